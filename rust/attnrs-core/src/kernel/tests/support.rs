//! Test support shared by the forward and backward kernel tests: deterministic randomness and the memory
//! layouts test tensors take.

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
