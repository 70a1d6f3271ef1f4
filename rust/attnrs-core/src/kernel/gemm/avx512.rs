//! The AVX-512 micro-kernels: f32 operands ([`Avx512F32`]) and bf16 pairs on `vdpbf16ps` ([`Avx512Bf16`]),
//! and the in-register 16×16 transpose of 32-bit units both use for packing.

use std::arch::x86_64::*;

use super::{Kern, bf16_bits};
use crate::tensor::{DType, Float};

/// [`Kern::transpose_units`] on AVX-512: 16×16 blocks of 32-bit units transposed in registers
/// (unpack 32, unpack 64, then two rounds of 128-bit lane shuffles); leftover rows and units one by one.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(
    src: *const u8,
    row_bytes: isize,
    n: usize,
    units: usize,
    dst: *mut u32,
    ld: usize,
) {
    let (full_rows, full_units) = (n / 16 * 16, units / 16 * 16);
    for c0 in (0..full_rows).step_by(16) {
        for u0 in (0..full_units).step_by(16) {
            // SAFETY: rows c0..c0+16, units u0..u0+16 are readable; dst units (u0+k)*ld + c0.. +16 are
            // inside `dst` (caller's promise).
            unsafe {
                let r: [__m512i; 16] = std::array::from_fn(|i| {
                    _mm512_loadu_si512(src.offset((c0 + i) as isize * row_bytes).add(4 * u0).cast())
                });
                let t: [__m512i; 16] = std::array::from_fn(|i| {
                    let (a, b) = (r[i & !1], r[i | 1]);
                    if i % 2 == 0 {
                        _mm512_unpacklo_epi32(a, b)
                    } else {
                        _mm512_unpackhi_epi32(a, b)
                    }
                });
                // u[4g + k]: lane L holds rows 4g..4g+4 at unit 4L + k.
                let u: [__m512i; 16] = std::array::from_fn(|i| {
                    let (g, k) = (i / 4, i % 4);
                    let (a, b) = (t[4 * g + k / 2], t[4 * g + 2 + k / 2]);
                    if k % 2 == 0 {
                        _mm512_unpacklo_epi64(a, b)
                    } else {
                        _mm512_unpackhi_epi64(a, b)
                    }
                });
                for k in 0..4 {
                    let v0 = _mm512_shuffle_i32x4::<0x44>(u[k], u[4 + k]);
                    let v1 = _mm512_shuffle_i32x4::<0xEE>(u[k], u[4 + k]);
                    let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + k], u[12 + k]);
                    let v3 = _mm512_shuffle_i32x4::<0xEE>(u[8 + k], u[12 + k]);
                    let out = [
                        _mm512_shuffle_i32x4::<0x88>(v0, v2),
                        _mm512_shuffle_i32x4::<0xDD>(v0, v2),
                        _mm512_shuffle_i32x4::<0x88>(v1, v3),
                        _mm512_shuffle_i32x4::<0xDD>(v1, v3),
                    ];
                    for (l, o) in out.iter().enumerate() {
                        _mm512_storeu_si512(dst.add((u0 + 4 * l + k) * ld + c0).cast(), *o);
                    }
                }
            }
        }
        // SAFETY: leftover units of these rows, under the same promise.
        unsafe { scalar_units(src, row_bytes, c0..c0 + 16, full_units..units, dst, ld) };
    }
    // SAFETY: leftover rows, under the same promise.
    unsafe { scalar_units(src, row_bytes, full_rows..n, 0..units, dst, ld) };
}

/// Rows `rows` and units `units` of [`Kern::transpose_units`], one unit at a time.
#[inline(always)]
unsafe fn scalar_units(
    src: *const u8,
    row_bytes: isize,
    rows: std::ops::Range<usize>,
    units: std::ops::Range<usize>,
    dst: *mut u32,
    ld: usize,
) {
    for c in rows {
        // SAFETY: caller's promise, as for `transpose16`.
        unsafe {
            let row = src.offset(c as isize * row_bytes).cast::<u32>();
            for u in units.clone() {
                dst.add(u * ld + c)
                    .write_unaligned(row.add(u).read_unaligned());
            }
        }
    }
}

/// f32 operands, AVX-512F: 6 rows × up to 4 zmm (64 columns) of accumulators.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512F32;

#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile512<const MR: usize, const NV: usize>(
    kp: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: (whole body) the caller passes an MR×(16·NV) tile of C, MR rows of A with kp elements and
    // kp rows of B with 16·NV elements, all in bounds.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(c.add(i * ldc + 16 * v));
                }
            }
        }
        for p in 0..kp {
            let bp = b.add(p * ldb);
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_ps(bp.add(16 * v));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*a.add(i * lda + p));
                for (x, &y) in row.iter_mut().zip(&bv) {
                    *x = _mm512_fmadd_ps(av, y, *x);
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc + 16 * v), *x);
            }
        }
    }
}

impl Kern for Avx512F32 {
    type A = f32;
    type E = f32;
    const PAIR: usize = 1;
    const RAW: Option<DType> = Some(DType::F32);
    const AVX512: bool = true;
    #[inline(always)]
    fn to_e(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn load<T: Float>(x: T) -> f32 {
        x.to_f32()
    }
    #[inline(always)]
    unsafe fn transpose_units(
        src: *const u8,
        row_bytes: isize,
        n: usize,
        units: usize,
        dst: *mut u32,
        ld: usize,
    ) {
        // SAFETY: forwarded promise (this kernel only runs on CPUs with AVX-512F).
        unsafe { transpose16(src, row_bytes, n, units, dst, ld) }
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
            let nv = ((n - j) / 16).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(6);
                // SAFETY: the tile `[i, i+mr) × [j, j+16·nv)` lies inside the caller's ranges, and the
                // driver only builds this kernel when the CPU has AVX-512F.
                unsafe {
                    let (a, b, c) = (a.add(i * lda), b.add(j), c.add(i * ldc + j));
                    dispatch_tile!(tile512, mr, nv, (kp, a, lda, b, ldb, c, ldc, accumulate), [1 2 3 4 5 6], [1 2 3 4]);
                }
                i += mr;
            }
            j += 16 * nv;
        }
    }
}

/// bf16 operands, AVX-512 BF16 (`vdpbf16ps`): 6 rows × up to 4 zmm of f32 accumulators.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Avx512Bf16;

#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn tile_bf16<const MR: usize, const NV: usize>(
    kp: usize,
    a: *const u16,
    lda: usize,
    b: *const u16,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    // SAFETY: (whole body) as in `tile512`, with A rows of 2·kp and B rows of 2·16·NV bf16 values. The
    // transmutes reinterpret 512 bits of packed bf16 pairs as the `__m512bh` the dot product takes.
    unsafe {
        if accumulate {
            for (i, row) in acc.iter_mut().enumerate() {
                for (v, x) in row.iter_mut().enumerate() {
                    *x = _mm512_loadu_ps(c.add(i * ldc + 16 * v));
                }
            }
        }
        for p in 0..kp {
            let bp = b.add(p * ldb * 2);
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_loadu_si512(bp.add(32 * v).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let pair = a.add(i * lda + 2 * p).cast::<i32>().read_unaligned();
                let av = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                for (x, &y) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(y));
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_storeu_ps(c.add(i * ldc + 16 * v), *x);
            }
        }
    }
}

impl Kern for Avx512Bf16 {
    type A = f32;
    type E = u16;
    const PAIR: usize = 2;
    const RAW: Option<DType> = Some(DType::BF16);
    const AVX512: bool = true;
    #[inline(always)]
    fn to_e(x: f32) -> u16 {
        bf16_bits(x)
    }
    #[inline(always)]
    unsafe fn transpose_units(
        src: *const u8,
        row_bytes: isize,
        n: usize,
        units: usize,
        dst: *mut u32,
        ld: usize,
    ) {
        // SAFETY: forwarded promise (this kernel only runs on CPUs with AVX-512 BF16).
        unsafe { transpose16(src, row_bytes, n, units, dst, ld) }
    }
    #[inline(always)]
    fn load<T: Float>(x: T) -> u16 {
        bf16_bits(x.to_f32())
    }
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        kp: usize,
        a: *const u16,
        lda: usize,
        b: *const u16,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        accumulate: bool,
    ) {
        let mut j = 0;
        while j < n {
            let nv = ((n - j) / 16).min(4);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(6);
                // SAFETY: the tile lies inside the caller's ranges; the driver only builds this kernel
                // when the CPU has AVX-512 BF16.
                unsafe {
                    let (a, b, c) = (a.add(i * lda), b.add(j * 2), c.add(i * ldc + j));
                    dispatch_tile!(tile_bf16, mr, nv, (kp, a, lda, b, ldb, c, ldc, accumulate), [1 2 3 4 5 6], [1 2 3 4]);
                }
                i += mr;
            }
            j += 16 * nv;
        }
    }
}
