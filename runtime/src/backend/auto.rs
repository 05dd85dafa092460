//! Which backend runs a model: the one `--device` forces, or, for `auto`, the faster one as measured.
//!
//! A GPU is not faster than the CPU because it exists: on many phones Vulkan decodes slower than the
//! CPU cores beside it, and a software adapter always does. So `auto`, on the first load of a model on
//! a device, runs a few decode steps on the CPU and then on the GPU ([`time_decode`]) and keeps the
//! faster. The decision is written beside the pipeline cache
//! ([`GpuOptions::pipeline_cache`](super::gpu::GpuOptions::pipeline_cache)), one small text file per
//! [`DecisionKey`] — adapter, driver, model file, CPU precision and threads, GPU tuning, KV cache
//! options, library version — so later loads of the same model on the same device read it and open no device they do
//! not use. Without a folder nothing is remembered and every load measures.
//!
//! What the note ([`Model::device_note`](crate::Model::device_note)) says, and when:
//! - no adapter, or a device that cannot take the model (it does not fit, a step no kernel takes):
//!   the CPU, and why (not remembered: binding is where those show, and it is redone on the next load);
//! - a software adapter: the CPU, untried (unless [`GpuOptions::trial_software`](super::gpu::GpuOptions::trial_software));
//! - a GPU that fails during the trial (device lost, validation error, out of memory): the CPU, and why;
//!   remembered like a measurement, so a driver that fails is not tried at every start;
//! - otherwise both times and the choice, and whether they were measured now or read back.
//!
//! Only a device failure ([`Error::is_device`]) sends `auto` to the CPU: an internal error or a bad
//! model is returned, so a bug never hides behind a fallback.

use std::path::Path;
use std::time::Instant;

use super::cpu::exec::CpuBackend;
use super::gpu::context::{AdapterId, Probed};
use super::gpu::DeviceRequest;
use super::{Backend, StepCall};
use crate::contract::{self, ModelInfo};
use crate::error::{Error, Result};
use crate::kv::PagedCache;
use crate::load::LoadOptions;
use crate::plan::Plan;
use crate::step::StepSampling;

/// Decode steps run before the timed ones (first-use costs: pipeline creation, page faults, caches).
const WARM: usize = 2;
/// Decode steps timed on each backend; their median decides.
const TIMED: usize = 5;

/// The backend for `plan` under `opts`, and the note saying why `auto` chose it. `model` is the
/// model file's bytes (its fingerprint keys the remembered decision); `probed`, the adapter the
/// planning picked for `opts.device` (`None`: picked here).
pub(crate) fn choose(
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
    model: &[u8],
    probed: Option<Probed>,
) -> Result<(Box<dyn Backend>, Option<String>)> {
    let cpu = || -> Result<Box<dyn Backend>> { Ok(Box::new(CpuBackend::new(plan, opts)?)) };
    match opts.device {
        DeviceRequest::Cpu => return Ok((cpu()?, None)),
        DeviceRequest::Gpu(_) => {
            let g = super::gpu::backend::bind(plan, info, opts, probed.as_ref())?;
            return Ok((Box::new(g), None));
        }
        DeviceRequest::Auto => {}
    }
    let probed = match probed {
        Some(p) => p,
        None => match or_cpu(Probed::new(&opts.device, opts.backend))? {
            Ok(p) => p,
            Err(note) => return Ok((cpu()?, Some(note))),
        },
    };
    let adapter = &probed.id;
    if adapter.is_software() && !opts.gpu.trial_software {
        return Ok((
            cpu()?,
            Some(format!(
                "{} is a software adapter; the CPU backend is faster (use --device gpu to force it)",
                adapter.name
            )),
        ));
    }
    let key = DecisionKey::new(adapter, opts, model);
    let file = opts
        .gpu
        .pipeline_cache
        .as_ref()
        .map(|dir| dir.join(key.file_name()));
    if let Some((f, d)) = file
        .as_deref()
        .and_then(|f| Some((f, Decision::read(f, &key)?)))
    {
        let note = format!("{} (remembered: {})", d.describe(adapter), f.display());
        if !d.gpu {
            return Ok((cpu()?, Some(note)));
        }
        return match or_cpu(super::gpu::backend::bind(plan, info, opts, Some(&probed)))? {
            Ok(g) => Ok((Box::new(g), Some(note))),
            Err(why) => Ok((cpu()?, Some(why))),
        };
    }
    let gpu = match or_cpu(super::gpu::backend::bind(plan, info, opts, Some(&probed)))? {
        Ok(g) => g,
        Err(why) => return Ok((cpu()?, Some(why))),
    };
    let d = decide(&*cpu()?, &gpu, plan, info, opts)?;
    let kept = match &file {
        Some(f) => match d.write(f, &key) {
            Ok(()) => format!("remembered in {}", f.display()),
            Err(e) => format!("not remembered: {}: {e}", f.display()),
        },
        None => "not remembered: no pipeline cache folder".to_string(),
    };
    let note = format!("{} (measured now; {kept})", d.describe(adapter));
    if d.gpu {
        Ok((Box::new(gpu), Some(note)))
    } else {
        Ok((cpu()?, Some(note)))
    }
}

/// A device failure ([`Error::is_device`]) becomes `Err(why)`, for the CPU to take over; any other
/// error is returned.
fn or_cpu<T>(r: Result<T>) -> Result<std::result::Result<T, String>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) if e.is_device() => Ok(Err(e.to_string())),
        Err(e) => Err(e),
    }
}

/// Times a decode step on `cpu`, then on `gpu` (the CPU first: the GPU's last step, run ahead, may
/// still be running when its trial ends — on a software adapter, on the CPU's cores); the faster is
/// chosen. A device failure of the GPU during its steps chooses the CPU; any other error is returned.
fn decide(
    cpu: &dyn Backend,
    gpu: &dyn Backend,
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
) -> Result<Decision> {
    let cpu_ms = time_decode(cpu, plan, info, opts)?;
    let gpu_ms = or_cpu(time_decode(gpu, plan, info, opts))?;
    Ok(Decision {
        gpu: matches!(gpu_ms, Ok(g) if g < cpu_ms),
        cpu_ms,
        gpu_ms,
    })
}

/// The median milliseconds of a greedy decode step on `backend`: a fresh sequence from position 0,
/// each step fed the token the one before chose and reading back only that token, as a chat does;
/// [`WARM`] steps untimed, then [`TIMED`] (fewer when the cache is smaller).
fn time_decode(
    backend: &dyn Backend,
    plan: &Plan,
    info: &ModelInfo,
    opts: &LoadOptions,
) -> Result<f64> {
    let shapes: Vec<_> = plan
        .caches
        .iter()
        .map(|c| (c.dtype, c.shape.clone()))
        .collect();
    let mut host = PagedCache::new(&shapes, opts.kv.page_rows.max(1))?;
    let mut seq = backend.new_seq(plan, &shapes, &opts.kv, info.max_chunk)?;
    let want = [plan.outputs[contract::NEXT_TOKEN]];
    let steps = (WARM + TIMED).min(info.max_cache);
    let first_timed = WARM.min(steps.saturating_sub(1));
    let mut token = 0u32;
    let mut ms = Vec::with_capacity(TIMED);
    for position in 0..steps {
        let t0 = Instant::now();
        let call = StepCall {
            plan,
            ids: &[token],
            position,
            sampling: &StepSampling::GREEDY,
            want: &want,
            max_cache: info.max_cache,
            held: &Default::default(),
        };
        let env = backend.step(&call, &mut seq, &mut host)?;
        token = crate::step::outputs(plan, info, &env, false)?.next_token;
        if position >= first_timed {
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    ms.sort_by(f64::total_cmp);
    ms.get(ms.len() / 2)
        .copied()
        .ok_or_else(|| Error::internal("auto's trial timed no step"))
}

/// What a remembered decision is valid for: everything that changes which backend is faster.
pub(crate) struct DecisionKey(String);

impl DecisionKey {
    fn new(adapter: &AdapterId, opts: &LoadOptions, model: &[u8]) -> DecisionKey {
        // The CPU pool's size (`backend/cpu/pool.rs`: rayon's, which the CLI's --threads sets).
        let threads = rayon::current_num_threads();
        let tuning = super::gpu::GpuOptions {
            pipeline_cache: None,
            ..opts.gpu.clone()
        };
        let key = format!(
            "onestep {}; adapter {} ({}, {}); driver {}; model {:016x} ({} bytes); \
             cpu {:?} x{threads}; gpu {tuning:?}; kv {:?}",
            env!("CARGO_PKG_VERSION"),
            adapter.name,
            adapter.backend,
            adapter.device_type,
            adapter.driver,
            fingerprint(model),
            model.len(),
            opts.precision,
            opts.kv,
        );
        DecisionKey(key.replace(['\n', '\r'], " "))
    }

    fn file_name(&self) -> String {
        format!(
            "auto-device-{:016x}.txt",
            fnv1a(FNV_OFFSET, self.0.as_bytes())
        )
    }
}

/// `auto`'s decision: which backend, and the times (or the GPU's failure) it rests on.
#[derive(Debug, Clone, PartialEq)]
struct Decision {
    gpu: bool,
    cpu_ms: f64,
    gpu_ms: std::result::Result<f64, String>,
}

impl Decision {
    fn describe(&self, adapter: &AdapterId) -> String {
        let name = format!("{} ({})", adapter.name, adapter.backend);
        match &self.gpu_ms {
            Err(why) => format!("auto chose the CPU: the GPU {name} failed during the trial ({why})"),
            Ok(g) => format!(
                "auto chose the {}: a decode step took {g:.2} ms on the GPU {name} and {:.2} ms on the CPU",
                if self.gpu { "GPU" } else { "CPU" },
                self.cpu_ms
            ),
        }
    }

    /// The decision in `file` when it was made for `key` (anything else, a damaged file included,
    /// is no decision: `auto` measures again and rewrites it).
    fn read(file: &Path, key: &DecisionKey) -> Option<Decision> {
        let text = std::fs::read_to_string(file).ok()?;
        let mut lines = text.lines();
        if lines.next()?.strip_prefix("key ")? != key.0 {
            return None;
        }
        let gpu = match lines.next()?.strip_prefix("device ")? {
            "gpu" => true,
            "cpu" => false,
            _ => return None,
        };
        let cpu_ms = lines.next()?.strip_prefix("cpu_ms ")?.parse().ok()?;
        let g = lines.next()?;
        let gpu_ms = match (g.strip_prefix("gpu_ms "), g.strip_prefix("gpu_failed ")) {
            (Some(ms), _) => Ok(ms.parse().ok()?),
            (_, Some(why)) => Err(why.to_string()),
            _ => return None,
        };
        Some(Decision {
            gpu,
            cpu_ms,
            gpu_ms,
        })
    }

    /// Writes the decision to `file` (through a temporary file renamed over it, so a reader never sees
    /// half of one).
    fn write(&self, file: &Path, key: &DecisionKey) -> std::io::Result<()> {
        let gpu = match &self.gpu_ms {
            Ok(ms) => format!("gpu_ms {ms}"),
            Err(why) => format!("gpu_failed {}", why.replace(['\n', '\r'], " ")),
        };
        let text = format!(
            "key {}\ndevice {}\ncpu_ms {}\n{gpu}\n",
            key.0,
            if self.gpu { "gpu" } else { "cpu" },
            self.cpu_ms
        );
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, file)
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a, 64 bits, continuing from `h`.
fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Bytes of each window [`fingerprint`] hashes.
const WINDOW: usize = 4096;
/// Windows spread over the file.
const WINDOWS: usize = 256;

/// A fingerprint of a model file that costs no read of the whole file: its length, its first and
/// last 64 KiB (the ONNX header and the metadata: exporter settings, tokenizer) and [`WINDOWS`]
/// windows spread evenly over the weights. Two exports of different models, or of one model at
/// different settings, differ in all of them; a file edited in place outside every window would be
/// taken for the same (at worst, `auto` keeps a decision that was measured on the old file).
fn fingerprint(model: &[u8]) -> u64 {
    let mut h = fnv1a(FNV_OFFSET, &(model.len() as u64).to_le_bytes());
    let edge = model.len().min(16 * WINDOW);
    h = fnv1a(h, &model[..edge]);
    h = fnv1a(h, &model[model.len() - edge..]);
    if model.len() > WINDOW {
        let stride = (model.len() - WINDOW) / WINDOWS;
        for i in 0..WINDOWS {
            let at = i * stride;
            h = fnv1a(h, &model[at..at + WINDOW]);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::SeqState;
    use crate::graph::DType;
    use crate::kv::{KvOptions, KvStats};
    use crate::tensor::Tensor;

    /// The CPU backend, failing with `fail` from its `after`-th step on (a GPU lost during the trial),
    /// and `delay_ms` slower a step.
    struct Flaky {
        cpu: CpuBackend,
        after: usize,
        fail: fn() -> Error,
        delay_ms: u64,
        steps: std::sync::atomic::AtomicUsize,
    }

    impl Backend for Flaky {
        fn new_seq(
            &self,
            plan: &Plan,
            shapes: &[(DType, Vec<usize>)],
            kv: &KvOptions,
            max_chunk: usize,
        ) -> Result<SeqState> {
            self.cpu.new_seq(plan, shapes, kv, max_chunk)
        }
        fn step(
            &self,
            call: &StepCall<'_>,
            seq: &mut SeqState,
            host: &mut PagedCache,
        ) -> Result<Vec<Option<Tensor>>> {
            let n = self
                .steps
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n >= self.after {
                return Err((self.fail)());
            }
            std::thread::sleep(std::time::Duration::from_millis(self.delay_ms));
            self.cpu.step(call, seq, host)
        }
        fn kv_stats(&self, seq: &SeqState) -> KvStats {
            self.cpu.kv_stats(seq)
        }
        fn profile(&self) -> Vec<(String, u64, f64)> {
            Vec::new()
        }
        fn device(&self) -> String {
            "flaky".into()
        }
    }

    fn fixture() -> (Plan, ModelInfo) {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/step_q8_tied_f16kv.onnx"
        );
        let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
        let graph = crate::onnx::read::decode_model(bytes, path).unwrap();
        let info = crate::load::check(&graph).unwrap();
        (Plan::new(graph).unwrap(), info)
    }

    /// The trial times both backends and keeps the faster; a GPU lost during its steps leaves the
    /// model on the CPU with the reason; a bug in either is returned, not decided around.
    #[test]
    fn the_trial_keeps_the_faster_and_survives_a_lost_gpu() {
        let (plan, info) = fixture();
        let opts = LoadOptions::cpu();
        let flaky = |after, fail, delay_ms| Flaky {
            cpu: CpuBackend::new(&plan, &opts).unwrap(),
            after,
            fail,
            delay_ms,
            steps: Default::default(),
        };
        let lost = || Error::device(crate::error::DeviceFault::Lost, "the driver reset");
        let bug = || Error::internal("step 3 has no GPU weights");
        let cpu = CpuBackend::new(&plan, &opts).unwrap();
        let d = decide(&cpu, &flaky(99, lost, 20), &plan, &info, &opts).unwrap();
        assert!(!d.gpu && d.gpu_ms.as_ref().unwrap() > &d.cpu_ms, "{d:?}");
        assert!(*d.gpu_ms.as_ref().unwrap() >= 20.0, "{d:?}");
        let slow_cpu = flaky(99, lost, 20);
        let d = decide(&slow_cpu, &cpu, &plan, &info, &opts).unwrap();
        assert!(d.gpu && d.cpu_ms >= 20.0, "{d:?}");
        let d = decide(&cpu, &flaky(3, lost, 0), &plan, &info, &opts).unwrap();
        assert!(!d.gpu, "{d:?}");
        let why = d.gpu_ms.unwrap_err();
        assert!(why.contains("the driver reset"), "{why}");
        assert!(matches!(
            decide(&cpu, &flaky(3, bug, 0), &plan, &info, &opts),
            Err(Error::Internal(_))
        ));
    }

    /// `auto` runs on the CPU after a device failure, never after an internal error or a bad model.
    #[test]
    fn auto_falls_back_only_for_device_failures() {
        use crate::error::DeviceFault;
        let dev = || {
            Err::<(), _>(Error::device(
                DeviceFault::OutOfMemory,
                "weights of `lm_head`",
            ))
        };
        let note = or_cpu(dev()).unwrap().unwrap_err();
        assert!(
            note.contains("out of memory") && note.contains("lm_head"),
            "{note}"
        );
        let bug = || Err::<(), _>(Error::internal("step 3 has no GPU weights"));
        assert!(matches!(or_cpu(bug()), Err(Error::Internal(_))));
        let bad = || Err::<(), _>(Error::node("n", "MatMul", "shapes"));
        assert!(matches!(or_cpu(bad()), Err(Error::Node { .. })));
        assert_eq!(or_cpu(Ok(7)).unwrap(), Ok(7));
    }

    /// A decision reads back as written, for its key only; a damaged file is no decision.
    #[test]
    fn decisions_round_trip_for_their_key_only() {
        let dir = std::env::temp_dir().join(format!("onestep-auto-{}", std::process::id()));
        let adapter = AdapterId {
            name: "Test GPU".into(),
            backend: "Vulkan".into(),
            device_type: "IntegratedGpu".into(),
            driver: "test 1.0".into(),
        };
        let opts = LoadOptions::default();
        let key = DecisionKey::new(&adapter, &opts, b"model one");
        let other = DecisionKey::new(&adapter, &opts, b"model two");
        let file = dir.join(key.file_name());
        assert_ne!(key.file_name(), other.file_name());
        for d in [
            Decision {
                gpu: true,
                cpu_ms: 9.5,
                gpu_ms: Ok(3.25),
            },
            Decision {
                gpu: false,
                cpu_ms: 9.5,
                gpu_ms: Err("device lost:\nreset".into()),
            },
        ] {
            d.write(&file, &key).unwrap();
            let back = Decision::read(&file, &key).unwrap();
            assert_eq!(back.gpu, d.gpu);
            assert_eq!(back.cpu_ms, d.cpu_ms);
            match (&back.gpu_ms, &d.gpu_ms) {
                (Ok(a), Ok(b)) => assert_eq!(a, b),
                (Err(a), Err(_)) => assert_eq!(a, "device lost: reset"),
                _ => panic!("{back:?} vs {d:?}"),
            }
            assert!(Decision::read(&file, &other).is_none());
        }
        assert!(
            Decision::describe(&Decision::read(&file, &key).unwrap(), &adapter)
                .contains("failed during the trial (device lost: reset)")
        );
        let text = std::fs::read_to_string(&file).unwrap();
        std::fs::write(&file, text.replace("device cpu", "device maybe")).unwrap();
        assert!(Decision::read(&file, &key).is_none());
        std::fs::write(&file, &text[..text.len() / 2]).unwrap();
        assert!(Decision::read(&file, &key).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The fingerprint sees the length, the edges and the spread windows of a file.
    #[test]
    fn fingerprint_sees_every_part_it_samples() {
        let base: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 + i / 977) as u8).collect();
        let f = fingerprint(&base);
        assert_eq!(f, fingerprint(&base.clone()));
        assert_ne!(f, fingerprint(&base[..base.len() - 1]));
        let stride = (base.len() - WINDOW) / WINDOWS;
        for at in [0, base.len() - 1, 100 * stride + 17, 255 * stride] {
            let mut m = base.clone();
            m[at] ^= 1;
            assert_ne!(f, fingerprint(&m), "a change at {at}");
        }
        assert_ne!(fingerprint(b""), fingerprint(b"x"));
    }
}
