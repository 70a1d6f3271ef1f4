//! Per-row statistics before the tiles run: `Δ = dO · O` and how each row's `P` is formed (from the saved
//! lse, or recomputed where it is too coarse, and always for f64).

use super::*;
use crate::kernel::args::Dims;
use crate::kernel::gemm::Kern;
use crate::kernel::pack::pack_t;
use crate::kernel::softmax::Acc;
use crate::mask::tiles::BlockClass;
use crate::tensor::Float;

/// Saved lse values at least this large in magnitude are too coarse in f32 to recover `P` from (their ulp
/// is 2^-13 or more): such rows (in practice, rows whose every logit is ~`finfo.min`) are recomputed.
pub(super) const LSE_RECOMPUTE: f32 = 1024.0;

/// `Δ` of every row of `(b, h)`, and how to form its `P` (see [`Job::shift`]): from the saved lse, or, for
/// f64 inputs and rows whose saved lse is too coarse, recomputed as `(max, 1 / sum)` in `A`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(super) fn row_stats<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    h: usize,
    shift: &mut [K::A],
    norm: &mut [K::A],
    delta: &mut [K::A],
) {
    type A<K> = <K as Kern>::A;
    let Dims { q, k, d, dv, g, .. } = job.dims;
    // f64 inputs recompute every row: the f32 lse would cap the f64 gradients' accuracy at ~1e-7.
    let mut redo = vec![!A::<K>::IS_F32; q];
    for i in 0..q {
        let mut acc = A::<K>::ZERO;
        for c in 0..dv {
            // SAFETY: (b, h, i, c) is in range of out and grad_out.
            let (o, go) = unsafe {
                (
                    job.out.at(b, h, i, c).read(),
                    job.dout.at(b, h, i, c).read(),
                )
            };
            acc = acc + A::<K>::read(o) * A::<K>::read(go);
        }
        if let Some(g) = &job.grad_lse {
            // SAFETY: (b, h, i) is in range of grad_lse (checked [B, H, Q]; its fourth stride is 0).
            acc = acc - A::<K>::from_f64(f64::from(unsafe { g.at(b, h, i, 0).read() }));
        }
        delta[i] = acc;
        // SAFETY: (b, h, i) is in range of lse (its fourth stride is 0).
        let l = unsafe { job.lse_in.at(b, h, i, 0).read() };
        shift[i] = A::<K>::from_f64(f64::from(l));
        norm[i] = A::<K>::ONE;
        redo[i] |= l.is_finite() && l.abs() >= LSE_RECOMPUTE;
    }
    // Online (max, sum) over the visible logits, then the sink.
    let (dp, kvh, bk) = (job.dp, h / g, job.bk);
    for qb in 0..job.nqb() {
        let q0 = qb * BQ;
        let m = (q - q0).min(BQ);
        if !redo[q0..q0 + m].contains(&true) {
            continue;
        }
        rows.pack::<K, T>(job, b, h, q0, m, 0, false);
        let mut mx = [A::<K>::NEG_INF; BQ];
        let mut sum = [A::<K>::ZERO; BQ];
        for kb in 0..job.nkb() {
            let c0 = kb * bk;
            let n = (k - c0).min(bk);
            let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
            if cls == BlockClass::Empty {
                continue;
            }
            pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
            if cls == BlockClass::Partial {
                sc.vis.load(job.mask, b, h, q0..q0 + m, c0..c0 + n);
            }
            let p = &mut sc.p[..m * bk];
            mm::<K>(
                m,
                bk,
                d.div_ceil(K::PAIR),
                &rows.q,
                dp,
                &sc.kt,
                bk,
                p,
                bk,
                false,
            );
            logits(
                job,
                p,
                &mut sc.g,
                &sc.vis,
                &mut sc.brow,
                b,
                h,
                q0,
                m,
                c0,
                n,
                cls,
            );
            for r in 0..m {
                let x = &p[r * bk..(r + 1) * bk];
                let top = x.iter().fold(A::<K>::NEG_INF, |a, &v| a.max(v));
                if top == A::<K>::NEG_INF {
                    continue;
                }
                let new = mx[r].max(top);
                let mut s = if mx[r] == A::<K>::NEG_INF {
                    A::<K>::ZERO
                } else {
                    sum[r] * (mx[r] - new).exp_nonpos()
                };
                for &v in x {
                    s = s + (v - new).exp_nonpos();
                }
                (mx[r], sum[r]) = (new, s);
            }
        }
        let sink = job.sinks.as_ref().map(|s| A::<K>::from_f64(s[h]));
        for r in (0..m).filter(|&r| redo[q0 + r]) {
            let (mut top, mut s) = (mx[r], sum[r]);
            if let Some(sk) = sink.filter(|&sk| sk > A::<K>::NEG_INF) {
                let new = top.max(sk);
                let kept = if top == A::<K>::NEG_INF {
                    A::<K>::ZERO
                } else {
                    s * (top - new).exp_nonpos()
                };
                (top, s) = (new, kept + (sk - new).exp_nonpos());
            }
            shift[q0 + r] = top;
            norm[q0 + r] = if top == A::<K>::NEG_INF {
                A::<K>::ONE
            } else {
                s.recip()
            };
        }
    }
}
