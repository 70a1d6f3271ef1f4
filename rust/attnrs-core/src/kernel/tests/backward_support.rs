//! The backward tests' cases: inputs set up from a case, the kernel run on them, results compared.

use proptest::prelude::*;

use super::backward_reference::*;
pub(super) use super::forward_support::backends;
use crate::kernel::args::*;
use crate::kernel::backward::*;
use crate::kernel::tests::support::{Bitmap, Layout, Rng, causal, finfo_min, layout};
use crate::kernel::*;
use crate::mask::tiles::{MaskTiles, NoMask};
use crate::tensor::DType;

/// A random problem. `mask`: 0 none, 1 causal (random diagonal), 2 random bitmap.
#[derive(Debug, Clone)]
pub(super) struct Case {
    pub(super) seed: u64,
    pub(super) dtype: DType,
    pub(super) b: usize,
    pub(super) hkv: usize,
    pub(super) g: usize,
    pub(super) q: usize,
    pub(super) k: usize,
    pub(super) d: usize,
    pub(super) dv: usize,
    pub(super) mask: u8,
}

/// A problem plus the kernel-facing tensors and mask.
pub(super) struct Setup {
    pub(super) p: Problem,
    pub(super) layouts: [Layout; 5], // q, k, v, out, dout
    pub(super) mask: Box<dyn MaskTiles>,
    pub(super) out_layout: Layout,
}

pub(super) fn setup(c: &Case) -> Setup {
    let mut rng = Rng(c.seed);
    let h = c.hkv * c.g;
    let dt = c.dtype;
    let shapes = [
        vec![c.b, h, c.q, c.d],
        vec![c.b, c.hkv, c.k, c.d],
        vec![c.b, c.hkv, c.k, c.dv],
    ];
    let layouts = [
        layout(&mut rng, true),
        layout(&mut rng, true),
        layout(&mut rng, true),
        layout(&mut rng, false),
        layout(&mut rng, true),
    ];
    let make = |shape: &[usize], lay: Layout, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let mut v: Vec<f64> = (0..n).map(|_| round_to(dt, rng.range(-1.0, 1.0))).collect();
        if let Layout::Broadcast(d) = lay {
            broadcast_fix(&mut v, shape, d);
        }
        v
    };
    let q = make(&shapes[0], layouts[0], &mut rng);
    let k = make(&shapes[1], layouts[1], &mut rng);
    let v = make(&shapes[2], layouts[2], &mut rng);
    let dout = make(&[c.b, h, c.q, c.dv], layouts[4], &mut rng);
    let bias = rng.chance(0.35).then(|| {
        let choices: [Vec<usize>; 4] = [
            vec![c.b, h, c.q, c.k],
            vec![1, 1, c.q, c.k],
            vec![c.b, 1, 1, c.k],
            vec![c.q, c.k],
        ];
        let shape = choices[rng.below(4)].clone();
        let bdt = if rng.chance(0.5) { dt } else { DType::F32 };
        let min = finfo_min(bdt);
        let huge = rng.chance(0.3);
        let n: usize = shape.iter().product();
        let vals: Vec<f64> = (0..n)
            .map(|_| {
                if rng.chance(0.1) {
                    f64::NEG_INFINITY
                } else if huge && rng.chance(0.4) {
                    min
                } else {
                    round_to(bdt, rng.range(-2.0, 2.0))
                }
            })
            .collect();
        (shape, vals, bdt)
    });
    let sinks = rng
        .chance(0.3)
        .then(|| (0..h).map(|_| rng.range(-2.0, 2.0) as f32 as f64).collect());
    let scale = rng.range(0.5, 2.0) / (c.d.max(1) as f64).sqrt();
    let scale = if dt == DType::F64 {
        scale
    } else {
        scale as f32 as f64
    };
    let softcap = rng.chance(0.25).then(|| rng.range(0.5, 5.0) as f32 as f64);
    let mask: Box<dyn MaskTiles> = match c.mask {
        0 => Box::new(NoMask),
        1 => Box::new(causal(
            rng.below(11) as i64 - 5 + (c.k as i64 - c.q as i64) * (rng.below(2) as i64),
        )),
        _ => Box::new(Bitmap::new([c.b, h, c.q, c.k], &mut rng)),
    };
    let vis = (0..c.b * h * c.q * c.k)
        .map(|f| {
            let [b, hh, i, j]: [usize; 4] = unravel(f, &[c.b, h, c.q, c.k]).try_into().unwrap();
            let mut x = [0u8];
            mask.fill(b, hh, i..i + 1, j..j + 1, &mut x);
            x[0] != 0
        })
        .collect();
    let out_layout = layout(&mut rng, false);
    let dropout = rng.chance(0.3).then(|| Dropout {
        p: rng.range(0.05, 0.8),
        seed: rng.next(),
    });
    let mut setup = Setup {
        p: Problem {
            dtype: dt,
            dims: [c.b, h, c.hkv, c.q, c.k, c.d, c.dv, c.g],
            q,
            k,
            v,
            dout,
            bias,
            sinks,
            scale,
            softcap,
            vis,
            dropout: None,
            kept: Vec::new(),
        },
        layouts,
        mask,
        out_layout,
    };
    setup.p.set_dropout(dropout);
    setup
}

/// The kernel-facing input tensors of a problem (q, k, v in the given layouts; bias and sinks contiguous).
pub(super) struct Inputs {
    pub(super) q: Buf,
    pub(super) k: Buf,
    pub(super) v: Buf,
    pub(super) bias: Option<Buf>,
    pub(super) sinks: Option<Buf>,
}

impl Inputs {
    pub(super) fn new(p: &Problem, layouts: &[Layout]) -> Inputs {
        let [nb, h, hkv, nq, nk, d, dv, _] = p.dims;
        let dt = p.dtype;
        Inputs {
            q: Buf::new(dt, &[nb, h, nq, d], layouts[0], &p.q),
            k: Buf::new(dt, &[nb, hkv, nk, d], layouts[1], &p.k),
            v: Buf::new(dt, &[nb, hkv, nk, dv], layouts[2], &p.v),
            bias: p
                .bias
                .as_ref()
                .map(|(shape, vals, bdt)| Buf::new(*bdt, shape, Layout::Contiguous, vals)),
            sinks: p
                .sinks
                .as_ref()
                .map(|sk| Buf::new(DType::F32, &[h], Layout::Contiguous, sk)),
        }
    }

    /// The kernel's forward on `backend`: (out, lse), contiguous.
    pub(super) fn forward(
        &self,
        p: &Problem,
        mask: &dyn MaskTiles,
        backend: Backend,
    ) -> (Buf, Buf) {
        let [nb, h, _, nq, _, _, dv, _] = p.dims;
        let out = Buf::nan(p.dtype, &[nb, h, nq, dv], Layout::Contiguous);
        let lse = Buf::nan(DType::F32, &[nb, h, nq], Layout::Contiguous);
        let args = AttentionArgs {
            query: &self.q.view,
            key: &self.k.view,
            value: &self.v.view,
            out: &out.view,
            lse: Some(&lse.view),
            mask,
            bias: self.bias.as_ref().map(|b| &b.view),
            scale: p.scale,
            softcap: p.softcap,
            sinks: self.sinks.as_ref().map(|b| &b.view),
            dropout: p.dropout,
            score: Default::default(),
            num_threads: 2,
            f32_precision: Default::default(),
        };
        crate::kernel::attention_forward_with(&args, backend).unwrap();
        (out, lse)
    }
}

/// The kernel's gradients, read back in logical order.
pub(super) struct Got {
    pub(super) dq: Vec<f64>,
    pub(super) dk: Vec<f64>,
    pub(super) dv: Vec<f64>,
    pub(super) dsinks: Vec<f64>,
    pub(super) dbias: Vec<f64>,
}

/// Runs the backward with out / lse from the reference forward (rounded as the forward would store them).
pub(super) fn run_backward(
    s: &Setup,
    backend: Backend,
    strategy: Tuning,
    threads: usize,
    with_bias_grad: bool,
) -> Got {
    let p = &s.p;
    let [nb, h, hkv, nq, nk, d, dv, _] = p.dims;
    let dt = p.dtype;
    let (out, lse) = p.forward();
    let Inputs {
        q: qb,
        k: kb,
        v: vb,
        bias,
        sinks,
    } = Inputs::new(p, &s.layouts);
    let ob = Buf::new(dt, &[nb, h, nq, dv], s.layouts[3], &out);
    let gob = Buf::new(dt, &[nb, h, nq, dv], s.layouts[4], &p.dout);
    let lb = Buf::new(DType::F32, &[nb, h, nq], Layout::Contiguous, &lse);
    let gq = Buf::nan(dt, &[nb, h, nq, d], s.out_layout);
    let gk = Buf::nan(dt, &[nb, hkv, nk, d], s.out_layout);
    let gv = Buf::nan(dt, &[nb, hkv, nk, dv], s.out_layout);
    // f32 gradients for sinks and bias, except where the test wants f64 accuracy.
    let gdt = if dt == DType::F64 { dt } else { DType::F32 };
    let gs = Buf::nan(gdt, &[h], Layout::Contiguous);
    let gb = Buf::nan(gdt, &[nb, h, nq, nk], Layout::Contiguous);
    let args = AttentionGradArgs {
        grad_lse: None,
        query: &qb.view,
        key: &kb.view,
        value: &vb.view,
        out: &ob.view,
        grad_out: &gob.view,
        lse: &lb.view,
        mask: s.mask.as_ref(),
        bias: bias.as_ref().map(|b| &b.view),
        scale: p.scale,
        softcap: p.softcap,
        sinks: sinks.as_ref().map(|b| &b.view),
        grad_query: &gq.view,
        grad_key: &gk.view,
        grad_value: &gv.view,
        grad_sinks: sinks.as_ref().map(|_| &gs.view),
        grad_bias: with_bias_grad.then_some(&gb.view),
        dropout: p.dropout,
        score: Default::default(),
        grad_score_distance: None,
        grad_score_key: None,
        num_threads: threads,
        f32_precision: Default::default(),
    };
    backward_with(&args, backend, strategy).unwrap();
    Got {
        dq: gq.values(),
        dk: gk.values(),
        dv: gv.values(),
        dsinks: if sinks.is_some() {
            gs.values()
        } else {
            vec![0.0; h]
        },
        dbias: if with_bias_grad {
            gb.values()
        } else {
            Vec::new()
        },
    }
}

pub(super) fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

/// `got` within `tol` of `want`, relative to the largest `want` (at least 1).
pub(super) fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64, ctx: &str) {
    assert_eq!(got.len(), want.len(), "{ctx}: {name} length");
    let top = want.iter().fold(1.0f64, |a, w| a.max(w.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{ctx}: {name}[{i}] = {g}");
        assert!(
            (g - w).abs() <= tol * top,
            "{ctx}: {name}[{i}] = {g}, want {w} (scale {top})"
        );
    }
}

/// Both ways of forming dQ (a second pass, one partial, several partials clamped to the kv tiles), at both key
/// tile widths, with the query rows packed per group and per tile.
pub(super) const STRATEGIES: [Tuning; 5] = [
    tuning(DqPath::TwoPass, 64, true),
    tuning(DqPath::TwoPass, 128, false),
    tuning(DqPath::Split(1), 64, false),
    tuning(DqPath::Split(1), 128, true),
    tuning(DqPath::Split(3), 128, false),
];

/// A forced [`Tuning`]; `per_tile` packs the query rows tile by tile instead of per GQA group.
pub(super) const fn tuning(dq: DqPath, kv_tile: usize, per_tile: bool) -> Tuning {
    Tuning {
        dq,
        kv_tile: Some(kv_tile),
        pack_budget: if per_tile { 0 } else { usize::MAX },
    }
}

pub(super) fn check_case(c: &Case) {
    let s = setup(c);
    let want = s.p.grads();
    let tol = tolerance(c.dtype);
    let threads = 1 + (c.seed % 3) as usize;
    let runs = backends(c.dtype)
        .into_iter()
        .flat_map(|b| STRATEGIES.map(|s| (b, s)));
    for (backend, strategy) in runs {
        let got = run_backward(&s, backend, strategy, threads, true);
        let ctx = format!(
            "{c:?} backend {backend:?} {strategy:?} bias {:?} sinks {} softcap {:?} dropout {:?} layouts {:?}/{:?}",
            s.p.bias.as_ref().map(|b| (&b.0, b.2)),
            s.p.sinks.is_some(),
            s.p.softcap,
            s.p.dropout,
            s.layouts,
            s.out_layout
        );
        assert_close("dq", &got.dq, &want.dq, tol, &ctx);
        assert_close("dk", &got.dk, &want.dk, tol, &ctx);
        assert_close("dv", &got.dv, &want.dv, tol, &ctx);
        assert_close("dsinks", &got.dsinks, &want.dsinks, tol, &ctx);
        assert_close("dbias", &got.dbias, &want.dbias, tol, &ctx);
    }
}

pub(super) fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        3 => Just(DType::F64),
        3 => Just(DType::F32),
        1 => Just(DType::BF16),
        1 => Just(DType::F16)
    ]
}
