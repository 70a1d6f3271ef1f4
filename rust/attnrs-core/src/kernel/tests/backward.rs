//! The backward kernel against a naive f64 reference (explicit formulas, plain loops), the reference against
//! finite differences, determinism across thread counts, and argument validation.

use proptest::prelude::*;

use super::backward_reference::*;
use super::backward_support::*;
use crate::kernel::backward::*;
use crate::kernel::tests::support::{Layout, Rng};
use crate::kernel::*;
use crate::tensor::DType;

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn backward_matches_reference(
        seed in any::<u64>(),
        dtype in dtype_strategy(),
        b in 1usize..=2,
        (hkv, g) in prop_oneof![Just((1usize, 1usize)), Just((1, 2)), Just((2, 2)), Just((1, 3)), Just((2, 1))],
        q in 1usize..80,
        k in 1usize..80,
        d in prop_oneof![Just(1usize), Just(5), Just(16), Just(20), Just(32)],
        dv in prop_oneof![Just(0usize), Just(3), Just(16), Just(17)],
        mask in 0u8..3,
    ) {
        let dv = if dv == 0 { d } else { dv };
        check_case(&Case { seed, dtype, b, hkv, g, q, k, d, dv, mask });
    }
}

#[test]
fn every_feature_on_awkward_sizes() {
    // Sizes straddling the 64-row / 64- and 128-column tiles, every mask kind, f64, f32 and bf16 (its
    // dot-product path: odd rows and columns leave half-filled pairs).
    let mut seed = 11;
    for (q, k) in [(1, 1), (63, 65), (65, 63), (130, 7), (7, 130), (65, 129)] {
        for mask in 0..3 {
            for dtype in [DType::F64, DType::F32, DType::BF16] {
                seed += 1;
                check_case(&Case {
                    seed,
                    dtype,
                    b: 1,
                    hkv: 1,
                    g: 3,
                    q,
                    k,
                    d: 8,
                    dv: 5,
                    mask,
                });
            }
        }
    }
}

/// Central differences of `L = Σ out ∘ dout` (reference forward, f64) against the kernel's f64 gradients:
/// checks the formulas themselves, grad_sinks' sign included.
#[test]
fn finite_differences_agree_with_the_kernel() {
    for seed in 0..6u64 {
        let mut s = setup(&Case {
            seed,
            dtype: DType::F64,
            b: 1,
            hkv: 1,
            g: 2,
            q: 3,
            k: 4,
            d: 3,
            dv: 2,
            mask: (seed % 3) as u8,
        });
        let mut rng = Rng(seed + 100);
        s.p.softcap = (seed % 2 == 0).then_some(1.5);
        s.p.sinks = Some(vec![rng.range(-1.0, 1.0), rng.range(-1.0, 1.0)]);
        s.p.bias = Some((
            vec![1, 2, 3, 4],
            (0..24)
                .map(|i| {
                    if i == 5 {
                        f64::NEG_INFINITY
                    } else {
                        rng.range(-1.0, 1.0)
                    }
                })
                .collect(),
            DType::F64,
        ));
        s.layouts = [Layout::Contiguous; 5];
        let got = run_backward(&s, Backend::Portable, Tuning::default(), 1, true);
        let loss = |p: &Problem| -> f64 {
            let (out, _) = p.forward();
            out.iter().zip(&p.dout).map(|(o, g)| o * g).sum()
        };
        let eps = 1e-6;
        let fd = |edit: &dyn Fn(&mut Problem, f64)| {
            let mut plus = s.p.clone();
            edit(&mut plus, eps);
            let mut minus = s.p.clone();
            edit(&mut minus, -eps);
            (loss(&plus) - loss(&minus)) / (2.0 * eps)
        };
        let close = |name: &str, g: f64, n: f64| {
            assert!(
                (g - n).abs() <= 1e-6 * (1.0 + n.abs()),
                "seed {seed}: {name}: kernel {g}, finite difference {n}"
            );
        };
        for i in 0..s.p.q.len() {
            close("dq", got.dq[i], fd(&|p, e| p.q[i] += e));
        }
        for i in 0..s.p.k.len() {
            close("dk", got.dk[i], fd(&|p, e| p.k[i] += e));
        }
        for i in 0..s.p.v.len() {
            close("dv", got.dv[i], fd(&|p, e| p.v[i] += e));
        }
        for h in 0..2 {
            close(
                "dsinks",
                got.dsinks[h],
                fd(&|p, e| p.sinks.as_mut().unwrap()[h] += e),
            );
        }
        for i in 0..24 {
            if s.p.bias.as_ref().unwrap().1[i] == f64::NEG_INFINITY {
                assert_eq!(got.dbias[i], 0.0);
                continue;
            }
            let n = fd(&|p, e| p.bias.as_mut().unwrap().1[i] += e);
            close("dbias", got.dbias[i], n);
        }
    }
}

#[test]
fn gradients_are_bitwise_identical_across_runs_and_threads() {
    for dtype in [DType::F32, DType::BF16, DType::F64] {
        let mut s = setup(&Case {
            seed: 5,
            dtype,
            b: 2,
            hkv: 2,
            g: 2,
            q: 150,
            k: 140,
            d: 24,
            dv: 16,
            mask: 1,
        });
        s.p.softcap = Some(3.0);
        s.p.sinks = Some(vec![0.5, -1.0, 0.0, 1.0]);
        let runs = backends(dtype).into_iter().flat_map(|b| {
            [
                Tuning::default(),
                tuning(DqPath::TwoPass, 128, true),
                tuning(DqPath::Split(2), 64, false),
            ]
            .map(|s| (b, s))
        });
        for (backend, strategy) in runs {
            let first = run_backward(&s, backend, strategy, 1, true);
            for threads in [2, 1, 3] {
                let again = run_backward(&s, backend, strategy, threads, true);
                let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                for (a, b) in [
                    (&first.dq, &again.dq),
                    (&first.dk, &again.dk),
                    (&first.dv, &again.dv),
                    (&first.dsinks, &again.dsinks),
                    (&first.dbias, &again.dbias),
                ] {
                    assert_eq!(
                        bits(a),
                        bits(b),
                        "{dtype:?} {backend:?} {strategy:?} threads {threads}"
                    );
                }
            }
        }
    }
}

/// Runs the real forward, then the backward, on f32: the pipeline the autograd binding uses (with and
/// without dropout: the backward must regenerate the forward's pattern).
#[test]
fn forward_then_backward_matches_reference() {
    let runs = [(0u8, 1u64), (1, 2), (2, 3)]
        .into_iter()
        .flat_map(|(mask, seed)| [(mask, seed, None), (mask, seed, Some(0.3))]);
    for (mask, seed, drop_p) in runs {
        let mut s = setup(&Case {
            seed,
            dtype: DType::F32,
            b: 1,
            hkv: 2,
            g: 2,
            q: 70,
            k: 90,
            d: 32,
            dv: 32,
            mask,
        });
        s.p.sinks = Some(vec![0.1, 0.2, -0.3, 1.0]);
        s.p.set_dropout(drop_p.map(|p| Dropout {
            p,
            seed: 1234 + seed,
        }));
        let p = &s.p;
        let [nb, h, hkv, nq, nk, d, dv, _] = p.dims;
        let inputs = Inputs::new(p, &s.layouts);
        let gob = Buf::new(DType::F32, &[nb, h, nq, dv], s.layouts[4], &p.dout);
        let (out, lse) = inputs.forward(p, s.mask.as_ref(), Backend::Auto);
        let ctx = format!("forward+backward mask {mask} dropout {drop_p:?}");
        assert_close("out", &out.values(), &p.forward().0, 2e-5, &ctx);
        let gq = Buf::nan(DType::F32, &[nb, h, nq, d], Layout::Transposed);
        let gk = Buf::nan(DType::F32, &[nb, hkv, nk, d], Layout::Contiguous);
        let gv = Buf::nan(DType::F32, &[nb, hkv, nk, dv], Layout::Padded);
        let gs = Buf::nan(DType::BF16, &[h], Layout::Contiguous);
        attention_backward(&AttentionGradArgs {
            grad_lse: None,
            query: &inputs.q.view,
            key: &inputs.k.view,
            value: &inputs.v.view,
            out: &out.view,
            grad_out: &gob.view,
            lse: &lse.view,
            mask: s.mask.as_ref(),
            bias: inputs.bias.as_ref().map(|b| &b.view),
            scale: p.scale,
            softcap: p.softcap,
            sinks: inputs.sinks.as_ref().map(|b| &b.view),
            grad_query: &gq.view,
            grad_key: &gk.view,
            grad_value: &gv.view,
            grad_sinks: Some(&gs.view),
            grad_bias: None,
            dropout: p.dropout,
            score: Default::default(),
            grad_score_distance: None,
            grad_score_key: None,
            num_threads: 2,
            f32_precision: Default::default(),
        })
        .unwrap();
        let want = p.grads();
        assert_close("dq", &gq.values(), &want.dq, 2e-4, &ctx);
        assert_close("dk", &gk.values(), &want.dk, 2e-4, &ctx);
        assert_close("dv", &gv.values(), &want.dv, 2e-4, &ctx);
        assert_close("dsinks", &gs.values(), &want.dsinks, 1e-2, &ctx);
    }
}

/// The forward with dropout against the reference on every backend, prefill and decode shapes (decode
/// leaves its in-place path for the streaming one, which drops the same pairs).
#[test]
fn forward_dropout_matches_reference_on_every_path() {
    for (q, k, dtype) in [
        (1, 300, DType::F32),
        (3, 130, DType::BF16),
        (70, 90, DType::F32),
    ] {
        let mut s = setup(&Case {
            seed: q as u64,
            dtype,
            b: 2,
            hkv: 2,
            g: 2,
            q,
            k,
            d: 16,
            dv: 16,
            mask: 1,
        });
        s.p.set_dropout(Some(Dropout { p: 0.4, seed: 99 }));
        let p = &s.p;
        let inputs = Inputs::new(p, &[Layout::Contiguous; 3]);
        let (want, want_lse) = p.forward();
        for backend in backends(dtype).into_iter().chain([Backend::Auto]) {
            let (out, lse) = inputs.forward(p, s.mask.as_ref(), backend);
            let ctx = format!("q {q} k {k} {dtype:?} {backend:?}");
            assert_close("out", &out.values(), &want, tolerance(dtype), &ctx);
            let finite: Vec<f64> = want_lse.iter().map(|x| x.max(-1e30)).collect();
            let got: Vec<f64> = lse.values().iter().map(|x| x.max(-1e30)).collect();
            assert_close("lse (unaffected by dropout)", &got, &finite, 1e-4, &ctx);
        }
    }
}

/// Rows that see nothing give zero gradients, rows of `finfo.min` logits give the uniform softmax's, and
/// empty dims still write every gradient.
#[test]
fn empty_rows_huge_bias_rows_and_empty_dims() {
    // Row 0: normal; row 1: every bias -inf; row 2: every bias f32::MIN (uniform softmax over the 3 keys).
    let mut s = setup(&Case {
        seed: 9,
        dtype: DType::F32,
        b: 1,
        hkv: 1,
        g: 1,
        q: 3,
        k: 3,
        d: 4,
        dv: 2,
        mask: 0,
    });
    let min = f32::MIN as f64;
    s.p.bias = Some((
        vec![3, 3],
        vec![
            0.1,
            -0.2,
            0.3,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            f64::NEG_INFINITY,
            min,
            min,
            min,
        ],
        DType::F32,
    ));
    s.p.sinks = None;
    s.p.softcap = None;
    for (backend, strategy) in backends(DType::F32)
        .into_iter()
        .flat_map(|b| STRATEGIES.map(|s| (b, s)))
    {
        let got = run_backward(&s, backend, strategy, 1, true);
        let want = s.p.grads();
        assert_close("dq", &got.dq, &want.dq, 1e-5, "huge rows");
        assert_close("dk", &got.dk, &want.dk, 1e-5, "huge rows");
        assert_close("dv", &got.dv, &want.dv, 1e-5, "huge rows");
        assert_close("dbias", &got.dbias, &want.dbias, 1e-5, "huge rows");
        assert!(got.dq[4..8].iter().all(|&x| x == 0.0));
    }
    // Q = 0 (grad_key / grad_value are zero), K = 0 (grad_query is zero).
    for (q, k) in [(0usize, 5usize), (4, 0)] {
        let s = setup(&Case {
            seed: 3,
            dtype: DType::F32,
            b: 1,
            hkv: 1,
            g: 2,
            q,
            k,
            d: 4,
            dv: 3,
            mask: 0,
        });
        for strategy in STRATEGIES {
            let got = run_backward(&s, Backend::Auto, strategy, 2, true);
            for v in [&got.dq, &got.dk, &got.dv] {
                assert!(v.iter().all(|&x| x == 0.0), "q {q} k {k}: {v:?}");
            }
        }
    }
}
