//! What every forward path shares: the typed call ([`Job`]), the tile width, the online-softmax step of one
//! kv tile for a GQA group's rows ([`softmax_tile`]) and the final write of out and lse ([`write_rows`]).
//! The packed path ([`super::item`]), split-KV decode ([`super::split_kv`]) and the AVX-512 decode kernel
//! build on these; this module depends on none of them.

use std::ops::Range;

use crate::kernel::args::Dims;
use crate::kernel::dropout::DropMask;
use crate::kernel::ragged::Ragged;
use crate::kernel::score::AnyTerms;
use crate::kernel::softmax::{Acc, Logits, RowPasses, finish, online_step, rescale};
use crate::kernel::strided::{BiasRef, Strided};
use crate::mask::tiles::{BlockClass, MaskTiles, TileVis};
use crate::tensor::Float;

/// Key/value columns per tile.
pub(crate) const BC: usize = 64;
/// Query rows (all heads of a GQA group together) per work item, aimed for.
pub(crate) const ROWS: usize = 96;

pub(crate) fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m) * m
}

/// One call, typed: raw strided views plus the scalars.
pub(crate) struct Job<'a, T> {
    pub(crate) dims: Dims,
    pub(crate) q: Strided<T>,
    pub(crate) k: Strided<T>,
    pub(crate) v: Strided<T>,
    pub(crate) out: Strided<T>,
    pub(crate) lse: Option<Strided<f32>>,
    pub(crate) bias: Option<BiasRef>,
    pub(crate) sinks: Option<Vec<f64>>,
    pub(crate) mask: &'a dyn MaskTiles,
    pub(crate) scale: f64,
    pub(crate) softcap: Option<f64>,
    /// The score mod's terms (head scales, distance and key terms), read once per call.
    pub(crate) terms: AnyTerms,
    pub(crate) drop: Option<DropMask>,
    /// Query rows per block (per head).
    pub(crate) bq: usize,
    /// Packed row lengths: D rounded up to 2, Dv rounded up to 16.
    pub(crate) dp: usize,
    pub(crate) dvp: usize,
    /// A ragged call's sequences (their lengths bound every loop), or `None` for a dense batch.
    pub(crate) ragged: Option<&'a Ragged>,
    /// The kernel family runs AVX-512F/BW/VL ([`Kern::AVX512`](crate::kernel::gemm::Kern::AVX512)), so
    /// [`write_rows`] may store contiguous rows with it.
    pub(crate) avx512: bool,
}

impl<T> Job<'_, T> {
    pub(super) fn ntiles(&self) -> usize {
        self.dims.k.div_ceil(BC)
    }
    pub(super) fn nqb(&self) -> usize {
        self.dims.q.div_ceil(self.bq)
    }
    pub(crate) fn klen(&self) -> usize {
        self.dp * BC
    }
    pub(crate) fn vlen(&self) -> usize {
        BC * self.dvp
    }
    /// Query rows of batch item (sequence) `b`.
    #[inline]
    pub(crate) fn q_len(&self, b: usize) -> usize {
        self.ragged.map_or(self.dims.q, |r| r.q_len[b])
    }
    /// Keys of batch item (sequence) `b`.
    #[inline]
    pub(crate) fn k_len(&self, b: usize) -> usize {
        self.ragged.map_or(self.dims.k, |r| r.k_len[b])
    }
}

/// The softmax state of an item's rows: `m`, `l` (one per row) and `O` (`dvp` per row).
pub(super) struct Rows<'a, A> {
    pub m: &'a mut [A],
    pub l: &'a mut [A],
    pub o: &'a mut [A],
    /// Elements per row of `o`.
    pub ld: usize,
}

/// The online-softmax step of one kv tile (`cells` = query rows × key columns) for the rows of every head of
/// the group whose class is not empty: score terms, bias and mask applied, `m` and `l` updated, `O` rescaled,
/// `P` written. `s` and `p` hold the rows of the group (`r = gi * bq + i`) at stride [`BC`]; `scratch` is
/// (a partial tile's visibility, one bias row, one terms row). `passes` are the kernel family's
/// ([`crate::kernel::gemm::Kern::row_passes`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn softmax_tile<A: Acc, E: Copy, T>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    cells: (Range<usize>, Range<usize>),
    classes: &[BlockClass],
    lg: Logits<A>,
    s: &mut [A],
    p: &mut [E],
    st: Rows<'_, A>,
    scratch: (&mut TileVis, &mut [A], &mut [A]),
    passes: RowPasses<
        impl Fn(A) -> E + Copy,
        impl Fn(&[A]) -> A + Copy,
        impl Fn(&[A], A, &mut [E]) -> A + Copy,
    >,
) {
    let (rows, cols) = cells;
    let (q0, bq, c0, n) = (rows.start, rows.len(), cols.start, cols.len());
    let (g, nw) = (job.dims.g, round_up(n, 16));
    let (vis, bias, term_row) = scratch;
    let terms = job.terms.get::<A>();
    for (gi, &cls) in classes.iter().enumerate() {
        if cls == BlockClass::Empty {
            continue;
        }
        let h = kvh * g + gi;
        let lg = match terms {
            Some(t) if t.has_scale() => Logits {
                scale: lg.scale * t.scale_of(h),
                ..lg
            },
            _ => lg,
        };
        let partial = cls == BlockClass::Partial;
        if partial {
            vis.load(job.mask, b, h, rows.clone(), cols.clone());
        }
        for i in 0..bq {
            let r = gi * bq + i;
            if let Some(bref) = &job.bias {
                // SAFETY: (b, h, q0 + i) and columns c0..c0+n are in range of [B, H, Q, K].
                unsafe { bref.row(b, h, q0 + i, c0, &mut bias[..n], A::from_f64) };
            }
            let add = terms.and_then(|t| t.row(b, h, q0 + i, c0, n, term_row));
            let alpha = online_step(
                &mut s[r * BC..r * BC + nw],
                n,
                lg,
                add,
                job.bias.as_ref().map(|_| &bias[..n]),
                partial.then(|| vis.row(i)),
                &mut st.m[r],
                &mut st.l[r],
                &mut p[r * BC..r * BC + nw],
                passes,
            );
            if alpha != A::ONE {
                rescale(&mut st.o[r * st.ld..(r + 1) * st.ld], alpha);
            }
            if let Some(drop) = &job.drop {
                // The denominator `l` keeps every weight; only `P·V` loses the dropped ones.
                drop.row(b, h, q0 + i).drop_into(
                    c0,
                    &mut p[r * BC..r * BC + n],
                    (passes.to_p)(A::ZERO),
                );
            }
        }
    }
}

/// Writes out (and lse) for rows whose state `(m, l, O)` is final.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn write_rows<A: Acc, T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    q0: usize,
    bq: usize,
    m: &[A],
    l: &[A],
    o: &[A],
) {
    let Dims { g, dv, .. } = job.dims;
    let kept_scale = A::from_f64(job.drop.map_or(1.0, |d| d.scale));
    for gi in 0..g {
        let h = kvh * g + gi;
        let sink = job.sinks.as_ref().map(|s| A::from_f64(s[h]));
        for i in 0..bq {
            let r = gi * bq + i;
            let (f, lse) = finish(m[r], l[r], sink);
            let f = f * kept_scale;
            let src = &o[r * job.dvp..r * job.dvp + dv];
            // SAFETY: (b, h, q0 + i, ·) is in range of out; rows of different items never coincide and out has
            // no internal overlap (validated), so this thread is the only writer of these elements.
            unsafe {
                let row = job.out.at(b, h, q0 + i, 0);
                match A::as_f32(src) {
                    // SAFETY: the family's features are present; the row's Dv elements are contiguous.
                    #[cfg(target_arch = "x86_64")]
                    Some(src) if job.avx512 && job.out.st[3] == 1 => {
                        store_scaled_avx512(src, f.to_f32(), row)
                    }
                    _ => store_scaled(src, f, row, job.out.st[3]),
                }
                if let Some(lse_view) = &job.lse {
                    lse_view.at(b, h, q0 + i, 0).write(lse.to_f32());
                }
            }
        }
    }
}

/// `dst[j * stride] = T(src[j] * f)` for each `j`.
///
/// # Safety
/// Those elements of `dst` are writable, and no one else reads or writes them meanwhile.
#[inline(always)]
pub(crate) unsafe fn store_scaled<A: Acc, T: Float>(src: &[A], f: A, dst: *mut T, stride: isize) {
    for (j, &x) in src.iter().enumerate() {
        // SAFETY: the caller's promise.
        unsafe { dst.offset(j as isize * stride).write((x * f).write::<T>()) };
    }
}

/// [`store_scaled`] at stride 1 for f32 rows, 16 elements at a time, rounding as the scalar conversions do:
/// to nearest, ties to even; a NaN stays NaN, made quiet; bf16 and f16 subnormals are kept, not flushed
/// (`vcvtneps2bf16` would flush them, so bf16 rounds by integer arithmetic).
///
/// # Safety
/// As for [`store_scaled`], with `dst` contiguous; the CPU has AVX-512F/BW/VL (and F16C, which it implies).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
pub(crate) unsafe fn store_scaled_avx512<T: Float>(src: &[f32], f: f32, dst: *mut T) {
    use crate::tensor::DType;
    use std::arch::x86_64::*;
    let fv = _mm512_set1_ps(f);
    let n = src.len();
    for j in (0..n).step_by(16) {
        let mask = ((1u32 << (n - j).min(16)) - 1) as __mmask16;
        // SAFETY: the masked loads and stores touch elements below `n` only: of `src`, and of `dst` by the
        // caller's promise; `T::DTYPE` says what `T` is.
        unsafe {
            let x = _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, src.as_ptr().add(j)), fv);
            let at = dst.add(j);
            match T::DTYPE {
                DType::F32 => _mm512_mask_storeu_ps(at.cast(), mask, x),
                DType::BF16 => _mm256_mask_storeu_epi16(at.cast(), mask, bf16_round(x)),
                DType::F16 => {
                    let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                    _mm256_mask_storeu_epi16(at.cast(), mask, h)
                }
                _ => {
                    for (k, &y) in src[j..(j + 16).min(n)].iter().enumerate() {
                        at.add(k).write((y * f).write::<T>());
                    }
                }
            }
        }
    }
}

/// The bf16 bits nearest each lane (ties to even); a NaN keeps its top bits and is made quiet, as `half`'s
/// conversion does.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
fn bf16_round(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let bias = _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
    let magnitude = _mm512_and_si512(b, _mm512_set1_epi32(0x7fff_ffff));
    let nan = _mm512_cmpgt_epu32_mask(magnitude, _mm512_set1_epi32(0x7f80_0000));
    let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
    _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet))
}
