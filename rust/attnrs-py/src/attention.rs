//! `attnrs._attnrs.attention_forward`: the CPU kernel behind `attnrs.attention`.
//!
//! Python validates and allocates (out, lse); this converts the tensors, decodes the structural mask
//! program, releases the GIL and runs the kernel.

use attnrs_core::block::{BothTiles, DenseTiles, MaskTiles, NoMask};
use attnrs_core::kernel::{
    attention_backward as run_backward, attention_forward as run_kernel, keep_pattern,
    AttentionArgs, AttentionGradArgs, Dropout,
};
use attnrs_core::mask::{MaskExpr, PlacedMask};
use attnrs_core::registry::{check_call, kernels};
use attnrs_core::tensor::DType;
use attnrs_core::Error;
use pyo3::prelude::*;

use crate::dlpack::{self, Imported};
use crate::door::run_detached;
use crate::errors::PyAttnrsError;

fn optional(obj: Option<&Bound<'_, PyAny>>, arg: &str) -> PyResult<Option<Imported>> {
    obj.filter(|o| !o.is_none())
        .map(|o| dlpack::import(o, arg))
        .transpose()
}

fn ints(obj: &Bound<'_, PyAny>, arg: &str) -> PyResult<Vec<i64>> {
    let t = dlpack::import(obj, arg)?;
    if t.view.dtype() != DType::I64 {
        return Err(PyAttnrsError(Error::dtype(
            arg,
            "torch.int64",
            t.view.dtype().torch_name(),
        ))
        .into());
    }
    Ok(t.view
        .to_contiguous_bytes()
        .chunks_exact(8)
        .map(|c| i64::from_ne_bytes(c.try_into().unwrap_or([0; 8])))
        .collect())
}

/// The tensors and mask of one call, imported and checked, ready to run without the GIL.
struct Prepared {
    query: Imported,
    key: Imported,
    value: Imported,
    out: Imported,
    lse: Option<Imported>,
    dense: Option<(DenseTiles, Imported)>,
    bias: Option<Imported>,
    sinks: Option<Imported>,
    expr: Option<MaskExpr>,
    q_offset: i64,
    kv_offset: i64,
    scale: f64,
    softcap: f64,
    dropout: Option<Dropout>,
    num_threads: usize,
}

impl Prepared {
    #[allow(clippy::too_many_arguments)]
    fn new(
        query: &Bound<'_, PyAny>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        lse: Option<&Bound<'_, PyAny>>,
        dense_mask: Option<&Bound<'_, PyAny>>,
        bias: Option<&Bound<'_, PyAny>>,
        sinks: Option<&Bound<'_, PyAny>>,
        program: &Bound<'_, PyAny>,
        program_ints: &Bound<'_, PyAny>,
        program_bytes: &Bound<'_, PyAny>,
        q_offset: i64,
        kv_offset: i64,
        scale: f64,
        softcap: f64,
        dropout: Option<Dropout>,
        num_threads: usize,
    ) -> PyResult<Prepared> {
        let query = dlpack::import(query, "query")?;
        let key = dlpack::import(key, "key")?;
        let value = dlpack::import(value, "value")?;
        let out = dlpack::import_output(out, "out")?;
        let lse = lse
            .filter(|o| !o.is_none())
            .map(|o| dlpack::import_output(o, "lse"))
            .transpose()?;
        let (q, k) = (query.view.shape(), key.view.shape());
        if q.len() != 4 || k.len() != 4 {
            let got = format!("query {q:?}, key {k:?}");
            return Err(PyAttnrsError(Error::shape("query", "4-D query and key", got)).into());
        }
        let grid = [q[0], q[1], q[2], k[2]];
        let dense = optional(dense_mask, "attn_mask")?
            .map(|t| DenseTiles::new(t.view.clone(), grid).map(|d| (d, t)))
            .transpose()
            .map_err(PyAttnrsError)?;
        let bias = optional(bias, "attn_mask")?;
        let sinks = optional(sinks, "sinks")?;
        let program = ints(program, "program")?;
        let expr = if program.is_empty() {
            None
        } else {
            let table = ints(program_ints, "program_ints")?;
            let bytes = dlpack::import(program_bytes, "program_bytes")?
                .view
                .to_contiguous_bytes();
            Some(MaskExpr::decode(&program, &table, &bytes).map_err(PyAttnrsError)?)
        };
        Ok(Prepared {
            query,
            key,
            value,
            out,
            lse,
            dense,
            bias,
            sinks,
            expr,
            q_offset,
            kv_offset,
            scale,
            softcap,
            dropout,
            num_threads,
        })
    }

    /// Whether a mask may hide pairs.
    fn masked(&self) -> bool {
        self.expr.is_some() || self.dense.is_some()
    }

    /// Runs `kernel` on the call with the GIL released.
    fn run(
        self,
        py: Python<'_>,
        kernel: impl FnOnce(&AttentionArgs) -> attnrs_core::Result<()> + Send,
    ) -> PyResult<()> {
        run_detached(py, move || {
            let placed = self
                .expr
                .map(|e| PlacedMask::new(e, self.q_offset, self.kv_offset));
            let structural: Option<&dyn MaskTiles> = placed.as_ref().map(|p| p as &dyn MaskTiles);
            let dense_tiles: Option<&dyn MaskTiles> =
                self.dense.as_ref().map(|(d, _)| d as &dyn MaskTiles);
            let both;
            let mask: &dyn MaskTiles = match (structural, dense_tiles) {
                (Some(first), Some(second)) => {
                    both = BothTiles { first, second };
                    &both
                }
                (Some(m), None) | (None, Some(m)) => m,
                (None, None) => &NoMask,
            };
            let args = AttentionArgs {
                query: &self.query.view,
                key: &self.key.view,
                value: &self.value.view,
                out: &self.out.view,
                lse: self.lse.as_ref().map(|t| &t.view),
                mask,
                bias: self.bias.as_ref().map(|t| &t.view),
                scale: self.scale,
                softcap: (self.softcap > 0.0).then_some(self.softcap),
                sinks: self.sinks.as_ref().map(|t| &t.view),
                dropout: self.dropout,
                num_threads: self.num_threads,
            };
            kernel(&args)
        })
    }
}

/// Runs the CPU kernel: `out[B,H,Q,Dv]` (and `lse[B,H,Q]` f32 if given) from q, k, v.
///
/// The mask is the AND of: the structural mask encoded by `program` / `program_ints` / `program_bytes`
/// (placed so that row `i` is position `q_offset + i`, column `j` position `kv_offset + j`; an empty
/// program means none) and `dense_mask` (bool, viewed as `[B, H, Q, K]`). `bias` is an additive float
/// tensor viewed as `[B, H, Q, K]`. `softcap <= 0` means none. `dropout_p > 0` drops weights with the
/// pattern of `dropout_seed` (see `attnrs_core::kernel::Dropout`).
#[pyfunction]
#[pyo3(signature = (query, key, value, out, lse, dense_mask, bias, sinks, program, program_ints, program_bytes,
                    q_offset, kv_offset, scale, softcap, num_threads, dropout_p=0.0, dropout_seed=0))]
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    py: Python<'_>,
    query: &Bound<'_, PyAny>,
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    dense_mask: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, PyAny>>,
    program: &Bound<'_, PyAny>,
    program_ints: &Bound<'_, PyAny>,
    program_bytes: &Bound<'_, PyAny>,
    q_offset: i64,
    kv_offset: i64,
    scale: f64,
    softcap: f64,
    num_threads: usize,
    dropout_p: f64,
    dropout_seed: u64,
) -> PyResult<()> {
    let call = Prepared::new(
        query,
        key,
        value,
        out,
        lse,
        dense_mask,
        bias,
        sinks,
        program,
        program_ints,
        program_bytes,
        q_offset,
        kv_offset,
        scale,
        softcap,
        dropout(dropout_p, dropout_seed),
        num_threads,
    )?;
    call.run(py, run_kernel)
}

fn dropout(p: f64, seed: u64) -> Option<Dropout> {
    (p != 0.0).then_some(Dropout { p, seed })
}

/// Writes the dropout keep pattern (`True` = kept) of a `[B, H, Q, K]` call with `dropout_p` and
/// `dropout_seed` into the bool tensor `out` (contiguous): exactly the pairs the kernels keep.
#[pyfunction]
pub fn dropout_keep_pattern(
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
    // SAFETY: `out` is a contiguous bool tensor of `numel` elements (checked above), imported as a writable
    // output and alive until the end of this function; a bool is one byte and only 0 or 1 is written.
    let bools =
        unsafe { std::slice::from_raw_parts_mut(view.as_ptr().cast::<bool>(), view.numel()) };
    let dropout = Dropout {
        p: dropout_p,
        seed: dropout_seed,
    };
    keep_pattern(dropout, shape, bools).map_err(|e| PyAttnrsError(e).into())
}

/// [`attention_forward`] on the registered native kernel `name` (the built-in "attnrs" or a plugin). The
/// call is checked against the kernel's declared capabilities first, then runs with the GIL released.
#[pyfunction]
#[pyo3(signature = (name, query, key, value, out, lse, dense_mask, bias, sinks, program, program_ints,
                    program_bytes, q_offset, kv_offset, scale, softcap, num_threads))]
#[allow(clippy::too_many_arguments)]
pub fn native_attention_forward(
    py: Python<'_>,
    name: &str,
    query: &Bound<'_, PyAny>,
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    lse: Option<&Bound<'_, PyAny>>,
    dense_mask: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, PyAny>>,
    program: &Bound<'_, PyAny>,
    program_ints: &Bound<'_, PyAny>,
    program_bytes: &Bound<'_, PyAny>,
    q_offset: i64,
    kv_offset: i64,
    scale: f64,
    softcap: f64,
    num_threads: usize,
) -> PyResult<()> {
    let kernel = kernels().lookup(name).map_err(PyAttnrsError)?;
    let call = Prepared::new(
        query,
        key,
        value,
        out,
        lse,
        dense_mask,
        bias,
        sinks,
        program,
        program_ints,
        program_bytes,
        q_offset,
        kv_offset,
        scale,
        softcap,
        None,
        num_threads,
    )?;
    let masked = call.masked();
    let name = name.to_owned();
    call.run(py, move |args| {
        check_call(&name, kernel.as_ref(), args, masked)?;
        kernel.forward(args)
    })
}

/// Gradients of [`attention_forward`]: writes `grad_query`, `grad_key`, `grad_value` (and `grad_sinks` f32 [H],
/// `grad_bias` f32 [B,H,Q,K] when given) from the forward's inputs, its `out` and `lse`, and `grad_out`.
/// Deterministic: the same inputs give bitwise the same gradients on every run and thread count.
#[pyfunction]
#[pyo3(signature = (query, key, value, out, grad_out, lse, dense_mask, bias, sinks, program, program_ints,
                    program_bytes, q_offset, kv_offset, scale, softcap, grad_query, grad_key, grad_value,
                    grad_sinks, grad_bias, grad_lse, num_threads, dropout_p=0.0, dropout_seed=0))]
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    py: Python<'_>,
    query: &Bound<'_, PyAny>,
    key: &Bound<'_, PyAny>,
    value: &Bound<'_, PyAny>,
    out: &Bound<'_, PyAny>,
    grad_out: &Bound<'_, PyAny>,
    lse: &Bound<'_, PyAny>,
    dense_mask: Option<&Bound<'_, PyAny>>,
    bias: Option<&Bound<'_, PyAny>>,
    sinks: Option<&Bound<'_, PyAny>>,
    program: &Bound<'_, PyAny>,
    program_ints: &Bound<'_, PyAny>,
    program_bytes: &Bound<'_, PyAny>,
    q_offset: i64,
    kv_offset: i64,
    scale: f64,
    softcap: f64,
    grad_query: &Bound<'_, PyAny>,
    grad_key: &Bound<'_, PyAny>,
    grad_value: &Bound<'_, PyAny>,
    grad_sinks: Option<&Bound<'_, PyAny>>,
    grad_bias: Option<&Bound<'_, PyAny>>,
    grad_lse: Option<&Bound<'_, PyAny>>,
    num_threads: usize,
    dropout_p: f64,
    dropout_seed: u64,
) -> PyResult<()> {
    let call = Prepared::new(
        query,
        key,
        value,
        out,
        Some(lse),
        dense_mask,
        bias,
        sinks,
        program,
        program_ints,
        program_bytes,
        q_offset,
        kv_offset,
        scale,
        softcap,
        dropout(dropout_p, dropout_seed),
        num_threads,
    )?;
    let grad_out = dlpack::import(grad_out, "grad_out")?;
    let grad_query = dlpack::import_output(grad_query, "grad_query")?;
    let grad_key = dlpack::import_output(grad_key, "grad_key")?;
    let grad_value = dlpack::import_output(grad_value, "grad_value")?;
    let output = |obj: Option<&Bound<'_, PyAny>>, arg: &str| {
        obj.filter(|o| !o.is_none())
            .map(|o| dlpack::import_output(o, arg))
            .transpose()
    };
    let grad_sinks = output(grad_sinks, "grad_sinks")?;
    let grad_bias = output(grad_bias, "grad_bias")?;
    let grad_lse = optional(grad_lse, "grad_lse")?;
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
            num_threads: args.num_threads,
        })
    })
}
