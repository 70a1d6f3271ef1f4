//! The register-blocked micro-kernels: `C[m×n] (+)= A[m×k] · B[k×n]` over packed operands.
//!
//! Both products of attention have this shape: `S = Q·Kᵀ` (A = packed Q rows, B = a Kᵀ tile) and
//! `O += P·V` (A = the probabilities, B = a V tile). B is packed so one SIMD load reads `16` consecutive
//! output columns: `[k][ldb]` for f32/f64, and `[k/2][ldb][2]` (pairs along k) for bf16, which is the
//! operand order of AVX-512 BF16's `vdpbf16ps`. A is row-major with each row's `k` (pairs) contiguous, so
//! one broadcast feeds a whole row of accumulators. `n` is always a multiple of 16.

use crate::tensor::{DType, Float};

use super::softmax::Acc;

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
        for c in 0..n {
            // SAFETY: row c and its `units` units are readable; `u * ld + c` is inside `dst` (caller's promise).
            unsafe {
                let row = src.offset(c as isize * row_bytes).cast::<u32>();
                for u in 0..units {
                    dst.add(u * ld + c)
                        .write_unaligned(row.add(u).read_unaligned());
                }
            }
        }
    }
    /// Converts an input element to an operand.
    fn load<T: Float>(x: T) -> Self::E;
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

/// Plain Rust, any accumulator: f32 (for f32/bf16/f16) or f64.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Portable<A>(std::marker::PhantomData<A>);

impl<A: Acc> Kern for Portable<A> {
    type A = A;
    type E = A;
    const PAIR: usize = 1;
    const RAW: Option<DType> = if A::IS_F32 { Some(DType::F32) } else { None };
    #[inline(always)]
    fn to_e(x: A) -> A {
        x
    }
    #[inline(always)]
    fn load<T: Float>(x: T) -> A {
        A::read(x)
    }
    #[inline(always)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        kp: usize,
        a: *const A,
        lda: usize,
        b: *const A,
        ldb: usize,
        c: *mut A,
        ldc: usize,
        accumulate: bool,
    ) {
        // Four rows at a time: each loaded B row feeds four accumulator rows.
        let mut i = 0;
        while i < m {
            let rows = (m - i).min(4);
            for r in 0..rows {
                // SAFETY: row `i + r < m` of C has `n` elements (caller's promise).
                let crow = unsafe { std::slice::from_raw_parts_mut(c.add((i + r) * ldc), n) };
                if !accumulate {
                    crow.fill(A::ZERO);
                }
            }
            for p in 0..kp {
                // SAFETY: row `p < kp` of B has `n` elements starting at `p * ldb`.
                let brow = unsafe { std::slice::from_raw_parts(b.add(p * ldb), n) };
                for r in 0..rows {
                    // SAFETY: element `(i + r, p)` of A is in range; row `i + r` of C has `n` elements and no
                    // other live reference points into it.
                    let (av, crow) = unsafe {
                        (
                            *a.add((i + r) * lda + p),
                            std::slice::from_raw_parts_mut(c.add((i + r) * ldc), n),
                        )
                    };
                    for (x, &y) in crow.iter_mut().zip(brow) {
                        *x = *x + av * y;
                    }
                }
            }
            i += rows;
        }
    }
}

/// Rounds an f32 to the nearest bf16 (ties to even) and returns its bits. Exact for bf16 values.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2F32, Avx512Bf16, Avx512F32};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{bf16_bits, Kern};
    use crate::tensor::{DType, Float};

    /// [`Kern::transpose_units`] on AVX-512: 16×16 blocks of 32-bit units transposed in registers
    /// (unpack 32, unpack 64, then two rounds of 128-bit lane shuffles); leftover rows and units one by one.
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(
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
                        _mm512_loadu_si512(
                            src.offset((c0 + i) as isize * row_bytes).add(4 * u0).cast(),
                        )
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

    /// Dispatches the runtime tile shape `(rows, vecs)` to a const-generic tile function.
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
}
