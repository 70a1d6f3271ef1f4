//! Strided tensor views over memory the core does not own (torch tensors imported through DLPack).
//!
//! A view is a pointer plus shape and element strides. Strides may be zero (broadcast inputs) or
//! arbitrary (transposed, sliced views); they are never negative here because torch never makes them so.

use half::{bf16, f16};

use crate::{Error, Result};

/// Element types the core handles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    BF16,
    F16,
    Bool,
    U8,
    I32,
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::Bool | DType::U8 => 1,
        }
    }

    /// The torch spelling, for messages.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
            DType::BF16 => "torch.bfloat16",
            DType::F16 => "torch.float16",
            DType::Bool => "torch.bool",
            DType::U8 => "torch.uint8",
            DType::I32 => "torch.int32",
            DType::I64 => "torch.int64",
        }
    }

    /// True for the floating types attention runs in.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::BF16 | DType::F16)
    }
}

/// A floating element type the kernels compute with; arithmetic happens in f32 (or f64 for f64).
pub trait Float: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(x: f32) -> Self;
    fn to_f64(self) -> f64;
    fn from_f64(x: f64) -> Self;
}

macro_rules! impl_float {
    ($t:ty, $dtype:expr, $to32:expr, $from32:expr, $to64:expr, $from64:expr) => {
        impl Float for $t {
            const DTYPE: DType = $dtype;
            #[inline(always)]
            fn to_f32(self) -> f32 {
                $to32(self)
            }
            #[inline(always)]
            fn from_f32(x: f32) -> Self {
                $from32(x)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                $to64(self)
            }
            #[inline(always)]
            fn from_f64(x: f64) -> Self {
                $from64(x)
            }
        }
    };
}

impl_float!(
    f32,
    DType::F32,
    |x| x,
    |x| x,
    |x: f32| x as f64,
    |x: f64| x as f32
);
impl_float!(
    f64,
    DType::F64,
    |x: f64| x as f32,
    |x: f32| x as f64,
    |x| x,
    |x| x
);
impl_float!(
    bf16,
    DType::BF16,
    bf16::to_f32,
    bf16::from_f32,
    bf16::to_f64,
    bf16::from_f64
);
impl_float!(
    f16,
    DType::F16,
    f16::to_f32,
    f16::from_f32,
    f16::to_f64,
    f16::from_f64
);

/// A strided view of memory owned elsewhere.
///
/// The creator promises that every element addressed by `shape` and `strides` from `ptr` is readable
/// (and writable, for outputs) for as long as the view is used; [`TensorView::new`] is `unsafe` for that.
#[derive(Debug, Clone)]
pub struct TensorView {
    ptr: *mut u8,
    dtype: DType,
    shape: Vec<usize>,
    strides: Vec<isize>,
}

// SAFETY: a view is a plain address plus metadata. Whoever creates it guarantees the memory outlives the
// view (`TensorView::new`); concurrent writes are only made through disjoint element ranges by the kernels.
unsafe impl Send for TensorView {}
// SAFETY: see `Send`; shared access only reads the metadata or reads elements.
unsafe impl Sync for TensorView {}

impl TensorView {
    /// Wraps `ptr` (already advanced by any byte offset) with element `strides`.
    ///
    /// # Safety
    /// Every element `ptr + dtype.size() * sum(i_d * strides[d])` for in-range indices must be valid to read
    /// (and to write, if the view is used as an output) while the view lives, and `ptr` must be aligned
    /// to `dtype.size()`. Strides must not be negative.
    pub unsafe fn new(
        ptr: *mut u8,
        dtype: DType,
        shape: Vec<usize>,
        strides: Vec<isize>,
    ) -> Result<Self> {
        if shape.len() != strides.len() {
            return Err(Error::Internal(format!(
                "shape has {} dims but strides have {}",
                shape.len(),
                strides.len()
            )));
        }
        if let Some(s) = strides.iter().find(|s| **s < 0) {
            return Err(Error::layout(
                "tensor",
                "non-negative strides",
                format!("stride {s}"),
            ));
        }
        if ptr.is_null() && shape.iter().product::<usize>() != 0 {
            return Err(Error::layout("tensor", "a non-null data pointer", "null"));
        }
        Ok(Self {
            ptr,
            dtype,
            shape,
            strides,
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[isize] {
        &self.strides
    }
    pub fn ndim(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Row-major contiguous (size-1 dims may have any stride).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true; // no element to place: torch calls every empty tensor contiguous
        }
        let mut expected = 1isize;
        for (&n, &s) in self.shape.iter().zip(&self.strides).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n as isize;
        }
        true
    }

    /// The half-open byte range `[lo, hi)` the view can touch; empty for an empty tensor.
    pub fn byte_span(&self) -> (usize, usize) {
        if self.numel() == 0 {
            return (self.ptr as usize, self.ptr as usize);
        }
        let last: isize = self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n as isize - 1) * s)
            .sum();
        let lo = self.ptr as usize;
        (lo, lo + (last as usize + 1) * self.dtype.size())
    }

    /// True when the byte ranges of the two views intersect.
    pub fn overlaps(&self, other: &TensorView) -> bool {
        let (a0, a1) = self.byte_span();
        let (b0, b1) = other.byte_span();
        a0 < a1 && b0 < b1 && a0 < b1 && b0 < a1
    }

    /// True when two different indices may address the same element (stride 0 or interleaved strides).
    pub fn has_internal_overlap(&self) -> bool {
        let mut dims: Vec<(usize, isize)> = self
            .shape
            .iter()
            .copied()
            .zip(self.strides.iter().copied())
            .filter(|(n, _)| *n > 1)
            .collect();
        dims.sort_by_key(|&(_, s)| s);
        let mut reach = 1isize; // elements covered by the dims seen so far
        for (n, s) in dims {
            if s < reach {
                return true;
            }
            reach = s * n as isize;
        }
        false
    }

    /// Element offset of a multi-index.
    #[inline]
    fn offset(&self, index: &[usize]) -> isize {
        index
            .iter()
            .zip(&self.strides)
            .map(|(&i, &s)| i as isize * s)
            .sum()
    }

    /// The elements' bytes gathered in row-major order (a contiguous copy of any strided view).
    pub fn to_contiguous_bytes(&self) -> Vec<u8> {
        let size = self.dtype.size();
        let mut out = Vec::with_capacity(self.numel() * size);
        self.for_each_offset(|o| {
            // SAFETY: `o` is the offset of an in-range element; the memory is valid by the view's contract.
            let bytes =
                unsafe { std::slice::from_raw_parts(self.ptr.offset(o * size as isize), size) };
            out.extend_from_slice(bytes);
        });
        out
    }

    /// Calls `f(element_offset)` for every element in row-major order.
    fn for_each_offset(&self, mut f: impl FnMut(isize)) {
        if self.numel() == 0 {
            return;
        }
        let mut index = vec![0usize; self.ndim()];
        loop {
            f(self.offset(&index));
            // Odometer increment, last dimension fastest.
            let mut d = self.ndim();
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                index[d] += 1;
                if index[d] < self.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
    }
}

/// Copies `src` into `dst` element by element (same dtype, same shape, any strides).
/// The DLPack bridge tests use it to show that strides and offsets are honoured.
pub fn strided_copy(src: &TensorView, dst: &TensorView) -> Result<()> {
    if src.dtype != dst.dtype {
        return Err(Error::dtype(
            "dst",
            src.dtype.torch_name(),
            dst.dtype.torch_name(),
        ));
    }
    if src.shape != dst.shape {
        return Err(Error::shape(
            "dst",
            format!("shape {:?}", src.shape),
            format!("shape {:?}", dst.shape),
        ));
    }
    if dst.has_internal_overlap() {
        return Err(Error::layout(
            "dst",
            "a tensor without stride-0 or overlapping dims",
            "an overlapping view",
        ));
    }
    if src.overlaps(dst) {
        return Err(Error::layout(
            "dst",
            "memory disjoint from src",
            "a view aliasing src",
        ));
    }
    let size = src.dtype.size() as isize;
    let mut offsets = Vec::with_capacity(src.numel());
    src.for_each_offset(|o| offsets.push(o));
    let mut i = 0;
    dst.for_each_offset(|o| {
        // SAFETY: both offsets come from in-range indices of views whose memory is valid by the
        // `TensorView::new` contract; `dst` does not overlap `src` or itself (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                src.ptr.offset(offsets[i] * size),
                dst.ptr.offset(o * size),
                size as usize,
            );
        }
        i += 1;
    });
    Ok(())
}

/// Sums every element of a floating view in f64.
pub fn strided_sum(src: &TensorView) -> Result<f64> {
    fn sum<T: Float>(v: &TensorView) -> f64 {
        let base = v.ptr as *const T;
        let mut total = 0.0;
        v.for_each_offset(|o| {
            // SAFETY: `o` is the offset of an in-range index; memory is valid by the view's contract and
            // `ptr` is aligned for `T` (checked by the creator).
            total += unsafe { base.offset(o).read() }.to_f64();
        });
        total
    }
    match src.dtype {
        DType::F32 => Ok(sum::<f32>(src)),
        DType::F64 => Ok(sum::<f64>(src)),
        DType::BF16 => Ok(sum::<bf16>(src)),
        DType::F16 => Ok(sum::<f16>(src)),
        other => Err(Error::dtype("src", "a floating dtype", other.torch_name())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(buf: &mut [f32], shape: &[usize], strides: &[isize]) -> TensorView {
        // SAFETY: every test below addresses only elements inside `buf`.
        unsafe {
            TensorView::new(
                buf.as_mut_ptr().cast(),
                DType::F32,
                shape.to_vec(),
                strides.to_vec(),
            )
        }
        .unwrap()
    }

    #[test]
    fn transposed_copy_and_sum() {
        let mut src: Vec<f32> = (0..6).map(|x| x as f32).collect();
        let mut dst = vec![0f32; 6];
        // src viewed as the transpose of a 2x3 matrix: shape [3, 2], strides [1, 3].
        let s = view(&mut src, &[3, 2], &[1, 3]);
        let d = view(&mut dst, &[3, 2], &[2, 1]);
        strided_copy(&s, &d).unwrap();
        assert_eq!(dst, vec![0., 3., 1., 4., 2., 5.]);
        assert_eq!(strided_sum(&s).unwrap(), 15.0);
        let gathered: Vec<f32> = s
            .to_contiguous_bytes()
            .chunks_exact(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(gathered, vec![0., 3., 1., 4., 2., 5.]);
    }

    #[test]
    fn broadcast_views_are_readable_but_not_writable() {
        let mut src = vec![7f32; 1];
        let mut dst = vec![0f32; 4];
        let s = view(&mut src, &[2, 2], &[0, 0]);
        assert!(s.has_internal_overlap());
        assert_eq!(strided_sum(&s).unwrap(), 28.0);
        strided_copy(&s, &view(&mut dst, &[2, 2], &[2, 1])).unwrap();
        assert_eq!(dst, vec![7.0; 4]);
        let err = strided_copy(&view(&mut dst, &[2, 2], &[2, 1]), &s).unwrap_err();
        assert!(matches!(err, Error::Layout { .. }));
    }

    #[test]
    fn aliasing_is_detected() {
        let mut buf = [0f32; 8];
        let a = view(&mut buf[..4], &[4], &[1]);
        let b = view(&mut buf[2..], &[4], &[1]);
        assert!(a.overlaps(&b));
        assert!(matches!(strided_copy(&a, &b), Err(Error::Layout { .. })));
        assert!(!view(&mut buf[..4], &[2, 2], &[2, 1]).has_internal_overlap());
        assert!(view(&mut buf[..4], &[2, 2], &[2, 1]).is_contiguous());
        assert!(!view(&mut buf[..4], &[2, 2], &[1, 2]).is_contiguous());
        // An empty tensor is contiguous whatever its strides (torch's [1, 1, 0, 0] has strides [0, 0, 0, 1]).
        assert!(view(&mut buf[..0], &[1, 1, 0, 0], &[0, 0, 0, 1]).is_contiguous());
    }
}
