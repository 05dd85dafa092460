//! Device selection, the wgpu device and queue, shader compilation with an on-disk pipeline cache, and
//! buffer helpers. Every wgpu validation error and device loss is captured and turned into
//! [`Error::Device`] (or [`Error::Internal`] for a broken invariant) — nothing panics through wgpu's default error handler.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::options::GpuOptions;
use crate::error::{DeviceFault, Error, Result};

/// Which device runs the model (`--device auto|cpu|gpu|gpu:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceRequest {
    /// The GPU when one is usable, else the CPU (and the CPU when the GPU fails to plan or run out of memory).
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// A GPU: the best one (`None`) or adapter number N of `onestep devices`.
    Gpu(Option<usize>),
}

impl FromStr for DeviceRequest {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "gpu" => Ok(Self::Gpu(None)),
            _ => match s.strip_prefix("gpu:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(Self::Gpu(Some(n))),
                _ => Err(Error::InvalidArgument(format!(
                    "device `{s}`: expected auto, cpu, gpu or gpu:N"
                ))),
            },
        }
    }
}

/// Which wgpu backends may be used (`--gpu-backend`; the CLI also reads `WGPU_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendFilter {
    /// Every backend wgpu was built with.
    #[default]
    Any,
    /// Vulkan.
    Vulkan,
    /// Metal.
    Metal,
    /// Direct3D 12.
    Dx12,
    /// OpenGL / GLES.
    Gl,
}

impl FromStr for BackendFilter {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "any" | "auto" => Ok(Self::Any),
            "vulkan" | "vk" => Ok(Self::Vulkan),
            "metal" => Ok(Self::Metal),
            "dx12" | "d3d12" => Ok(Self::Dx12),
            "gl" | "gles" | "opengl" => Ok(Self::Gl),
            _ => Err(Error::InvalidArgument(format!(
                "GPU backend `{s}`: expected vulkan, metal, dx12 or gl"
            ))),
        }
    }
}

impl BackendFilter {
    fn backends(self) -> wgpu::Backends {
        match self {
            Self::Any => wgpu::Backends::all(),
            Self::Vulkan => wgpu::Backends::VULKAN,
            Self::Metal => wgpu::Backends::METAL,
            Self::Dx12 => wgpu::Backends::DX12,
            Self::Gl => wgpu::Backends::GL,
        }
    }
}

/// What the chosen adapter is and offers.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    /// Adapter name (`NVIDIA H200`, `llvmpipe (LLVM 15.0.6, 256 bits)`).
    pub name: String,
    /// Backend (`Vulkan`, `Metal`, ...).
    pub backend: String,
    /// Device type (`DiscreteGpu`, `Cpu`, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
    /// Whether `shader-f16` is available (kernels do not need it: f16 is unpacked from u32 words).
    pub shader_f16: bool,
    /// Whether subgroup operations are available.
    pub subgroups: bool,
    /// GPU timestamps inside compute passes were enabled (only when profiling asked for them).
    pub timestamps: bool,
    /// The largest storage binding the kernels may use (bytes; tensors beyond it are split or refused).
    pub max_binding: u64,
    /// The largest buffer.
    pub max_buffer: u64,
    /// Milliseconds to create the device.
    pub init_ms: f64,
    /// Milliseconds spent compiling pipelines (cold: no on-disk cache; warm: cache hit).
    pub compile_ms: f64,
    /// Whether an on-disk pipeline cache was found and used.
    pub pipeline_cache_hit: bool,
}

impl GpuInfo {
    /// A software adapter (lavapipe, WARP, SwiftShader): the GPU API emulated on the CPU.
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

/// One wgpu device and queue shared by every model loaded on it.
pub struct GpuContext {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    info: Mutex<GpuInfo>,
    /// Binding size limit the planner works with (the adapter's, or lower in tests).
    pub binding_limit: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_groups: u32,
    /// The adapter's smallest subgroup size where the device has subgroup operations, else 0.
    pub subgroup_min: u32,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    cache: Option<(wgpu::PipelineCache, PathBuf)>,
    pipelines: Mutex<HashMap<String, Arc<Kernel>>>,
    /// How the executor and the kernels run on this device (fixed when it is opened).
    pub options: GpuOptions,
    /// Per-kernel times asked for ([`crate::LoadOptions::profile`]): timestamps were requested.
    pub profiling: bool,
}

/// How a kernel binds a storage buffer (bindings 1.. in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bind {
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    Write,
}

/// A compiled kernel: its pipeline and bind-group layout.
#[derive(Debug)]
pub struct Kernel {
    /// The pipeline.
    pub pipeline: wgpu::ComputePipeline,
    /// Layout of `@group(0)`.
    pub layout: wgpu::BindGroupLayout,
    /// `family/entry/constants`, for errors and profiles.
    pub name: String,
}

impl GpuContext {
    /// A bind group for `kernel`: the parameter block range `params` then `bufs` at bindings 1...
    pub fn bind(
        &self,
        kernel: &Kernel,
        params: (&wgpu::Buffer, u64),
        bufs: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let at: Vec<(&wgpu::Buffer, u64)> = bufs.iter().map(|b| (*b, 0)).collect();
        self.bind_at(kernel, params, &at)
    }

    /// [`GpuContext::bind`] with each buffer bound from a byte offset to its end (offsets are multiples
    /// of the adapter's `min_storage_buffer_offset_alignment`).
    pub fn bind_at(
        &self,
        kernel: &Kernel,
        params: (&wgpu::Buffer, u64),
        bufs: &[(&wgpu::Buffer, u64)],
    ) -> wgpu::BindGroup {
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                buffer: params.0,
                offset: params.1,
                size: wgpu::BufferSize::new(256),
            }),
        }];
        for (i, (b, off)) in bufs.iter().enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: i as u32 + 1,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: b,
                    offset: *off,
                    size: None,
                }),
            });
        }
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&kernel.name),
            layout: &kernel.layout,
            entries: &entries,
        })
    }
}

impl std::fmt::Debug for GpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuContext")
            .field("info", &self.info())
            .finish()
    }
}

/// Lists the adapters wgpu finds for `filter` (index, name, backend, type).
pub fn list_adapters(filter: BackendFilter) -> Vec<(usize, String, String, String)> {
    let instance = instance(filter);
    pollster::block_on(instance.enumerate_adapters(filter.backends()))
        .into_iter()
        .enumerate()
        .map(|(i, a)| {
            let info = a.get_info();
            (
                i,
                info.name,
                format!("{:?}", info.backend),
                format!("{:?}", info.device_type),
            )
        })
        .collect()
}

fn instance(filter: BackendFilter) -> wgpu::Instance {
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle();
    desc.backends = filter.backends();
    wgpu::Instance::new(desc)
}

/// The adapter `req` names among those of `filter` (the high-performance one for `auto` and `gpu`).
fn pick_adapter(req: &DeviceRequest, filter: BackendFilter) -> Result<wgpu::Adapter> {
    let instance = instance(filter);
    match req {
        DeviceRequest::Cpu => Err(Error::InvalidArgument(
            "a GPU context for the CPU device".into(),
        )),
        DeviceRequest::Gpu(Some(n)) => {
            let all = pollster::block_on(instance.enumerate_adapters(filter.backends()));
            let count = all.len();
            all.into_iter().nth(*n).ok_or_else(|| {
                Error::device(
                    DeviceFault::NoAdapter,
                    format!("no adapter number {n} ({count} found)"),
                )
            })
        }
        _ => pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            force_fallback_adapter: false,
            compatible_surface: None,
            apply_limit_buckets: false,
        }))
        .map_err(|e| Error::device(DeviceFault::NoAdapter, format!("no GPU adapter: {e}"))),
    }
}

/// Who an adapter is (name, API, type, driver), as it is known before a device is opened on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterId {
    /// Adapter name.
    pub name: String,
    /// Backend (`Vulkan`, `Metal`, ...).
    pub backend: String,
    /// Device type (`DiscreteGpu`, `Cpu` for a software adapter, ...).
    pub device_type: String,
    /// Driver name and version.
    pub driver: String,
}

impl AdapterId {
    fn of(a: &wgpu::AdapterInfo) -> AdapterId {
        AdapterId {
            name: a.name.clone(),
            backend: format!("{:?}", a.backend),
            device_type: format!("{:?}", a.device_type),
            driver: format!("{} {}", a.driver, a.driver_info).trim().to_string(),
        }
    }

    /// A software adapter (lavapipe, WARP, SwiftShader): the GPU API emulated on the CPU.
    pub fn is_software(&self) -> bool {
        self.device_type == "Cpu"
    }
}

/// An adapter picked for a request and not opened yet: who it is, its limits, and the handle a device
/// is then opened on — so that a load picks its adapter (an instance and an enumeration, tens of
/// milliseconds) once, for the planner's bounds, `auto`'s choice and the device.
#[derive(Debug, Clone)]
pub(crate) struct Probed {
    adapter: wgpu::Adapter,
    /// Who it is.
    pub(crate) id: AdapterId,
}

impl Probed {
    /// The adapter [`GpuContext::with_options`] would open for `req`.
    pub(crate) fn new(req: &DeviceRequest, filter: BackendFilter) -> Result<Probed> {
        let adapter = pick_adapter(req, filter)?;
        let id = AdapterId::of(&adapter.get_info());
        Ok(Probed { adapter, id })
    }

    /// The limits a device opened on it gets (its own: see `GpuContext::open`).
    pub(crate) fn limits(&self) -> wgpu::Limits {
        self.adapter.limits()
    }
}

impl GpuContext {
    /// Opens a device. `DeviceRequest::Cpu` is an error here (the caller does not ask for a GPU then).
    pub fn new(req: &DeviceRequest, filter: BackendFilter) -> Result<Arc<GpuContext>> {
        Self::open(req, filter, None, GpuOptions::default(), false, None)
    }

    /// [`GpuContext::with_options`] on an adapter already picked for `req` (`None`: picked now).
    pub(crate) fn on_probed(
        probed: Option<&Probed>,
        req: &DeviceRequest,
        filter: BackendFilter,
        options: GpuOptions,
        profiling: bool,
    ) -> Result<Arc<GpuContext>> {
        Self::open(req, filter, None, options, profiling, probed)
    }

    /// Like [`GpuContext::new`], running with `options`; `profiling` asks for timestamp queries (where the
    /// adapter has them) so that every dispatch can be timed.
    pub fn with_options(
        req: &DeviceRequest,
        filter: BackendFilter,
        options: GpuOptions,
        profiling: bool,
    ) -> Result<Arc<GpuContext>> {
        Self::open(req, filter, None, options, profiling, None)
    }

    /// Like [`GpuContext::new`] with the storage-binding limit lowered to `limit` bytes (tests use this to
    /// exercise the split paths on any adapter).
    pub fn with_binding_limit(
        req: &DeviceRequest,
        filter: BackendFilter,
        limit: Option<u64>,
    ) -> Result<Arc<GpuContext>> {
        Self::open(req, filter, limit, GpuOptions::default(), false, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        req: &DeviceRequest,
        filter: BackendFilter,
        limit: Option<u64>,
        options: GpuOptions,
        profiling: bool,
        probed: Option<&Probed>,
    ) -> Result<Arc<GpuContext>> {
        let t0 = Instant::now();
        let adapter = match probed {
            Some(p) => p.adapter.clone(),
            None => pick_adapter(req, filter)?,
        };
        let ainfo = adapter.get_info();
        let features = adapter.features();
        let mut required = wgpu::Features::empty();
        for f in [
            wgpu::Features::SHADER_F16,
            wgpu::Features::PIPELINE_CACHE,
            wgpu::Features::SUBGROUP,
        ] {
            if features.contains(f) {
                required |= f;
            }
        }
        // Profiling: GPU timestamps around every dispatch where the adapter has them.
        let stamps =
            wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES;
        if profiling && features.contains(stamps) {
            required |= stamps;
        }
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("onestep"),
            required_features: required,
            required_limits: limits.clone(),
            experimental_features: wgpu::ExperimentalFeatures::disabled(),
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| {
            Error::device(
                DeviceFault::NoAdapter,
                format!("{}: cannot open the device: {e}", ainfo.name),
            )
        })?;
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let lost: Arc<Mutex<Option<String>>> = Arc::default();
        {
            let errors = errors.clone();
            device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
                if let Ok(mut v) = errors.lock() {
                    if v.len() < 16 {
                        v.push(e.to_string());
                    }
                }
            }));
            let lost = lost.clone();
            device.set_device_lost_callback(move |reason, msg| {
                if let Ok(mut l) = lost.lock() {
                    *l = Some(format!("{reason:?}: {msg}"));
                }
            });
        }
        let max_binding = limits
            .max_storage_buffer_binding_size
            .min(limits.max_buffer_size);
        let binding_limit = limit.unwrap_or(max_binding).min(max_binding).max(1024);
        let mut hit = false;
        let cache = if required.contains(wgpu::Features::PIPELINE_CACHE) {
            wgpu::util::pipeline_cache_key(&ainfo).and_then(|key| {
                let path = options.pipeline_cache.as_ref()?.join(key);
                let data = std::fs::read(&path).ok();
                hit = data.is_some();
                // SAFETY: the data is either absent or a file this function wrote from `get_data`;
                // `fallback: true` makes wgpu discard a cache the driver rejects.
                let c = unsafe {
                    device.create_pipeline_cache(&wgpu::PipelineCacheDescriptor {
                        label: Some("onestep pipelines"),
                        data: data.as_deref(),
                        fallback: true,
                    })
                };
                Some((c, path))
            })
        } else {
            None
        };
        let id = AdapterId::of(&ainfo);
        let info = GpuInfo {
            name: id.name,
            backend: id.backend,
            device_type: id.device_type,
            driver: id.driver,
            shader_f16: required.contains(wgpu::Features::SHADER_F16),
            subgroups: required.contains(wgpu::Features::SUBGROUP),
            timestamps: required.contains(stamps),
            max_binding,
            max_buffer: limits.max_buffer_size,
            init_ms: t0.elapsed().as_secs_f64() * 1e3,
            compile_ms: 0.0,
            pipeline_cache_hit: hit,
        };
        Ok(Arc::new(GpuContext {
            device,
            queue,
            info: Mutex::new(info),
            binding_limit,
            max_groups: limits.max_compute_workgroups_per_dimension,
            subgroup_min: if required.contains(wgpu::Features::SUBGROUP) {
                ainfo.subgroup_min_size.max(1)
            } else {
                0
            },
            errors,
            lost,
            cache,
            pipelines: Mutex::default(),
            options,
            profiling,
        }))
    }

    /// What the adapter is (a snapshot).
    pub fn info(&self) -> GpuInfo {
        self.info
            .lock()
            .map(|i| i.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    /// Fails with the first captured validation error or the device-lost reason, if any.
    pub fn check(&self, what: &str) -> Result<()> {
        if let Some(l) = self.lost.lock().ok().and_then(|l| l.clone()) {
            return Err(Error::device(
                DeviceFault::Lost,
                format!("{what}: device lost ({l})"),
            ));
        }
        let mut errs = self
            .errors
            .lock()
            .map_err(|_| Error::internal("error log poisoned"))?;
        if !errs.is_empty() {
            let msg = errs.join("; ");
            errs.clear();
            return Err(Error::device(
                DeviceFault::Rejected,
                format!("{what}: {msg}"),
            ));
        }
        Ok(())
    }

    /// The compute pipeline for `entry` of `source` (compiled once per context, keyed by `key`), with
    /// the explicit binding layout `binds` (binding 0 is always the uniform parameter block).
    pub fn pipeline(
        &self,
        key: &str,
        source: &str,
        entry: &str,
        binds: &[Bind],
        constants: &[(&str, f64)],
    ) -> Result<Arc<Kernel>> {
        let full_key = format!("{key}/{entry}/{constants:?}");
        if let Some(p) = self
            .pipelines
            .lock()
            .ok()
            .and_then(|m| m.get(&full_key).cloned())
        {
            return Ok(p);
        }
        let t0 = Instant::now();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(key),
                source: wgpu::ShaderSource::Wgsl(std::borrow::Cow::Owned(format!(
                    "{}\n{source}",
                    super::PRELUDE
                ))),
            });
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (i, b) in binds.iter().enumerate() {
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: i as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage {
                        read_only: *b == Bind::Read,
                    },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                count: None,
            });
        }
        let bgl = self
            .device
            .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                label: Some(key),
                entries: &entries,
            });
        let layout = self
            .device
            .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                label: Some(key),
                bind_group_layouts: &[Some(&bgl)],
                immediate_size: 0,
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&full_key),
                layout: Some(&layout),
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: self.cache.as_ref().map(|(c, _)| c),
            });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::device(
                DeviceFault::Rejected,
                format!("kernel `{key}` entry `{entry}`: {e}"),
            ));
        }
        if let Ok(mut i) = self.info.lock() {
            i.compile_ms += t0.elapsed().as_secs_f64() * 1e3;
        }
        let p = Arc::new(Kernel {
            pipeline,
            layout: bgl,
            name: full_key.clone(),
        });
        if let Ok(mut m) = self.pipelines.lock() {
            m.insert(full_key, p.clone());
        }
        Ok(p)
    }

    /// Writes the pipeline cache to disk (Vulkan), so the next start does not recompile shaders.
    pub fn save_pipeline_cache(&self) {
        if let Some((c, path)) = &self.cache {
            if let Some(data) = c.get_data() {
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let tmp = path.with_extension("tmp");
                if std::fs::write(&tmp, &data).is_ok() {
                    let _ = std::fs::rename(&tmp, path);
                }
            }
        }
    }

    /// A storage buffer holding `bytes` (padded to 4 bytes).
    pub fn buffer_with(&self, label: &str, bytes: &[u8]) -> Result<wgpu::Buffer> {
        let size = (bytes.len().max(4) as u64).next_multiple_of(4);
        let b = self.storage(label, size)?;
        let aligned = bytes.len() / 4 * 4;
        if aligned > 0 {
            self.queue.write_buffer(&b, 0, &bytes[..aligned]);
        }
        if aligned < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - aligned].copy_from_slice(&bytes[aligned..]);
            self.queue.write_buffer(&b, aligned as u64, &tail);
        }
        Ok(b)
    }

    /// A zeroed storage buffer of `size` bytes (rounded up to 4), checked against the binding limit.
    pub fn storage(&self, label: &str, size: u64) -> Result<wgpu::Buffer> {
        let size = size.max(4).next_multiple_of(4);
        if size > self.binding_limit {
            return Err(Error::device(
                DeviceFault::Limits,
                format!(
                    "`{label}` needs {size} bytes in one binding; this adapter allows {}",
                    self.binding_limit
                ),
            ));
        }
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let b = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_DST
                | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::device(
                DeviceFault::OutOfMemory,
                format!("out of GPU memory allocating `{label}` ({size} bytes): {e}"),
            ));
        }
        Ok(b)
    }

    /// A uniform buffer of `size` bytes.
    pub fn uniform(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(256),
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// A mappable buffer for reading results back.
    pub fn staging(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: size.max(4).next_multiple_of(4),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Seconds a read-back waits before calling the GPU stuck: 60, or 300 on a software adapter,
    /// where the GPU's work runs on the CPU's cores (lavapipe encodes a Whisper window in ~45 s).
    fn wait_limit_s(&self) -> u64 {
        match self.info.lock().map(|i| i.is_software()) {
            Ok(true) => 300,
            _ => 60,
        }
    }

    /// Maps `bufs` (each with the byte count to read) once submission `until` (or the last one) is done
    /// and copies them out.
    pub fn read_back(
        &self,
        bufs: &[(&wgpu::Buffer, usize)],
        until: Option<wgpu::SubmissionIndex>,
    ) -> Result<Vec<Vec<u8>>> {
        #[allow(clippy::type_complexity)]
        let pending: Arc<Mutex<Vec<Option<std::result::Result<(), String>>>>> =
            Arc::new(Mutex::new(vec![None; bufs.len()]));
        for (i, (b, n)) in bufs.iter().enumerate() {
            let p = pending.clone();
            let len = (*n as u64).max(4).next_multiple_of(4);
            b.map_async(wgpu::MapMode::Read, 0..len, move |r| {
                if let Ok(mut p) = p.lock() {
                    p[i] = Some(r.map_err(|e| e.to_string()));
                }
            });
        }
        // Another thread polling the same device may be the one that runs these callbacks: a returned
        // poll does not mean they ran yet, so wait until they did (or the time is up).
        let limit = self.wait_limit_s();
        let deadline = Instant::now() + std::time::Duration::from_secs(limit);
        let results = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.device
                .poll(wgpu::PollType::Wait {
                    submission_index: until.clone(),
                    timeout: Some(left),
                })
                .map_err(|e| {
                    Error::device(DeviceFault::Lost, format!("waiting for the GPU: {e}"))
                })?;
            let now = pending
                .lock()
                .map_err(|_| Error::internal("map state poisoned"))?
                .clone();
            if now.iter().all(Option::is_some) || Instant::now() >= deadline {
                break now;
            }
            std::thread::yield_now();
        };
        self.check("step")?;
        let mut out = Vec::with_capacity(bufs.len());
        for ((b, n), r) in bufs.iter().zip(results) {
            match r {
                Some(Ok(())) => {}
                Some(Err(e)) => {
                    return Err(Error::device(
                        DeviceFault::Lost,
                        format!("mapping a result buffer: {e}"),
                    ))
                }
                None => {
                    return Err(Error::device(
                        DeviceFault::Timeout,
                        format!("the GPU did not finish within {limit} s"),
                    ))
                }
            }
            let len = (*n as u64).max(4).next_multiple_of(4);
            let v = {
                let view = b.slice(0..len).get_mapped_range().map_err(|e| {
                    Error::device(DeviceFault::Lost, format!("reading a result buffer: {e}"))
                })?;
                view[..*n].to_vec()
            };
            b.unmap();
            out.push(v);
        }
        Ok(out)
    }
}
