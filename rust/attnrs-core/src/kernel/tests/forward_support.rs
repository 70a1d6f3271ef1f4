//! The forward tests' naive f64 reference, strided test buffers, a bitmap mask and the case runner.

use half::{bf16, f16};
use proptest::prelude::*;

use crate::kernel::args::*;
use crate::kernel::forward;
use crate::kernel::tests::support::{Bitmap, Layout, Rng, causal, finfo_min, layout, read_f64};
use crate::kernel::*;
use crate::mask::tiles::{MaskTiles, NoMask};
use crate::tensor::{DType, TensorView};

/// Owned storage plus a strided view of it.
pub(super) struct Buf {
    pub(super) _store: Vec<u64>,
    pub(super) view: TensorView,
}

impl Buf {
    pub(super) fn new(
        dtype: DType,
        shape: &[usize],
        layout: Layout,
        rng: &mut Rng,
        fill: &mut dyn FnMut(&mut Rng) -> f64,
    ) -> Buf {
        let n = shape.len();
        let mut order: Vec<usize> = (0..n).collect(); // outermost first
        match (layout, n) {
            (Layout::Transposed, 4) => order = vec![0, 2, 1, 3],
            (Layout::ColumnMajor, 4) => order = vec![0, 1, 3, 2],
            _ => {}
        }
        let mut strides = vec![0isize; n];
        let mut acc = 1usize;
        for (pos, &dim) in order.iter().enumerate().rev() {
            let broadcast = matches!(layout, Layout::Broadcast(d) if d == dim);
            strides[dim] = if broadcast { 0 } else { acc as isize };
            if !broadcast {
                acc *= shape[dim];
                if pos == n - 1 && matches!(layout, Layout::Padded) {
                    acc += 3;
                }
            }
        }
        let elems = acc.max(1);
        let mut store = vec![0u64; (elems * dtype.size()).div_ceil(8)];
        let base = store.as_mut_ptr().cast::<u8>();
        for i in 0..elems {
            let x = fill(rng);
            // SAFETY: `i < elems` and the store holds `elems` elements of `dtype`.
            unsafe {
                match dtype {
                    DType::F32 => base.cast::<f32>().add(i).write(x as f32),
                    DType::F64 => base.cast::<f64>().add(i).write(x),
                    DType::BF16 => base.cast::<bf16>().add(i).write(bf16::from_f64(x)),
                    _ => base.cast::<f16>().add(i).write(f16::from_f64(x)),
                }
            }
        }
        // SAFETY: every index in range addresses one of the `elems` elements (strides computed above).
        let view = unsafe { TensorView::new(base, dtype, shape.to_vec(), strides) }.unwrap();
        Buf {
            _store: store,
            view,
        }
    }

    pub(super) fn zeros(dtype: DType, shape: &[usize], layout: Layout, rng: &mut Rng) -> Buf {
        Buf::new(dtype, shape, layout, rng, &mut |_| f64::NAN)
    }

    /// Element `idx` read through the view, as f64.
    pub(super) fn get(&self, idx: &[usize]) -> f64 {
        read_f64(&self.view, idx)
    }
}

pub(super) fn visible(mask: &dyn MaskTiles, b: usize, h: usize, i: usize, j: usize) -> bool {
    let mut v = [0u8];
    mask.fill(b, h, i..i + 1, j..j + 1, &mut v);
    v[0] != 0
}

pub(super) struct Inputs {
    pub(super) q: Buf,
    pub(super) k: Buf,
    pub(super) v: Buf,
    pub(super) bias: Option<Buf>,
    pub(super) sinks: Option<Buf>,
    pub(super) scale: f32,
    pub(super) softcap: Option<f32>,
}

/// The definition, in f64, by straightforward loops: `(out [B,H,Q,Dv], lse [B,H,Q])`.
pub(super) fn reference(x: &Inputs, mask: &dyn MaskTiles) -> (Vec<f64>, Vec<f64>) {
    let [b_, h_, q_, d] = x.q.view.shape().try_into().unwrap();
    let [_, hkv, k_, _]: [usize; 4] = x.k.view.shape().try_into().unwrap();
    let dv = x.v.view.shape()[3];
    let g = h_ / hkv;
    let mut out = vec![0.0; b_ * h_ * q_ * dv];
    let mut lse = vec![0.0; b_ * h_ * q_];
    let bias_at = |b: usize, h: usize, i: usize, j: usize| -> f64 {
        let Some(bias) = &x.bias else { return 0.0 };
        let sh = bias.view.shape();
        let full = [b, h, i, j];
        let idx: Vec<usize> = (0..sh.len())
            .map(|t| {
                if sh[t] == 1 {
                    0
                } else {
                    full[4 - sh.len() + t]
                }
            })
            .collect();
        bias.get(&idx)
    };
    for b in 0..b_ {
        for h in 0..h_ {
            let sink = x.sinks.as_ref().map(|s| s.get(&[h]));
            for i in 0..q_ {
                let mut logits = Vec::new();
                for j in 0..k_ {
                    if !visible(mask, b, h, i, j) {
                        continue;
                    }
                    let mut s: f64 = (0..d)
                        .map(|t| x.q.get(&[b, h, i, t]) * x.k.get(&[b, h / g, j, t]))
                        .sum();
                    s *= x.scale as f64;
                    if let Some(c) = x.softcap {
                        s = c as f64 * (s / c as f64).tanh();
                    }
                    s += bias_at(b, h, i, j);
                    if s > f64::NEG_INFINITY {
                        logits.push((j, s));
                    }
                }
                let top = logits
                    .iter()
                    .map(|p| p.1)
                    .chain(sink)
                    .fold(f64::NEG_INFINITY, f64::max);
                let row = (b * h_ + h) * q_ + i;
                if top == f64::NEG_INFINITY {
                    lse[row] = f64::NEG_INFINITY;
                    continue;
                }
                let den: f64 = logits.iter().map(|p| (p.1 - top).exp()).sum::<f64>()
                    + sink.map_or(0.0, |s| (s - top).exp());
                lse[row] = top + den.ln();
                for c in 0..dv {
                    let num: f64 = logits
                        .iter()
                        .map(|&(j, s)| (s - top).exp() * x.v.get(&[b, h / g, j, c]))
                        .sum();
                    out[row * dv + c] = num / den;
                }
            }
        }
    }
    (out, lse)
}

/// Runs the kernel on `backend` with `rows` query rows per item and checks it against the reference.
#[allow(clippy::too_many_arguments)]
pub(super) fn check(
    x: &Inputs,
    mask: &dyn MaskTiles,
    backend: Backend,
    rows: usize,
    threads: usize,
    out_layout: Layout,
    rng: &mut Rng,
) {
    let [b_, h_, q_, _] = x.q.view.shape().try_into().unwrap();
    let dv = x.v.view.shape()[3];
    let dtype = x.q.view.dtype();
    let out = Buf::zeros(dtype, &[b_, h_, q_, dv], out_layout, rng);
    let lse = Buf::zeros(DType::F32, &[b_, h_, q_], Layout::Contiguous, rng);
    let args = AttentionArgs {
        query: &x.q.view,
        key: &x.k.view,
        value: &x.v.view,
        out: &out.view,
        lse: Some(&lse.view),
        mask,
        bias: x.bias.as_ref().map(|t| &t.view),
        scale: f64::from(x.scale),
        softcap: x.softcap.map(f64::from),
        sinks: x.sinks.as_ref().map(|t| &t.view),
        dropout: None,
        score: Default::default(),
        num_threads: threads,
        f32_precision: Default::default(),
    };
    let plan = args.check().unwrap();
    let resolved = backend.resolve(dtype).unwrap();
    forward::run(&args, &plan, resolved, rows, None).unwrap();
    let (want, want_lse) = reference(x, mask);
    let vmax = (0..want.len())
        .map(|i| want[i].abs())
        .fold(1.0f64, f64::max);
    let (otol, ltol) = match dtype {
        DType::F64 => (1e-12, 1e-6), // lse is f32 whatever the inputs
        DType::F32 => (2e-5, 2e-5),
        DType::F16 => (3e-3, 2e-4),
        _ => (2e-2, 2e-3),
    };
    let ctx = format!(
        "backend {resolved:?} dtype {dtype:?} rows {rows} shape q{:?} k{:?} v{:?}",
        x.q.view.shape(),
        x.k.view.shape(),
        x.v.view.shape()
    );
    for b in 0..b_ {
        for h in 0..h_ {
            for i in 0..q_ {
                let row = (b * h_ + h) * q_ + i;
                let got_lse = lse.get(&[b, h, i]);
                let wl = want_lse[row];
                let wl32 = wl as f32 as f64; // lse is stored as f32 (f64::MIN-sized logits round to -inf)
                if wl32 == f64::NEG_INFINITY {
                    assert_eq!(got_lse, f64::NEG_INFINITY, "{ctx}: lse of empty row {row}");
                } else {
                    assert!(
                        (got_lse - wl32).abs() <= ltol * (1.0 + wl32.abs()),
                        "{ctx}: lse row {row}: {got_lse} vs {wl}"
                    );
                }
                for c in 0..dv {
                    let got = out.get(&[b, h, i, c]);
                    let w = want[row * dv + c];
                    if wl == f64::NEG_INFINITY {
                        assert_eq!(got, 0.0, "{ctx}: out of empty row {row}");
                    }
                    assert!(
                        (got - w).abs() <= otol * vmax,
                        "{ctx}: out[{b},{h},{i},{c}] = {got}, want {w}"
                    );
                }
            }
        }
    }
}

/// Every path this CPU can run for `dtype`.
pub(super) fn backends(dtype: DType) -> Vec<Backend> {
    let mut all = vec![Backend::Portable];
    for b in [
        Backend::Avx2,
        Backend::Avx512,
        Backend::Avx512Bf16,
        Backend::Amx,
        Backend::AmxEmulated,
    ] {
        if let Ok(r) = b.resolve(dtype)
            && !all.contains(&r)
        {
            all.push(r);
        }
    }
    all
}

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
    pub(super) rows: usize,
}

pub(super) fn run_case(c: &Case) {
    let mut rng = Rng(c.seed);
    let h = c.hkv * c.g;
    let dt = c.dtype;
    let mut unit = |r: &mut Rng| r.range(-1.0, 1.0);
    // Broadcasting over batch or heads only makes sense where the size is > 1; stride 0 on K/V is legal.
    let q = Buf::new(
        dt,
        &[c.b, h, c.q, c.d],
        layout(&mut rng, true),
        &mut Rng(c.seed ^ 1),
        &mut unit,
    );
    let k = Buf::new(
        dt,
        &[c.b, c.hkv, c.k, c.d],
        layout(&mut rng, true),
        &mut Rng(c.seed ^ 2),
        &mut unit,
    );
    let v = Buf::new(
        dt,
        &[c.b, c.hkv, c.k, c.dv],
        layout(&mut rng, true),
        &mut Rng(c.seed ^ 3),
        &mut unit,
    );
    let bias = rng.chance(0.35).then(|| {
        let shapes: [Vec<usize>; 4] = [
            vec![c.b, h, c.q, c.k],
            vec![1, 1, c.q, c.k],
            vec![c.b, 1, 1, c.k],
            vec![c.q, c.k],
        ];
        let shape = shapes[rng.below(4)].clone();
        let bdt = if rng.chance(0.5) { dt } else { DType::F32 };
        let min = finfo_min(bdt);
        let huge = rng.chance(0.3);
        Buf::new(
            bdt,
            &shape,
            Layout::Contiguous,
            &mut Rng(c.seed ^ 4),
            &mut |r| {
                if r.chance(0.1) {
                    f64::NEG_INFINITY
                } else if huge && r.chance(0.4) {
                    min
                } else {
                    r.range(-2.0, 2.0)
                }
            },
        )
    });
    let sinks = rng.chance(0.3).then(|| {
        Buf::new(
            DType::F32,
            &[h],
            Layout::Contiguous,
            &mut Rng(c.seed ^ 5),
            &mut |r| r.range(-2.0, 2.0),
        )
    });
    let scale = (rng.range(0.5, 2.0) / (c.d.max(1) as f64).sqrt()) as f32;
    let softcap = rng.chance(0.25).then(|| rng.range(0.5, 5.0) as f32);
    let x = Inputs {
        q,
        k,
        v,
        bias,
        sinks,
        scale,
        softcap,
    };
    let causal =
        causal(rng.below(11) as i64 - 5 + (c.k as i64 - c.q as i64) * (rng.below(2) as i64));
    let bitmap = Bitmap::new([c.b, h, c.q, c.k], &mut rng);
    let mask: &dyn MaskTiles = match c.mask {
        0 => &NoMask,
        1 => &causal,
        _ => &bitmap,
    };
    let threads = 1 + rng.below(3);
    let out_layout = layout(&mut rng, false);
    for backend in backends(dt) {
        check(&x, mask, backend, c.rows, threads, out_layout, &mut rng);
    }
}

pub(super) fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        Just(DType::F32),
        Just(DType::BF16),
        Just(DType::F16),
        Just(DType::F64)
    ]
}

pub(super) fn head_dims() -> impl Strategy<Value = (usize, usize)> {
    let d = prop_oneof![4 => Just(32usize), 3 => Just(64), 1 => Just(80), 1 => Just(96), 1 => Just(128), 1 => Just(256)];
    (
        d,
        prop_oneof![3 => Just(0usize), 1 => Just(16), 1 => Just(24), 1 => Just(7)],
    )
        .prop_map(|(d, dv)| (d, if dv == 0 { d } else { dv }))
}
