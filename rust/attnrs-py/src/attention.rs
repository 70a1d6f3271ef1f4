//! `attnrs._attnrs.attention_forward`, `native_attention_forward`, `attention_backward` and
//! `dropout_keep_pattern`: the CPU kernels behind `attnrs.attention`.
//!
//! Python validates and allocates the outputs; this converts the tensors and the mask operand
//! ([`crate::operand`]), releases the GIL and runs the kernel. Arguments that belong together arrive as one
//! tuple each ([`Inputs`], [`Outputs`], [`MaskArgs`], [`Scalars`], [`GradArgs`]), so the three calls share one
//! [`Prepared`].

use attnrs_core::Error;
use attnrs_core::kernel::{
    AttentionArgs, AttentionGradArgs, Dropout, F32Precision, RaggedArgs, ScoreTerms,
    attention_backward as run_backward, attention_forward as run_kernel, attention_forward_ragged,
    keep_pattern,
};
use attnrs_core::mask::PlacedMask;
use attnrs_core::mask::tiles::{CallMask, Grid};
use attnrs_core::registry::{check_call, kernels};
use attnrs_core::tensor::DType;
use pyo3::prelude::*;

use crate::dlpack::{self, Imported};
use crate::door::run_detached;
use crate::errors::PyAttnrsError;
use crate::operand::MaskArgs;

/// The tensors every call reads: `(query, key, value, sinks, head_scale, score_distance, score_key)` (the
/// last three: the score mod's terms, see `attnrs_core::kernel::ScoreTerms`).
#[derive(FromPyObject)]
pub struct Inputs<'py>(
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

/// The forward's results: `(out, lse)`, written by the forward (`lse` f32 `[B, H, Q]`, when given), read by
/// the backward (which needs `lse`).
#[derive(FromPyObject)]
pub struct Outputs<'py>(Bound<'py, PyAny>, Option<Bound<'py, PyAny>>);

/// The scalars of a call: `(scale, softcap, dropout_p, dropout_seed, num_threads, f32_precision)`.
/// `softcap <= 0` means none; `dropout_p > 0` drops weights with the pattern of `dropout_seed` (see
/// `attnrs_core::kernel::Dropout`); `f32_precision` is torch's float32 matmul precision as 0 ("highest"),
/// 1 ("high") or 2 ("medium") (python/attnrs/precision.py writes it).
#[derive(FromPyObject, Clone, Copy)]
pub struct Scalars(f64, f64, f64, u64, usize, u8);

impl Scalars {
    fn f32_precision(&self) -> PyResult<F32Precision> {
        match self.5 {
            0 => Ok(F32Precision::Highest),
            1 => Ok(F32Precision::High),
            2 => Ok(F32Precision::Medium),
            other => Err(PyAttnrsError(Error::value(
                "f32_precision",
                "0 (highest), 1 (high) or 2 (medium)",
                other.to_string(),
            ))
            .into()),
        }
    }

    fn dropout(&self) -> Option<Dropout> {
        (self.2 != 0.0).then_some(Dropout {
            p: self.2,
            seed: self.3,
        })
    }
}

/// The gradient tensors of the backward: `(grad_out, grad_lse, grad_query, grad_key, grad_value,
/// grad_sinks, grad_bias, grad_score_distance, grad_score_key)`, the first two read, the others written
/// (`grad_sinks` f32 `[H]`, `grad_bias` f32 `[B, H, Q, K]`, `grad_score_distance` f32 `[H, Q + K - 1]`,
/// `grad_score_key` f32 `[B, H, K]`, each when given).
#[derive(FromPyObject)]
pub struct GradArgs<'py>(
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
);

/// The tensors and mask of one call, imported and checked, ready to run without the GIL.
struct Prepared {
    query: Imported,
    key: Imported,
    value: Imported,
    sinks: Option<Imported>,
    out: Imported,
    lse: Option<Imported>,
    /// The call's mask as the kernel reads it (the core picks its representation).
    mask: CallMask,
    /// Keeps the dense mask tensor that `mask` reads alive.
    _dense: Option<Imported>,
    bias: Option<Imported>,
    /// The score mod's terms: head scales, distance and key terms.
    terms: [Option<Imported>; 3],
    scalars: Scalars,
    f32_precision: F32Precision,
}

impl Prepared {
    fn new(
        inputs: &Inputs<'_>,
        outputs: &Outputs<'_>,
        mask: &MaskArgs<'_>,
        scalars: Scalars,
    ) -> PyResult<Prepared> {
        let query = dlpack::import(&inputs.0, "query")?;
        let key = dlpack::import(&inputs.1, "key")?;
        let value = dlpack::import(&inputs.2, "value")?;
        let out = dlpack::import_output(&outputs.0, "out")?;
        let lse = dlpack::import_output_optional(outputs.1.as_ref(), "lse")?;
        let (q, k) = (query.view.shape(), key.view.shape());
        if q.len() != 4 || k.len() != 4 {
            let got = format!("query {q:?}, key {k:?}");
            return Err(PyAttnrsError(Error::shape("query", "4-D query and key", got)).into());
        }
        let grid = Grid::new(q[0], q[1], q[2], k[2]);
        let imported = mask.import()?;
        // The operand already carries the offsets (a shift node), so the expression is placed at 0.
        let structural = imported.expr.map(|e| PlacedMask::new(e, 0, 0));
        let dense_view = imported.dense.as_ref().map(|t| t.view.clone());
        let call_mask = CallMask::new(grid, structural, dense_view).map_err(PyAttnrsError)?;
        let sinks = dlpack::import_optional(inputs.3.as_ref(), "sinks")?;
        let terms = [
            dlpack::import_optional(inputs.4.as_ref(), "head_scale")?,
            dlpack::import_optional(inputs.5.as_ref(), "score_distance")?,
            dlpack::import_optional(inputs.6.as_ref(), "score_key")?,
        ];
        Ok(Prepared {
            query,
            key,
            value,
            sinks,
            out,
            lse,
            mask: call_mask,
            _dense: imported.dense,
            bias: imported.bias,
            terms,
            scalars,
            f32_precision: scalars.f32_precision()?,
        })
    }

    /// Whether a mask may hide pairs.
    fn masked(&self) -> bool {
        self.mask.is_masked()
    }

    /// Runs `kernel` on the call with the GIL released.
    fn run(
        self,
        py: Python<'_>,
        kernel: impl FnOnce(&AttentionArgs) -> attnrs_core::Result<()> + Send,
    ) -> PyResult<()> {
        run_detached(py, move || {
            let Scalars(scale, softcap, _, _, num_threads, _) = self.scalars;
            let [head_scale, distance, key] = &self.terms;
            kernel(&AttentionArgs {
                query: &self.query.view,
                key: &self.key.view,
                value: &self.value.view,
                out: &self.out.view,
                lse: self.lse.as_ref().map(|t| &t.view),
                mask: &self.mask,
                bias: self.bias.as_ref().map(|t| &t.view),
                scale,
                softcap: (softcap > 0.0).then_some(softcap),
                sinks: self.sinks.as_ref().map(|t| &t.view),
                dropout: self.scalars.dropout(),
                score: ScoreTerms {
                    head_scale: head_scale.as_ref().map(|t| &t.view),
                    distance: distance.as_ref().map(|t| &t.view),
                    key: key.as_ref().map(|t| &t.view),
                },
                num_threads,
                f32_precision: self.f32_precision,
            })
        })
    }
}

/// Runs the CPU kernel: `out[B,H,Q,Dv]` (and `lse[B,H,Q]` f32 if given) of `outputs` from `inputs`.
///
/// The mask is the AND of the structural mask packed in `mask_program` (see [`crate::operand`]; empty:
/// none) and `dense_mask` (bool, viewed as `[B, H, Q, K]`); `bias` is an additive float tensor viewed as
/// `[B, H, Q, K]`.
#[pyfunction]
pub fn attention_forward(
    py: Python<'_>,
    inputs: Inputs<'_>,
    outputs: Outputs<'_>,
    mask: MaskArgs<'_>,
    scalars: Scalars,
) -> PyResult<()> {
    Prepared::new(&inputs, &outputs, &mask, scalars)?.run(py, run_kernel)
}

/// [`attention_forward`] on the registered native kernel `name` (the built-in "attnrs" or a plugin). The
/// call is checked against the kernel's declared capabilities first, then runs with the GIL released.
#[pyfunction]
pub fn native_attention_forward(
    py: Python<'_>,
    name: &str,
    inputs: Inputs<'_>,
    outputs: Outputs<'_>,
    mask: MaskArgs<'_>,
    scalars: Scalars,
) -> PyResult<()> {
    let kernel = kernels().lookup(name).map_err(PyAttnrsError)?;
    if scalars.dropout().is_some() {
        let what =
            format!("dropout_p > 0: native kernel '{name}' has no dropout; use backend='native'");
        return Err(PyAttnrsError(Error::Unsupported(what)).into());
    }
    let call = Prepared::new(&inputs, &outputs, &mask, scalars)?;
    let masked = call.masked();
    let name = name.to_owned();
    call.run(py, move |args| {
        check_call(&name, kernel.as_ref(), args, masked)?;
        kernel.forward(args)
    })
}

/// The description of a ragged (varlen) call: `(cu_seq_q, cu_seq_k, seqused_k, block_table, page_size,
/// window_left, window_right)` (see `attnrs_core::kernel::RaggedArgs`).
#[derive(FromPyObject)]
pub struct Ragged<'py>(
    Bound<'py, PyAny>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    Option<Bound<'py, PyAny>>,
    usize,
    i64,
    i64,
);

/// [`attention_forward`] over a ragged batch: `inputs` and `outputs` are batch-1 views of packed rows
/// (query/out `[1, H, Tq, ·]`, lse `[1, H, Tq]`, key/value `[1, Hkv, Tk, ·]`, a paged pool's pages one after
/// another), split into sequences by `ragged`. No mask is taken: each sequence's window is the mask.
#[pyfunction]
pub fn varlen_attention_forward(
    py: Python<'_>,
    inputs: Inputs<'_>,
    outputs: Outputs<'_>,
    mask: MaskArgs<'_>,
    scalars: Scalars,
    ragged: Ragged<'_>,
) -> PyResult<()> {
    let call = Prepared::new(&inputs, &outputs, &mask, scalars)?;
    if call.masked() || call.bias.is_some() {
        let what = "none in a varlen call (window_size is its mask)";
        return Err(PyAttnrsError(Error::value("attn_mask", what, "a mask")).into());
    }
    let Ragged(cu_q, cu_k, used, table, page_size, left, right) = &ragged;
    let cu_q = dlpack::import(cu_q, "cu_seq_q")?;
    let cu_k = dlpack::import_optional(cu_k.as_ref(), "cu_seq_k")?;
    let used = dlpack::import_optional(used.as_ref(), "seqused_k")?;
    let table = dlpack::import_optional(table.as_ref(), "block_table")?;
    let (page_size, window) = (*page_size, (*left, *right));
    call.run(py, move |args| {
        attention_forward_ragged(
            args,
            &RaggedArgs {
                cu_seq_q: &cu_q.view,
                cu_seq_k: cu_k.as_ref().map(|t| &t.view),
                seqused_k: used.as_ref().map(|t| &t.view),
                block_table: table.as_ref().map(|t| &t.view),
                page_size,
                window,
            },
        )
    })
}

/// Gradients of [`attention_forward`]: writes the gradients of [`GradArgs`] from the forward's inputs, its
/// `outputs` (`out` and `lse`), and `grad_out` (and `grad_lse`). Deterministic: the same inputs give bitwise
/// the same gradients on every run and thread count.
#[pyfunction]
pub fn attention_backward(
    py: Python<'_>,
    inputs: Inputs<'_>,
    outputs: Outputs<'_>,
    mask: MaskArgs<'_>,
    scalars: Scalars,
    grads: GradArgs<'_>,
) -> PyResult<()> {
    let call = Prepared::new(&inputs, &outputs, &mask, scalars)?;
    let GradArgs(
        grad_out,
        grad_lse,
        grad_query,
        grad_key,
        grad_value,
        grad_sinks,
        grad_bias,
        grad_distance,
        grad_score_key,
    ) = &grads;
    let grad_out = dlpack::import(grad_out, "grad_out")?;
    let grad_query = dlpack::import_output(grad_query, "grad_query")?;
    let grad_key = dlpack::import_output(grad_key, "grad_key")?;
    let grad_value = dlpack::import_output(grad_value, "grad_value")?;
    let grad_sinks = dlpack::import_output_optional(grad_sinks.as_ref(), "grad_sinks")?;
    let grad_bias = dlpack::import_output_optional(grad_bias.as_ref(), "grad_bias")?;
    let grad_lse = dlpack::import_optional(grad_lse.as_ref(), "grad_lse")?;
    let grad_distance =
        dlpack::import_output_optional(grad_distance.as_ref(), "grad_score_distance")?;
    let grad_score_key = dlpack::import_output_optional(grad_score_key.as_ref(), "grad_score_key")?;
    call.run(py, move |args| {
        let lse = args
            .lse
            .ok_or_else(|| Error::Internal("the backward needs the forward's lse".into()))?;
        run_backward(&AttentionGradArgs {
            query: args.query,
            key: args.key,
            value: args.value,
            out: args.out,
            grad_out: &grad_out.view,
            lse,
            mask: args.mask,
            bias: args.bias,
            scale: args.scale,
            softcap: args.softcap,
            sinks: args.sinks,
            dropout: args.dropout,
            grad_query: &grad_query.view,
            grad_key: &grad_key.view,
            grad_value: &grad_value.view,
            grad_sinks: grad_sinks.as_ref().map(|t| &t.view),
            grad_bias: grad_bias.as_ref().map(|t| &t.view),
            grad_lse: grad_lse.as_ref().map(|t| &t.view),
            score: args.score,
            grad_score_distance: grad_distance.as_ref().map(|t| &t.view),
            grad_score_key: grad_score_key.as_ref().map(|t| &t.view),
            num_threads: args.num_threads,
            f32_precision: args.f32_precision,
        })
    })
}

/// Writes the dropout keep pattern (`True` = kept) of a `[B, H, Q, K]` call with `dropout_p` and
/// `dropout_seed` into the bool tensor `out` (contiguous): exactly the pairs the kernels keep. O(B*H*Q*K),
/// so it runs with the GIL released.
#[pyfunction]
pub fn dropout_keep_pattern(
    py: Python<'_>,
    out: &Bound<'_, PyAny>,
    dropout_p: f64,
    dropout_seed: u64,
) -> PyResult<()> {
    let out = dlpack::import_output(out, "out")?;
    let view = &out.view;
    let shape: [usize; 4] = view.shape().try_into().map_err(|_| {
        PyAttnrsError(Error::shape(
            "out",
            "a 4-D tensor [B, H, Q, K]",
            format!("shape {:?}", view.shape()),
        ))
    })?;
    if view.dtype() != DType::Bool || !view.is_contiguous() {
        return Err(PyAttnrsError(Error::layout(
            "out",
            "a contiguous torch.bool tensor",
            format!(
                "{} with strides {:?}",
                view.dtype().torch_name(),
                view.strides()
            ),
        ))
        .into());
    }
    let dropout = Dropout {
        p: dropout_p,
        seed: dropout_seed,
    };
    run_detached(py, move || {
        let view = &out.view;
        // SAFETY: `out` is a contiguous bool tensor of `numel` elements (checked above), imported as a
        // writable output and alive until the end of this closure (it owns `out`); nothing else touches it
        // while the GIL is released; a bool is one byte and only 0 or 1 is written.
        let bools =
            unsafe { std::slice::from_raw_parts_mut(view.as_ptr().cast::<bool>(), view.numel()) };
        keep_pattern(dropout, shape, bools)
    })
}
