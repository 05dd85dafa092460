//! CPU kernels: plain slices in, plain slices out; threading with rayon; SIMD chosen at run time.

pub mod basic;
pub mod ops;
