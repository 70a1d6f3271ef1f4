//! Packing strided input rows into the micro-kernels' operand layouts (see [`super::gemm`]): the forward's
//! K/V tiles ([`pack_tile`]) and the backward's query, dO, K and V rows
//! ([`pack_a`], [`scatter_rows`], [`pack_b_rows`], [`pack_t`]). Packing is exact: how rows are packed never
//! changes a result.

use crate::kernel::args::Dims;
use crate::kernel::forward::tile::{BC, Job};
use crate::kernel::gemm::Kern;
use crate::kernel::strided::Strided;
use crate::tensor::Float;

/// Packs kv tile `t` of `(b, kvh)` into `dst` (`klen` of Kᵀ then `vlen` of V). Padding (d beyond D, columns
/// beyond the tile, v columns beyond Dv) is written as zeros.
#[inline(always)]
pub(crate) fn pack_tile<K: Kern, T: Float>(
    job: &Job<T>,
    b: usize,
    kvh: usize,
    t: usize,
    dst: &mut [K::E],
    stage: &mut Vec<u32>,
) {
    let Dims { d, dv, .. } = job.dims;
    let pair = K::PAIR;
    let c0 = t * BC;
    // Keys past the sequence's own (a ragged call) are padding, written as zeros.
    let n = job.k_len(b).saturating_sub(c0).min(BC);
    let (kt, vt) = dst.split_at_mut(job.klen());
    let zero = K::E::default();
    // Contiguous rows whose bits are the operand's pack by moving 32-bit units (no conversion).
    let raw = K::RAW == Some(T::DTYPE) && std::mem::size_of::<K::E>() * pair == 4;
    // Kᵀ: [dp / pair][BC][pair].
    if raw && job.k.st[3] == 1 && d % pair == 0 && n > 0 {
        // SAFETY: rows c0..c0+n of key are in range, each with D contiguous elements (D / pair units); `kt`
        // holds dp / pair units of BC columns; the kernel's features were checked by `Backend::resolve`.
        unsafe {
            let units = d / pair;
            // Copy the rows to a contiguous stage first: a sequential read the prefetchers follow, after which
            // the transposing gathers hit L1/L2 instead of 16 DRAM streams at once. Each row is found on its
            // own: a paged pool's rows are contiguous only within a page.
            stage.resize(n * units, 0);
            for c in 0..n {
                let row = job.k.at(b, kvh, c0 + c, 0).cast::<u8>();
                std::ptr::copy_nonoverlapping(
                    row,
                    stage.as_mut_ptr().add(c * units).cast::<u8>(),
                    units * 4,
                );
            }
            let row_bytes = (units * 4) as isize;
            K::transpose_units(
                stage.as_ptr().cast(),
                row_bytes,
                n,
                units,
                kt.as_mut_ptr().cast(),
                BC,
            );
        }
    } else {
        for c in 0..n {
            // SAFETY: (b, kvh, c0 + c, 0) is in range of key; its row has D elements at stride st[3].
            let row = unsafe { job.k.at(b, kvh, c0 + c, 0) };
            for dd in 0..d {
                // SAFETY: dd < D.
                let x = unsafe { row.offset(dd as isize * job.k.st[3]).read() };
                kt[((dd / pair) * BC + c) * pair + dd % pair] = K::load(x);
            }
        }
    }
    for c in n..BC {
        for dd in 0..job.dp {
            kt[((dd / pair) * BC + c) * pair + dd % pair] = zero;
        }
    }
    // V: [BC / pair][dvp][pair].
    let vrow = |c: usize| -> Option<*const T> {
        // SAFETY: (b, kvh, c0 + c, 0) is in range of value when c < n.
        (c < n).then(|| unsafe { job.v.at(b, kvh, c0 + c, 0) } as *const T)
    };
    if raw && job.v.st[3] == 1 && pair == 1 {
        for c in 0..BC {
            let dst = &mut vt[c * job.dvp..c * job.dvp + dv];
            match vrow(c) {
                // SAFETY: the row holds Dv contiguous elements whose bits are `K::E` values (`raw`).
                Some(row) => dst
                    .copy_from_slice(unsafe { std::slice::from_raw_parts(row.cast::<K::E>(), dv) }),
                None => dst.fill(zero),
            }
        }
    } else if raw && job.v.st[3] == 1 {
        // bf16 pairs: unit (cp, j) = v[2cp, j] | v[2cp + 1, j] << 16.
        // SAFETY: rows hold Dv contiguous 16-bit elements.
        let half =
            |c: usize| vrow(c).map(|r| unsafe { std::slice::from_raw_parts(r.cast::<u16>(), dv) });
        for cp in 0..BC / 2 {
            let dst = vt[cp * job.dvp * 2..(cp * job.dvp + dv) * 2]
                .as_mut_ptr()
                .cast::<u32>();
            let put = |j: usize, x: u32| {
                // SAFETY: unit j < Dv of pair-row cp lies inside `vt` (sliced above); unaligned write.
                unsafe { dst.add(j).write_unaligned(x) }
            };
            match (half(2 * cp), half(2 * cp + 1)) {
                (Some(a), Some(bb)) => a
                    .iter()
                    .zip(bb)
                    .enumerate()
                    .for_each(|(j, (&x, &y))| put(j, x as u32 | (y as u32) << 16)),
                (Some(a), None) => a.iter().enumerate().for_each(|(j, &x)| put(j, x as u32)),
                _ => (0..dv).for_each(|j| put(j, 0)),
            }
        }
    } else {
        for c in 0..BC {
            let (cp, ct) = (c / pair, c % pair);
            match vrow(c) {
                Some(row) => {
                    for j in 0..dv {
                        // SAFETY: j < Dv.
                        let x = unsafe { row.offset(j as isize * job.v.st[3]).read() };
                        vt[(cp * job.dvp + j) * pair + ct] = K::load(x);
                    }
                }
                None => {
                    for j in 0..dv {
                        vt[(cp * job.dvp + j) * pair + ct] = zero;
                    }
                }
            }
        }
    }
}

/// Row-major operand rows: `dst[r * ld + c] = src[b, h, r0 + r, c]` for `r < rows`, `c < width`, zeros for
/// `width <= c < ld` (and for a missing partner row when `PAIR == 2`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_a<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    ld: usize,
    dst: &mut [K::E],
) {
    for r in 0..rows {
        let out = &mut dst[r * ld..(r + 1) * ld];
        if width > 0 {
            // SAFETY: (b, h, r0 + r, 0) is in range (callers pass rows inside the dim) and width > 0.
            let p = unsafe { src.at(b, h, r0 + r, 0) };
            if src.st[3] == 1 {
                // SAFETY: the row's `width` elements are contiguous and in range.
                let row = unsafe { std::slice::from_raw_parts(p as *const T, width) };
                for (x, &y) in out[..width].iter_mut().zip(row) {
                    *x = K::load(y);
                }
            } else {
                for (c, x) in out[..width].iter_mut().enumerate() {
                    // SAFETY: c < width, the size of the last dim.
                    *x = K::load(unsafe { p.offset(c as isize * src.st[3]).read() });
                }
            }
        }
        out[width..].fill(K::E::default());
    }
    dst[rows * ld..rows.next_multiple_of(K::PAIR) * ld].fill(K::E::default());
}

/// `dst[at(r, c)] = src[b, h, r0 + r, c]` for `r < rows`, `c < width`, and zero for every other `(r, c)` of
/// the padded grid `grid = (rows', cols')`: rows of a strided input scattered into an operand layout.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn scatter_rows<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    grid: (usize, usize),
    dst: &mut [K::E],
    at: impl Fn(usize, usize) -> usize,
) {
    for r in 0..grid.0 {
        if r < rows && width > 0 {
            // SAFETY: (b, h, r0 + r, 0) is in range (callers pass rows inside the dim) and width > 0.
            let p = unsafe { src.at(b, h, r0 + r, 0) };
            for c in 0..width {
                // SAFETY: c < width, the size of the last dim.
                dst[at(r, c)] = K::load(unsafe { p.offset(c as isize * src.st[3]).read() });
            }
        }
        let from = if r < rows { width } else { 0 };
        for c in from..grid.1 {
            dst[at(r, c)] = K::E::default();
        }
    }
}

/// Rows as the B operand of a product over them (`k` = the row): element `(r, j)` of rows `r0..r0 + rows`
/// at `((r / PAIR) * ld + j) * PAIR + r % PAIR`; zeros for `width <= j < ld` and a missing partner row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b_rows<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    ld: usize,
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let grid = (rows.next_multiple_of(pair), ld);
    let at = |r: usize, j: usize| ((r / pair) * ld + j) * pair + r % pair;
    scatter_rows::<K, T>(src, b, h, r0, rows, width, grid, dst, at);
}

/// The kv rows `c0..c0 + n` transposed into a B operand: element `(e, c)` = `src[b, h, c0 + c, e]` at
/// `((e / PAIR) * BK + c) * PAIR + e % PAIR`; zeros for `n <= c < BK` and for `e` up to `width` rounded to even.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_t<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    c0: usize,
    n: usize,
    width: usize,
    bk: usize,
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let grid = (bk, width.next_multiple_of(2));
    let at = |c: usize, e: usize| ((e / pair) * bk + c) * pair + e % pair;
    scatter_rows::<K, T>(src, b, h, c0, n, width, grid, dst, at);
}
