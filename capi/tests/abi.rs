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
