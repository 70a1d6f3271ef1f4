//! The backward kernel against a naive f64 reference (explicit formulas, plain loops), the reference against
//! finite differences, determinism across thread counts, and argument validation.

use std::ops::Range;

use half::{bf16, f16};
use proptest::prelude::*;

use super::*;
use crate::block::{CausalTiles, NoMask};
use crate::isa::Isa;
use crate::kernel::test_support::{layout, Layout, Rng};
use crate::kernel::{AttentionArgs, Dropout};

fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::F16 => f16::from_f64(x).to_f64(),
        _ => x,
    }
}

fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

/// Owned storage plus a strided view of it.
struct Buf {
    _store: Vec<u64>,
    view: TensorView,
}

impl Buf {
    /// A tensor of logical (row-major) contents `data` stored with `layout`. With `Broadcast(d)` the data
    /// must not vary along `d` (see [`broadcast_fix`]).
    fn new(dtype: DType, shape: &[usize], layout: Layout, data: &[f64]) -> Buf {
        let n = shape.len();
        let mut order: Vec<usize> = (0..n).collect();
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
                if pos == n - 1 && layout == Layout::Padded {
                    acc += 3;
                }
            }
        }
        let elems = acc.max(1);
        let mut store = vec![0u64; (elems * dtype.size()).div_ceil(8)];
        let base = store.as_mut_ptr().cast::<u8>();
        for (flat, &x) in data.iter().enumerate() {
            let idx = unravel(flat, shape);
            let off: isize = idx
                .iter()
                .zip(&strides)
                .map(|(&i, &s)| i as isize * s)
                .sum();
            // SAFETY: `off` addresses one of the `elems` elements of the store.
            unsafe {
                match dtype {
                    DType::F32 => base.cast::<f32>().offset(off).write(x as f32),
                    DType::F64 => base.cast::<f64>().offset(off).write(x),
                    DType::BF16 => base.cast::<bf16>().offset(off).write(bf16::from_f64(x)),
                    _ => base.cast::<f16>().offset(off).write(f16::from_f64(x)),
                }
            }
        }
        // SAFETY: every in-range index addresses one of the `elems` elements (strides computed above).
        let view = unsafe { TensorView::new(base, dtype, shape.to_vec(), strides) }.unwrap();
        Buf {
            _store: store,
            view,
        }
    }

    fn nan(dtype: DType, shape: &[usize], layout: Layout) -> Buf {
        let n = shape.iter().product();
        Buf::new(dtype, shape, layout, &vec![f64::NAN; n])
    }

    fn get(&self, idx: &[usize]) -> f64 {
        let off: isize = idx
            .iter()
            .zip(self.view.strides())
            .map(|(&i, &s)| i as isize * s)
            .sum();
        fn rd<T: Float>(p: *mut u8, off: isize) -> f64 {
            // SAFETY: `off` is the offset of an in-range index of the view.
            unsafe { p.cast::<T>().offset(off).read() }.to_f64()
        }
        match self.view.dtype() {
            DType::F32 => rd::<f32>(self.view.as_ptr(), off),
            DType::F64 => rd::<f64>(self.view.as_ptr(), off),
            DType::BF16 => rd::<bf16>(self.view.as_ptr(), off),
            _ => rd::<f16>(self.view.as_ptr(), off),
        }
    }

    /// Every element in logical order.
    fn values(&self) -> Vec<f64> {
        let shape = self.view.shape().to_vec();
        (0..shape.iter().product())
            .map(|f| self.get(&unravel(f, &shape)))
            .collect()
    }
}

/// Makes `data` constant along dim `d` (so a stride-0 view of it is faithful).
fn broadcast_fix(data: &mut [f64], shape: &[usize], d: usize) {
    for flat in 0..data.len() {
        let mut idx = unravel(flat, shape);
        idx[d] = 0;
        data[flat] = data[ravel(&idx, shape)];
    }
}

/// Random per-element visibility, some rows fully hidden.
struct Bitmap {
    shape: [usize; 4],
    bits: Vec<u8>,
}

impl Bitmap {
    fn new(shape: [usize; 4], rng: &mut Rng) -> Bitmap {
        let density = rng.range(0.05, 0.95);
        let mut bits: Vec<u8> = (0..shape.iter().product())
            .map(|_| u8::from(rng.chance(density)))
            .collect();
        for row in bits.chunks_mut(shape[3].max(1)) {
            if rng.chance(0.1) {
                row.fill(0);
            } else if rng.chance(0.1) {
                row.fill(1);
            }
        }
        Bitmap { shape, bits }
    }
    fn at(&self, b: usize, h: usize, i: usize, j: usize) -> u8 {
        self.bits[ravel(&[b, h, i, j], &self.shape)]
    }
}

impl MaskTiles for Bitmap {
    fn classify(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>) -> BlockClass {
        let total = rows.len() * cols.len();
        let seen: usize = rows
            .flat_map(|i| cols.clone().map(move |j| (i, j)))
            .map(|(i, j)| self.at(b, h, i, j) as usize)
            .sum();
        match seen {
            0 => BlockClass::Empty,
            s if s == total => BlockClass::Full,
            _ => BlockClass::Partial,
        }
    }
    fn fill(&self, b: usize, h: usize, rows: Range<usize>, cols: Range<usize>, out: &mut [u8]) {
        let w = cols.len();
        for (r, i) in rows.enumerate() {
            for (c, j) in cols.clone().enumerate() {
                out[r * w + c] = self.at(b, h, i, j);
            }
        }
    }
}

/// One problem, as f64 values already rounded to the dtype the kernel sees (logical row-major order).
#[derive(Clone)]
struct Problem {
    dtype: DType,
    dims: [usize; 8], // b, h, hkv, q, k, d, dv, g
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
    dout: Vec<f64>,
    /// Shape, values (rounded to `bias_dtype`), dtype.
    bias: Option<(Vec<usize>, Vec<f64>, DType)>,
    sinks: Option<Vec<f64>>,
    scale: f64,
    softcap: Option<f64>,
    /// Visibility `[B, H, Q, K]`.
    vis: Vec<bool>,
    /// Dropout, and the factor each pair's weight is multiplied by (`M / (1 - p)`; 1 without dropout).
    dropout: Option<Dropout>,
    kept: Vec<f64>,
}

/// The reference gradients.
struct Grads {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dsinks: Vec<f64>,
    dbias: Vec<f64>,
}

impl Problem {
    /// Sets the dropout and recomputes the per-pair factors from the kernel's keep pattern.
    fn set_dropout(&mut self, dropout: Option<Dropout>) {
        let [nb, nh, _, nq, nk, ..] = self.dims;
        let n = nb * nh * nq * nk;
        self.dropout = dropout;
        self.kept = match dropout {
            None => vec![1.0; n],
            Some(d) => {
                let mut keep = vec![false; n];
                crate::kernel::keep_pattern(d, [nb, nh, nq, nk], &mut keep).unwrap();
                keep.iter()
                    .map(|&k| if k { 1.0 / (1.0 - d.p) } else { 0.0 })
                    .collect()
            }
        };
    }

    fn bias_at(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
        let Some((shape, vals, _)) = &self.bias else {
            return 0.0;
        };
        let full = [b, h, i, j];
        let idx: Vec<usize> = (0..shape.len())
            .map(|t| {
                if shape[t] == 1 {
                    0
                } else {
                    full[4 - shape.len() + t]
                }
            })
            .collect();
        vals[ravel(&idx, shape)]
    }

    /// Logits `(j, x, 1 - t²)` of the visible, finite pairs of row `(b, h, i)`.
    fn row_logits(&self, b: usize, h: usize, i: usize) -> Vec<(usize, f64, f64)> {
        let [nb, nh, hkv, nq, nk, d, _, g] = self.dims;
        let mut out = Vec::new();
        for j in 0..nk {
            if !self.vis[ravel(&[b, h, i, j], &[nb, nh, nq, nk])] {
                continue;
            }
            let kvh = h / g;
            let dot: f64 = (0..d)
                .map(|t| {
                    self.q[ravel(&[b, h, i, t], &[nb, nh, nq, d])]
                        * self.k[ravel(&[b, kvh, j, t], &[nb, hkv, nk, d])]
                })
                .sum();
            let mut x = dot * self.scale;
            let mut deriv = 1.0;
            if let Some(c) = self.softcap {
                let t = (x / c).tanh();
                x = c * t;
                deriv = 1.0 - t * t;
            }
            x += self.bias_at(b, h, i, j);
            if x > f64::NEG_INFINITY {
                out.push((j, x, deriv));
            }
        }
        out
    }

    /// `(top, den)` of a row: `P_j = exp(x_j - top) / den` (never through the lse, which cannot hold
    /// `finfo.min + ln n` exactly); `None` when the row sees nothing.
    fn norm(&self, h: usize, logits: &[(usize, f64, f64)]) -> Option<(f64, f64)> {
        let sink = self.sinks.as_ref().map(|s| s[h]);
        let top = logits
            .iter()
            .map(|p| p.1)
            .chain(sink)
            .fold(f64::NEG_INFINITY, f64::max);
        if top == f64::NEG_INFINITY {
            return None;
        }
        let den: f64 = logits.iter().map(|p| (p.1 - top).exp()).sum::<f64>()
            + sink.map_or(0.0, |s| (s - top).exp());
        Some((top, den))
    }

    /// `(out [B,H,Q,Dv], lse [B,H,Q])`.
    fn forward(&self) -> (Vec<f64>, Vec<f64>) {
        let [nb, nh, hkv, nq, nk, _, dv, g] = self.dims;
        let mut out = vec![0.0; nb * nh * nq * dv];
        let mut lse = vec![f64::NEG_INFINITY; nb * nh * nq];
        for b in 0..nb {
            for h in 0..nh {
                for i in 0..nq {
                    let lg = self.row_logits(b, h, i);
                    let row = (b * nh + h) * nq + i;
                    let Some((top, den)) = self.norm(h, &lg) else {
                        continue;
                    };
                    lse[row] = top + den.ln();
                    for &(j, x, _) in &lg {
                        let p = (x - top).exp() / den * self.kept[row * nk + j];
                        for c in 0..dv {
                            out[row * dv + c] +=
                                p * self.v[ravel(&[b, h / g, j, c], &[nb, hkv, nk, dv])];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// The gradients of `L = Σ out ∘ dout`, by the explicit formulas.
    fn grads(&self) -> Grads {
        let [nb, nh, hkv, nq, nk, d, dv, g] = self.dims;
        let mut gr = Grads {
            dq: vec![0.0; nb * nh * nq * d],
            dk: vec![0.0; nb * hkv * nk * d],
            dv: vec![0.0; nb * hkv * nk * dv],
            dsinks: vec![0.0; nh],
            dbias: vec![0.0; nb * nh * nq * nk],
        };
        for b in 0..nb {
            for h in 0..nh {
                let kvh = h / g;
                for i in 0..nq {
                    let lg = self.row_logits(b, h, i);
                    let Some((top, den)) = self.norm(h, &lg) else {
                        continue;
                    };
                    let row = (b * nh + h) * nq + i;
                    let dout = &self.dout[row * dv..(row + 1) * dv];
                    let vrow = |j: usize| {
                        let s = ravel(&[b, kvh, j, 0], &[nb, hkv, nk, dv]);
                        &self.v[s..s + dv]
                    };
                    // With dropout, out = Σ_j P_j f_j V_j (f_j = M_j / (1 - p)): dP_j = f_j dO·V_j.
                    let pdp: Vec<(f64, f64)> = lg
                        .iter()
                        .map(|&(j, x, _)| {
                            let dot: f64 = dout.iter().zip(vrow(j)).map(|(a, b)| a * b).sum();
                            ((x - top).exp() / den, dot * self.kept[row * nk + j])
                        })
                        .collect();
                    let delta: f64 = pdp.iter().map(|(p, dp)| p * dp).sum();
                    if let Some(s) = &self.sinks {
                        gr.dsinks[h] -= (s[h] - top).exp() / den * delta;
                    }
                    for (&(j, _, deriv), &(p, dp)) in lg.iter().zip(&pdp) {
                        let dx = p * (dp - delta);
                        gr.dbias[row * nk + j] = dx;
                        let ds = dx * deriv * self.scale;
                        let dropped = p * self.kept[row * nk + j];
                        for (c, &go) in dout.iter().enumerate() {
                            gr.dv[ravel(&[b, kvh, j, c], &[nb, hkv, nk, dv])] += dropped * go;
                        }
                        for t in 0..d {
                            let ki = ravel(&[b, kvh, j, t], &[nb, hkv, nk, d]);
                            let qi = ravel(&[b, h, i, t], &[nb, nh, nq, d]);
                            gr.dq[qi] += ds * self.k[ki];
                            gr.dk[ki] += ds * self.q[qi];
                        }
                    }
                }
            }
        }
        gr
    }
}

/// A random problem. `mask`: 0 none, 1 causal (random diagonal), 2 random bitmap.
#[derive(Debug, Clone)]
struct Case {
    seed: u64,
    dtype: DType,
    b: usize,
    hkv: usize,
    g: usize,
    q: usize,
    k: usize,
    d: usize,
    dv: usize,
    mask: u8,
}

/// A problem plus the kernel-facing tensors and mask.
struct Setup {
    p: Problem,
    layouts: [Layout; 5], // q, k, v, out, dout
    mask: Box<dyn MaskTiles>,
    out_layout: Layout,
}

fn setup(c: &Case) -> Setup {
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
    let gen = |shape: &[usize], lay: Layout, rng: &mut Rng| {
        let n: usize = shape.iter().product();
        let mut v: Vec<f64> = (0..n).map(|_| round_to(dt, rng.range(-1.0, 1.0))).collect();
        if let Layout::Broadcast(d) = lay {
            broadcast_fix(&mut v, shape, d);
        }
        v
    };
    let q = gen(&shapes[0], layouts[0], &mut rng);
    let k = gen(&shapes[1], layouts[1], &mut rng);
    let v = gen(&shapes[2], layouts[2], &mut rng);
    let dout = gen(&[c.b, h, c.q, c.dv], layouts[4], &mut rng);
    let bias = rng.chance(0.35).then(|| {
        let choices: [Vec<usize>; 4] = [
            vec![c.b, h, c.q, c.k],
            vec![1, 1, c.q, c.k],
            vec![c.b, 1, 1, c.k],
            vec![c.q, c.k],
        ];
        let shape = choices[rng.below(4)].clone();
        let bdt = if rng.chance(0.5) { dt } else { DType::F32 };
        let min = match bdt {
            DType::F64 => f64::MIN,
            DType::F32 => f32::MIN as f64,
            DType::BF16 => bf16::MIN.to_f64(),
            _ => f16::MIN.to_f64(),
        };
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
        1 => Box::new(CausalTiles {
            diagonal: rng.below(11) as i64 - 5 + (c.k as i64 - c.q as i64) * (rng.below(2) as i64),
        }),
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
struct Inputs {
    q: Buf,
    k: Buf,
    v: Buf,
    bias: Option<Buf>,
    sinks: Option<Buf>,
}

impl Inputs {
    fn new(p: &Problem, layouts: &[Layout]) -> Inputs {
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
    fn forward(&self, p: &Problem, mask: &dyn MaskTiles, backend: Backend) -> (Buf, Buf) {
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
            num_threads: 2,
        };
        crate::kernel::attention_forward_with(&args, backend).unwrap();
        (out, lse)
    }
}

/// The kernel's gradients, read back in logical order.
struct Got {
    dq: Vec<f64>,
    dk: Vec<f64>,
    dv: Vec<f64>,
    dsinks: Vec<f64>,
    dbias: Vec<f64>,
}

/// Runs the backward with out / lse from the reference forward (rounded as the forward would store them).
fn run_backward(
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
        num_threads: threads,
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

fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-9,
        DType::F32 => 1e-4,
        DType::F16 => 1e-2,
        _ => 5e-2,
    }
}

/// `got` within `tol` of `want`, relative to the largest `want` (at least 1).
fn assert_close(name: &str, got: &[f64], want: &[f64], tol: f64, ctx: &str) {
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
const STRATEGIES: [Tuning; 5] = [
    tuning(DqPath::TwoPass, 64, true),
    tuning(DqPath::TwoPass, 128, false),
    tuning(DqPath::Split(1), 64, false),
    tuning(DqPath::Split(1), 128, true),
    tuning(DqPath::Split(3), 128, false),
];

/// A forced [`Tuning`]; `per_tile` packs the query rows tile by tile instead of per GQA group.
const fn tuning(dq: DqPath, kv_tile: usize, per_tile: bool) -> Tuning {
    Tuning {
        dq,
        kv_tile: Some(kv_tile),
        pack_budget: if per_tile { 0 } else { usize::MAX },
    }
}

/// Every backend this CPU can run for `dtype`.
fn backends(dtype: DType) -> Vec<Backend> {
    let mut all = vec![Backend::Portable];
    for b in [Backend::Avx2, Backend::Avx512, Backend::Avx512Bf16] {
        if let Ok(r) = b.resolve(dtype) {
            if !all.contains(&r) {
                all.push(r);
            }
        }
    }
    all
}

fn check_case(c: &Case) {
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

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![
        3 => Just(DType::F64),
        3 => Just(DType::F32),
        1 => Just(DType::BF16),
        1 => Just(DType::F16)
    ]
}

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
            num_threads: 2,
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

#[test]
fn errors_name_the_argument_and_never_panic() {
    let f32_buf = |shape: &[usize]| {
        let n: usize = shape.iter().product();
        let mut rng = Rng(n as u64);
        let data: Vec<f64> = (0..n).map(|_| rng.range(-1.0, 1.0)).collect();
        Buf::new(DType::F32, shape, Layout::Contiguous, &data)
    };
    let q = f32_buf(&[1, 4, 3, 8]);
    let k = f32_buf(&[1, 2, 5, 8]);
    let v = f32_buf(&[1, 2, 5, 6]);
    let out = f32_buf(&[1, 4, 3, 6]);
    let dout = f32_buf(&[1, 4, 3, 6]);
    let lse = f32_buf(&[1, 4, 3]);
    let gq = f32_buf(&[1, 4, 3, 8]);
    let gk = f32_buf(&[1, 2, 5, 8]);
    let gv = f32_buf(&[1, 2, 5, 6]);
    let sinks = f32_buf(&[4]);
    let base = AttentionGradArgs {
        grad_lse: None,
        query: &q.view,
        key: &k.view,
        value: &v.view,
        out: &out.view,
        grad_out: &dout.view,
        lse: &lse.view,
        mask: &NoMask,
        bias: None,
        scale: 0.3,
        softcap: None,
        sinks: None,
        grad_query: &gq.view,
        grad_key: &gk.view,
        grad_value: &gv.view,
        grad_sinks: None,
        grad_bias: None,
        dropout: None,
        num_threads: 2,
    };
    attention_backward(&base).unwrap();
    assert!(format!("{base:?}").contains("AttentionGradArgs"));
    let arg_of = |r: Result<()>| match r.unwrap_err() {
        Error::Shape { arg, .. }
        | Error::Dtype { arg, .. }
        | Error::Layout { arg, .. }
        | Error::Value { arg, .. } => arg,
        other => panic!("unexpected error {other}"),
    };
    let bad = |a: AttentionGradArgs| arg_of(attention_backward(&a));
    let k3 = f32_buf(&[1, 3, 5, 8]);
    assert_eq!(
        bad(AttentionGradArgs {
            key: &k3.view,
            ..base
        }),
        "key"
    );
    let q3 = f32_buf(&[4, 3, 8]);
    assert_eq!(
        bad(AttentionGradArgs {
            query: &q3.view,
            ..base
        }),
        "query"
    );
    let vk = f32_buf(&[1, 2, 4, 6]);
    assert_eq!(
        bad(AttentionGradArgs {
            value: &vk.view,
            ..base
        }),
        "value"
    );
    let o5 = f32_buf(&[1, 4, 3, 5]);
    assert_eq!(
        bad(AttentionGradArgs {
            out: &o5.view,
            ..base
        }),
        "out"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            grad_out: &o5.view,
            ..base
        }),
        "grad_out"
    );
    let l2 = f32_buf(&[1, 4, 2]);
    assert_eq!(
        bad(AttentionGradArgs {
            lse: &l2.view,
            ..base
        }),
        "lse"
    );
    let l64 = Buf::new(DType::F64, &[1, 4, 3], Layout::Contiguous, &[0.0; 12]);
    assert_eq!(
        bad(AttentionGradArgs {
            lse: &l64.view,
            ..base
        }),
        "lse"
    );
    let gq7 = f32_buf(&[1, 4, 3, 7]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &gq7.view,
            ..base
        }),
        "grad_query"
    );
    let gk16 = Buf::new(DType::BF16, &[1, 2, 5, 8], Layout::Contiguous, &[0.0; 80]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_key: &gk16.view,
            ..base
        }),
        "grad_key"
    );
    let gv4 = f32_buf(&[1, 2, 4, 6]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_value: &gv4.view,
            ..base
        }),
        "grad_value"
    );
    let bias = f32_buf(&[2, 3, 5]);
    assert_eq!(
        bad(AttentionGradArgs {
            bias: Some(&bias.view),
            ..base
        }),
        "bias"
    );
    let s2 = f32_buf(&[2]);
    assert_eq!(
        bad(AttentionGradArgs {
            sinks: Some(&s2.view),
            ..base
        }),
        "sinks"
    );
    let gs = f32_buf(&[4]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_sinks: Some(&gs.view),
            ..base
        }),
        "grad_sinks"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            sinks: Some(&sinks.view),
            grad_sinks: Some(&s2.view),
            ..base
        }),
        "grad_sinks"
    );
    let gb = f32_buf(&[1, 4, 3, 4]);
    assert_eq!(
        bad(AttentionGradArgs {
            grad_bias: Some(&gb.view),
            ..base
        }),
        "grad_bias"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            scale: f64::NAN,
            ..base
        }),
        "scale"
    );
    assert_eq!(
        bad(AttentionGradArgs {
            softcap: Some(-1.0),
            ..base
        }),
        "softcap"
    );
    // Gradients aliasing inputs, each other, or themselves.
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &q.view,
            ..base
        }),
        "grad_query"
    );
    let gk_alias = Buf::new(DType::F32, &[1, 2, 5, 8], Layout::Contiguous, &[0.0; 80]);
    // SAFETY: the view covers the first 60 of the 80 elements of `gk_alias`.
    let gk6 = unsafe {
        TensorView::new(
            gk_alias.view.as_ptr(),
            DType::F32,
            vec![1, 2, 5, 6],
            vec![30, 15, 3, 1],
        )
    }
    .unwrap();
    assert_eq!(
        bad(AttentionGradArgs {
            grad_key: &gk_alias.view,
            grad_value: &gk6,
            ..base
        }),
        "grad_value"
    );
    let gq_b = Buf::nan(DType::F32, &[1, 4, 3, 8], Layout::Broadcast(1));
    assert_eq!(
        bad(AttentionGradArgs {
            grad_query: &gq_b.view,
            ..base
        }),
        "grad_query"
    );
    let qi = Buf::new(DType::I32, &[1, 4, 3, 8], Layout::Contiguous, &[]);
    assert!(matches!(
        attention_backward(&AttentionGradArgs {
            query: &qi.view,
            ..base
        }),
        Err(Error::Dtype { .. })
    ));
    let isa = Isa::get();
    if !isa.avx512f {
        assert!(matches!(
            attention_backward_with(&base, Backend::Avx512),
            Err(Error::Unsupported(_))
        ));
    }
}

/// Wide key tiles where they waste little: no mask and causal masks take 128, a sliding window keeps 64.
#[test]
fn kv_tile_width_follows_the_masks_waste() {
    use crate::mask::{MaskExpr, PlacedMask};
    let dims = |q: usize, k: usize| Dims {
        b: 1,
        h: 4,
        hkv: 2,
        g: 2,
        q,
        k,
        d: 64,
        dv: 64,
    };
    assert_eq!(kv_tile_width(&NoMask, &dims(2048, 2048)), BK_MAX);
    assert_eq!(
        kv_tile_width(&CausalTiles { diagonal: 0 }, &dims(2048, 2048)),
        BK_MAX
    );
    let window = PlacedMask::new(MaskExpr::sliding_window(512, true).unwrap(), 0, 0);
    assert_eq!(kv_tile_width(&window, &dims(2048, 2048)), BK_MIN);
    assert_eq!(kv_tile_width(&NoMask, &dims(0, 2048)), BK_MIN);
}
