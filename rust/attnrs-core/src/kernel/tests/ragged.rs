//! Ragged (varlen) and paged calls on every backend this CPU has: against a naive f64 reference per sequence
//! (bottom-right windows, GQA, lengths 0 and 1, prefill and decode shapes), and paged keys bitwise equal to
//! packed ones.

use super::forward_support::{Buf, backends};
use super::support::{Layout, Rng};
use crate::kernel::{
    AttentionArgs, Backend, RaggedArgs, ScoreTerms, attention_forward_ragged_with,
};
use crate::mask::tiles::NoMask;
use crate::tensor::{DType, TensorView};

/// An int32 `[n]` or `[rows, n / rows]` tensor.
struct Ints {
    _store: Vec<i32>,
    view: TensorView,
}

fn ints(values: Vec<i32>, shape: &[usize]) -> Ints {
    let mut store = values;
    let strides = if shape.len() == 2 {
        vec![shape[1] as isize, 1]
    } else {
        vec![1]
    };
    // SAFETY: the store holds `shape.iter().product()` int32 values laid out row-major.
    let view = unsafe {
        TensorView::new(
            store.as_mut_ptr().cast(),
            DType::I32,
            shape.to_vec(),
            strides,
        )
    }
    .unwrap();
    Ints {
        _store: store,
        view,
    }
}

fn cumulative(lengths: &[usize]) -> Vec<i32> {
    let mut cu = vec![0i32];
    for &n in lengths {
        cu.push(cu[cu.len() - 1] + n as i32);
    }
    cu
}

struct Call<'a> {
    q: &'a Buf,
    k: &'a Buf,
    v: &'a Buf,
    heads: usize,
    dv: usize,
}

/// Runs one ragged call; returns out `[1, H, Tq, Dv]` (token-major) and lse.
fn run(c: &Call, ragged: &RaggedArgs, backend: Backend, rng: &mut Rng) -> (Buf, Buf) {
    let tq = c.q.view.shape()[2];
    let out = Buf::zeros(
        c.q.view.dtype(),
        &[1, c.heads, tq, c.dv],
        Layout::Transposed,
        rng,
    );
    let lse = Buf::zeros(DType::F32, &[1, c.heads, tq], Layout::Contiguous, rng);
    let args = AttentionArgs {
        query: &c.q.view,
        key: &c.k.view,
        value: &c.v.view,
        out: &out.view,
        lse: Some(&lse.view),
        mask: &NoMask,
        bias: None,
        scale: 0.37,
        softcap: None,
        score: ScoreTerms::default(),
        sinks: None,
        dropout: None,
        num_threads: 1 + rng.below(3),
        f32_precision: Default::default(),
    };
    attention_forward_ragged_with(&args, ragged, backend).unwrap();
    (out, lse)
}

#[test]
fn ragged_and_paged_match_the_reference_on_every_backend() {
    let mut rng = Rng(5);
    for case in 0..24 {
        let dtype = [DType::F32, DType::BF16, DType::F64][case % 3];
        let (hkv, g) = [(1, 1), (2, 2), (1, 4)][case % 3];
        let heads = hkv * g;
        let (d, dv) = [(8, 8), (16, 12), (5, 7)][(case / 3) % 3];
        let n = 1 + rng.below(5);
        let decode = case % 4 == 0;
        let pick = |rng: &mut Rng, top: usize| match rng.below(4) {
            0 => 0,
            1 => 1,
            _ => rng.below(top + 1),
        };
        let k_len: Vec<usize> = (0..n).map(|_| pick(&mut rng, 150)).collect();
        let q_len: Vec<usize> = (0..n)
            .map(|b| {
                if decode {
                    1
                } else if rng.chance(0.5) {
                    k_len[b]
                } else {
                    pick(&mut rng, 80)
                }
            })
            .collect();
        let window = [(-1, -1), (-1, 0), (5, 0), (3, 9)][rng.below(4)];
        let (tq, tk): (usize, usize) = (q_len.iter().sum(), k_len.iter().sum());
        if tq == 0 {
            continue; // nothing to write (and the test buffers' empty views have overlapping strides)
        }
        let mut fill = |rng: &mut Rng| rng.range(-2.0, 2.0);
        let q = Buf::new(
            dtype,
            &[1, heads, tq, d],
            Layout::Transposed,
            &mut rng,
            &mut fill,
        );
        let k = Buf::new(
            dtype,
            &[1, hkv, tk, d],
            Layout::Transposed,
            &mut rng,
            &mut fill,
        );
        let v = Buf::new(
            dtype,
            &[1, hkv, tk, dv],
            Layout::Transposed,
            &mut rng,
            &mut fill,
        );
        let (cu_q, cu_k) = (cumulative(&q_len), cumulative(&k_len));
        // The same keys in a pool of pages in shuffled order, plus spare pages of noise.
        let page = [1, 3, 16, 64][rng.below(4)];
        let need: Vec<usize> = k_len.iter().map(|n| n.div_ceil(page)).collect();
        let total: usize = need.iter().sum::<usize>() + 2;
        let mut ids: Vec<usize> = (0..total).collect();
        for i in (1..total).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let width = need.iter().copied().max().unwrap_or(0) + 1;
        let mut table = vec![-7i32; n * width]; // never read past the used pages
        let mut source = vec![None; total * page]; // pool row -> packed key row
        let mut next = ids.into_iter();
        for b in 0..n {
            for p in 0..need[b] {
                let id = next.next().unwrap();
                table[b * width + p] = id as i32;
                for r in 0..page.min(k_len[b] - p * page) {
                    source[id * page + r] = Some(cu_k[b] as usize + p * page + r);
                }
            }
        }
        let pooled = |from: &Buf, dim: usize, rng: &mut Rng| {
            let mut i = 0usize;
            Buf::new(
                dtype,
                &[1, hkv, total * page, dim],
                Layout::Transposed,
                rng,
                &mut |rng| {
                    // Storage order is [row, head, dim].
                    let (row, h, dd) = (i / (hkv * dim), (i / dim) % hkv, i % dim);
                    i += 1;
                    source[row]
                        .map_or_else(|| rng.range(-9.0, 9.0), |src| from.get(&[0, h, src, dd]))
                },
            )
        };
        let (pool_k, pool_v) = (pooled(&k, d, &mut rng), pooled(&v, dv, &mut rng));
        let (cu_q_t, cu_k_t) = (ints(cu_q.clone(), &[n + 1]), ints(cu_k.clone(), &[n + 1]));
        let used = ints(k_len.iter().map(|&x| x as i32).collect(), &[n]);
        let table = ints(table, &[n, width]);
        let packed = RaggedArgs {
            cu_seq_q: &cu_q_t.view,
            cu_seq_k: Some(&cu_k_t.view),
            seqused_k: None,
            block_table: None,
            page_size: 1,
            window,
        };
        let paged = RaggedArgs {
            cu_seq_k: None,
            seqused_k: Some(&used.view),
            block_table: Some(&table.view),
            page_size: page,
            ..packed
        };
        for backend in backends(dtype) {
            let dense = Call {
                q: &q,
                k: &k,
                v: &v,
                heads,
                dv,
            };
            let (out, lse) = run(&dense, &packed, backend, &mut rng);
            let pool = Call {
                q: &q,
                k: &pool_k,
                v: &pool_v,
                heads,
                dv,
            };
            let (out_paged, lse_paged) = run(&pool, &paged, backend, &mut rng);
            let tol: f64 = match dtype {
                DType::F64 => 1e-10,
                DType::F32 => 2e-5,
                _ => 2e-2,
            };
            for b in 0..n {
                let off = k_len[b] as i64 - q_len[b] as i64;
                for h in 0..heads {
                    for i in 0..q_len[b] {
                        let row = cu_q[b] as usize + i;
                        let a = i as i64 + off;
                        let seen = |j: i64| {
                            (window.0 < 0 || j >= a - window.0)
                                && (window.1 < 0 || j <= a + window.1)
                        };
                        let logits: Vec<(usize, f64)> = (0..k_len[b])
                            .filter(|&j| seen(j as i64))
                            .map(|j| {
                                let kr = cu_k[b] as usize + j;
                                let dot: f64 = (0..d)
                                    .map(|dd| q.get(&[0, h, row, dd]) * k.get(&[0, h / g, kr, dd]))
                                    .sum();
                                (kr, dot * 0.37)
                            })
                            .collect();
                        let m = logits.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                        let sum: f64 = logits.iter().map(|x| (x.1 - m).exp()).sum();
                        let want_lse = if logits.is_empty() {
                            f64::NEG_INFINITY
                        } else {
                            m + sum.ln()
                        };
                        let got_lse = lse.get(&[0, h, row]);
                        assert_eq!(got_lse.to_bits(), lse_paged.get(&[0, h, row]).to_bits());
                        if logits.is_empty() {
                            assert_eq!(got_lse, f64::NEG_INFINITY, "{backend:?} case {case}");
                        } else {
                            // The lse is f32 for every dtype.
                            let lse_tol = (tol * 10.0).max(1e-5) * (1.0 + want_lse.abs());
                            assert!(
                                (got_lse - want_lse).abs() <= lse_tol,
                                "{backend:?} case {case} lse {got_lse} vs {want_lse}"
                            );
                        }
                        for j in 0..dv {
                            let want: f64 = logits
                                .iter()
                                .map(|&(kr, x)| (x - m).exp() / sum * v.get(&[0, h / g, kr, j]))
                                .sum();
                            let got = out.get(&[0, h, row, j]);
                            assert_eq!(got.to_bits(), out_paged.get(&[0, h, row, j]).to_bits());
                            let want = if logits.is_empty() { 0.0 } else { want };
                            assert!(
                                (got - want).abs() <= tol * (1.0 + want.abs()) * 4.0,
                                "{backend:?} {dtype:?} case {case} seq {b} head {h} row {i} col {j}: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
