//! Decode on AVX-512: the few query rows of a GQA group against K and V read where they lie.
//!
//! The prefill path packs each K/V tile (Kᵀ transposed, V re-laid) for its register-blocked products; with a
//! handful of query rows that packing costs more than the products and keeps the memory system idle between
//! tiles. Here `S = Q·Kᵀ` is a set of dot products along D read straight from K's rows (4 query rows × 4 keys
//! of accumulators, reduced together by a transpose-add tree) and `O += P·V` reads whole V rows, in address
//! order, once per 2 query rows. bf16 on an AVX-512 BF16 CPU runs both products on `vdpbf16ps` (Q and P
//! rounded to bf16, V rows interleaved pairwise); otherwise bf16 and f16 are widened to f32 on load. The next
//! tile's K rows are prefetched into L2 a few at a time during `Q·Kᵀ`, its V rows during `P·V`: every line
//! (on Zen 4 the hardware prefetchers alone, or prefetching one line in two or one per page, read 1.5-1.8×
//! slower); the prefetch instructions are then where the cycles wait, bounded by the misses a core can have
//! in flight. The online-softmax step is the
//! one every variant shares ([`softmax_tile`]). Needs K and V rows contiguous along D.

use std::arch::x86_64::*;
use std::ops::Range;

use super::tile::{BC, Job, Rows, round_up, softmax_tile};
use crate::kernel::gemm::{Avx512Bf16, Avx512F32, Kern, bf16_bits};
use crate::kernel::softmax::Logits;
use crate::mask::tiles::{BlockClass, TileVis};
use crate::tensor::{DType, Float};

/// Most query rows (Q·G) one decode item takes; more go through the packed path.
pub(super) const MAX_ROWS: usize = 32;

/// How many tiles ahead K and V rows are prefetched.
const AHEAD: usize = 1;

/// Whether [`item`] can run this call: f32 accumulation, no dropout, rows few enough, K and V contiguous
/// along D.
pub(super) fn applies<T: Float>(job: &Job<T>) -> bool {
    matches!(T::DTYPE, DType::F32 | DType::BF16 | DType::F16)
        && job.drop.is_none()
        // Ragged calls (per-sequence lengths, paged rows) take the packed streaming path.
        && job.ragged.is_none()
        && job.dims.g * job.dims.q <= MAX_ROWS
        && (job.k.st[3] == 1 || job.dims.d <= 1)
        && (job.v.st[3] == 1 || job.dims.dv <= 1)
}

/// Per-item buffers; rows padded to a multiple of 4 (the padding rows of Q and P stay zero).
pub(super) struct Scratch {
    /// Query rows as f32, `round_up(D, 16)` each (widening path).
    qp: Vec<f32>,
    /// Query rows as bf16 bits, `round_up(D, 32)` each (`vdpbf16ps` path).
    qb: Vec<u16>,
    s: Vec<f32>,
    p: Vec<f32>,
    /// P as bf16 bits (`vdpbf16ps` path).
    pb: Vec<u16>,
    /// O, `ld` per row: `dvp` (widening path) or `round_up(Dv, 32)` in the pair-interleaved column order of
    /// [`pv_bf16`] until [`body`] puts it back at stride `dvp`.
    pub o: Vec<f32>,
    pub m: Vec<f32>,
    pub l: Vec<f32>,
    vis: TileVis,
    bias: Vec<f32>,
    /// Each GQA head's class of the current tile.
    classes: Vec<BlockClass>,
}

impl Scratch {
    /// Buffers for `job`; `dot` selects the `vdpbf16ps` path (bf16 inputs on an AVX-512 BF16 CPU).
    pub fn new<T>(job: &Job<T>, dot: bool) -> Scratch {
        let rows = job.dims.g * job.dims.q;
        let rpad = round_up(rows, 4);
        let (d, dv) = (job.dims.d, job.dims.dv);
        Scratch {
            qp: vec![0.0; if dot { 0 } else { rpad * round_up(d, 16) }],
            qb: vec![0; if dot { rpad * round_up(d, 32) } else { 0 }],
            s: vec![0.0; rpad * BC],
            p: vec![0.0; if dot { 0 } else { rpad * BC }],
            pb: vec![0; if dot { rpad * BC } else { 0 }],
            o: vec![0.0; rpad * job.dvp.max(if dot { round_up(dv, 32) } else { 0 })],
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            vis: TileVis::new(job.dims.q, BC),
            bias: vec![0.0; 2 * BC], // a bias row, then a score-terms row
            classes: vec![BlockClass::Empty; job.dims.g],
        }
    }
}

/// Loads 16 elements of one input dtype as f32; lanes outside `mask` read nothing and are 0.
trait Lanes {
    /// Bytes per element.
    const SIZE: usize;
    /// # Safety
    /// The lanes in `mask` address readable elements; the CPU has AVX-512F/BW/VL.
    unsafe fn load(p: *const u8, mask: __mmask16) -> __m512;
}

struct F32s;
struct Bf16s;
struct F16s;

impl Lanes for F32s {
    const SIZE: usize = 4;
    #[inline(always)]
    unsafe fn load(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: the caller's promise; masked-off lanes are not accessed.
        unsafe { _mm512_maskz_loadu_ps(mask, p.cast()) }
    }
}

impl Lanes for Bf16s {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: as above; a bf16 is the upper half of the f32 with the same value.
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, p.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

impl Lanes for F16s {
    const SIZE: usize = 2;
    #[inline(always)]
    unsafe fn load(p: *const u8, mask: __mmask16) -> __m512 {
        // SAFETY: as above.
        unsafe { _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p.cast())) }
    }
}

/// The lanes of vector `v` (16 elements from `16 * v`) that lie inside a row of `len` elements.
#[inline(always)]
fn lanes_mask(v: usize, len: usize) -> __mmask16 {
    let left = len.saturating_sub(16 * v).min(16);
    ((1u32 << left) - 1) as __mmask16
}

/// The 16-bit lanes of vector `v` (32 elements from `32 * v`) that lie inside a row of `len` elements.
#[inline(always)]
fn lanes_mask32(v: usize, len: usize) -> __mmask32 {
    let left = len.saturating_sub(32 * v).min(32);
    if left == 32 { !0 } else { (1u32 << left) - 1 }
}

/// Sums each of 16 vectors: lane `i` of the result is the sum of the lanes of `x[i]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn reduce16(x: &[__m512; 16]) -> __m512 {
    // Per 128-bit segment: [a0+a2, b0+b2, a1+a3, b1+b3] for each pair (a, b).
    let mut t = [_mm512_setzero_ps(); 8];
    for (i, y) in t.iter_mut().enumerate() {
        let (a, b) = (x[2 * i], x[2 * i + 1]);
        *y = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Per segment: the partials of 4 consecutive vectors.
    let mut u = [_mm512_setzero_ps(); 4];
    for (i, y) in u.iter_mut().enumerate() {
        let (a, b) = (_mm512_castps_pd(t[2 * i]), _mm512_castps_pd(t[2 * i + 1]));
        *y = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
        );
    }
    // Sum the segments pairwise, then again: segment s ends holding the sums of vectors 4s..4s+4.
    let (a, b) = (u[0], u[1]);
    let w0 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xDD>(a, b),
    );
    let (a, b) = (u[2], u[3]);
    let w1 = _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(a, b),
        _mm512_shuffle_f32x4::<0xDD>(a, b),
    );
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0x88>(w0, w1),
        _mm512_shuffle_f32x4::<0xDD>(w0, w1),
    )
}

/// Issues L2 prefetches for the `bytes` bytes from `p`.
#[inline(always)]
unsafe fn prefetch_row(p: *const u8, bytes: usize) {
    let mut off = 0;
    while off < bytes {
        // SAFETY: a prefetch never faults; `wrapping_add` keeps the address computation defined.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(off).cast()) };
        off += 64;
    }
}

/// The K and V rows of a tile ahead, prefetched a few at a time while the current tile's dot products run.
#[derive(Clone, Copy)]
struct Prefetch {
    k: *const u8,
    v: *const u8,
    kst: isize,
    vst: isize,
    /// Rows that exist.
    n: usize,
    kbytes: usize,
}

impl Prefetch {
    /// Prefetches rows `rows` (those below `n`) of K.
    #[inline(always)]
    fn k_rows(&self, rows: Range<usize>) {
        for x in rows.start..rows.end.min(self.n) {
            // SAFETY: prefetches never fault; the addresses are computed with wrapping arithmetic.
            unsafe { prefetch_row(self.k.wrapping_offset(x as isize * self.kst), self.kbytes) };
        }
    }
    /// Prefetches `lines` cache lines from byte `from` of row `x` (if below `n`) of V: the columns one
    /// `O += P·V` pass reads. Callers pass a count the compiler knows, so the prefetch is straight-line code
    /// and the pass keeps its accumulators in registers (a loop over `vbytes` here made LLVM spill all 16
    /// of the f32 pass to the stack: 1.5x slower from cache).
    #[inline(always)]
    fn v_lines(&self, x: usize, from: usize, lines: usize) {
        if x < self.n {
            let row = self
                .v
                .wrapping_offset(x as isize * self.vst)
                .wrapping_add(from);
            for line in 0..lines {
                // SAFETY: as above.
                unsafe { _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(64 * line).cast()) };
            }
        }
    }
}

/// `S[r][j] = q_r · k_j` for rows `0..rpad` and keys `0..round_up(n, 4)` (keys past `n` repeat key `n - 1`).
/// `pf`: the next tile's first key row and how many of its rows to prefetch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn qk<L: Lanes>(
    qp: &[f32],
    dpad: usize,
    rpad: usize,
    k: *const u8,
    kst: isize,
    n: usize,
    d: usize,
    s: &mut [f32],
    pf: Prefetch,
) {
    let nvec = d.div_ceil(16);
    for j0 in (0..n).step_by(4) {
        // SAFETY: rows j < n of the tile are in range of key, each with D contiguous elements; masked loads
        // read only those; Q rows `rpad` × `dpad` and S rows `rpad` × BC (j0 + 4 <= BC) are in the buffers.
        unsafe {
            let rows: [*const u8; 4] =
                std::array::from_fn(|x| k.offset((j0 + x).min(n - 1) as isize * kst));
            pf.k_rows(j0..j0 + 4);
            for rb in (0..rpad).step_by(4) {
                let mut acc = [_mm512_setzero_ps(); 16];
                for v in 0..nvec {
                    let mask = lanes_mask(v, d);
                    let kv: [__m512; 4] =
                        std::array::from_fn(|x| L::load(rows[x].add(16 * v * L::SIZE), mask));
                    for r in 0..4 {
                        let qv = _mm512_loadu_ps(qp.as_ptr().add((rb + r) * dpad + 16 * v));
                        for x in 0..4 {
                            acc[4 * r + x] = _mm512_fmadd_ps(qv, kv[x], acc[4 * r + x]);
                        }
                    }
                }
                let sums = reduce16(&acc);
                let sp = s.as_mut_ptr().add(rb * BC + j0);
                _mm_storeu_ps(sp, _mm512_extractf32x4_ps::<0>(sums));
                _mm_storeu_ps(sp.add(BC), _mm512_extractf32x4_ps::<1>(sums));
                _mm_storeu_ps(sp.add(2 * BC), _mm512_extractf32x4_ps::<2>(sums));
                _mm_storeu_ps(sp.add(3 * BC), _mm512_extractf32x4_ps::<3>(sums));
            }
        }
    }
}

/// Query rows one pass of `O += P·V` updates: with two rows every accumulator of a whole 128-column V row
/// fits in the registers, so V is read row after row in address order (the hardware prefetcher follows that;
/// half rows, or rows interleaved chunk by chunk, read at about half the rate).
const PV_ROWS: usize = 2;

/// Most 16-column vectors one `O += P·V` pass keeps (widening path): 8 = 128 f32 columns.
const PV_VECS: usize = 8;

/// `O[r] += Σ_j P[r][j] v_j` for rows `0..rows`, [`PV_ROWS`] at a time, over `NV` vectors of columns from
/// vector `v0`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_cols<L: Lanes, const NV: usize>(
    p: &[f32],
    rows: usize,
    v: *const u8,
    vst: isize,
    n: usize,
    dv: usize,
    o: &mut [f32],
    dvp: usize,
    v0: usize,
    pf: Prefetch,
) {
    let masks: [__mmask16; NV] = std::array::from_fn(|x| lanes_mask(v0 + x, dv));
    for rb in (0..rows).step_by(PV_ROWS) {
        // SAFETY: O and P hold `round_up(rows, 4)` rows (so rows rb..rb + PV_ROWS exist), O rows with dvp >=
        // 16 (v0 + NV) columns; V rows j < n hold Dv contiguous elements (masked loads read only those); P
        // rows hold BC >= n columns.
        unsafe {
            let op = o.as_mut_ptr().add(rb * dvp + 16 * v0);
            let mut acc = [[_mm512_setzero_ps(); NV]; PV_ROWS];
            for (r, row) in acc.iter_mut().enumerate() {
                for (x, a) in row.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(op.add(r * dvp + 16 * x));
                }
            }
            let pp = p.as_ptr().add(rb * BC);
            for j in 0..n {
                if rb == 0 {
                    pf.v_lines(j, 16 * v0 * L::SIZE, (NV * L::SIZE).div_ceil(4));
                }
                let vrow = v.offset(j as isize * vst).add(16 * v0 * L::SIZE);
                let vv: [__m512; NV] =
                    std::array::from_fn(|x| L::load(vrow.add(16 * x * L::SIZE), masks[x]));
                for (r, row) in acc.iter_mut().enumerate() {
                    let pb = _mm512_set1_ps(*pp.add(r * BC + j));
                    for (a, &y) in row.iter_mut().zip(&vv) {
                        *a = _mm512_fmadd_ps(pb, y, *a);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (x, a) in row.iter().enumerate() {
                    _mm512_storeu_ps(op.add(r * dvp + 16 * x), *a);
                }
            }
        }
    }
}

/// `O += P·V` over the tile's `n` keys for rows `0..rows`, prefetching the next tile's V rows (`pf` as for
/// [`qk`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<L: Lanes>(
    p: &[f32],
    rows: usize,
    v: *const u8,
    vst: isize,
    n: usize,
    dv: usize,
    o: &mut [f32],
    dvp: usize,
    pf: Prefetch,
) {
    let nvec = dvp / 16;
    let mut v0 = 0;
    while v0 < nvec {
        let nv = (nvec - v0).min(PV_VECS);
        // SAFETY: forwarded; columns v0..v0+nv vectors lie inside dvp.
        unsafe {
            match nv {
                1 => pv_cols::<L, 1>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                2 => pv_cols::<L, 2>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                3 => pv_cols::<L, 3>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                4 => pv_cols::<L, 4>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                5 => pv_cols::<L, 5>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                6 => pv_cols::<L, 6>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                7 => pv_cols::<L, 7>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
                _ => pv_cols::<L, 8>(p, rows, v, vst, n, dv, o, dvp, v0, pf),
            }
        }
        v0 += nv;
    }
}

/// `S[r][j] = q_r · k_j` with `vdpbf16ps` on bf16 rows (Q as bf16 bits, `dpad` = D rounded up to 32 each),
/// otherwise as [`qk`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn qk_bf16(
    qb: &[u16],
    dpad: usize,
    rpad: usize,
    k: *const u8,
    kst: isize,
    n: usize,
    d: usize,
    s: &mut [f32],
    pf: Prefetch,
) {
    let nvec = d.div_ceil(32);
    for j0 in (0..n).step_by(4) {
        // SAFETY: as in `qk`, with 32 bf16 lanes per vector (masked to the row's D elements). The transmutes
        // reinterpret 512 bits of bf16 pairs as the `__m512bh` the dot product takes.
        unsafe {
            let rows: [*const u8; 4] =
                std::array::from_fn(|x| k.offset((j0 + x).min(n - 1) as isize * kst));
            pf.k_rows(j0..j0 + 4);
            for rb in (0..rpad).step_by(4) {
                let mut acc = [_mm512_setzero_ps(); 16];
                // One key row after another, so the rows are read in address order (the hardware prefetcher
                // follows that; four rows interleaved chunk by chunk read at about half the rate).
                for x in 0..4 {
                    for v in 0..nvec {
                        let left = d - 32 * v;
                        let mask: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
                        let kv = std::mem::transmute::<__m512i, __m512bh>(
                            _mm512_maskz_loadu_epi16(mask, rows[x].add(64 * v).cast()),
                        );
                        for r in 0..4 {
                            let qv = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                                qb.as_ptr().add((rb + r) * dpad + 32 * v).cast(),
                            ));
                            acc[4 * r + x] = _mm512_dpbf16_ps(acc[4 * r + x], qv, kv);
                        }
                    }
                }
                let sums = reduce16(&acc);
                let sp = s.as_mut_ptr().add(rb * BC + j0);
                _mm_storeu_ps(sp, _mm512_extractf32x4_ps::<0>(sums));
                _mm_storeu_ps(sp.add(BC), _mm512_extractf32x4_ps::<1>(sums));
                _mm_storeu_ps(sp.add(2 * BC), _mm512_extractf32x4_ps::<2>(sums));
                _mm_storeu_ps(sp.add(3 * BC), _mm512_extractf32x4_ps::<3>(sums));
            }
        }
    }
}

/// Column `c` (of a 32-column chunk) that lane `k` of the chunk's two accumulators holds in [`pv_bf16`]:
/// interleaving two rows 16 bits at a time pairs columns 0-3, 8-11, .. (low) and 4-7, 12-15, .. (high).
#[inline(always)]
pub(crate) const fn interleaved_col(k: usize) -> usize {
    let (hi, k) = (k / 16, k % 16);
    8 * (k / 4) + 4 * hi + k % 4
}

/// Most 32-column chunks one `vdpbf16ps` pass of `O += P·V` keeps: 4 = 128 bf16 columns (see [`PV_ROWS`]).
const PV_CHUNKS: usize = 4;

/// `O[r] += Σ_j P[r][j] v_j` with `vdpbf16ps` over key pairs, for rows `0..rows` ([`PV_ROWS`] at a time) and
/// `NC` chunks of 32 columns from chunk `c0`. P holds bf16 bits (`BC` per row); O is in the interleaved order
/// of [`interleaved_col`], `ld` per row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_bf16_cols<const NC: usize>(
    pb: &[u16],
    rows: usize,
    v: *const u8,
    vst: isize,
    n: usize,
    dv: usize,
    o: &mut [f32],
    ld: usize,
    c0: usize,
    pf: Prefetch,
) {
    let masks: [__mmask32; NC] = std::array::from_fn(|x| lanes_mask32(c0 + x, dv));
    for rb in (0..rows).step_by(PV_ROWS) {
        // SAFETY: O and P hold `round_up(rows, 4)` rows (so rows rb..rb + PV_ROWS exist), O rows with ld >=
        // 32 (c0 + NC) columns; V rows j < n hold Dv contiguous elements (masked loads read only those; the
        // missing partner of an odd last key is zero, as is its P); P rows hold BC >= round_up(n, 2) bf16
        // values. Transmutes as in `qk_bf16`.
        unsafe {
            let op = o.as_mut_ptr().add(rb * ld + 32 * c0);
            let mut acc = [[_mm512_setzero_ps(); 2 * PV_CHUNKS]; PV_ROWS];
            for (r, row) in acc.iter_mut().enumerate() {
                for (x, a) in row.iter_mut().take(2 * NC).enumerate() {
                    *a = _mm512_loadu_ps(op.add(r * ld + 16 * x));
                }
            }
            let pp = pb.as_ptr().add(rb * BC);
            for j in (0..n).step_by(2) {
                if rb == 0 {
                    pf.v_lines(j, 64 * c0, NC);
                    pf.v_lines(j + 1, 64 * c0, NC);
                }
                let va = v.offset(j as isize * vst).add(64 * c0);
                let vb = v.offset((j + 1).min(n - 1) as isize * vst).add(64 * c0);
                let mut vv = [_mm512_setzero_si512(); 2 * PV_CHUNKS];
                let a: [__m512i; NC] = std::array::from_fn(|x| {
                    _mm512_maskz_loadu_epi16(masks[x], va.add(64 * x).cast())
                });
                let b: [__m512i; NC] = std::array::from_fn(|x| {
                    if j + 1 < n {
                        _mm512_maskz_loadu_epi16(masks[x], vb.add(64 * x).cast())
                    } else {
                        _mm512_setzero_si512()
                    }
                });
                for x in 0..NC {
                    vv[2 * x] = _mm512_unpacklo_epi16(a[x], b[x]);
                    vv[2 * x + 1] = _mm512_unpackhi_epi16(a[x], b[x]);
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let pair = pp.add(r * BC + j).cast::<i32>().read_unaligned();
                    let pv = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair));
                    for (a, &y) in row.iter_mut().zip(&vv).take(2 * NC) {
                        *a = _mm512_dpbf16_ps(*a, pv, std::mem::transmute::<__m512i, __m512bh>(y));
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (x, a) in row.iter().take(2 * NC).enumerate() {
                    _mm512_storeu_ps(op.add(r * ld + 16 * x), *a);
                }
            }
        }
    }
}

/// `O += P·V` with `vdpbf16ps` (see [`pv_bf16_cols`]) for rows `0..rows`, prefetching the next tile's V rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn pv_bf16(
    pb: &[u16],
    rows: usize,
    v: *const u8,
    vst: isize,
    n: usize,
    dv: usize,
    o: &mut [f32],
    ld: usize,
    pf: Prefetch,
) {
    let nc = ld / 32;
    let mut c0 = 0;
    while c0 < nc {
        let k = (nc - c0).min(PV_CHUNKS);
        // SAFETY: forwarded; chunks c0..c0+k lie inside ld.
        unsafe {
            match k {
                1 => pv_bf16_cols::<1>(pb, rows, v, vst, n, dv, o, ld, c0, pf),
                2 => pv_bf16_cols::<2>(pb, rows, v, vst, n, dv, o, ld, c0, pf),
                3 => pv_bf16_cols::<3>(pb, rows, v, vst, n, dv, o, ld, c0, pf),
                _ => pv_bf16_cols::<4>(pb, rows, v, vst, n, dv, o, ld, c0, pf),
            }
        }
        c0 += k;
    }
}

/// Runs all `Q·G` rows of `(b, kvh)` over kv tiles `tiles`, leaving `(m, l, O)` in the scratch (O at stride
/// `dvp`). `DOT`: bf16 inputs through `vdpbf16ps` (then `L` is [`Bf16s`]); else widened to f32.
#[inline(always)]
fn body<L: Lanes, T: Float, const DOT: bool>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    tiles: Range<usize>,
    sc: &mut Scratch,
) {
    let dims = job.dims;
    let (g, q, d, dv, dvp) = (dims.g, dims.q, dims.d, dims.dv, job.dvp);
    let rows = g * q;
    let dpad = round_up(d, if DOT { 32 } else { 16 });
    let ld = if DOT { round_up(dv, 32) } else { dvp };
    let rpad = round_up(rows, 4);
    for gi in 0..g {
        for i in 0..q {
            let r = gi * q + i;
            // SAFETY: (b, kvh * g + gi, i, 0) is in range of query; its row has D elements at stride st[3].
            let row = unsafe { job.q.at(b, kvh * g + gi, i, 0) };
            if job.q.st[3] == 1 || d == 1 {
                let p = row.cast::<u8>().cast_const();
                // SAFETY: the row's D elements are contiguous; each scratch row holds `dpad` >= D elements;
                // `DOT` runs bf16 inputs (`T` is bf16) and only on CPUs with AVX-512 BF16.
                unsafe {
                    if DOT {
                        load_bf16_bits(p, d, &mut sc.qb[r * dpad..(r + 1) * dpad]);
                    } else {
                        load_row::<L>(p, d, &mut sc.qp[r * dpad..(r + 1) * dpad]);
                    }
                }
                continue;
            }
            for dd in 0..d {
                // SAFETY: dd < D.
                let x = unsafe { row.offset(dd as isize * job.q.st[3]).read() }.to_f32();
                if DOT {
                    sc.qb[r * dpad + dd] = bf16_bits(x);
                } else {
                    sc.qp[r * dpad + dd] = x;
                }
            }
        }
    }
    sc.m.fill(f32::NEG_INFINITY);
    sc.l.fill(0.0);
    sc.o.fill(0.0);
    let lg = Logits {
        scale: job.scale as f32,
        softcap: job.softcap.map(|c| (c as f32, (1.0 / c) as f32)),
    };
    let classes = &mut sc.classes;
    let (kst, vst) = (
        job.k.st[2] * L::SIZE as isize,
        job.v.st[2] * L::SIZE as isize,
    );
    let end = (tiles.end * BC).min(dims.k);
    for t in tiles {
        let c0 = t * BC;
        let n = (dims.k - c0).min(BC);
        for (gi, cls) in classes.iter_mut().enumerate() {
            *cls = job.mask.classify(b, kvh * g + gi, 0..q, c0..c0 + n);
        }
        if classes.iter().all(|c| *c == BlockClass::Empty) {
            continue;
        }
        let next = (end.saturating_sub(c0 + AHEAD * BC)).min(BC);
        // SAFETY: rows c0..c0+n of key and value are in range (n >= 1); the next tile's rows are only
        // prefetched (an address computation, never dereferenced) when they exist.
        let (kp, vp) = unsafe {
            (
                job.k.at(b, kvh, c0, 0).cast::<u8>().cast_const(),
                job.v.at(b, kvh, c0, 0).cast::<u8>().cast_const(),
            )
        };
        let pf = Prefetch {
            k: kp.wrapping_offset((AHEAD * BC) as isize * kst),
            v: vp.wrapping_offset((AHEAD * BC) as isize * vst),
            kst,
            vst,
            n: next,
            kbytes: d * L::SIZE,
        };
        // SAFETY: see `qk` / `qk_bf16`; `DOT` is only set on CPUs with AVX-512 BF16.
        unsafe {
            if DOT {
                qk_bf16(&sc.qb, dpad, rpad, kp, kst, n, d, &mut sc.s, pf);
            } else {
                qk::<L>(&sc.qp, dpad, rpad, kp, kst, n, d, &mut sc.s, pf);
            }
        }
        let st = Rows {
            m: &mut sc.m,
            l: &mut sc.l,
            o: &mut sc.o,
            ld,
        };
        let cells = (0..q, c0..c0 + n);
        let (bias, terms) = sc.bias.split_at_mut(BC);
        let scratch = (&mut sc.vis, bias, terms);
        if DOT {
            for (gi, &cls) in classes.iter().enumerate() {
                if cls == BlockClass::Empty {
                    // This head's rows take nothing from the tile.
                    sc.pb[gi * q * BC..(gi + 1) * q * BC].fill(0);
                }
            }
            let (s, p) = (&mut sc.s, &mut sc.pb);
            // SAFETY: `DOT` is only set on CPUs with AVX-512 BF16, the features of `Avx512Bf16`.
            let passes = unsafe { Avx512Bf16::row_passes() };
            softmax_tile(job, b, kvh, cells, classes, lg, s, p, st, scratch, passes);
            // SAFETY: see `pv_bf16`.
            unsafe { pv_bf16(&sc.pb, rows, vp, vst, n, dv, &mut sc.o, ld, pf) };
        } else {
            for (gi, &cls) in classes.iter().enumerate() {
                if cls == BlockClass::Empty {
                    sc.p[gi * q * BC..(gi + 1) * q * BC].fill(0.0);
                }
            }
            let (s, p) = (&mut sc.s, &mut sc.p);
            // SAFETY: this kernel only runs on CPUs with AVX-512F, the features of `Avx512F32`.
            let passes = unsafe { Avx512F32::row_passes() };
            softmax_tile(job, b, kvh, cells, classes, lg, s, p, st, scratch, passes);
            // SAFETY: see `pv`.
            unsafe { pv::<L>(&sc.p, rows, vp, vst, n, dv, &mut sc.o, dvp, pf) };
        }
    }
    if DOT {
        // SAFETY: `DOT` runs only on CPUs with AVX-512; O holds `rpad >= rows` rows of `ld >= dvp` columns.
        unsafe { natural_order(&mut sc.o, rows, ld, dvp, dv) };
    }
}

/// `dst[..D] = ` a query row of `D` contiguous elements as f32 (zeros after `D`, up to a multiple of 16).
///
/// # Safety
/// `p` addresses `D` readable elements of `L`'s type; `dst.len() >= round_up(D, 16)`; the CPU has AVX-512F/BW/VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
unsafe fn load_row<L: Lanes>(p: *const u8, d: usize, dst: &mut [f32]) {
    assert!(dst.len() >= round_up(d, 16));
    for v in 0..d.div_ceil(16) {
        // SAFETY: the masked load reads only elements below D; vector v's 16 floats lie inside dst.
        unsafe {
            let x = L::load(p.add(16 * v * L::SIZE), lanes_mask(v, d));
            _mm512_storeu_ps(dst.as_mut_ptr().add(16 * v), x);
        }
    }
}

/// `dst[..D] = ` a bf16 query row's bits, with a NaN made quiet as widening it to f32 does (`half`'s
/// `to_f32`, which the scalar path takes), zeros after `D` up to a multiple of 32.
///
/// # Safety
/// `p` addresses `D` readable bf16 values; `dst.len() >= round_up(D, 32)`; the CPU has AVX-512F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn load_bf16_bits(p: *const u8, d: usize, dst: &mut [u16]) {
    assert!(dst.len() >= round_up(d, 32));
    for v in 0..d.div_ceil(32) {
        let mask = lanes_mask32(v, d);
        // SAFETY: the masked load reads only values below D; vector v's 32 values lie inside dst.
        unsafe {
            let x = _mm512_maskz_loadu_epi16(mask, p.add(64 * v).cast());
            let magnitude = _mm512_and_si512(x, _mm512_set1_epi16(0x7fff));
            let nan = _mm512_cmpgt_epu16_mask(magnitude, _mm512_set1_epi16(0x7f80));
            let x = _mm512_mask_mov_epi16(x, nan, _mm512_or_si512(x, _mm512_set1_epi16(0x40)));
            _mm512_storeu_si512(dst.as_mut_ptr().add(32 * v).cast(), x);
        }
    }
}

/// Moves O's rows from [`interleaved_col`]'s order at stride `ld` to natural column order at stride `dvp`
/// (`<= ld`), 32 columns at a time and in place: a chunk is read whole before it is written, and where it is
/// written never reaches a chunk not yet read (row `r`'s chunk `c` lands below `r * ld + 32 (c + 1)`).
///
/// # Safety
/// The CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn natural_order(o: &mut [f32], rows: usize, ld: usize, dvp: usize, dv: usize) {
    /// `NATURAL[c]`: the lane of a chunk's accumulator pair (16 + i is lane i of the second) holding column c.
    const NATURAL: [i32; 32] = {
        let mut t = [0; 32];
        let mut k = 0;
        while k < 32 {
            t[interleaved_col(k)] = k as i32;
            k += 1;
        }
        t
    };
    assert!(dvp <= ld && dv <= dvp && ld.is_multiple_of(32) && rows * ld <= o.len());
    // SAFETY: NATURAL holds 32 i32s.
    let (first, second) = unsafe {
        (
            _mm512_loadu_si512(NATURAL.as_ptr().cast()),
            _mm512_loadu_si512(NATURAL.as_ptr().add(16).cast()),
        )
    };
    let p = o.as_mut_ptr();
    for r in 0..rows {
        for c in 0..dv.div_ceil(32) {
            // SAFETY: the chunk's source `r * ld + 32 c + 32 <= rows * ld` lies in `o`; its destination,
            // masked to columns below Dv, ends before that.
            unsafe {
                let src = p.add(r * ld + 32 * c);
                let (lo, hi) = (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)));
                let dst = p.add(r * dvp + 32 * c);
                let (a, b) = (lanes_mask(2 * c, dv), lanes_mask(2 * c + 1, dv));
                _mm512_mask_storeu_ps(dst, a, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_mask_storeu_ps(dst.add(16), b, _mm512_permutex2var_ps(lo, second, hi));
            }
        }
    }
}

/// Runs the rows of `(b, kvh)` over kv tiles `tiles` (see [`body`]); `dot` as for [`Scratch::new`].
///
/// # Safety
/// The CPU must have AVX-512F, BW and VL (and AVX2, FMA), and AVX-512 BF16 when `dot`; [`applies`] must
/// hold for `job`; `sc` was made for `job` with the same `dot`.
pub(super) unsafe fn item<T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    tiles: Range<usize>,
    sc: &mut Scratch,
    dot: bool,
) {
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma,f16c")]
    unsafe fn go<L: Lanes, T: Float>(
        job: &Job<T>,
        b: usize,
        kvh: usize,
        tiles: Range<usize>,
        sc: &mut Scratch,
    ) {
        body::<L, T, false>(job, b, kvh, tiles, sc)
    }
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    unsafe fn dot_bf16<T: Float>(
        job: &Job<T>,
        b: usize,
        kvh: usize,
        tiles: Range<usize>,
        sc: &mut Scratch,
    ) {
        body::<Bf16s, T, true>(job, b, kvh, tiles, sc)
    }
    // SAFETY: the caller guarantees the features; the element type matches `T::DTYPE`.
    unsafe {
        match T::DTYPE {
            DType::BF16 if dot => dot_bf16::<T>(job, b, kvh, tiles, sc),
            DType::F32 => go::<F32s, T>(job, b, kvh, tiles, sc),
            DType::BF16 => go::<Bf16s, T>(job, b, kvh, tiles, sc),
            _ => go::<F16s, T>(job, b, kvh, tiles, sc),
        }
    }
}
