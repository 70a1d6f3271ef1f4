//! The backward tests' naive f64 reference: explicit formulas in plain loops over strided test buffers.

use half::{bf16, f16};

use crate::kernel::tests::support::{Layout, read_f64};
use crate::kernel::*;
use crate::tensor::{DType, TensorView};

pub(super) fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F32 => x as f32 as f64,
        DType::BF16 => bf16::from_f64(x).to_f64(),
        DType::F16 => f16::from_f64(x).to_f64(),
        _ => x,
    }
}

pub(super) fn unravel(mut flat: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        idx[d] = flat % shape[d];
        flat /= shape[d];
    }
    idx
}

pub(super) fn ravel(idx: &[usize], shape: &[usize]) -> usize {
    idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
}

/// Owned storage plus a strided view of it.
pub(super) struct Buf {
    pub(super) _store: Vec<u64>,
    pub(super) view: TensorView,
}

impl Buf {
    /// A tensor of logical (row-major) contents `data` stored with `layout`. With `Broadcast(d)` the data
    /// must not vary along `d` (see [`broadcast_fix`]).
    pub(super) fn new(dtype: DType, shape: &[usize], layout: Layout, data: &[f64]) -> Buf {
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

    pub(super) fn nan(dtype: DType, shape: &[usize], layout: Layout) -> Buf {
        let n = shape.iter().product();
        Buf::new(dtype, shape, layout, &vec![f64::NAN; n])
    }

    pub(super) fn get(&self, idx: &[usize]) -> f64 {
        read_f64(&self.view, idx)
    }

    /// Every element in logical order.
    pub(super) fn values(&self) -> Vec<f64> {
        let shape = self.view.shape().to_vec();
        (0..shape.iter().product())
            .map(|f| self.get(&unravel(f, &shape)))
            .collect()
    }
}

/// Makes `data` constant along dim `d` (so a stride-0 view of it is faithful).
pub(super) fn broadcast_fix(data: &mut [f64], shape: &[usize], d: usize) {
    for flat in 0..data.len() {
        let mut idx = unravel(flat, shape);
        idx[d] = 0;
        data[flat] = data[ravel(&idx, shape)];
    }
}

/// One problem, as f64 values already rounded to the dtype the kernel sees (logical row-major order).
#[derive(Clone)]
pub(super) struct Problem {
    pub(super) dtype: DType,
    pub(super) dims: [usize; 8], // b, h, hkv, q, k, d, dv, g
    pub(super) q: Vec<f64>,
    pub(super) k: Vec<f64>,
    pub(super) v: Vec<f64>,
    pub(super) dout: Vec<f64>,
    /// Shape, values (rounded to `bias_dtype`), dtype.
    pub(super) bias: Option<(Vec<usize>, Vec<f64>, DType)>,
    pub(super) sinks: Option<Vec<f64>>,
    pub(super) scale: f64,
    pub(super) softcap: Option<f64>,
    /// Visibility `[B, H, Q, K]`.
    pub(super) vis: Vec<bool>,
    /// Dropout, and the factor each pair's weight is multiplied by (`M / (1 - p)`; 1 without dropout).
    pub(super) dropout: Option<Dropout>,
    pub(super) kept: Vec<f64>,
}

/// The reference gradients.
pub(super) struct Grads {
    pub(super) dq: Vec<f64>,
    pub(super) dk: Vec<f64>,
    pub(super) dv: Vec<f64>,
    pub(super) dsinks: Vec<f64>,
    pub(super) dbias: Vec<f64>,
}

impl Problem {
    /// Sets the dropout and recomputes the per-pair factors from the kernel's keep pattern.
    pub(super) fn set_dropout(&mut self, dropout: Option<Dropout>) {
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

    pub(super) fn bias_at(&self, b: usize, h: usize, i: usize, j: usize) -> f64 {
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
    pub(super) fn row_logits(&self, b: usize, h: usize, i: usize) -> Vec<(usize, f64, f64)> {
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
    pub(super) fn norm(&self, h: usize, logits: &[(usize, f64, f64)]) -> Option<(f64, f64)> {
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
    pub(super) fn forward(&self) -> (Vec<f64>, Vec<f64>) {
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
    pub(super) fn grads(&self) -> Grads {
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
