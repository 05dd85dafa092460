//! CPU kernels: plain slices in, plain slices out; threading on the CPU pool (`pool.rs`: rayon only sizes
//! it); SIMD chosen at run time.
//!
//! One file per kernel family. Every family exposes a safe dispatching function (it picks AVX2+FMA on
//! x86-64 when the CPU has it, NEON on aarch64, and a portable scalar path elsewhere) and a plain
//! `reference` function used as the test oracle. No kernel panics on mismatched slice lengths: shapes are
//! checked up front and reported as [`KernelError`]; the caller maps it to the runtime's error.

pub mod attention;
mod attention_paged;
mod attention_plain;
pub mod bandwidth;
pub(crate) mod exec;
mod gelu;
mod huge_pages;
pub mod linear;
pub(crate) mod linear_q8;
pub mod misc;
pub mod norm;
pub mod ops;
mod pool;
pub(crate) mod repack;
pub mod rope;
mod simd;

/// What a kernel can refuse: its inputs do not have the lengths/shapes it was told, or a borrowed weight
/// buffer cannot be read in place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// A slice has the wrong number of elements for the stated shape.
    #[error("{kernel}: `{what}` has {got} elements, expected {expected}")]
    Length {
        /// The kernel (e.g. `linear`).
        kernel: &'static str,
        /// Which argument.
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length that was passed.
        got: usize,
    },
    /// The shape itself is invalid (zero/odd sizes where not allowed, K not a multiple of the block size,
    /// an index out of range, ...).
    #[error("{kernel}: {detail}")]
    Shape {
        /// The kernel.
        kernel: &'static str,
        /// What is wrong.
        detail: String,
    },
}

/// Result alias for kernels.
pub type KernelResult<T = ()> = Result<T, KernelError>;

/// Checks `got == expected`, naming the kernel and argument otherwise.
pub(crate) fn check_len(
    kernel: &'static str,
    what: &'static str,
    expected: usize,
    got: usize,
) -> KernelResult {
    if expected == got {
        Ok(())
    } else {
        Err(KernelError::Length {
            kernel,
            what,
            expected,
            got,
        })
    }
}

/// Multiplies shape factors, reporting overflow as a shape error instead of wrapping.
pub(crate) fn mul_dims(kernel: &'static str, dims: &[usize]) -> KernelResult<usize> {
    dims.iter().try_fold(1usize, |acc, &d| {
        acc.checked_mul(d).ok_or_else(|| KernelError::Shape {
            kernel,
            detail: format!("shape {dims:?} overflows usize"),
        })
    })
}

/// Builds a [`KernelError::Shape`].
pub(crate) fn shape_err(kernel: &'static str, detail: impl Into<String>) -> KernelError {
    KernelError::Shape {
        kernel,
        detail: detail.into(),
    }
}
