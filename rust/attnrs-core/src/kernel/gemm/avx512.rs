//! The AVX-512 micro-kernels: f32 operands ([`Avx512F32`]) and bf16 pairs on `vdpbf16ps` ([`Avx512Bf16`]),
//! and the in-register 16×16 transpose of 32-bit units both use for packing.

use std::arch::x86_64::*;

use super::{Kern, bf16_bits, scalar_units};
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
    unsafe fn exp_row(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
        // SAFETY: forwarded promise (this kernel only runs on CPUs with AVX-512F).
        unsafe { exp_row_f32(s, m, p) }
    }
    #[inline(always)]
    unsafe fn max_row(s: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { max_row16(s) }
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
    unsafe fn exp_row(s: &[f32], m: f32, p: &mut [u16]) -> f32 {
        // SAFETY: forwarded promise (this kernel only runs on CPUs with AVX-512 BF16).
        unsafe { exp_row_bf16(s, m, p) }
    }
    #[inline(always)]
    unsafe fn max_row(s: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { max_row16(s) }
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

/// `exp(x)` on 16 lanes: [`crate::kernel::softmax::exp_f32`]'s algorithm (and constants) with fused
/// multiply-adds. NaN stays NaN (each min/max returns its second operand when one is NaN); inputs below -87.3
/// (-inf included) give 0.
#[target_feature(enable = "avx512f")]
#[inline]
fn exp16(x: __m512) -> __m512 {
    use crate::kernel::softmax::exp_consts::*;
    let x = _mm512_max_ps(
        _mm512_set1_ps(-CLAMP),
        _mm512_min_ps(_mm512_set1_ps(CLAMP), x),
    );
    let magic = _mm512_set1_ps(MAGIC);
    let z = _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), magic);
    let n = _mm512_sub_ps(z, magic);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(POLY[0]);
    for &c in &POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let bits = _mm512_sub_epi32(
        _mm512_castps_si512(z),
        _mm512_set1_epi32((MAGIC_BITS - 127) as i32),
    );
    _mm512_mul_ps(p, _mm512_castsi512_ps(_mm512_slli_epi32::<23>(bits)))
}

/// [`Kern::exp_row`] for f32 operands: the exps and their sum in registers.
///
/// # Safety
/// `s.len()` is a multiple of 16 and `p` at least as long (checked); the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn exp_row_f32(s: &[f32], m: f32, p: &mut [f32]) -> f32 {
    assert!(s.len().is_multiple_of(16) && p.len() >= s.len());
    let mv = _mm512_set1_ps(m);
    let mut sum = _mm512_setzero_ps();
    for (sc, pc) in s.chunks_exact(16).zip(p.chunks_exact_mut(16)) {
        // SAFETY: each chunk holds 16 f32.
        unsafe {
            let e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sc.as_ptr()), mv));
            _mm512_storeu_ps(pc.as_mut_ptr(), e);
            sum = _mm512_add_ps(sum, e);
        }
    }
    _mm512_reduce_add_ps(sum)
}

/// [`Kern::exp_row`] for bf16 operands: 32 exps at a time rounded to bf16 by one `vcvtne2ps2bf16` (nearest,
/// ties to even, as `bf16_bits`; the instruction flushes denormal results, below 1.2e-38, to zero), the sum
/// kept in f32.
///
/// # Safety
/// `s.len()` is a multiple of 16 and `p` at least as long (checked); the CPU has AVX-512 BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn exp_row_bf16(s: &[f32], m: f32, p: &mut [u16]) -> f32 {
    assert!(s.len().is_multiple_of(16) && p.len() >= s.len());
    let mv = _mm512_set1_ps(m);
    let (mut sum0, mut sum1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let pairs = s.len() / 32;
    // SAFETY: (whole body) chunk `c` reads s[32c..32c+32] and writes p[32c..32c+32], inside both slices; the
    // tail reads and writes the last 16. The transmutes reinterpret 32 bf16 (16 in the tail) as integer lanes.
    unsafe {
        for c in 0..pairs {
            let e0 = exp16(_mm512_sub_ps(_mm512_loadu_ps(s.as_ptr().add(32 * c)), mv));
            let e1 = exp16(_mm512_sub_ps(
                _mm512_loadu_ps(s.as_ptr().add(32 * c + 16)),
                mv,
            ));
            // The second operand fills the low half.
            let b = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(e1, e0));
            _mm512_storeu_si512(p.as_mut_ptr().add(32 * c).cast(), b);
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
        }
        if !s.len().is_multiple_of(32) {
            let e = exp16(_mm512_sub_ps(
                _mm512_loadu_ps(s.as_ptr().add(32 * pairs)),
                mv,
            ));
            let b = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(e));
            _mm256_storeu_si256(p.as_mut_ptr().add(32 * pairs).cast(), b);
            sum0 = _mm512_add_ps(sum0, e);
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(sum0, sum1))
}

/// [`Kern::max_row`] on 16 lanes: the maximum in a register, NaN if any element is NaN (the one reduction at
/// the end, not a chain of scalar NaN-aware comparisons).
///
/// # Safety
/// `s.len()` is a multiple of 16 (checked); the CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn max_row16(s: &[f32]) -> f32 {
    assert!(s.len().is_multiple_of(16));
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut nan: __mmask16 = 0;
    for c in s.chunks_exact(16) {
        // SAFETY: each chunk holds 16 f32.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        nan |= _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
        max = _mm512_max_ps(max, v);
    }
    if nan != 0 {
        f32::NAN
    } else {
        _mm512_reduce_max_ps(max)
    }
}
