//! The runtime's tensor: a dtype, a shape and shared storage that is either heap memory owned by the
//! runtime or a slice of the memory-mapped model file (weights are never copied).

use std::sync::Arc;

use bytemuck::Pod;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::graph::DType;

#[derive(Debug)]
enum Storage {
    /// Runtime-owned; `u64` words keep every element type aligned.
    Heap { words: Vec<u64>, len: usize },
    /// A slice of the model file (or of an owned load buffer).
    Mapped(Bytes),
}

/// A tensor value flowing through the plan. Cloning shares the storage.
#[derive(Debug, Clone)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    storage: Arc<Storage>,
}

/// Product of a shape's dimensions.
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Whether `other` is this tensor: the same shared storage, element type and shape (a clone of
    /// it, not merely equal contents).
    pub fn same_storage(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.storage, &other.storage)
            && self.dtype == other.dtype
            && self.shape == other.shape
    }

    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let len = numel(shape) * dtype.size();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Heap {
                words: vec![0u64; len.div_ceil(8)],
                len,
            }),
        }
    }

    /// A tensor built by `fill`, which receives the zeroed elements as `T`.
    pub fn build<T: Pod>(dtype: DType, shape: &[usize], fill: impl FnOnce(&mut [T])) -> Tensor {
        debug_assert_eq!(std::mem::size_of::<T>(), dtype.size());
        let mut t = Tensor::zeros(dtype, shape);
        fill(t.typed_mut::<T>());
        t
    }

    /// Like [`Tensor::build`] but `fill` may fail.
    pub fn try_build<T: Pod>(
        dtype: DType,
        shape: &[usize],
        fill: impl FnOnce(&mut [T]) -> Result<()>,
    ) -> Result<Tensor> {
        let mut t = Tensor::zeros(dtype, shape);
        fill(t.typed_mut::<T>())?;
        Ok(t)
    }

    /// A tensor holding a copy of `data`.
    pub fn from_slice<T: Pod>(dtype: DType, shape: &[usize], data: &[T]) -> Tensor {
        Tensor::build(dtype, shape, |o: &mut [T]| o.copy_from_slice(data))
    }

    /// An f32 tensor.
    pub fn f32(shape: &[usize], data: &[f32]) -> Tensor {
        Tensor::from_slice(DType::F32, shape, data)
    }

    /// An i64 tensor.
    pub fn i64(shape: &[usize], data: &[i64]) -> Tensor {
        Tensor::from_slice(DType::I64, shape, data)
    }

    /// A bool tensor (one byte an element).
    pub fn bool(shape: &[usize], data: &[bool]) -> Tensor {
        let bytes: Vec<u8> = data.iter().map(|&b| b as u8).collect();
        Tensor::from_slice(DType::Bool, shape, &bytes)
    }

    /// Wraps mapped bytes (an initializer) without copying. Falls back to a copy when the bytes are not
    /// aligned for the element type (only files from other writers; ours align every payload to 64).
    pub fn mapped(dtype: DType, shape: &[usize], bytes: Bytes) -> Tensor {
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size().max(1));
        if aligned {
            Tensor {
                dtype,
                shape: shape.to_vec(),
                storage: Arc::new(Storage::Mapped(bytes)),
            }
        } else {
            let mut t = Tensor::zeros(dtype, shape);
            t.bytes_mut().copy_from_slice(&bytes);
            t
        }
    }

    /// A tensor with a shape and no bytes: only for shape inference of view ops (`Reshape`, `Squeeze`,
    /// ...), which never read the data.
    #[cfg(feature = "gpu")]
    pub(crate) fn shape_only(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor {
            dtype,
            shape: shape.to_vec(),
            storage: Arc::new(Storage::Mapped(Bytes::new())),
        }
    }

    /// Whether the storage is a slice of the model file.
    pub fn is_mapped(&self) -> bool {
        matches!(*self.storage, Storage::Mapped(_))
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The raw little-endian bytes.
    pub fn bytes(&self) -> &[u8] {
        match &*self.storage {
            Storage::Heap { words, len } => &bytemuck::cast_slice(words)[..*len],
            Storage::Mapped(b) => b,
        }
    }

    /// Mutable raw bytes; copies first if the storage is shared or mapped.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        if !matches!(*self.storage, Storage::Heap { .. })
            || Arc::get_mut(&mut self.storage).is_none()
        {
            let len = self.bytes().len();
            let mut words = vec![0u64; len.div_ceil(8)];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..len].copy_from_slice(self.bytes());
            self.storage = Arc::new(Storage::Heap { words, len });
        }
        match Arc::get_mut(&mut self.storage) {
            Some(Storage::Heap { words, len }) => &mut bytemuck::cast_slice_mut(words)[..*len],
            _ => unreachable!("storage was made unique and heap-backed above"),
        }
    }

    /// The elements as `T` (the caller checked the dtype).
    pub fn typed<T: Pod>(&self) -> &[T] {
        bytemuck::cast_slice(self.bytes())
    }

    /// Mutable elements as `T`.
    pub fn typed_mut<T: Pod>(&mut self) -> &mut [T] {
        bytemuck::cast_slice_mut(self.bytes_mut())
    }

    /// The same storage with another shape (numel must match).
    pub fn reshaped(&self, shape: Vec<usize>) -> Tensor {
        debug_assert_eq!(numel(&shape), self.numel());
        Tensor {
            dtype: self.dtype,
            shape,
            storage: self.storage.clone(),
        }
    }

    /// Checks the dtype, naming `what` in the error.
    pub fn expect(&self, dtype: DType, what: &str) -> Result<&Self> {
        if self.dtype != dtype {
            return Err(Error::tensor(
                what,
                format!("expected {dtype}, found {}", self.dtype),
            ));
        }
        Ok(self)
    }

    /// f32 elements (errors on another dtype).
    pub fn as_f32(&self, what: &str) -> Result<&[f32]> {
        Ok(self.expect(DType::F32, what)?.typed())
    }

    /// i64 elements (errors on another dtype).
    pub fn as_i64(&self, what: &str) -> Result<&[i64]> {
        Ok(self.expect(DType::I64, what)?.typed())
    }

    /// Integer elements (i64 or i32) widened to i64.
    pub fn to_i64_vec(&self, what: &str) -> Result<Vec<i64>> {
        match self.dtype {
            DType::I64 => Ok(self.typed::<i64>().to_vec()),
            DType::I32 => Ok(self.typed::<i32>().iter().map(|&v| v as i64).collect()),
            d => Err(Error::tensor(
                what,
                format!("expected an integer tensor, found {d}"),
            )),
        }
    }

    /// The single element of a one-element integer tensor.
    pub fn scalar_i64(&self, what: &str) -> Result<i64> {
        let v = self.to_i64_vec(what)?;
        if v.len() != 1 {
            return Err(Error::tensor(
                what,
                format!("expected one element, found shape {:?}", self.shape),
            ));
        }
        Ok(v[0])
    }

    /// Elements converted to f32 (from f32, f16, bf16, i64, i32).
    pub fn to_f32_vec(&self, what: &str) -> Result<Vec<f32>> {
        Ok(match self.dtype {
            DType::F32 => self.typed::<f32>().to_vec(),
            DType::F16 => self
                .typed::<half::f16>()
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::BF16 => self
                .typed::<half::bf16>()
                .iter()
                .map(|v| v.to_f32())
                .collect(),
            DType::I64 => self.typed::<i64>().iter().map(|&v| v as f32).collect(),
            DType::I32 => self.typed::<i32>().iter().map(|&v| v as f32).collect(),
            d => return Err(Error::tensor(what, format!("cannot read {d} as float"))),
        })
    }
}
