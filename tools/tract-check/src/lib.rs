//! Nothing here: see `tests/tract.rs`, which exports the tiny fixtures and runs them in tract and in the onestep runtime.
