//! What the integration tests share.

/// Whether this machine has a wgpu adapter; when it has none, says so (a test that needs one is then
/// skipped) unless `ONESTEP_REQUIRE_GPU` is set, which makes it a failure.
#[cfg(feature = "gpu")]
pub fn has_gpu(what: &str) -> bool {
    use onestep::backend::gpu::{BackendFilter, DeviceRequest, GpuContext};
    match GpuContext::new(&DeviceRequest::Gpu(None), BackendFilter::Any) {
        Ok(_) => true,
        Err(e) => {
            assert!(
                std::env::var_os("ONESTEP_REQUIRE_GPU").is_none(),
                "ONESTEP_REQUIRE_GPU is set but there is no adapter: {e}"
            );
            eprintln!("note: no wgpu adapter ({e}); {what} not run on the GPU");
            false
        }
    }
}
