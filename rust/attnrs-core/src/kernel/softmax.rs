//! The accumulator type both kernels (forward and backward) compute in, the one online-softmax step every
//! forward variant shares, and the row finalisation / split merge.
//!
//! Per row the state is the running maximum `m`, the running denominator `l` (relative to `m`) and the
//! accumulator row `O` (also relative to `m`). A tile turns raw scores into logits (scale, softcap, bias,
//! mask), raises `m`, rescales `l` and `O` by `alpha = exp(m_old - m_new)`, and writes `P = exp(s - m_new)`
//! for the `O += P·V` product. Everything here is plain Rust written to auto-vectorise: the driver inlines it
//! into `#[target_feature]` functions so it is compiled for the ISA at hand.

use std::ops::{Add, Mul, Sub};

use crate::mask::tiles::RowVis;
use crate::tensor::Float;

/// The accumulator type: f32 (for f32, bf16 and f16 inputs) or f64 (for f64 inputs).
pub(crate) trait Acc:
    Copy
    + Default
    + Send
    + Sync
    + PartialOrd
    + 'static
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
{
    /// True for f32 (false for f64).
    const IS_F32: bool;
    const ZERO: Self;
    const ONE: Self;
    const NEG_INF: Self;
    const INF: Self;
    fn from_f64(x: f64) -> Self;
    fn to_f32(self) -> f32;
    fn to_f64(self) -> f64;
    /// The slice as f32s when `Self` is f32 (for the SIMD stores of f32 state).
    fn as_f32(x: &[Self]) -> Option<&[f32]>;
    fn is_finite(self) -> bool;
    fn read<T: Float>(x: T) -> Self;
    fn write<T: Float>(self) -> T;
    /// `exp(x)` for `x <= 0` (and `-inf`, giving 0); f32 uses a vectorisable polynomial (rel. err. ~2e-7).
    fn exp_nonpos(self) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn recip(self) -> Self;
    /// The larger of the two, NaN if either is NaN: a NaN logit must reach the row's output, never be
    /// passed over by the running maximum (which would make the row look fully masked).
    fn max(self, other: Self) -> Self;
}

impl Acc for f32 {
    const IS_F32: bool = true;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f32::NEG_INFINITY;
    const INF: Self = f32::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    #[inline(always)]
    fn read<T: Float>(x: T) -> Self {
        x.to_f32()
    }
    #[inline(always)]
    fn write<T: Float>(self) -> T {
        T::from_f32(self)
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        exp_f32(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self || other.is_nan() {
            other
        } else {
            self
        }
    }
}

impl Acc for f64 {
    const IS_F32: bool = false;
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    const NEG_INF: Self = f64::NEG_INFINITY;
    const INF: Self = f64::INFINITY;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn as_f32(_: &[f64]) -> Option<&[f32]> {
        None
    }
    #[inline(always)]
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    #[inline(always)]
    fn read<T: Float>(x: T) -> Self {
        x.to_f64()
    }
    #[inline(always)]
    fn write<T: Float>(self) -> T {
        T::from_f64(self)
    }
    #[inline(always)]
    fn exp_nonpos(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn recip(self) -> Self {
        1.0 / self
    }
    #[inline(always)]
    fn max(self, other: Self) -> Self {
        if other > self || other.is_nan() {
            other
        } else {
            self
        }
    }
}

/// The constants of [`exp_f32`], shared with its SIMD versions (`gemm/avx512.rs`, `gemm/avx2.rs`).
pub(crate) mod exp_consts {
    /// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits (its bits are `MAGIC_BITS`).
    pub(crate) const MAGIC: f32 = 12_582_912.0;
    pub(crate) const MAGIC_BITS: u32 = 0x4B40_0000;
    /// 0.693359375, 9 significant bits: n * LN2_HI is exact for |n| <= 127.
    pub(crate) const LN2_HI: f32 = 0.693_359_4;
    pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
    /// The inputs are clamped to ±CLAMP first (so |n| <= 127).
    pub(crate) const CLAMP: f32 = 88.0;
    /// The Taylor coefficients of e^r, highest degree first (1/7! .. 1/1!, then 1).
    pub(crate) const POLY: [f32; 8] = [
        1.0 / 5040.0,
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ];
}

/// `exp(x)` for `x <= 0`, branch-free so loops over it vectorise. Cody-Waite: `x = n·ln2 + r` with an integer
/// `n` (the exponent bits of the result) and `|r| <= ln2/2` (a degree-7 Taylor polynomial), `n·ln2` split into
/// an exactly multiplied high part and a small low part. Inputs below `-87.3` (including `-inf`) give 0.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    use exp_consts::*;
    let x = x.clamp(-CLAMP, CLAMP); // NaN stays NaN
    let z = x * std::f32::consts::LOG2_E + MAGIC; // |n| <= 127
    let n = z - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = p * r + c;
    }
    // The exponent field of 2^n is n + 127; n = -127 yields the bit pattern of 0.0.
    let scale = f32::from_bits(z.to_bits().wrapping_sub(MAGIC_BITS).wrapping_add(127) << 23);
    p * scale
}

/// How a tile's logits are formed from its raw `q·k` scores.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Logits<A> {
    pub scale: A,
    /// `(c, 1/c)` of the softcap.
    pub softcap: Option<(A, A)>,
}

/// One online-softmax step for one row of one tile.
///
/// `s` holds the raw scores of the tile's padded width (a multiple of 16); the first `n` are real. `terms`
/// (length `n`, the score mod's additive terms) are added before the softcap, `bias` (length `n`) after it,
/// and `vis` (a partial tile's row) masks. `p` (the tile's padded width) receives `exp(s - m_new)` through
/// `passes.to_p`, with zeros beyond `n` and for hidden pairs. Returns `alpha`, the factor the caller must apply
/// to the row's `O` (1 when nothing changed). `passes` are the kernel family's (its operand conversion, row
/// maximum and exp pass: the hot loops).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn online_step<A: Acc, E: Copy>(
    s: &mut [A],
    n: usize,
    lg: Logits<A>,
    terms: Option<&[A]>,
    bias: Option<&[A]>,
    vis: Option<RowVis>,
    m: &mut A,
    l: &mut A,
    p: &mut [E],
    passes: RowPasses<impl Fn(A) -> E, impl Fn(&[A]) -> A, impl Fn(&[A], A, &mut [E]) -> A>,
) -> A {
    let width = s.len();
    debug_assert!(width.is_multiple_of(16) && p.len() >= width);
    match terms {
        // One pass: the scale and the terms (the padding columns beyond `n` become -inf below).
        Some(terms) => {
            for (x, &t) in s[..n].iter_mut().zip(terms) {
                *x = *x * lg.scale + t;
            }
        }
        None => {
            for x in s.iter_mut() {
                *x = *x * lg.scale;
            }
        }
    }
    if let Some((c, inv)) = lg.softcap {
        for x in s[..n].iter_mut() {
            *x = c * (*x * inv).tanh();
        }
    }
    if let Some(bias) = bias {
        for (x, &b) in s[..n].iter_mut().zip(bias) {
            *x = *x + b;
        }
    }
    if let Some(vis) = vis {
        vis.hide(&mut s[..n], A::NEG_INF);
    }
    for x in s[n..].iter_mut() {
        *x = A::NEG_INF;
    }
    let tile_max = (passes.max)(s);
    let m_new = m.max(tile_max);
    if m_new == A::NEG_INF {
        // Nothing visible so far: P is zero and the state stays (-inf, 0, 0).
        let zero = (passes.to_p)(A::ZERO);
        p[..width].iter_mut().for_each(|x| *x = zero);
        return A::ONE;
    }
    let alpha = if *m == m_new {
        A::ONE
    } else {
        (*m - m_new).exp_nonpos()
    };
    let sum = (passes.exp)(s, m_new, &mut p[..width]);
    *l = *l * alpha + sum;
    *m = m_new;
    alpha
}

/// `p[i] = to_p(exp(s[i] - m))` over a row of logits whose length is a multiple of 16 (each `s[i] <= m`, or
/// -inf for a hidden pair), returning the sum of the exps: the softmax's hot loop, in plain Rust
/// ([`crate::kernel::gemm::Kern::exp_row`]; the AVX2, AVX-512 and AMX families have their own).
#[inline(always)]
pub(crate) fn exp_row<A: Acc, E: Copy>(s: &[A], m: A, p: &mut [E], to_p: impl Fn(A) -> E) -> A {
    debug_assert!(s.len().is_multiple_of(16) && p.len() >= s.len());
    let mut lanes = [A::ZERO; 16];
    for (sc, pc) in s.chunks_exact(16).zip(p.chunks_exact_mut(16)) {
        let sc: &[A; 16] = sc.try_into().expect("chunks of 16");
        let pc: &mut [E; 16] = pc.try_into().expect("chunks of 16");
        for i in 0..16 {
            let e = (sc[i] - m).exp_nonpos();
            pc[i] = to_p(e);
            lanes[i] = lanes[i] + e;
        }
    }
    lanes.iter().fold(A::ZERO, |a, &b| a + b)
}

/// What the softmax step takes from a kernel family: `to_p` (an accumulator value to an operand) and its two
/// vector passes over a row of logits, `max` (as [`max_row`]) and `exp` (as [`exp_row`]).
#[derive(Clone, Copy)]
pub(crate) struct RowPasses<C, M, X> {
    pub to_p: C,
    pub max: M,
    pub exp: X,
}

/// Maximum over a slice whose length is a multiple of 16, NaN if any element is NaN, in 16 lanes so it
/// vectorises: the portable pass ([`crate::kernel::gemm::Kern::max_row`]).
#[inline(always)]
pub(crate) fn max_row<A: Acc>(s: &[A]) -> A {
    let mut lanes = [A::NEG_INF; 16];
    for c in s.chunks_exact(16) {
        let c: &[A; 16] = c.try_into().expect("chunks of 16");
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    lanes.iter().fold(A::NEG_INF, |a, &b| a.max(b))
}

/// Multiplies a row by `alpha`.
#[inline(always)]
pub(crate) fn rescale<A: Acc>(o: &mut [A], alpha: A) {
    for x in o.iter_mut() {
        *x = *x * alpha;
    }
}

/// The final state of one row: `(factor for O, lse)`. `O · factor` is the output row (0 for a row that saw
/// nothing), `lse` includes the sink.
#[inline(always)]
pub(crate) fn finish<A: Acc>(m: A, l: A, sink: Option<A>) -> (A, A) {
    match sink {
        None if m == A::NEG_INF => (A::ZERO, A::NEG_INF),
        None => (l.recip(), m + l.ln()),
        Some(sink) if m == A::NEG_INF => (A::ZERO, sink),
        // A +inf sink takes the whole row: output 0, lse +inf (the formula below would give inf - inf).
        Some(sink) if sink == A::INF && m.is_finite() => (A::ZERO, sink),
        Some(sink) => {
            // den = l + exp(sink - m) may overflow to inf when the sink dominates: the output is then 0.
            let den = l + (sink - m).exp();
            let top = m.max(sink);
            let lse = top + (l * (m - top).exp() + (sink - top).exp()).ln();
            (den.recip(), lse)
        }
    }
}

/// Merges partial row states (same row, disjoint key ranges) into the first: `(m, l)` updated, `o` rows
/// combined. `parts` yields `(m_i, l_i, O_i)`.
#[inline(always)]
pub(crate) fn merge_into<'a, A: Acc>(
    parts: impl Iterator<Item = (A, A, &'a [A])> + Clone,
    o: &mut [A],
) -> (A, A) {
    let m = parts.clone().fold(A::NEG_INF, |a, (mi, _, _)| a.max(mi));
    o.iter_mut().for_each(|x| *x = A::ZERO);
    if m == A::NEG_INF {
        return (m, A::ZERO);
    }
    let mut l = A::ZERO;
    for (mi, li, oi) in parts {
        if mi == A::NEG_INF {
            continue;
        }
        let w = (mi - m).exp_nonpos();
        l = l + li * w;
        for (x, &y) in o.iter_mut().zip(oi) {
            *x = *x + y * w;
        }
    }
    (m, l)
}
