//! ONNX bytes → checked [`Graph`](crate::graph::Graph).
