//! placeholder
use super::{SourceError, SourceModel};
/// Reads a Hugging Face folder.
pub fn read(path: &std::path::Path) -> Result<SourceModel, SourceError> {
    Err(SourceError::Unsupported {
        path: path.display().to_string(),
        what: "HF folder (not built yet)".into(),
    })
}
