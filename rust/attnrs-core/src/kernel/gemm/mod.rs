//! The register-blocked micro-kernels: `C[m×n] (+)= A[m×k] · B[k×n]` over packed operands.
//!
//! Both products of attention have this shape: `S = Q·Kᵀ` (A = packed Q rows, B = a Kᵀ tile) and
//! `O += P·V` (A = the probabilities, B = a V tile). B is packed so one SIMD load reads `16` consecutive
//! output columns: `[k][ldb]` for f32/f64, and `[k/2][ldb][2]` (pairs along k) for bf16, which is the
//! operand order of AVX-512 BF16's `vdpbf16ps`. A is row-major with each row's `k` (pairs) contiguous, so
//! one broadcast feeds a whole row of accumulators. `n` is always a multiple of 16.
//!
//! This module owns the [`Kern`] trait; each ISA's kernels live in their own file ([`portable`], `avx2`,
//! `avx512`, `amx` with its emulated twin), and [`super::dispatch`] picks among them.

use crate::tensor::{DType, Float};

use super::softmax::{self, Acc};

/// A family of micro-kernels: the accumulator type, the packed operand type and the product itself.
pub(crate) trait Kern: Copy + Send + Sync + 'static {
    /// Accumulator (S, O, softmax state).
    type A: Acc;
    /// Packed operand element.
    type E: Copy + Default + Send + Sync + 'static;
    /// k-elements per packed unit: 1, or 2 for bf16 pairs.
    const PAIR: usize;
    /// The input dtype whose bits are exactly the packed operand's (`PAIR` of them make one 32-bit unit),
    /// so contiguous rows of it pack by moving 32-bit units.
    const RAW: Option<DType>;
    /// The CPU runs AVX-512F/BW/VL, so decode may use the in-place kernels of [`super::decode`].
    const AVX512: bool = false;
    /// Converts an accumulator value (a probability) to an operand.
    fn to_e(x: Self::A) -> Self::E;
    /// Transposes 32-bit units: `dst[u * ld + c] = unit u of row c` for `c < n`, `u < units`, where row `c`
    /// starts `c * row_bytes` bytes after `src`.
    ///
    /// # Safety
    /// Every unit read lies in readable memory, `dst` holds `(units - 1) * ld + n` units, `n <= ld`, and the
    /// CPU has the kernel's target features.
    #[inline(always)]
    unsafe fn transpose_units(
        src: *const u8,
        row_bytes: isize,
        n: usize,
        units: usize,
        dst: *mut u32,
        ld: usize,
    ) {
        // SAFETY: forwarded promise.
        unsafe { scalar_units(src, row_bytes, 0..n, 0..units, dst, ld) }
    }
    /// Converts an input element to an operand.
    fn load<T: Float>(x: T) -> Self::E;
    /// `p[i] = to_e(exp(s[i] - m))` over a row of logits (a multiple of 16 long, each `s[i] <= m` or -inf),
    /// returning the sum of the exps: the softmax's hot loop. The portable [`softmax::exp_row`] unless the family
    /// has a faster one.
    ///
    /// # Safety
    /// The CPU has the kernel's target features.
    #[inline(always)]
    unsafe fn exp_row(s: &[Self::A], m: Self::A, p: &mut [Self::E]) -> Self::A {
        softmax::exp_row(s, m, p, Self::to_e)
    }
    /// The maximum of a row of logits (a multiple of 16 long), NaN if any is NaN: the portable
    /// [`softmax::max_row`] unless the family has a faster one.
    ///
    /// # Safety
    /// The CPU has the kernel's target features.
    #[inline(always)]
    unsafe fn max_row(s: &[Self::A]) -> Self::A {
        softmax::max_row(s)
    }
    /// [`Kern::to_e`], [`Kern::max_row`] and [`Kern::exp_row`] as the closures the softmax step takes.
    ///
    /// # Safety
    /// The closures may only be called where the CPU has the kernel's target features (inside its
    /// `#[target_feature]` entry points).
    #[inline(always)]
    #[allow(clippy::type_complexity)] // three closure types, named by their signatures
    unsafe fn row_passes() -> softmax::RowPasses<
        impl Fn(Self::A) -> Self::E + Copy,
        impl Fn(&[Self::A]) -> Self::A + Copy,
        impl Fn(&[Self::A], Self::A, &mut [Self::E]) -> Self::A + Copy,
    > {
        softmax::RowPasses {
            to_p: Self::to_e,
            // SAFETY: the caller's promise: these only run where the CPU has the features.
            max: |s: &[Self::A]| unsafe { Self::max_row(s) },
            // SAFETY: as above.
            exp: |s: &[Self::A], m, p: &mut [Self::E]| unsafe { Self::exp_row(s, m, p) },
        }
    }
    /// `C (+)= A·B` with `kp` packed units of k. Element `(i, p)` of A is at `a[i*lda + p*PAIR ..]`, element
    /// `(p, j)` of B at `b[(p*ldb + j)*PAIR ..]`, element `(i, j)` of C at `c[i*ldc + j]`.
    ///
    /// # Safety
    /// The pointers must address the whole ranges named above; `n % 16 == 0`; the CPU must support the
    /// kernel's target features (the driver only builds a kernel its [`super::Backend`] resolved to).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        kp: usize,
        a: *const Self::E,
        lda: usize,
        b: *const Self::E,
        ldb: usize,
        c: *mut Self::A,
        ldc: usize,
        accumulate: bool,
    );
}

/// Rows `rows` and units `units` of [`Kern::transpose_units`], one unit at a time: the portable transpose, and
/// the leftovers of the SIMD ones.
///
/// # Safety
/// As for [`Kern::transpose_units`], for these rows and units.
#[inline(always)]
pub(super) unsafe fn scalar_units(
    src: *const u8,
    row_bytes: isize,
    rows: std::ops::Range<usize>,
    units: std::ops::Range<usize>,
    dst: *mut u32,
    ld: usize,
) {
    for c in rows {
        // SAFETY: caller's promise: every unit read is readable and `u * ld + c` is inside `dst`.
        unsafe {
            let row = src.offset(c as isize * row_bytes).cast::<u32>();
            for u in units.clone() {
                dst.add(u * ld + c)
                    .write_unaligned(row.add(u).read_unaligned());
            }
        }
    }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and returns its bits. Exact for bf16 values.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Dispatches the runtime tile shape `(rows, vecs)` to a const-generic tile function.
#[cfg(target_arch = "x86_64")]
macro_rules! dispatch_tile {
    ($f:ident, $mr:expr, $nv:expr, $args:tt, [$($r:literal)*], $vs:tt) => {
        match $mr {
            $($r => dispatch_tile!(@vecs $f, $r, $nv, $args, $vs),)*
            _ => unreachable!("row block larger than the micro-tile"),
        }
    };
    (@vecs $f:ident, $r:literal, $nv:expr, $args:tt, [$($v:literal)*]) => {
        match $nv {
            $($v => $f::<$r, $v> $args,)*
            _ => unreachable!("column block larger than the micro-tile"),
        }
    };
}

mod amx;
mod portable;
#[cfg(target_arch = "x86_64")]
pub(crate) use amx::{Amx, AmxBf16x3};
pub(crate) use amx::{AmxEmulated, AmxEmulatedBf16x3};
pub(crate) use portable::Portable;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx2::Avx2F32;
#[cfg(target_arch = "x86_64")]
pub(crate) use avx512::{Avx512Bf16, Avx512F32};
