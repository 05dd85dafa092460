//! placeholder
use super::{SourceError, SourceModel};
/// Reads a GGUF file.
pub fn read(path: &std::path::Path) -> Result<SourceModel, SourceError> {
    Err(SourceError::Unsupported {
        path: path.display().to_string(),
        what: "GGUF (not built yet)".into(),
    })
}
