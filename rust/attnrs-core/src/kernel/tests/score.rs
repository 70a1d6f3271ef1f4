//! Score-mod terms (head scales, distance and key terms, softcap after them) against a naive f64 reference,
//! forward and backward (the terms' gradients included), on every path this CPU has, every dQ path, with GQA,
//! Q != K and causal masks; gradients bitwise equal across thread counts.

use super::backward_reference::Buf;
use super::forward_support::backends;
use super::support::{Layout, Rng, causal};
use crate::kernel::backward::{DqPath, Tuning, backward_with};
use crate::kernel::score::span;
use crate::kernel::{
    AttentionArgs, AttentionGradArgs, Backend, ScoreTerms, attention_forward_with,
};
use crate::mask::PlacedMask;
use crate::mask::tiles::{CallMask, Grid};
use crate::tensor::DType;

/// One problem: sizes, which terms, and their values (row-major f64).
struct Problem {
    b: usize,
    h: usize,
    hkv: usize,
    q: usize,
    k: usize,
    d: usize,
    scale: f64,
    softcap: Option<f64>,
    /// Causal diagonal, or no mask.
    diagonal: Option<i64>,
    qv: Vec<f64>,
    kv: Vec<f64>,
    vv: Vec<f64>,
    dout: Vec<f64>,
    head_scale: Option<Vec<f64>>,
    /// `[dist_heads][span]`.
    distance: Option<(usize, Vec<f64>)>,
    /// `[key_b][key_h][K]`.
    key: Option<(usize, usize, Vec<f64>)>,
}

fn randv(rng: &mut Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| rng.range(lo, hi)).collect()
}

impl Problem {
    #[allow(clippy::too_many_arguments)]
    fn new(
        seed: u64,
        (b, h, hkv, q, k, d): (usize, usize, usize, usize, usize, usize),
        softcap: Option<f64>,
        diagonal: Option<i64>,
        with: (bool, Option<usize>, Option<(usize, usize)>),
    ) -> Problem {
        let mut rng = Rng(seed);
        let (hs, dist_heads, key_dims) = with;
        Problem {
            b,
            h,
            hkv,
            q,
            k,
            d,
            scale: 0.4,
            softcap,
            diagonal,
            qv: randv(&mut rng, b * h * q * d, -1.0, 1.0),
            kv: randv(&mut rng, b * hkv * k * d, -1.0, 1.0),
            vv: randv(&mut rng, b * hkv * k * d, -1.0, 1.0),
            dout: randv(&mut rng, b * h * q * d, -1.0, 1.0),
            head_scale: hs.then(|| randv(&mut rng, h, 0.3, 2.0)),
            distance: dist_heads.map(|n| (n, randv(&mut rng, n * span(q, k), -2.0, 2.0))),
            key: key_dims.map(|(kb, kh)| (kb, kh, randv(&mut rng, kb * kh * k, -2.0, 2.0))),
        }
    }

    fn visible(&self, i: usize, j: usize) -> bool {
        self.diagonal.is_none_or(|dg| j as i64 <= i as i64 + dg)
    }

    /// The logit before the softcap.
    fn pre_cap(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let (d, g) = (self.d, self.h / self.hkv);
        let qo = ((b * self.h + h) * self.q + i) * d;
        let ko = ((b * self.hkv + h / g) * self.k + j) * d;
        let dot: f64 = (0..d).map(|c| self.qv[qo + c] * self.kv[ko + c]).sum();
        let mut y = self.scale * dot * self.head_scale.as_ref().map_or(1.0, |s| s[h]);
        if let Some((n, t)) = &self.distance {
            y += t[(if *n == 1 { 0 } else { h }) * span(self.q, self.k) + j + self.q - 1 - i];
        }
        if let Some((kb, kh, t)) = &self.key {
            let (bb, hh) = (if *kb == 1 { 0 } else { b }, if *kh == 1 { 0 } else { h });
            y += t[(bb * kh + hh) * self.k + j];
        }
        y
    }

    /// Forward and backward in f64: (out, lse, dq, dk, dv, d_distance [H][span], d_key [B][H][K]).
    #[allow(clippy::type_complexity)]
    fn reference(&self) -> [Vec<f64>; 7] {
        let (b_n, h_n, q_n, k_n, d, g) =
            (self.b, self.h, self.q, self.k, self.d, self.h / self.hkv);
        let sp = span(q_n, k_n);
        let mut out = vec![0.0; b_n * h_n * q_n * d];
        let mut lse = vec![f64::NEG_INFINITY; b_n * h_n * q_n];
        let (mut dq, mut dk, mut dv) = (
            vec![0.0; out.len()],
            vec![0.0; self.kv.len()],
            vec![0.0; self.kv.len()],
        );
        let mut ddist = vec![0.0; h_n * sp];
        let mut dkey = vec![0.0; b_n * h_n * k_n];
        for b in 0..b_n {
            for h in 0..h_n {
                for i in 0..q_n {
                    let cols: Vec<usize> = (0..k_n).filter(|&j| self.visible(i, j)).collect();
                    if cols.is_empty() {
                        continue;
                    }
                    let ys: Vec<f64> = cols.iter().map(|&j| self.pre_cap(b, h, i, j)).collect();
                    let xs: Vec<f64> = ys
                        .iter()
                        .map(|&y| self.softcap.map_or(y, |c| c * (y / c).tanh()))
                        .collect();
                    let m = xs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = xs.iter().map(|x| (x - m).exp()).sum();
                    let row = (b * h_n + h) * q_n + i;
                    lse[row] = m + sum.ln();
                    let p: Vec<f64> = xs.iter().map(|x| (x - lse[row]).exp()).collect();
                    let kvo = |j: usize| ((b * self.hkv + h / g) * k_n + j) * d;
                    for (&j, &pj) in cols.iter().zip(&p) {
                        for c in 0..d {
                            out[row * d + c] += pj * self.vv[kvo(j) + c];
                        }
                    }
                    let dp: Vec<f64> = cols
                        .iter()
                        .map(|&j| {
                            (0..d)
                                .map(|c| self.dout[row * d + c] * self.vv[kvo(j) + c])
                                .sum()
                        })
                        .collect();
                    let delta: f64 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    for (n, &j) in cols.iter().enumerate() {
                        let dx = p[n] * (dp[n] - delta);
                        let dy = self
                            .softcap
                            .map_or(dx, |c| dx * (1.0 - (ys[n] / c).tanh().powi(2)));
                        ddist[h * sp + j + q_n - 1 - i] += dy;
                        dkey[(b * h_n + h) * k_n + j] += dy;
                        let ds = dy * self.head_scale.as_ref().map_or(1.0, |s| s[h]) * self.scale;
                        for c in 0..d {
                            dq[row * d + c] += ds * self.kv[kvo(j) + c];
                            dk[kvo(j) + c] += ds * self.qv[row * d + c];
                            dv[kvo(j) + c] += p[n] * self.dout[row * d + c];
                        }
                    }
                }
            }
        }
        [out, lse, dq, dk, dv, ddist, dkey]
    }
}

fn close(name: &str, got: &[f64], want: &[f64], tol: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{name} ({ctx})");
    let scale = want.iter().fold(1.0f64, |a, &x| a.max(x.abs()));
    for (n, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g == w) || (g - w).abs() <= tol * scale;
        assert!(ok, "{name}[{n}] = {g}, expected {w} ({ctx})");
    }
}

/// Runs forward and backward on `backend` with `tuning` and `threads`; returns what [`Problem::reference`]
/// returns (the distance gradient summed over broadcast heads is compared by the caller).
fn run(
    p: &Problem,
    dtype: DType,
    backend: Backend,
    tuning: Tuning,
    threads: usize,
) -> [Vec<f64>; 7] {
    let (b, h, hkv, q, k, d) = (p.b, p.h, p.hkv, p.q, p.k, p.d);
    let c = Layout::Contiguous;
    let (qb, kb, vb) = (
        Buf::new(dtype, &[b, h, q, d], c, &p.qv),
        Buf::new(dtype, &[b, hkv, k, d], c, &p.kv),
        Buf::new(dtype, &[b, hkv, k, d], Layout::Transposed, &p.vv),
    );
    let hs = p
        .head_scale
        .as_ref()
        .map(|s| Buf::new(DType::F32, &[h], c, s));
    let dist = p
        .distance
        .as_ref()
        .map(|(n, t)| Buf::new(DType::F64, &[*n, span(q, k)], c, t));
    let key = p
        .key
        .as_ref()
        .map(|(kb, kh, t)| Buf::new(DType::BF16, &[*kb, *kh, k], c, t));
    let mask = CallMask::new(
        Grid::new(b, h, q, k),
        p.diagonal.map(causal).or(None::<PlacedMask>),
        None,
    )
    .unwrap();
    let score = ScoreTerms {
        head_scale: hs.as_ref().map(|t| &t.view),
        distance: dist.as_ref().map(|t| &t.view),
        key: key.as_ref().map(|t| &t.view),
    };
    let out = Buf::nan(dtype, &[b, h, q, d], c);
    let lse = Buf::nan(DType::F32, &[b, h, q], c);
    let fwd = AttentionArgs {
        query: &qb.view,
        key: &kb.view,
        value: &vb.view,
        out: &out.view,
        lse: Some(&lse.view),
        mask: &mask,
        bias: None,
        scale: p.scale,
        softcap: p.softcap,
        score,
        sinks: None,
        dropout: None,
        num_threads: threads,
        f32_precision: Default::default(),
    };
    attention_forward_with(&fwd, backend).unwrap();
    let dob = Buf::new(dtype, &[b, h, q, d], c, &p.dout);
    let (gq, gk, gv) = (
        Buf::nan(dtype, &[b, h, q, d], c),
        Buf::nan(dtype, &[b, hkv, k, d], c),
        Buf::nan(dtype, &[b, hkv, k, d], c),
    );
    let gdist = Buf::nan(
        if dtype == DType::F64 {
            dtype
        } else {
            DType::F32
        },
        &[h, span(q, k)],
        c,
    );
    let gkey = Buf::nan(DType::F64, &[b, h, k], Layout::Padded);
    let bwd = AttentionGradArgs {
        query: &qb.view,
        key: &kb.view,
        value: &vb.view,
        out: &out.view,
        grad_out: &dob.view,
        lse: &lse.view,
        mask: &mask,
        bias: None,
        scale: p.scale,
        softcap: p.softcap,
        sinks: None,
        dropout: None,
        grad_query: &gq.view,
        grad_key: &gk.view,
        grad_value: &gv.view,
        grad_sinks: None,
        grad_lse: None,
        grad_bias: None,
        score,
        grad_score_distance: dist.as_ref().map(|_| &gdist.view),
        grad_score_key: key.as_ref().map(|_| &gkey.view),
        num_threads: threads,
        f32_precision: Default::default(),
    };
    backward_with(&bwd, backend, tuning).unwrap();
    let or_empty = |on: bool, buf: &Buf| if on { buf.values() } else { Vec::new() };
    [
        out.values(),
        lse.values(),
        gq.values(),
        gk.values(),
        gv.values(),
        or_empty(dist.is_some(), &gdist),
        or_empty(key.is_some(), &gkey),
    ]
}

/// The reference with the terms' values rounded as the kernel reads them (distance f64, key bf16, head
/// scales f32) and the inputs rounded to `dtype`.
fn rounded(p: &Problem, dtype: DType) -> Problem {
    use super::backward_reference::round_to;
    let r = |v: &[f64], dt: DType| v.iter().map(|&x| round_to(dt, x)).collect::<Vec<_>>();
    Problem {
        qv: r(&p.qv, dtype),
        kv: r(&p.kv, dtype),
        vv: r(&p.vv, dtype),
        dout: r(&p.dout, dtype),
        head_scale: p.head_scale.as_ref().map(|s| r(s, DType::F32)),
        distance: p.distance.clone(),
        key: p.key.as_ref().map(|(a, b, t)| (*a, *b, r(t, DType::BF16))),
        ..*p
    }
}

const NAMES: [&str; 7] = ["out", "lse", "dq", "dk", "dv", "d_distance", "d_key"];

fn check(p: &Problem) {
    let tunings = [
        Tuning::default(),
        Tuning {
            dq: DqPath::TwoPass,
            ..Tuning::default()
        },
        Tuning {
            dq: DqPath::Split(3),
            kv_tile: Some(64),
            pack_budget: 0,
        },
    ];
    for dtype in [DType::F64, DType::F32, DType::BF16] {
        // The kernel writes the distance gradient per head even for a broadcast operand (the caller sums it),
        // as the reference computes it.
        let want = rounded(p, dtype).reference();
        let tol: f64 = match dtype {
            DType::F64 => 1e-10,
            DType::F32 => 2e-4,
            _ => 4e-2,
        };
        for backend in backends(dtype) {
            for (ti, &tuning) in tunings.iter().enumerate() {
                let got = run(p, dtype, backend, tuning, 2);
                let ctx = format!("{dtype:?} {backend:?} tuning {ti}");
                for (n, name) in NAMES.iter().enumerate() {
                    // The lse is f32 whatever the dtype.
                    let tol = if *name == "lse" { tol.max(1e-6) } else { tol };
                    if !got[n].is_empty() {
                        close(name, &got[n], &want[n], tol, &ctx);
                    }
                }
                if ti == 0 {
                    let again = run(p, dtype, backend, tuning, 3);
                    assert_eq!(
                        got[2..],
                        again[2..],
                        "gradients depend on the thread count ({ctx})"
                    );
                }
            }
        }
    }
}

#[test]
fn alibi_like_distance_terms_with_causal_mask_and_gqa() {
    // B2 H4 Hkv2, Q 70 K 90 (bottom-right causal), a per-head distance table.
    let p = Problem::new(
        1,
        (2, 4, 2, 70, 90, 8),
        None,
        Some(20),
        (false, Some(4), None),
    );
    check(&p);
}

#[test]
fn every_term_with_softcap_last() {
    let p = Problem::new(
        2,
        (1, 4, 1, 33, 150, 6),
        Some(1.5),
        Some(117),
        (true, Some(4), Some((1, 4))),
    );
    check(&p);
}

#[test]
fn broadcast_terms_without_mask() {
    // A distance table shared by the heads and a key table per batch shared by the heads; Q > K.
    let p = Problem::new(
        3,
        (2, 2, 2, 81, 40, 4),
        Some(3.0),
        None,
        (false, Some(1), Some((2, 1))),
    );
    check(&p);
}

#[test]
fn head_scales_alone_match_the_reference() {
    let p = Problem::new(4, (1, 3, 3, 17, 17, 5), None, Some(0), (true, None, None));
    check(&p);
}

#[test]
fn bad_term_shapes_are_refused_by_name() {
    let (b, h, q, k, d) = (1, 2, 3, 5, 4);
    let c = Layout::Contiguous;
    let t = |shape: &[usize]| Buf::new(DType::F32, shape, c, &vec![0.0; shape.iter().product()]);
    let (qb, kb, vb, out) = (
        t(&[b, h, q, d]),
        t(&[b, h, k, d]),
        t(&[b, h, k, d]),
        t(&[b, h, q, d]),
    );
    let mask = CallMask::new(Grid::new(b, h, q, k), None, None).unwrap();
    let (wrong_span, wrong_heads, wrong_key) = (t(&[h, q + k]), t(&[3]), t(&[b, h, k + 1]));
    let cases: [(ScoreTerms, &str); 3] = [
        (
            ScoreTerms {
                distance: Some(&wrong_span.view),
                ..Default::default()
            },
            "score_distance",
        ),
        (
            ScoreTerms {
                head_scale: Some(&wrong_heads.view),
                ..Default::default()
            },
            "head_scale",
        ),
        (
            ScoreTerms {
                key: Some(&wrong_key.view),
                ..Default::default()
            },
            "score_key",
        ),
    ];
    for (score, arg) in cases {
        let args = AttentionArgs {
            query: &qb.view,
            key: &kb.view,
            value: &vb.view,
            out: &out.view,
            lse: None,
            mask: &mask,
            bias: None,
            scale: 1.0,
            softcap: None,
            score,
            sinks: None,
            dropout: None,
            num_threads: 1,
            f32_precision: Default::default(),
        };
        let err = attention_forward_with(&args, Backend::Portable).unwrap_err();
        assert!(err.to_string().starts_with(arg), "{err}");
    }
}
