//! The AVX2 + FMA micro-kernel ([`Avx2F32`]): f32 operands, 6 rows × 16 columns of accumulators.

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
