//! The backward pass of the CPU attention kernel: gradients of [`super::attention_forward`]'s output with
//! respect to query, key, value (and optionally sinks and an additive bias).
//!
//! With the forward's definitions (see the module docs of [`super`]), `x_ij` the final logit of a visible
//! pair (scaled, soft-capped, biased) and `P_ij = exp(x_ij - lse_i)`:
//!
//! ```text
//! Δ_i        = Σ_c dO_ic · O_ic - dlse_i                       (dlse: the gradient of the returned lse, if any)
//! dV_j      += Σ_i P_ij dO_i                                 (summed over the query heads of the GQA group)
//! dP_ij      = dO_i · V_j
//!            (dropout: P_ij in dV and dP_ij are both multiplied by M_ij / (1 - p), M the keep pattern;
//!             Δ and dX keep the undropped P)
//! dX_ij      = P_ij (dP_ij - Δ_i)                            (= dL/dbias_ij: `grad_bias`)
//! dY_ij      = dX_ij · (1 - t_ij²)   where t = tanh(y / c), y the logit before the softcap
//!                                                             (softcap; dY = dX without it)
//! dterms     : d distance[h, j - i + Q - 1] += dY_ij, d key[b, h, j] += dY_ij   (score-mod terms)
//! dS_ij      = head_scale_h · dY_ij                           (score-mod head scales; dS = dY without)
//! dQ_i       = scale · Σ_j dS_ij K_j
//! dK_j      += scale · Σ_i dS_ij Q_i
//! dsink_h    = -Σ_{b,i} exp(sink_h - lse_bhi) · Δ_bhi
//! ```
//!
//! How it runs (flash-attention 2, without atomics): `P` is recomputed tile by tile from the saved
//! log-sum-exp. Work items are (batch, kv head, kv tiles): an item owns the rows of dK and dV (and the columns
//! of `grad_bias`) of its kv tiles and walks the query tiles of every head of the GQA group that the mask does
//! not classify [`BlockClass::Empty`]. dQ is formed one of two ways, chosen from the shapes alone:
//!
//! - split (the default when it fits 256 MiB): item `(chunk, b, kvh)` takes kv tiles `kb ≡ chunk (mod P)`
//!   (`P <= 4`, only as many as it takes to make 8 items; interleaved so causal work is balanced) and also
//!   adds `dS·K` into its own partial dQ; the `P` partials are then summed in chunk order. Five products per
//!   tile pair. With `P = 1` (8 or more `(b, kv head)` pairs: the usual case) an item owns its group's dQ
//!   rows, accumulates them in a buffer it reuses, and writes them itself.
//! - two-pass (when the partials would not fit): items `(b, kv head, kv tile)` form dK/dV only, then items
//!   `(b, query head, query tile)` recompute `P` and `dS` and form dQ. Seven products per tile pair, no
//!   extra memory.
//!
//! Every output element is written by exactly one item, and every sum runs in a fixed order that depends on
//! neither the thread count nor the scheduling, so gradients are bitwise reproducible (gradient
//! checkpointing relies on it).
//!
//! Rows whose lse is `-inf` (they saw no key and have no sink) contribute nothing; no `exp(-inf - -inf)`
//! is ever formed. Dtypes: f32, bf16 and f16 accumulate in f32; f64 computes in f64 throughout and, because
//! the lse is saved as f32, recomputes each row's normaliser in f64 first (the f32 lse would cap the f64
//! gradients' accuracy at ~1e-7). Rows whose saved lse is huge (|lse| >= 1024: in practice rows whose every
//! logit is ~`finfo.min`, where an f32 lse cannot give `P` back) are recomputed the same way.
//!
//! Every product runs on the forward's register-blocked micro-kernels ([`super::gemm`]: AVX-512 BF16 for bf16
//! inputs, AVX-512F, AVX2+FMA or portable, picked once per call by [`Backend::resolve`]); P and dS are
//! transposed per tile so the dV and dK products take the same packed operand layout. With `vdpbf16ps`
//! (bf16 inputs) the operands are bf16: the inputs exactly, P and dS rounded to bf16 for the dV, dK and dQ
//! products (as flash attention does on GPUs), accumulation in f32. The query and dO rows of a GQA group are
//! packed once per work item. The element-wise steps are generic loops compiled inside the same
//! `#[target_feature]` entry points. Different paths round differently; one path is reproducible.

mod job;
mod schedule;
mod stats;
mod tile;

use job::*;
use schedule::*;
#[cfg(test)]
pub(crate) use schedule::{DqPath, kv_tile_width};
use stats::*;
use tile::*;

use super::AttentionArgs;
use super::F32Precision;
use super::args::{
    Call, Checked, Dims, FLOATS, check_disjoint, expect_float, expect_like, expect_shape,
};
use super::dispatch::{Backend, Isa, select};
use super::strided::read_sinks;
use crate::mask::tiles::MaskTiles;
use crate::tensor::{DType, Float, TensorView};
use crate::{Error, Result, threads};

/// Key columns per tile: 64, or 128 where the mask's partial tiles waste little at that width (see
/// [`kv_tile_width`]); wider tiles halve the traffic of the dQ rows and of the packed query rows per product.
pub(crate) const BK_MIN: usize = 64;
pub(crate) const BK_MAX: usize = 128;
/// Query rows per tile (per head).
const BQ: usize = 64;

/// Everything one backward call reads and writes. Inputs are as for [`super::AttentionArgs`].
pub struct AttentionGradArgs<'a> {
    /// `[B, H, Q, D]`, any non-negative strides (stride 0 allowed).
    pub query: &'a TensorView,
    /// `[B, Hkv, K, D]`, any strides; `H % Hkv == 0`.
    pub key: &'a TensorView,
    /// `[B, Hkv, K, Dv]`, any strides.
    pub value: &'a TensorView,
    /// The forward output `[B, H, Q, Dv]`, any strides.
    pub out: &'a TensorView,
    /// `dL/dout`, `[B, H, Q, Dv]`, any strides.
    pub grad_out: &'a TensorView,
    /// f32 `[B, H, Q]`: the forward's log-sum-exp (sink included); `-inf` for rows that saw no key.
    /// (f64 inputs recompute it in f64 and only check its shape.)
    pub lse: &'a TensorView,
    /// The forward's mask.
    pub mask: &'a dyn MaskTiles,
    /// The forward's additive bias (any float dtype, broadcastable to `[B, H, Q, K]`).
    pub bias: Option<&'a TensorView>,
    /// The forward's scale (finite).
    pub scale: f64,
    /// The forward's softcap (finite, positive).
    pub softcap: Option<f64>,
    /// The forward's sinks, `[H]`, any float dtype.
    pub sinks: Option<&'a TensorView>,
    /// The forward's dropout (same probability and seed: the pattern is regenerated, see [`super::Dropout`]).
    pub dropout: Option<super::Dropout>,
    /// `dL/dquery`, `[B, H, Q, D]`, same dtype as query, written.
    pub grad_query: &'a TensorView,
    /// `dL/dkey`, `[B, Hkv, K, D]`, written (GQA: summed over the group's query heads).
    pub grad_key: &'a TensorView,
    /// `dL/dvalue`, `[B, Hkv, K, Dv]`, written.
    pub grad_value: &'a TensorView,
    /// `dL/dsinks`, `[H]`, any float dtype, written; only with `sinks`.
    pub grad_sinks: Option<&'a TensorView>,
    /// Optional f32 `[B, H, Q]`: the gradient of the forward's returned log-sum-exp. Since
    /// `dlse_i / dx_ij = P_ij`, it enters as `Δ_i - dlse_i` everywhere `Δ` does.
    pub grad_lse: Option<&'a TensorView>,
    /// `dL/dx` for every `(b, h, i, j)`, dense `[B, H, Q, K]`, any float dtype, written: the gradient of an
    /// additive bias before any broadcast reduction (0 where the mask hides a pair or the row saw no key).
    pub grad_bias: Option<&'a TensorView>,
    /// The forward's score-mod terms (see [`super::ScoreTerms`]).
    pub score: super::ScoreTerms<'a>,
    /// `dL/dscore_distance`, `[H, Q + K - 1]`, any float dtype, written (summed over batch and rows; a
    /// broadcast `[1, Q + K - 1]` operand takes the sum over heads); only with `score.distance`.
    pub grad_score_distance: Option<&'a TensorView>,
    /// `dL/dscore_key`, `[B, H, K]`, any float dtype, written (the caller reduces broadcast dims); only with
    /// `score.key`.
    pub grad_score_key: Option<&'a TensorView>,
    /// Worker threads (a private pool; 0 means 1). The result does not depend on it.
    pub num_threads: usize,
    /// How f32 inputs' products are computed (as the forward's [`AttentionArgs::f32_precision`]).
    pub f32_precision: F32Precision,
}

impl std::fmt::Debug for AttentionGradArgs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shape = |t: Option<&TensorView>| t.map(|t| t.shape().to_vec());
        f.debug_struct("AttentionGradArgs")
            .field("query", &self.query.shape())
            .field("key", &self.key.shape())
            .field("value", &self.value.shape())
            .field("out", &self.out.shape())
            .field("grad_out", &self.grad_out.shape())
            .field("lse", &self.lse.shape())
            .field("bias", &shape(self.bias))
            .field("scale", &self.scale)
            .field("softcap", &self.softcap)
            .field("sinks", &shape(self.sinks))
            .field("dropout", &self.dropout)
            .field("grad_sinks", &shape(self.grad_sinks))
            .field("grad_bias", &shape(self.grad_bias))
            .field("score", &self.score)
            .field("grad_score_distance", &shape(self.grad_score_distance))
            .field("grad_score_key", &shape(self.grad_score_key))
            .field("num_threads", &self.num_threads)
            .finish_non_exhaustive()
    }
}

/// Computes the gradients (see the module docs) into `grad_query`, `grad_key`, `grad_value` (and
/// `grad_sinks`, `grad_bias` when given), on the best path for this CPU.
///
/// Every argument is validated first; a bad one yields an [`Error`] naming it and nothing is written.
pub fn attention_backward(args: &AttentionGradArgs) -> Result<()> {
    attention_backward_with(args, Backend::Auto)
}

/// [`attention_backward`] on a chosen [`Backend`] (AVX-512 BF16 runs the AVX-512F loops).
pub fn attention_backward_with(args: &AttentionGradArgs, backend: Backend) -> Result<()> {
    backward_with(args, backend, Tuning::default())
}

/// How a call is carried out, where more than one way gives correct gradients (tests run them all).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tuning {
    /// How dQ is formed (this changes rounding; [`DqPath::Auto`] decides by the shapes alone).
    pub dq: DqPath,
    /// Key columns per tile (64 or 128; `None`: [`kv_tile_width`]).
    pub kv_tile: Option<usize>,
    /// Bytes a work item may hold of its group's packed rows ([`GROUP_PACK_BUDGET`]; 0 packs tile by tile).
    pub pack_budget: usize,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            dq: DqPath::Auto,
            kv_tile: None,
            pack_budget: GROUP_PACK_BUDGET,
        }
    }
}

/// A [`Tuning`] resolved for one call.
#[derive(Debug, Clone, Copy)]
struct Resolved {
    dq: DqPath,
    bk: usize,
    pack_budget: usize,
}

/// [`attention_backward_with`] with a chosen [`Tuning`].
pub(crate) fn backward_with(
    args: &AttentionGradArgs,
    backend: Backend,
    tuning: Tuning,
) -> Result<()> {
    let checked = validate(args)?;
    let bk = match tuning.kv_tile {
        Some(bk) if bk > BK_MIN => BK_MAX,
        Some(_) => BK_MIN,
        None => kv_tile_width(args.mask, &checked.dims),
    };
    let strategy = Resolved {
        dq: tuning.dq,
        bk,
        pack_budget: tuning.pack_budget,
    };
    // f64 runs the portable f64 loops whatever the backend (so a forced one missing here is no error).
    let backend = if checked.dtype == DType::F64 {
        Backend::Portable
    } else {
        backend.resolve_for(checked.dtype, args.f32_precision)?
    };
    select!(checked.dtype, backend, on(args, &checked, strategy))
}

/// [`run`] with the type parameters in `select!`'s order.
fn on<K: Isa, T: Float>(
    args: &AttentionGradArgs,
    checked: &Checked,
    strategy: Resolved,
) -> Result<()> {
    run::<T, K>(args, checked, strategy)
}

// ------------------------------------------------------------------------------------------------------------
// Validation

/// The forward's checks ([`AttentionArgs::check_inputs`], with `out` and `lse` as inputs), then the
/// gradients' shapes, dtypes and memory.
fn validate(a: &AttentionGradArgs) -> Result<Checked> {
    let forward = AttentionArgs {
        query: a.query,
        key: a.key,
        value: a.value,
        out: a.out,
        lse: Some(a.lse),
        mask: a.mask,
        bias: a.bias,
        scale: a.scale,
        softcap: a.softcap,
        sinks: a.sinks,
        dropout: a.dropout,
        score: a.score,
        num_threads: a.num_threads,
        f32_precision: a.f32_precision,
    };
    let checked = forward.check_inputs(Call::Backward)?;
    let Dims {
        b,
        h,
        hkv,
        q,
        k,
        d,
        dv,
        ..
    } = checked.dims;
    expect_shape(a.grad_out, "grad_out", &[b, h, q, dv], "[B, H, Q, Dv]")?;
    if let Some(g) = a.grad_lse {
        expect_shape(g, "grad_lse", &[b, h, q], "[B, H, Q]")?;
        if g.dtype() != DType::F32 {
            return Err(Error::dtype(
                "grad_lse",
                DType::F32.torch_name(),
                g.dtype().torch_name(),
            ));
        }
    }
    expect_shape(a.grad_query, "grad_query", &[b, h, q, d], "[B, H, Q, D]")?;
    expect_shape(a.grad_key, "grad_key", &[b, hkv, k, d], "[B, Hkv, K, D]")?;
    expect_shape(
        a.grad_value,
        "grad_value",
        &[b, hkv, k, dv],
        "[B, Hkv, K, Dv]",
    )?;
    for (arg, t) in [
        ("grad_out", a.grad_out),
        ("grad_query", a.grad_query),
        ("grad_key", a.grad_key),
        ("grad_value", a.grad_value),
    ] {
        expect_like(t, arg, checked.dtype)?;
    }
    if let Some(gs) = a.grad_sinks {
        if a.sinks.is_none() {
            return Err(Error::value(
                "grad_sinks",
                "None when sinks is None",
                "a tensor",
            ));
        }
        expect_float(gs, "grad_sinks", FLOATS)?;
        expect_shape(gs, "grad_sinks", &[h], "one per query head")?;
    }
    if let Some(gb) = a.grad_bias {
        expect_float(gb, "grad_bias", FLOATS)?;
        expect_shape(gb, "grad_bias", &[b, h, q, k], "[B, H, Q, K]")?;
    }
    let terms = [
        (
            "grad_score_distance",
            a.grad_score_distance,
            a.score.distance.is_some(),
            vec![h, super::score::span(q, k)],
            "[H, Q + K - 1]",
        ),
        (
            "grad_score_key",
            a.grad_score_key,
            a.score.key.is_some(),
            vec![b, h, k],
            "[B, H, K]",
        ),
    ];
    for (arg, grad, has_operand, want, layout) in terms {
        if let Some(t) = grad {
            if !has_operand {
                return Err(Error::value(
                    arg,
                    "None when the score has no such term",
                    "a tensor",
                ));
            }
            expect_float(t, arg, FLOATS)?;
            expect_shape(t, arg, &want, layout)?;
        }
    }
    check_outputs(a)?;
    Ok(checked)
}

/// The gradients must not alias themselves, each other, or anything the call reads.
fn check_outputs(a: &AttentionGradArgs) -> Result<()> {
    let mut inputs: Vec<(&str, &TensorView)> = vec![
        ("query", a.query),
        ("key", a.key),
        ("value", a.value),
        ("out", a.out),
        ("grad_out", a.grad_out),
        ("lse", a.lse),
    ];
    inputs.extend(a.bias.map(|t| ("bias", t)));
    inputs.extend(a.grad_lse.map(|t| ("grad_lse", t)));
    inputs.extend(a.sinks.map(|t| ("sinks", t)));
    inputs.extend(a.score.named());
    let mut outputs = vec![
        ("grad_query", a.grad_query),
        ("grad_key", a.grad_key),
        ("grad_value", a.grad_value),
    ];
    outputs.extend(a.grad_sinks.map(|t| ("grad_sinks", t)));
    outputs.extend(a.grad_bias.map(|t| ("grad_bias", t)));
    outputs.extend(a.grad_score_distance.map(|t| ("grad_score_distance", t)));
    outputs.extend(a.grad_score_key.map(|t| ("grad_score_key", t)));
    check_disjoint(&inputs, &outputs, true)
}
