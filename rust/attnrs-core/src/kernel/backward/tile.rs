//! One (query tile × key tile) of the backward: logits and `P` recomputed, `dP`, `dS`, and the products
//! into dK, dV and dQ on the micro-kernel `K` ([`kv_body`], [`q_body`]); their [`Body`]s for
//! [`Isa::enter`].

use super::*;
use crate::kernel::args::Dims;
use crate::kernel::dispatch::Body;
use crate::kernel::gemm::Kern;
use crate::kernel::pack::{pack_b_rows, pack_t};
use crate::kernel::softmax::Acc;
use crate::kernel::strided::Strided;
use crate::mask::tiles::{BlockClass, TileVis};
use crate::tensor::Float;

/// `c[i*ldc + j] (+)= Σ_p A(i, p) · B(p, j)` for `i < m`, `j < n` over `kp` packed units of k (pairs for
/// `PAIR == 2`) on the micro-kernel `K`, with the operand layouts of [`Kern::gemm`]; `n % 16 == 0`. Each
/// element of `c` is summed in order of `p`, so the result depends only on the operands.
///
/// # Panics
/// When a range falls outside its slice (a bug: callers size every buffer for its tile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn mm<K: Kern>(
    m: usize,
    n: usize,
    kp: usize,
    a: &[K::E],
    lda: usize,
    b: &[K::E],
    ldb: usize,
    c: &mut [K::A],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let pair = K::PAIR;
    assert!(n.is_multiple_of(16) && n <= ldc && c.len() >= (m - 1) * ldc + n);
    assert!(
        kp == 0 || (a.len() >= (m - 1) * lda + kp * pair && b.len() >= ((kp - 1) * ldb + n) * pair)
    );
    assert!((m == 1 || kp * pair <= lda) && (kp <= 1 || n <= ldb));
    // SAFETY: the asserts above put every element the product reads or writes inside its slice; `K` is
    // only instantiated inside entry points compiled for (and called on) CPUs with its features.
    unsafe {
        K::gemm(
            m,
            n,
            kp,
            a.as_ptr(),
            lda,
            b.as_ptr(),
            ldb,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// `dst[c * BQ + r] = src[r * BK + c]` for `r < m`, `c < n`, as operands (zero for the odd row's partner):
/// a tile transposed into the A operand of the dV and dK products. The tile is first converted into `stage`
/// as 32-bit units (one operand, or with `PAIR == 2` the operands of rows `2u` and `2u + 1`), which the
/// kernel's [`Kern::transpose_units`] transposes (16×16 blocks in registers on AVX-512).
#[inline(always)]
pub(super) fn transpose<K: Kern>(
    src: &[K::A],
    bk: usize,
    m: usize,
    n: usize,
    stage: &mut [u32],
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let rows = m.next_multiple_of(pair);
    if std::mem::size_of::<K::E>() * pair != 4 {
        // f64 operands: element by element.
        for (c, col) in dst.chunks_exact_mut(BQ).take(n).enumerate() {
            for (r, x) in col[..m].iter_mut().enumerate() {
                *x = K::to_e(src[r * bk + c]);
            }
            col[m..rows].fill(K::E::default());
        }
        return;
    }
    let zeros = [K::A::ZERO; BK_MAX];
    for u in 0..rows / pair {
        let out = &mut stage[u * bk..u * bk + n];
        if pair == 1 {
            for (x, &a) in out.iter_mut().zip(&src[u * bk..u * bk + n]) {
                *x = unit::<K>(a, a);
            }
        } else {
            let lo = &src[2 * u * bk..2 * u * bk + n];
            let hi = if 2 * u + 1 < m {
                &src[(2 * u + 1) * bk..(2 * u + 1) * bk + n]
            } else {
                &zeros[..n]
            };
            for ((x, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
                *x = unit::<K>(a, b);
            }
        }
    }
    assert!(stage.len() >= rows / pair * bk && dst.len() >= (n.max(1) - 1) * BQ + rows);
    // SAFETY: `stage` holds `rows / pair` rows of `bk` units, of which the first `n` are read; `dst` holds
    // `n` rows of `BQ / pair` 32-bit units (asserted; an operand unit is 4 bytes: checked above); the CPU has
    // `K`'s features (this runs inside its entry points).
    unsafe {
        K::transpose_units(
            stage.as_ptr().cast(),
            (bk * 4) as isize,
            rows / pair,
            n,
            dst.as_mut_ptr().cast(),
            BQ / pair,
        )
    }
}

/// The 32-bit unit of operands: `a` alone (4-byte operands), or `a` then `b` (2-byte operands, `PAIR == 2`).
#[inline(always)]
pub(super) fn unit<K: Kern>(a: K::A, b: K::A) -> u32 {
    if std::mem::size_of::<K::E>() == 4 {
        // SAFETY: the operand is 4 bytes of plain data (f32), and every bit pattern is a valid u32.
        unsafe { std::mem::transmute_copy::<K::E, u32>(&K::to_e(a)) }
    } else {
        assert!(std::mem::size_of::<[K::E; 2]>() == 4);
        // SAFETY: two 2-byte operands of plain data (bf16 bits) make 4 bytes, little-endian `a` first,
        // and every bit pattern is a valid u32.
        unsafe { std::mem::transmute_copy::<[K::E; 2], u32>(&[K::to_e(a), K::to_e(b)]) }
    }
}

/// Writes `src[r * ld + c] * factor` to `dst[b, h, r0 + r, c]` for `r < rows`, `c < width`.
///
/// # Safety
/// The rows must be in range of `dst` and written by no other thread.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn write_rows<T: Float, A: Acc>(
    dst: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    src: &[A],
    ld: usize,
    factor: A,
) {
    if width == 0 {
        return;
    }
    for r in 0..rows {
        // SAFETY: in range by the caller's promise; the view has no internal overlap (validated), so these
        // elements belong to this item alone.
        unsafe {
            let p = dst.at(b, h, r0 + r, 0);
            for (c, &x) in src[r * ld..r * ld + width].iter().enumerate() {
                p.offset(c as isize * dst.st[3])
                    .write((x * factor).write::<T>());
            }
        }
    }
}

/// Turns the raw scores `q·k` in `p` (rows `q0..q0+m` of head `h`, kv tile `c0..c0+n`) into final logits:
/// scale (times the head's score-mod scale), score-mod terms, softcap (its derivative `1 - t²` into `g`), bias,
/// and `-inf` for hidden pairs and padding columns.
/// `vis` must hold the tile's visibility when `cls` is partial.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn logits<T, A: Acc>(
    job: &Job<T, A>,
    p: &mut [A],
    g: &mut [A],
    vis: &TileVis,
    brow: &mut [A],
    b: usize,
    h: usize,
    q0: usize,
    m: usize,
    c0: usize,
    n: usize,
    cls: BlockClass,
) {
    let bk = job.bk;
    let scale = job.scale * job.terms.as_ref().map_or(A::ONE, |t| t.scale_of(h));
    for r in 0..m {
        let x = &mut p[r * bk..(r + 1) * bk];
        match job
            .terms
            .as_ref()
            .and_then(|t| t.row(b, h, q0 + r, c0, n, brow))
        {
            // One pass: the scale and the terms (the padding columns beyond `n` become -inf below).
            Some(add) => x[..n]
                .iter_mut()
                .zip(add)
                .for_each(|(v, &t)| *v = *v * scale + t),
            None => x.iter_mut().for_each(|v| *v = *v * scale),
        }
        if let Some((c, ic)) = job.softcap {
            for (v, gg) in x.iter_mut().zip(&mut g[r * bk..(r + 1) * bk]) {
                let t = (*v * ic).tanh();
                *v = c * t;
                *gg = A::ONE - t * t;
            }
        }
        if let Some(bias) = &job.bias {
            // SAFETY: (b, h, q0 + r) is in range of [B, H, Q] and c0 + n <= K.
            unsafe { bias.row(b, h, q0 + r, c0, &mut brow[..n], A::from_f64) };
            for (v, &bv) in x[..n].iter_mut().zip(&brow[..n]) {
                *v = *v + bv;
            }
        }
        if cls == BlockClass::Partial {
            vis.row(r).hide(&mut x[..n], A::NEG_INF);
        }
        x[n..].fill(A::NEG_INF);
    }
}

/// Recomputes `P` and `dS` of one (query tile, kv tile) pair into `sc.p` and `sc.ds` from the row-major
/// query and dO operand rows `qa`, `doa` of the tile and the packed `kt`, `vt` (and `vis` for a partial
/// tile); writes the tile of `grad_bias` when `write_bias`. With dropout, `sc.p` ends as the dropped weights
/// (for dV).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn tile<T, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    qa: &[K::E],
    doa: &[K::E],
    b: usize,
    h: usize,
    q0: usize,
    m: usize,
    c0: usize,
    n: usize,
    cls: BlockClass,
    write_bias: bool,
) {
    let Dims { d, dv, .. } = job.dims;
    let (dp, dvp, pair, bk) = (job.dp, job.dvp, K::PAIR, job.bk);
    let Scratch {
        kt,
        vt,
        p,
        ds,
        g,
        vis,
        brow,
        gdist,
        gkey,
        ..
    } = sc;
    let p = &mut p[..m * bk];
    mm::<K>(m, bk, d.div_ceil(pair), qa, dp, kt, bk, p, bk, false);
    logits(job, p, g, vis, brow, b, h, q0, m, c0, n, cls);
    for r in 0..m {
        let row = job.row(b, h, q0 + r);
        let (shift, norm) = (job.shift[row], job.norm[row]);
        let x = &mut p[r * bk..(r + 1) * bk];
        if shift.is_finite() {
            x.iter_mut()
                .for_each(|v| *v = (*v - shift).exp_nonpos() * norm);
        } else if shift == K::A::NEG_INF {
            x.fill(K::A::ZERO); // the row saw nothing
        } else {
            // A NaN (or +inf) lse: the row's NaN reaches the pairs it sees, not the ones the mask hides.
            x.iter_mut().for_each(|v| {
                *v = if *v == K::A::NEG_INF {
                    K::A::ZERO
                } else {
                    (*v - shift).exp_nonpos() * norm
                }
            });
        }
    }
    let ds = &mut ds[..m * bk];
    mm::<K>(m, bk, dv.div_ceil(pair), doa, dvp, vt, bk, ds, bk, false);
    for r in 0..m {
        let delta = job.delta[job.row(b, h, q0 + r)];
        let pr = &mut p[r * bk..(r + 1) * bk];
        let dr = &mut ds[r * bk..(r + 1) * bk];
        if let Some(drop) = &job.drop {
            // The forward used P∘M/(1-p) (M the keep pattern): dP = (dO·Vᵀ)∘M/(1-p), and dV takes the same
            // dropped weights, so P is overwritten once dS no longer needs it.
            let (key, kept_scale) = (drop.row(b, h, q0 + r), K::A::from_f64(drop.scale));
            for (c, (x, pv)) in dr[..n].iter_mut().zip(pr.iter_mut()).enumerate() {
                let (dpv, pval) = if key.kept(c0 + c) {
                    (*x * kept_scale, *pv * kept_scale)
                } else {
                    (K::A::ZERO, K::A::ZERO)
                };
                *x = *pv * (dpv - delta);
                *pv = pval;
            }
            dr[n..].fill(K::A::ZERO);
        } else {
            for (x, &pv) in dr.iter_mut().zip(pr.iter()) {
                *x = pv * (*x - delta);
            }
        }
        if write_bias && let Some(gb) = &job.grad_bias {
            // SAFETY: (b, h, q0 + r, c0..c0 + n) is in range; this kv tile's columns belong to this item.
            unsafe { gb.write_row([b, h, q0 + r, c0], &dr[..n]) };
        }
        if job.softcap.is_some() {
            for (x, &gv) in dr.iter_mut().zip(&g[r * bk..(r + 1) * bk]) {
                *x = *x * gv;
            }
        }
        if write_bias && let Some(tg) = &job.term_grads {
            // dr is now dL/d(the logit before the softcap): the gradient of every additive term.
            let gi = h % job.dims.g;
            if tg.dist.is_some() {
                let at = gi * tg.slot + (job.dims.q - 1) - (q0 + r);
                for (acc, &x) in gdist[at..at + n].iter_mut().zip(&dr[..n]) {
                    *acc = *acc + x;
                }
            }
            if tg.key.is_some() {
                for (acc, &x) in gkey[gi * bk..gi * bk + n].iter_mut().zip(&dr[..n]) {
                    *acc = *acc + x;
                }
            }
        }
        if let Some(t) = job.terms.as_ref().filter(|t| t.has_scale()) {
            let factor = t.scale_of(h);
            dr.iter_mut().for_each(|x| *x = *x * factor);
        }
    }
}

/// `dq[r] += Σ_c dS[r][c] K[c]` for the tile's `m` rows over its `n` kv columns (scale applied later).
#[inline(always)]
pub(super) fn add_dq<K: Kern>(
    sc: &mut Scratch<K>,
    bk: usize,
    dp: usize,
    m: usize,
    n: usize,
    dq: &mut [K::A],
) {
    let cols = n.next_multiple_of(K::PAIR);
    for (row, src) in sc
        .ds_e
        .chunks_exact_mut(bk)
        .zip(sc.ds.chunks_exact(bk))
        .take(m)
    {
        for (x, &y) in row[..cols].iter_mut().zip(&src[..cols]) {
            *x = K::to_e(y);
        }
    }
    mm::<K>(
        m,
        dp,
        n.div_ceil(K::PAIR),
        &sc.ds_e,
        bk,
        &sc.kr,
        dp,
        dq,
        dp,
        true,
    );
}

/// dK and dV of kv tile `kb` of `(b, kvh)`, over every query tile of every head of the group, whose query
/// and dO rows are packed in `rows` (`[G][Q'][..]`, or tile by tile when `rows.per_tile`). With `dq`
/// (`[G][Q'][dp]`, this group's rows of one partial dQ), also adds this kv tile's share of dQ into it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn kv_body<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    kvh: usize,
    kb: usize,
    mut dq: Option<&mut [K::A]>,
) {
    let Dims { g, q, k, d, dv, .. } = job.dims;
    let (dp, dvp, pair, bk) = (job.dp, job.dvp, K::PAIR, job.bk);
    let qpad = q.next_multiple_of(2);
    let c0 = kb * bk;
    let n = (k - c0).min(bk);
    pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
    pack_t::<K, T>(&job.v, b, kvh, c0, n, dv, bk, &mut sc.vt);
    if dq.is_some() {
        pack_b_rows::<K, T>(&job.k, b, kvh, c0, n, d, dp, &mut sc.kr);
    }
    sc.acc_k[..bk * dp].fill(K::A::ZERO);
    sc.acc_v[..bk * dvp].fill(K::A::ZERO);
    sc.gdist.fill(K::A::ZERO);
    sc.gkey.fill(K::A::ZERO);
    for gi in 0..g {
        let h = kvh * g + gi;
        for qb in 0..job.nqb() {
            let q0 = qb * BQ;
            let m = (q - q0).min(BQ);
            let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
            if cls == BlockClass::Empty {
                if let Some(gb) = &job.grad_bias {
                    for r in 0..m {
                        // SAFETY: in range; this kv tile's columns belong to this item.
                        unsafe { gb.write_row([b, h, q0 + r, c0], &sc.zeros[..n]) };
                    }
                }
                continue;
            }
            if cls == BlockClass::Partial {
                sc.vis.load(job.mask, b, h, q0..q0 + m, c0..c0 + n);
            }
            let at = if rows.per_tile {
                rows.pack::<K, T>(job, b, h, q0, m, 0, true);
                0
            } else {
                gi * qpad + q0
            };
            let (qa, doa) = (&rows.q[at * dp..], &rows.dout[at * dvp..]);
            tile::<T, K>(job, sc, qa, doa, b, h, q0, m, c0, n, cls, true);
            // dV[c] += Σ_r P[r][c] dO[r];  dK[c] += Σ_r dS[r][c] Q[r]  (scale applied at the end).
            transpose::<K>(&sc.p, bk, m, n, &mut sc.stage, &mut sc.pt);
            transpose::<K>(&sc.ds, bk, m, n, &mut sc.stage, &mut sc.dst);
            let kp = m.div_ceil(pair);
            let (q_b, dout_b) = rows.b_rows(pair);
            let (qr, dor) = (&q_b[at * dp..], &dout_b[at * dvp..]);
            mm::<K>(n, dvp, kp, &sc.pt, BQ, dor, dvp, &mut sc.acc_v, dvp, true);
            mm::<K>(n, dp, kp, &sc.dst, BQ, qr, dp, &mut sc.acc_k, dp, true);
            if let Some(dq) = dq.as_deref_mut() {
                add_dq(sc, bk, dp, m, n, &mut dq[(gi * qpad + q0) * dp..]);
            }
        }
    }
    // SAFETY: rows c0..c0 + n of (b, kvh) are in range and belong to this item alone.
    unsafe {
        write_rows(&job.dk, b, kvh, c0, n, d, &sc.acc_k, dp, job.scale);
        write_rows(&job.dv, b, kvh, c0, n, dv, &sc.acc_v, dvp, K::A::ONE);
    }
    if let Some(tg) = &job.term_grads {
        if let Some(key) = &tg.key {
            for gi in 0..g {
                // SAFETY: (b, kvh * g + gi, c0..c0 + n) is in range of grad_score_key (viewed [B, H, 1, K]);
                // this kv tile's columns belong to this item alone.
                unsafe { key.write_row([b, kvh * g + gi, 0, c0], &sc.gkey[gi * bk..gi * bk + n]) };
            }
        }
        if let Some(dist) = &tg.dist {
            let len = g * tg.slot;
            let at = ((b * job.dims.hkv + kvh) * job.nkb() + kb) * len;
            // SAFETY: slot (b, kvh, kb) of `len` elements lies inside the buffer (sized for every item in
            // `run`) and is written by this item alone.
            let slot = unsafe { std::slice::from_raw_parts_mut(dist.0.add(at), len) };
            slot.copy_from_slice(&sc.gdist);
        }
    }
}

/// Second pass: dQ of query tile `qb` of `(b, h)`, over every kv tile.
#[inline(always)]
pub(super) fn q_body<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    h: usize,
    qb: usize,
) {
    let Dims { g, q, k, d, dv, .. } = job.dims;
    let (dp, bk) = (job.dp, job.bk);
    let kvh = h / g;
    let q0 = qb * BQ;
    let m = (q - q0).min(BQ);
    rows.pack::<K, T>(job, b, h, q0, m, 0, true);
    sc.acc_k[..BQ * dp].fill(K::A::ZERO);
    for kb in 0..job.nkb() {
        let c0 = kb * bk;
        let n = (k - c0).min(bk);
        let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
        if cls == BlockClass::Empty {
            continue;
        }
        pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
        pack_t::<K, T>(&job.v, b, kvh, c0, n, dv, bk, &mut sc.vt);
        pack_b_rows::<K, T>(&job.k, b, kvh, c0, n, d, dp, &mut sc.kr);
        if cls == BlockClass::Partial {
            sc.vis.load(job.mask, b, h, q0..q0 + m, c0..c0 + n);
        }
        tile::<T, K>(job, sc, &rows.q, &rows.dout, b, h, q0, m, c0, n, cls, false);
        let mut acc = std::mem::take(&mut sc.acc_k);
        add_dq(sc, bk, dp, m, n, &mut acc);
        sc.acc_k = acc;
    }
    // SAFETY: rows q0..q0 + m of (b, h) are in range and belong to this item alone.
    unsafe { write_rows(&job.dq, b, h, q0, m, d, &sc.acc_k, dp, job.scale) };
}

// The per-ISA entry points: the generic bodies above as [`Body`]s, compiled inside the target features of the
// micro-kernel `K` (so their element-wise loops vectorise for the ISA too).

pub(super) struct KvItem<'a, 'j, T, K: Kern> {
    pub(super) job: &'a Job<'j, T, K::A>,
    pub(super) sc: &'a mut Scratch<K>,
    pub(super) rows: &'a mut Packed<K::E>,
    pub(super) b: usize,
    pub(super) kvh: usize,
    pub(super) kb: usize,
    pub(super) dq: Option<&'a mut [K::A]>,
}

impl<T: Float, K: Kern> Body for KvItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        kv_body::<T, K>(
            self.job, self.sc, self.rows, self.b, self.kvh, self.kb, self.dq,
        )
    }
}

pub(super) struct QItem<'a, 'j, T, K: Kern> {
    pub(super) job: &'a Job<'j, T, K::A>,
    pub(super) sc: &'a mut Scratch<K>,
    pub(super) rows: &'a mut Packed<K::E>,
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) qb: usize,
}

impl<T: Float, K: Kern> Body for QItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        q_body::<T, K>(self.job, self.sc, self.rows, self.b, self.h, self.qb)
    }
}

pub(super) struct StatsItem<'a, 'j, T, K: Kern> {
    pub(super) job: &'a Job<'j, T, K::A>,
    pub(super) sc: &'a mut Scratch<K>,
    pub(super) rows: &'a mut Packed<K::E>,
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) shift: &'a mut [K::A],
    pub(super) norm: &'a mut [K::A],
    pub(super) delta: &'a mut [K::A],
}

impl<T: Float, K: Kern> Body for StatsItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        row_stats::<T, K>(
            self.job, self.sc, self.rows, self.b, self.h, self.shift, self.norm, self.delta,
        )
    }
}
