//! Test support shared by the forward and backward kernel tests: deterministic randomness, the memory
//! layouts test tensors take, and the random bitmap mask.

use std::ops::Range;

use half::{bf16, f16};

use crate::mask::tiles::{BlockClass, MaskTiles};
use crate::tensor::{DType, Float, TensorView};

/// Element `idx` of a float test tensor, read through its strided view, as f64.
pub(crate) fn read_f64(view: &TensorView, idx: &[usize]) -> f64 {
    let off: isize = idx
        .iter()
        .zip(view.strides())
        .map(|(&i, &s)| i as isize * s)
        .sum();
    fn rd<T: Float>(p: *mut u8, off: isize) -> f64 {
        // SAFETY: `off` is the offset of an in-range index of the view (the caller's index is in its shape).
        unsafe { p.cast::<T>().offset(off).read() }.to_f64()
    }
    match view.dtype() {
        DType::F32 => rd::<f32>(view.as_ptr(), off),
        DType::F64 => rd::<f64>(view.as_ptr(), off),
        DType::BF16 => rd::<bf16>(view.as_ptr(), off),
        _ => rd::<f16>(view.as_ptr(), off),
    }
}

/// The most negative finite value of a float dtype (torch's `finfo.min`), as f64.
pub(crate) fn finfo_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F32 => f32::MIN as f64,
        DType::BF16 => bf16::MIN.to_f64(),
        _ => f16::MIN.to_f64(),
    }
}

/// splitmix64: the tests' own deterministic randomness, seeded by proptest.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub(crate) fn unif(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub(crate) fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unif()
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.unif() < p
    }
}

/// How a test tensor is laid out in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Layout {
    Contiguous,
    /// Stored as `[B, S, H, D]` and viewed as `[B, H, S, D]` (what Python passes for `[B, Q, H, D]` buffers).
    Transposed,
    /// Rows padded: the last-but-one stride exceeds the row length.
    Padded,
    /// The last two dims swapped in memory (the head dim is strided).
    ColumnMajor,
    /// Dim 0 (or 1) broadcast with stride 0.
    Broadcast(usize),
}

/// A random layout (broadcast ones only when the tensor may be broadcast).
pub(crate) fn layout(rng: &mut Rng, broadcastable: bool) -> Layout {
    match rng.below(if broadcastable { 6 } else { 4 }) {
        0 => Layout::Contiguous,
        1 => Layout::Transposed,
        2 => Layout::Padded,
        3 => Layout::ColumnMajor,
        _ => Layout::Broadcast(rng.below(2)),
    }
}

/// The causal mask whose row `i` sees columns `j <= i + diagonal`, as the kernels get it from a mask
/// expression.
pub(crate) fn causal(diagonal: i64) -> crate::mask::PlacedMask {
    crate::mask::PlacedMask::new(crate::mask::MaskExpr::causal_with_offset(diagonal), 0, 0)
}

/// A random per-element visibility mask over `[B, H, Q, K]` (some rows fully hidden, some fully visible),
/// with tile classes computed by brute force: the mask both kernels' tests check masking with.
pub(crate) struct Bitmap {
    pub(crate) shape: [usize; 4],
    pub(crate) bits: Vec<u8>,
}

impl Bitmap {
    pub(crate) fn new(shape: [usize; 4], rng: &mut Rng) -> Bitmap {
        let density = rng.range(0.05, 0.95);
        let mut bits: Vec<u8> = (0..shape.iter().product())
            .map(|_| u8::from(rng.chance(density)))
            .collect();
        for row in bits.chunks_mut(shape[3].max(1)) {
            if rng.chance(0.1) {
                row.fill(0);
            } else if rng.chance(0.1) {
                row.fill(1);
            }
        }
        Bitmap { shape, bits }
    }
    pub(crate) fn at(&self, b: usize, h: usize, i: usize, j: usize) -> u8 {
        let [_, hs, qs, ks] = self.shape;
        self.bits[((b * hs + h) * qs + i) * ks + j]
    }
}

impl MaskTiles for Bitmap {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let total = rows.len() * cols.len();
        let seen: usize = rows
            .flat_map(|i| cols.clone().map(move |j| (i, j)))
            .map(|(i, j)| self.at(b, h, i, j) as usize)
            .sum();
        match seen {
            0 => BlockClass::Empty,
            s if s == total => BlockClass::Full,
            _ => BlockClass::Partial,
        }
    }
    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let w = cols.len();
        for (r, i) in rows.enumerate() {
            for (c, j) in cols.clone().enumerate() {
                out[r * w + c] = self.at(b, h, i, j);
            }
        }
    }
}
