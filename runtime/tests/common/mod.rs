//! What the integration tests share.

/// Whether this machine has a wgpu adapter; when it has none, says so (a test that needs one is then
/// skipped) unless `ONESTEP_REQUIRE_GPU` is set, which makes it a failure.
#[cfg(feature = "gpu")]
#[allow(dead_code)]
pub fn has_gpu(what: &str) -> bool {
    gpu(what).is_some()
}

/// A device on this machine's wgpu adapter, or `None` as [`has_gpu`] says.
#[cfg(feature = "gpu")]
#[allow(dead_code)]
pub fn gpu(what: &str) -> Option<std::sync::Arc<onestep::testing::GpuContext>> {
    use onestep::gpu::{BackendFilter, DeviceRequest};
    use onestep::testing::GpuContext;
    match GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
        Ok(c) => Some(c),
        Err(e) => {
            assert!(
                std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
                "ONESTEP_REQUIRE_GPU is set but there is no adapter: {e}"
            );
            eprintln!("note: no wgpu adapter ({e}); {what} not run on the GPU");
            None
        }
    }
}
