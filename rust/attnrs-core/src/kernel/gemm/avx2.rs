//! The AVX2 + FMA micro-kernel ([`Avx2F32`]): f32 operands, 6 rows × 16 columns of accumulators; and the
//! softmax's row passes on 8 lanes.

use std::arch::x86_64::*;

use super::Kern;
use crate::tensor::{DType, Float};

/// f32 operands, AVX2 + FMA: 6 rows × 2 ymm (16 columns) of accumulators.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx2F32;

#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile256<const MR: usize, const NV: usize>(
    kp: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); NV]; MR];
    // SAFETY: (whole body) as in `tile512`, with 8-lane vectors.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm256_loadu_ps(c.add(i * ldc + 8 * v));
                }
            }
        }
        for p in 0..kp {
            let bp = b.add(p * ldb);
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(8 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_ps(*a.add(i * lda + p));
                for (x, &y) in row.iter_mut().zip(&bv) {
                    *x = _mm256_fmadd_ps(av, y, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_ps(c.add(i * ldc + 8 * v), *x);
            }
        }
    }
}

impl Kern for Avx2F32 {
    type A = f32;
    type E = f32;
    const PAIR: usize = 1;
    const RAW: Option<DType> = Some(DType::F32);
    #[inline(always)]
    fn to_e(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    unsafe fn exp_row(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
        // SAFETY: forwarded promise (this kernel only runs on CPUs with AVX2 and FMA).
        unsafe { exp_row8(s, m, p) }
    }
    #[inline(always)]
    unsafe fn max_row(s: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { max_row8(s) }
    }
    #[inline(always)]
    fn load<T: Float>(x: T) -> f32 {
        x.to_f32()
    }
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        kp: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(6);
                // SAFETY: the tile `[i, i+mr) × [j, j+16)` lies inside the caller's ranges (n % 16 == 0);
                // the driver only builds this kernel when the CPU has AVX2 and FMA.
                unsafe {
                    let (a, b, c) = (a.add(i * lda), b.add(j), c.add(i * ldc + j));
                    dispatch_tile!(tile256, mr, 2, (kp, a, lda, b, ldb, c, ldc, accumulate), [1 2 3 4 5 6], [2]);
                }
                i += mr;
            }
            j += 16;
        }
    }
}

/// `exp(x)` on 8 lanes: [`crate::kernel::softmax::exp_f32`]'s algorithm (and constants) with fused
/// multiply-adds. NaN stays NaN (each min/max returns its second operand when one is NaN); inputs below -87.3
/// (-inf included) give 0.
#[target_feature(enable = "avx2,fma")]
#[inline]
fn exp8(x: __m256) -> __m256 {
    use crate::kernel::softmax::exp_consts::*;
    let x = _mm256_max_ps(
        _mm256_set1_ps(-CLAMP),
        _mm256_min_ps(_mm256_set1_ps(CLAMP), x),
    );
    let magic = _mm256_set1_ps(MAGIC);
    let z = _mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), magic);
    let n = _mm256_sub_ps(z, magic);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(POLY[0]);
    for &c in &POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let bits = _mm256_sub_epi32(
        _mm256_castps_si256(z),
        _mm256_set1_epi32((MAGIC_BITS - 127) as i32),
    );
    _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32::<23>(bits)))
}

/// The sum of 8 lanes.
#[target_feature(enable = "avx2")]
#[inline]
fn sum8(x: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
}

/// [`Kern::exp_row`] on 8 lanes, the sum in two accumulators.
///
/// # Safety
/// `s.len()` is a multiple of 16 and `p` at least as long (checked); the CPU has AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_row8(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    assert!(s.len().is_multiple_of(16) && p.len() >= s.len());
    let mv = _mm256_set1_ps(m);
    let (mut sum0, mut sum1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for (sc, pc) in s.chunks_exact(16).zip(p.chunks_exact_mut(16)) {
        // SAFETY: each chunk holds 16 f32.
        unsafe {
            let e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc.as_ptr()), mv));
            let e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(sc.as_ptr().add(8)), mv));
            _mm256_storeu_ps(pc.as_mut_ptr(), e0);
            _mm256_storeu_ps(pc.as_mut_ptr().add(8), e1);
            sum0 = _mm256_add_ps(sum0, e0);
            sum1 = _mm256_add_ps(sum1, e1);
        }
    }
    sum8(_mm256_add_ps(sum0, sum1))
}

/// [`Kern::max_row`] on 8 lanes: the maximum in a register, NaN if any element is NaN.
///
/// # Safety
/// `s.len()` is a multiple of 16 (checked); the CPU has AVX2.
#[target_feature(enable = "avx2")]
unsafe fn max_row8(s: &[f32]) -> f32 {
    assert!(s.len().is_multiple_of(16));
    let mut max = _mm256_set1_ps(f32::NEG_INFINITY);
    let mut nan = _mm256_setzero_ps();
    for c in s.chunks_exact(8) {
        // SAFETY: each chunk holds 8 f32.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        nan = _mm256_or_ps(nan, _mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
        max = _mm256_max_ps(max, v);
    }
    if _mm256_movemask_ps(nan) != 0 {
        return f32::NAN;
    }
    let h = _mm_max_ps(_mm256_castps256_ps128(max), _mm256_extractf128_ps::<1>(max));
    let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
}
