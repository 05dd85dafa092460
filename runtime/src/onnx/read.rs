//! Decode a `ModelProto` from (memory-mapped) bytes into the [`Graph`](crate::graph::Graph) IR without
//! copying weight bytes.
