//! The C ABI called from Rust (the full end-to-end test is the C program in tests/c, run by
//! scripts/test-bindings): statuses, per-thread messages, out-pointer resets, struct sizes, on a
//! committed step-graph fixture (its tokenizer is a placeholder, so sessions fail with a typed error).

use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;
use std::ptr;

use onestep_capi::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../runtime/tests/fixtures/step_q8_tied_f16kv.onnx")
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(onestep_last_error()) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn load_info_and_typed_errors() {
    let path = CString::new(fixture().to_str().unwrap()).unwrap();
    let mut model: *mut OnestepModel = ptr::null_mut();
    unsafe {
        assert_eq!(
            onestep_model_load(path.as_ptr(), &mut model),
            OnestepStatus::Ok
        );
        assert!(!model.is_null());
        let mut info: OnestepModelInfo = std::mem::zeroed();
        info.struct_size = std::mem::size_of::<OnestepModelInfo>() as u32;
        assert_eq!(onestep_model_info(model, &mut info), OnestepStatus::Ok);
        assert_eq!(
            (info.num_layers, info.vocab_size, info.max_cache),
            (2, 80, 24)
        );
        let arch = CStr::from_ptr(onestep_model_architecture(model));
        assert_eq!(arch.to_str().unwrap(), "llama");

        // Too small a struct is refused, not overrun.
        info.struct_size = 4;
        assert_eq!(
            onestep_model_info(model, &mut info),
            OnestepStatus::InvalidArgument
        );
        assert!(last_error().contains("struct_size"), "{}", last_error());

        // The placeholder tokenizer: a typed error naming the tokenizer; the out pointer is NULL.
        let mut session: *mut OnestepSession = ptr::dangling_mut::<OnestepSession>();
        assert_eq!(
            onestep_session_new(model, &mut session),
            OnestepStatus::Tokenizer
        );
        assert!(session.is_null());
        assert!(last_error().contains("tokenizer"), "{}", last_error());

        // From memory: the whole file loads, a truncated copy does not.
        let bytes = std::fs::read(fixture()).unwrap();
        let mut m2: *mut OnestepModel = ptr::null_mut();
        let name = c"fixture".as_ptr();
        assert_eq!(
            onestep_model_load_from_memory(bytes.as_ptr(), bytes.len(), name, &mut m2),
            OnestepStatus::Ok
        );
        onestep_model_free(m2);
        m2 = ptr::dangling_mut::<OnestepModel>();
        assert_eq!(
            onestep_model_load_from_memory(bytes.as_ptr(), bytes.len() - 7, name, &mut m2),
            OnestepStatus::InvalidModel
        );
        assert!(m2.is_null());
        assert!(last_error().contains("fixture"), "{}", last_error());
        onestep_model_free(model);
    }
}

#[test]
fn null_pointers_and_bad_strings() {
    let mut model: *mut OnestepModel = ptr::null_mut();
    unsafe {
        assert_eq!(
            onestep_model_load(ptr::null(), &mut model),
            OnestepStatus::NullPointer
        );
        assert_eq!(last_error(), "path is NULL");
        let bad = [0xffu8, 0xfe, 0];
        assert_eq!(
            onestep_model_load(bad.as_ptr() as *const c_char, &mut model),
            OnestepStatus::InvalidUtf8
        );
        assert_eq!(
            onestep_session_generate(
                ptr::null_mut(),
                ptr::null(),
                ptr::null(),
                None,
                ptr::null_mut(),
                ptr::null_mut()
            ),
            OnestepStatus::NullPointer
        );
        assert_eq!(
            onestep_session_reset(ptr::null_mut()),
            OnestepStatus::NullPointer
        );
        onestep_session_cancel(ptr::null());
        onestep_model_free(ptr::null_mut());
        onestep_string_free(ptr::null_mut());
        let missing = c"/nonexistent/m.onnx";
        assert_eq!(
            onestep_model_load(missing.as_ptr(), &mut model),
            OnestepStatus::Io
        );
        assert!(last_error().contains("m.onnx"));
        assert_eq!(
            CStr::from_ptr(onestep_status_name(5)).to_str().unwrap(),
            "invalid_model"
        );
        assert_eq!(
            CStr::from_ptr(onestep_status_name(-3)).to_str().unwrap(),
            "unknown"
        );
    }
}

#[test]
fn last_error_is_per_thread() {
    unsafe {
        let mut model: *mut OnestepModel = ptr::null_mut();
        assert_eq!(
            onestep_model_load(ptr::null(), &mut model),
            OnestepStatus::NullPointer
        );
    }
    let other = std::thread::spawn(last_error).join().unwrap();
    assert_eq!(other, "");
    assert_eq!(last_error(), "path is NULL");
}

fn device_of(model: *const OnestepModel) -> String {
    unsafe { CStr::from_ptr(onestep_model_device(model)) }
        .to_string_lossy()
        .into_owned()
}

#[test]
fn load_options_choose_the_device_and_the_kv_cache() {
    let path = CString::new(fixture().to_str().unwrap()).unwrap();
    let bytes = std::fs::read(fixture()).unwrap();
    unsafe {
        let mut o: OnestepLoadOptions = std::mem::zeroed();
        o.struct_size = std::mem::size_of::<OnestepLoadOptions>() as u32;
        assert_eq!(onestep_load_options_default(&mut o), OnestepStatus::Ok);
        assert!(o.device.is_null() && o.gpu_cache_budget.is_null() && o.kv_page_rows == 0);
        assert!(o.precision.is_null() && o.settings.is_null());

        // NULL options and the defaults: the CPU.
        let mut model: *mut OnestepModel = ptr::null_mut();
        assert_eq!(
            onestep_model_load_with(path.as_ptr(), ptr::null(), &mut model),
            OnestepStatus::Ok
        );
        assert_eq!(device_of(model), "cpu");
        assert!(onestep_model_device_note(model).is_null());
        onestep_model_free(model);

        // Every field set, from memory.
        o.device = c"cpu".as_ptr();
        o.gpu_cache_budget = c"50%".as_ptr();
        o.kv_page_rows = 4;
        o.precision = c"exact".as_ptr();
        o.settings = c"profile=on, precision=exact".as_ptr();
        let mut m2: *mut OnestepModel = ptr::null_mut();
        assert_eq!(
            onestep_model_load_from_memory_with(
                bytes.as_ptr(),
                bytes.len(),
                c"fixture".as_ptr(),
                &o,
                &mut m2
            ),
            OnestepStatus::Ok
        );
        assert_eq!(device_of(m2), "cpu");
        onestep_model_free(m2);

        // Strings that do not parse: InvalidArgument naming the value; the out pointer is NULL.
        for (field, value) in [
            ("device", c"tpu"),
            ("budget", c"lots"),
            ("backend", c"glide"),
            ("precision", c"sloppy"),
            ("settings", c"profile=on,colour=blue"),
            ("settings", c"profile=sometimes"),
        ] {
            let mut bad = o;
            match field {
                "device" => bad.device = value.as_ptr(),
                "budget" => bad.gpu_cache_budget = value.as_ptr(),
                "precision" => bad.precision = value.as_ptr(),
                "settings" => bad.settings = value.as_ptr(),
                _ => bad.gpu_backend = value.as_ptr(),
            }
            let mut m = ptr::dangling_mut::<OnestepModel>();
            assert_eq!(
                onestep_model_load_with(path.as_ptr(), &bad, &mut m),
                OnestepStatus::InvalidArgument,
                "{field}"
            );
            assert!(m.is_null());
            let v = value.to_str().unwrap();
            let v = v.rsplit(',').next().unwrap().split('=').next().unwrap();
            assert!(last_error().contains(v), "{field}: {}", last_error());
        }
        // A caller built before `settings` existed: its smaller struct loads, without settings.
        let mut old = o;
        old.struct_size = std::mem::offset_of!(OnestepLoadOptions, settings) as u32;
        old.settings = c"colour=blue".as_ptr();
        let mut m3: *mut OnestepModel = ptr::null_mut();
        assert_eq!(
            onestep_model_load_with(path.as_ptr(), &old, &mut m3),
            OnestepStatus::Ok,
            "{}",
            last_error()
        );
        onestep_model_free(m3);
        let mut small = o;
        small.struct_size = 8;
        let mut m = ptr::null_mut();
        assert_eq!(
            onestep_model_load_with(path.as_ptr(), &small, &mut m),
            OnestepStatus::InvalidArgument
        );
        assert!(last_error().contains("struct_size"), "{}", last_error());

        // A GPU: the adapter (lavapipe in CI) or, where there is none, the Device status.
        o.device = c"gpu".as_ptr();
        o.gpu_cache_budget = ptr::null();
        let mut g: *mut OnestepModel = ptr::null_mut();
        match onestep_model_load_with(path.as_ptr(), &o, &mut g) {
            OnestepStatus::Ok => {
                assert_ne!(device_of(g), "cpu");
                assert!(onestep_model_device_note(g).is_null());
                onestep_model_free(g);
                // `auto` times both devices (a software adapter too, when the settings allow it) and
                // says what it measured.
                let dir =
                    std::env::temp_dir().join(format!("onestep-capi-auto-{}", std::process::id()));
                let settings = CString::new(format!(
                    "gpu_trial_software=on, gpu_pipeline_cache={}",
                    dir.display()
                ))
                .unwrap();
                o.device = c"auto".as_ptr();
                o.settings = settings.as_ptr();
                assert_eq!(
                    onestep_model_load_with(path.as_ptr(), &o, &mut g),
                    OnestepStatus::Ok,
                    "{}",
                    last_error()
                );
                let note = onestep_model_device_note(g);
                assert!(!note.is_null());
                let note = CStr::from_ptr(note).to_str().unwrap().to_string();
                assert!(
                    note.contains("auto chose the") && note.contains("ms on the CPU"),
                    "{note}"
                );
                onestep_model_free(g);
                let _ = std::fs::remove_dir_all(&dir);
            }
            OnestepStatus::Device => {
                assert!(g.is_null());
                assert!(
                    std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
                    "no GPU: {}",
                    last_error()
                );
                // `auto` falls back to the CPU and says why.
                o.device = c"auto".as_ptr();
                assert_eq!(
                    onestep_model_load_with(path.as_ptr(), &o, &mut g),
                    OnestepStatus::Ok
                );
                assert_eq!(device_of(g), "cpu");
                assert!(!onestep_model_device_note(g).is_null());
                onestep_model_free(g);
            }
            s => panic!("{s:?}: {}", last_error()),
        }
    }
}
