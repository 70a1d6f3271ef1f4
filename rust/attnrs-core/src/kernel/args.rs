//! The arguments of a call and their one validation: [`AttentionArgs`] and [`AttentionArgs::check`], which
//! checks shapes, dtypes, strides, bias broadcasting, sinks, scale/softcap, dropout and outputs and yields
//! the sizes the kernels work from ([`Checked`]). The backward ([`super::AttentionGradArgs`]) runs the same
//! checks on its forward arguments and adds only its gradients'. Every argument error message lives here.

use super::Dropout;
use super::score::ScoreTerms;
use crate::mask::tiles::MaskTiles;
use crate::tensor::{DType, TensorView};
use crate::{Error, Result};

/// Everything one attention call reads and writes. Every tensor is a strided view; see each field.
pub struct AttentionArgs<'a> {
    /// `[B, H, Q, D]`, any non-negative strides (stride 0 allowed).
    pub query: &'a TensorView,
    /// `[B, Hkv, K, D]`, any strides; `H % Hkv == 0` (GQA / MQA).
    pub key: &'a TensorView,
    /// `[B, Hkv, K, Dv]`, any strides; `Dv` may differ from `D`.
    pub value: &'a TensorView,
    /// `[B, H, Q, Dv]`, written. Any strides whose elements do not overlap each other or any input
    /// (a transposed view of a `[B, Q, H, Dv]` buffer is fine).
    pub out: &'a TensorView,
    /// Optional f32 `[B, H, Q]`, written: the natural-log log-sum-exp of the final logits of each row,
    /// sink included. `-inf` for a row that sees no key and has no sink.
    pub lse: Option<&'a TensorView>,
    /// Which (query row, key column) pairs are visible; rows are `0..Q`, columns `0..K`.
    pub mask: &'a dyn MaskTiles,
    /// Optional additive bias of any float dtype, broadcastable to `[B, H, Q, K]` (fewer dims align to the
    /// right; size-1 or stride-0 dims broadcast). It is simply added: `-inf` excludes a pair, a large finite
    /// negative (`finfo.min`) does not (like transformers' eager attention).
    pub bias: Option<&'a TensorView>,
    /// Multiplies `Q·Kᵀ`; must be finite. (f64 so that the f64 path is exact; f32 paths round it once.)
    pub scale: f64,
    /// `s = c * tanh(s / c)` after scaling and the score terms, before bias and mask; `c` must be finite
    /// and positive.
    pub softcap: Option<f64>,
    /// The score mod's operands (see [`ScoreTerms`]); empty by default.
    pub score: ScoreTerms<'a>,
    /// Optional `[H]` of any float dtype: `exp(sink_h)` joins each row's softmax denominator (GPT-OSS sinks).
    pub sinks: Option<&'a TensorView>,
    /// Optional dropout on the normalised weights (see [`Dropout`]): dropped weights are zeroed, kept ones
    /// scaled by `1 / (1 - p)`; `lse` is not affected.
    pub dropout: Option<Dropout>,
    /// Worker threads (a private pool; 0 means 1).
    pub num_threads: usize,
    /// How f32 inputs' products are computed (torch's `float32_matmul_precision`); other dtypes ignore it.
    pub f32_precision: F32Precision,
}

/// torch's `torch.get_float32_matmul_precision()` for attention's two products on f32 inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum F32Precision {
    /// f32 products, exact to f32 rounding (torch's default).
    #[default]
    Highest,
    /// "high": a bf16×3 split (`hi·hi + hi·lo + lo·hi`, f32 accumulation) on AMX tiles; elsewhere as
    /// [`F32Precision::Highest`] (torch too falls back to highest where it has no fast algorithm).
    High,
    /// "medium": inputs rounded to bf16 and the bf16 path (f32 accumulation) where the CPU has fast bf16
    /// products (AMX or AVX-512 BF16); elsewhere as [`F32Precision::High`], as torch specifies.
    Medium,
}

impl F32Precision {
    /// torch's name for it.
    pub fn name(self) -> &'static str {
        match self {
            F32Precision::Highest => "highest",
            F32Precision::High => "high",
            F32Precision::Medium => "medium",
        }
    }
}

impl std::fmt::Debug for AttentionArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttentionArgs")
            .field("query", &self.query.shape())
            .field("key", &self.key.shape())
            .field("value", &self.value.shape())
            .field("out", &self.out.shape())
            .field("lse", &self.lse.map(|t| t.shape().to_vec()))
            .field("bias", &self.bias.map(|t| t.shape().to_vec()))
            .field("scale", &self.scale)
            .field("softcap", &self.softcap)
            .field("score", &self.score)
            .field("sinks", &self.sinks.map(|t| t.shape().to_vec()))
            .field("dropout", &self.dropout)
            .field("num_threads", &self.num_threads)
            .field("f32_precision", &self.f32_precision)
            .finish_non_exhaustive()
    }
}

/// The sizes of one call.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub b: usize,
    pub h: usize,
    pub hkv: usize,
    /// Query heads per kv head (`H / Hkv`).
    pub g: usize,
    pub q: usize,
    pub k: usize,
    pub d: usize,
    pub dv: usize,
}

impl Dims {
    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.b == 0 || self.h == 0 || self.q == 0
    }
}

/// A validated call ([`AttentionArgs::check`]): sizes, dtype and the broadcast strides of the bias.
#[derive(Debug, Clone)]
pub struct Checked {
    pub(crate) dims: Dims,
    pub(crate) dtype: DType,
    pub(crate) bias_strides: Option<[isize; 4]>,
    pub(crate) scale: f64,
    pub(crate) softcap: Option<f64>,
    pub(crate) threads: usize,
}

/// Whose wording a message takes where the forward and the backward have always worded the same problem
/// differently (the shapes of key, value and out; the dtypes of bias and sinks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Call {
    Forward,
    Backward,
}

/// "float32, bfloat16, float16 or float64": what a float argument may be.
pub(crate) const FLOATS: &str = "float32, bfloat16, float16 or float64";

impl AttentionArgs<'_> {
    /// Validates every argument of a forward call (see each field); a bad one yields an [`Error`] naming it.
    pub fn check(&self) -> Result<Checked> {
        let checked = self.check_inputs(Call::Forward)?;
        let mut inputs: Vec<(&str, &TensorView)> = vec![
            ("query", self.query),
            ("key", self.key),
            ("value", self.value),
        ];
        inputs.extend(self.bias.map(|t| ("bias", t)));
        inputs.extend(self.sinks.map(|t| ("sinks", t)));
        inputs.extend(self.score.named());
        let mut outputs = vec![("out", self.out)];
        outputs.extend(self.lse.map(|t| ("lse", t)));
        check_disjoint(&inputs, &outputs, false)?;
        Ok(checked)
    }

    /// Everything but the memory of the outputs: for the backward, `out` and `lse` are inputs (the forward's
    /// results) and are checked as such; the caller checks what it writes.
    pub(crate) fn check_inputs(&self, call: Call) -> Result<Checked> {
        let forward = call == Call::Forward;
        let [b, h, q, d] = four(self.query, "query", "[B, H, Q, D]")?;
        let [kb, hkv, k, kd] = four(self.key, "key", "[B, Hkv, K, D]")?;
        let [vb, vh, vk, dv] = four(self.value, "value", "[B, Hkv, K, Dv]")?;
        if forward {
            let [ob, oh, oq, odv] = four(self.out, "out", "[B, H, Q, Dv]")?;
            expect_dim("key", "batch size (dim 0) of query", b, kb)?;
            expect_dim("key", "head dim (dim 3) of query", d, kd)?;
            expect_kv_heads(self.key, h, hkv)?;
            expect_dim("value", "batch size (dim 0) of query", b, vb)?;
            expect_dim("value", "kv heads (dim 1) of key", hkv, vh)?;
            expect_dim("value", "length (dim 2) of key", k, vk)?;
            expect_dim("out", "batch size (dim 0) of query", b, ob)?;
            expect_dim("out", "heads (dim 1) of query", h, oh)?;
            expect_dim("out", "length (dim 2) of query", q, oq)?;
            expect_dim("out", "head dim (dim 3) of value", dv, odv)?;
        } else {
            if kb != b || kd != d {
                return Err(Error::shape(
                    "key",
                    format!("shape [{b}, Hkv, K, {d}] (batch and head dim of query)"),
                    shape_str(self.key),
                ));
            }
            expect_kv_heads(self.key, h, hkv)?;
            expect_shape(self.value, "value", &[b, hkv, k, dv], "[B, Hkv, K, Dv]")?;
            expect_shape(self.out, "out", &[b, h, q, dv], "[B, H, Q, Dv]")?;
        }
        let dtype = self.query.dtype();
        expect_float(self.query, "query", FLOATS)?;
        for (arg, t) in [("key", self.key), ("value", self.value), ("out", self.out)] {
            expect_like(t, arg, dtype)?;
        }
        if let Some(lse) = self.lse {
            if lse.dtype() != DType::F32 {
                return Err(Error::dtype(
                    "lse",
                    DType::F32.torch_name(),
                    lse.dtype().torch_name(),
                ));
            }
            expect_shape(lse, "lse", &[b, h, q], "[B, H, Q]")?;
        }
        let bias_strides = match self.bias {
            None => None,
            Some(bias) => {
                let floats = if forward {
                    "a floating additive mask (float32, bfloat16, float16 or float64)"
                } else {
                    FLOATS
                };
                expect_float(bias, "bias", floats)?;
                Some(broadcast_strides(bias, [b, h, q, k])?)
            }
        };
        if let Some(sinks) = self.sinks {
            expect_float(
                sinks,
                "sinks",
                if forward { "a floating dtype" } else { FLOATS },
            )?;
            expect_shape(sinks, "sinks", &[h], "one per query head")?;
        }
        check_scale_softcap(self.scale, self.softcap)?;
        super::dropout::check(self.dropout)?;
        let dims = Dims {
            b,
            h,
            hkv,
            g: h.checked_div(hkv).unwrap_or(1),
            q,
            k,
            d,
            dv,
        };
        self.score.check(&dims)?;
        Ok(Checked {
            dims,
            dtype,
            bias_strides,
            scale: self.scale,
            softcap: self.softcap,
            threads: self.num_threads.max(1),
        })
    }
}

fn shape_str(v: &TensorView) -> String {
    format!("shape {:?}", v.shape())
}

fn four(v: &TensorView, arg: &str, layout: &str) -> Result<[usize; 4]> {
    match v.shape() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        _ => Err(Error::shape(
            arg,
            format!("a 4-D tensor {layout}"),
            shape_str(v),
        )),
    }
}

fn expect_dim(arg: &str, what: &str, expected: usize, got: usize) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("{what} = {expected}"),
            format!("{got}"),
        ))
    }
}

/// `v` has shape `want`; `layout` names the dims in the message.
pub(crate) fn expect_shape(v: &TensorView, arg: &str, want: &[usize], layout: &str) -> Result<()> {
    if v.shape() == want {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("shape {want:?} ({layout})"),
            shape_str(v),
        ))
    }
}

/// `v` has a float dtype; `floats` is the message's expectation.
pub(crate) fn expect_float(v: &TensorView, arg: &str, floats: &str) -> Result<()> {
    if v.dtype().is_float() {
        Ok(())
    } else {
        Err(Error::dtype(arg, floats, v.dtype().torch_name()))
    }
}

/// `v` has the query's `dtype`.
pub(crate) fn expect_like(v: &TensorView, arg: &str, dtype: DType) -> Result<()> {
    if v.dtype() == dtype {
        Ok(())
    } else {
        Err(Error::dtype(
            arg,
            format!("{} like query", dtype.torch_name()),
            v.dtype().torch_name(),
        ))
    }
}

/// At least one kv head, dividing the `h` query heads (GQA / MQA).
fn expect_kv_heads(key: &TensorView, h: usize, hkv: usize) -> Result<()> {
    if hkv == 0 && h > 0 {
        return Err(Error::shape("key", "at least one kv head", shape_str(key)));
    }
    if hkv > 0 && !h.is_multiple_of(hkv) {
        return Err(Error::shape(
            "key",
            format!("a number of kv heads dividing the {h} query heads"),
            format!("{hkv} kv heads"),
        ));
    }
    Ok(())
}

/// Strides that read `bias` as a `[B, H, Q, K]` tensor (torch broadcasting: dims align right, size 1 repeats).
fn broadcast_strides(bias: &TensorView, target: [usize; 4]) -> Result<[isize; 4]> {
    let n = bias.ndim();
    let expected = || format!("a shape broadcastable to {target:?} ([B, H, Q, K])");
    if n > 4 {
        return Err(Error::shape("bias", expected(), shape_str(bias)));
    }
    let mut strides = [0isize; 4];
    for i in 0..n {
        let t = 4 - n + i;
        let size = bias.shape()[i];
        if size == target[t] {
            strides[t] = if size == 1 { 0 } else { bias.strides()[i] };
        } else if size != 1 {
            return Err(Error::shape("bias", expected(), shape_str(bias)));
        }
    }
    Ok(strides)
}

/// `scale` must be finite and `softcap`, if any, finite and positive, both as the float32 the kernels
/// compute in (a scale of 1e39 is finite in f64 but inf in f32; a softcap below f32's smallest normal
/// number would make `1 / softcap` overflow).
fn check_scale_softcap(scale: f64, softcap: Option<f64>) -> Result<()> {
    let max = f64::from(f32::MAX);
    if !(scale.is_finite() && scale.abs() <= max) {
        return Err(Error::value(
            "scale",
            format!("a finite number of magnitude at most {max:e}"),
            format!("{scale}"),
        ));
    }
    let min = f64::from(f32::MIN_POSITIVE);
    match softcap {
        Some(c) if !(c.is_finite() && (min..=max).contains(&c)) => Err(Error::value(
            "softcap",
            format!("a finite positive number in [{min:e}, {max:e}]"),
            format!("{c}"),
        )),
        _ => Ok(()),
    }
}

/// Every output must not overlap itself, any input, or an earlier output. `skip_empty`: outputs with no
/// elements are not written, so they are not checked.
pub(crate) fn check_disjoint(
    inputs: &[(&str, &TensorView)],
    outputs: &[(&str, &TensorView)],
    skip_empty: bool,
) -> Result<()> {
    for (i, (name, o)) in outputs.iter().enumerate() {
        if skip_empty && o.numel() == 0 {
            continue; // nothing is written
        }
        if o.has_internal_overlap() {
            return Err(Error::layout(
                *name,
                "a writable view whose elements do not overlap",
                "an overlapping view",
            ));
        }
        for (other, t) in inputs.iter().chain(&outputs[..i]) {
            if o.overlaps(t) {
                return Err(Error::layout(
                    *name,
                    format!("memory disjoint from {other}"),
                    format!("a view aliasing {other}"),
                ));
            }
        }
    }
    Ok(())
}
