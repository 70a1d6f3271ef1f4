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
//! dS_ij      = dX_ij · (1 - t_ij²)   where t = tanh(scale·q·k / c)   (softcap; dS = dX without it)
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

use half::{bf16, f16};
use rayon::prelude::*;

use super::args::{
    check_disjoint, expect_float, expect_like, expect_shape, Call, Checked, Dims, FLOATS,
};
use super::dispatch::{select, Backend, Body, Isa, Select};
use super::dropout::DropMask;
use super::gemm::Kern;
use super::softmax::Acc;
use super::strided::{read_sinks, BiasRef, Strided};
use super::AttentionArgs;
use crate::block::{BlockClass, MaskTiles};
use crate::tensor::{DType, Float, TensorView};
use crate::{threads, Error, Result};

/// Key columns per tile: 64, or 128 where the mask's partial tiles waste little at that width (see
/// [`kv_tile_width`]); wider tiles halve the traffic of the dQ rows and of the packed query rows per product.
const BK_MIN: usize = 64;
const BK_MAX: usize = 128;
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
    /// Worker threads (a private pool; 0 means 1). The result does not depend on it.
    pub num_threads: usize,
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
    struct Backward<'a, 'b> {
        args: &'a AttentionGradArgs<'b>,
        checked: &'a Checked,
        strategy: Resolved,
    }
    impl Select for Backward<'_, '_> {
        type Out = Result<()>;
        fn with<K: Isa, T: Float>(self) -> Result<()> {
            run::<T, K>(self.args, self.checked, self.strategy)
        }
    }
    // f64 runs the portable f64 loops whatever the backend (so a forced one missing here is no error).
    let backend = if checked.dtype == DType::F64 {
        Backend::Portable
    } else {
        backend.resolve(checked.dtype)?
    };
    let call = Backward {
        args,
        checked: &checked,
        strategy,
    };
    select(checked.dtype, backend, call)
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
        num_threads: a.num_threads,
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
    let mut outputs = vec![
        ("grad_query", a.grad_query),
        ("grad_key", a.grad_key),
        ("grad_value", a.grad_value),
    ];
    outputs.extend(a.grad_sinks.map(|t| ("grad_sinks", t)));
    outputs.extend(a.grad_bias.map(|t| ("grad_bias", t)));
    check_disjoint(&inputs, &outputs, true)
}

// ------------------------------------------------------------------------------------------------------------
// The job

/// A written view of any float dtype (`grad_bias`, `grad_sinks`), up to four dims.
#[derive(Debug, Clone, Copy)]
struct AnyOut {
    ptr: *mut u8,
    dtype: DType,
    st: [isize; 4],
}

// SAFETY: an address plus strides of a validated output view; items write disjoint elements.
unsafe impl Send for AnyOut {}
// SAFETY: as for `Send`.
unsafe impl Sync for AnyOut {}

impl AnyOut {
    fn of(v: &TensorView) -> Self {
        let mut st = [0isize; 4];
        for (s, &v) in st.iter_mut().zip(v.strides()) {
            *s = v;
        }
        AnyOut {
            ptr: v.as_ptr(),
            dtype: v.dtype(),
            st,
        }
    }

    /// Writes `src[j]` to element `[i0, i1, i2, i3 + j]`.
    ///
    /// # Safety
    /// Every index written must be in range of the view, and no other thread may write those elements.
    #[inline(always)]
    unsafe fn write_row<A: Acc>(&self, idx: [usize; 4], src: &[A]) {
        #[inline(always)]
        unsafe fn go<T: Float, A: Acc>(p: &AnyOut, base: isize, src: &[A]) {
            let ptr = p.ptr as *mut T;
            for (j, &x) in src.iter().enumerate() {
                // SAFETY: in range by the caller's promise.
                unsafe {
                    ptr.offset(base + j as isize * p.st[3])
                        .write(T::from_f64(x.to_f64()))
                };
            }
        }
        let base: isize = idx
            .iter()
            .zip(&self.st)
            .map(|(&i, &s)| i as isize * s)
            .sum();
        // SAFETY: forwarded caller promise; the dtype matches the pointer's element type.
        unsafe {
            match self.dtype {
                DType::F32 => go::<f32, A>(self, base, src),
                DType::F64 => go::<f64, A>(self, base, src),
                DType::BF16 => go::<bf16, A>(self, base, src),
                _ => go::<f16, A>(self, base, src),
            }
        }
    }
}

/// One call, typed.
struct Job<'a, T, A> {
    dims: Dims,
    q: Strided<T>,
    k: Strided<T>,
    v: Strided<T>,
    out: Strided<T>,
    dout: Strided<T>,
    lse_in: Strided<f32>,
    grad_lse: Option<Strided<f32>>,
    dq: Strided<T>,
    dk: Strided<T>,
    dv: Strided<T>,
    bias: Option<BiasRef>,
    grad_bias: Option<AnyOut>,
    sinks: Option<Vec<f64>>,
    mask: &'a dyn MaskTiles,
    scale: A,
    /// `(c, 1/c)`.
    softcap: Option<(A, A)>,
    drop: Option<DropMask>,
    /// Per row `(b * H + h) * Q + i`: `P_ij = exp(x_ij - shift_i) · norm_i` (`shift = lse`, `norm = 1` from
    /// the saved lse; `(max, 1 / sum)` where it was recomputed); a non-finite shift means the row saw nothing.
    shift: Vec<A>,
    norm: Vec<A>,
    /// Per row: `Δ = dO · O`.
    delta: Vec<A>,
    /// D and Dv rounded up to 16 (packed row lengths).
    dp: usize,
    dvp: usize,
    /// Key columns per tile (`BK_MIN` or `BK_MAX`).
    bk: usize,
}

impl<T, A> Job<'_, T, A> {
    fn row(&self, b: usize, h: usize, i: usize) -> usize {
        (b * self.dims.h + h) * self.dims.q + i
    }
    fn nqb(&self) -> usize {
        self.dims.q.div_ceil(BQ)
    }
    fn nkb(&self) -> usize {
        self.dims.k.div_ceil(self.bk)
    }
}

/// Query and dO rows packed as operands of `K`: all rows of the GQA group (`[G][Q'][..]`, `Q'` = Q rounded
/// up to even), packed once per kv item when they fit [`GROUP_PACK_BUDGET`]; otherwise (`per_tile`, and for a
/// dQ item or a row-statistics pass) one tile at a time at row 0. Row-major copies are the A operands of
/// `Q·Kᵀ` and `dO·Vᵀ`; the B operands of `dSᵀ·Q` and `Pᵀ·dO` take rows in pairs (`[Q'/2][..][2]`) when
/// `K::PAIR == 2` (for `PAIR == 1` the row-major copies serve). Packing is exact, so how rows are packed
/// never changes a gradient.
struct Packed<E> {
    q: Vec<E>,
    dout: Vec<E>,
    q_pairs: Vec<E>,
    dout_pairs: Vec<E>,
    per_tile: bool,
}

/// Bytes one work item may hold of packed query and dO rows of its whole GQA group (per thread).
const GROUP_PACK_BUDGET: usize = 32 << 20;

impl<E: Copy + Default> Packed<E> {
    fn new() -> Self {
        Packed {
            q: Vec::new(),
            dout: Vec::new(),
            q_pairs: Vec::new(),
            dout_pairs: Vec::new(),
            per_tile: true,
        }
    }

    /// Whether the whole group's rows fit `budget` bytes for this call (a bf16 pair layout doubles them).
    fn group_fits<K: Kern<E = E>, T>(job: &Job<T, K::A>, budget: usize) -> bool {
        let rows = job.dims.g * job.dims.q.next_multiple_of(2);
        let bytes = rows * (job.dp + job.dvp) * std::mem::size_of::<E>() * K::PAIR;
        bytes <= budget
    }

    /// Packs rows `r0..r0 + rows` of query head `h` (and of dO when `with_dout`) at row `at` (even).
    #[allow(clippy::too_many_arguments)]
    fn pack<K: Kern<E = E>, T: Float>(
        &mut self,
        job: &Job<T, K::A>,
        b: usize,
        h: usize,
        r0: usize,
        rows: usize,
        at: usize,
        with_dout: bool,
    ) {
        debug_assert!(at.is_multiple_of(2));
        let Dims { d, dv, .. } = job.dims;
        let (dp, dvp) = (job.dp, job.dvp);
        let end = at + rows.next_multiple_of(2);
        let grow = |v: &mut Vec<E>, len: usize| {
            if v.len() < len {
                v.resize(len, E::default());
            }
        };
        grow(&mut self.q, end * dp);
        pack_a::<K, T>(&job.q, b, h, r0, rows, d, dp, &mut self.q[at * dp..]);
        if K::PAIR == 2 {
            grow(&mut self.q_pairs, end * dp);
            pack_b_rows::<K, T>(&job.q, b, h, r0, rows, d, dp, &mut self.q_pairs[at * dp..]);
        }
        if with_dout {
            grow(&mut self.dout, end * dvp);
            pack_a::<K, T>(
                &job.dout,
                b,
                h,
                r0,
                rows,
                dv,
                dvp,
                &mut self.dout[at * dvp..],
            );
            if K::PAIR == 2 {
                grow(&mut self.dout_pairs, end * dvp);
                let dst = &mut self.dout_pairs[at * dvp..];
                pack_b_rows::<K, T>(&job.dout, b, h, r0, rows, dv, dvp, dst);
            }
        }
    }

    /// The B-operand rows of query and dO (see the type's docs).
    fn b_rows(&self, pair: usize) -> (&[E], &[E]) {
        if pair == 2 {
            (&self.q_pairs, &self.dout_pairs)
        } else {
            (&self.q, &self.dout)
        }
    }
}

/// Per-item tile buffers: operands (`K::E`, zero-padded to the packed widths) and accumulators (`K::A`).
struct Scratch<K: Kern> {
    /// Kᵀ and Vᵀ of the kv tile as B operands, `[D'/PAIR][BK][PAIR]`.
    kt: Vec<K::E>,
    vt: Vec<K::E>,
    /// K rows of the kv tile as the B operand of `dS·K`, `[BK/PAIR][dp][PAIR]`.
    kr: Vec<K::E>,
    /// Logits, then P, `[BQ][BK]`.
    p: Vec<K::A>,
    /// dP, then dS, `[BQ][BK]`.
    ds: Vec<K::A>,
    /// Pᵀ and dSᵀ `[BK][BQ]`, and dS `[BQ][BK]`, as A operands; `stage` for [`transpose`].
    pt: Vec<K::E>,
    stage: Vec<u32>,
    dst: Vec<K::E>,
    ds_e: Vec<K::E>,
    /// Softcap derivative `1 - t²`, `[BQ][BK]`.
    g: Vec<K::A>,
    /// Visibility of a partial tile, `[m][n]`.
    vis: Vec<u8>,
    /// One bias row, `[BK]`.
    brow: Vec<K::A>,
    /// dK `[BK][dp]` (kv items) or dQ `[BQ][dp]` (dQ items).
    acc_k: Vec<K::A>,
    /// dV `[BK][dvp]`.
    acc_v: Vec<K::A>,
    zeros: Vec<K::A>,
}

impl<K: Kern> Scratch<K> {
    fn new<T>(job: &Job<T, K::A>) -> Self {
        let Dims { d, dv, .. } = job.dims;
        let (dp, dvp) = (job.dp, job.dvp);
        let (ze, za, bk) = (K::E::default(), K::A::ZERO, job.bk);
        Scratch {
            kt: vec![ze; d.next_multiple_of(2) * bk],
            vt: vec![ze; dv.next_multiple_of(2) * bk],
            kr: vec![ze; bk * dp],
            p: vec![za; BQ * bk],
            ds: vec![za; BQ * bk],
            pt: vec![ze; bk * BQ],
            stage: vec![0; BQ * bk],
            dst: vec![ze; bk * BQ],
            ds_e: vec![ze; BQ * bk],
            g: vec![za; BQ * bk],
            vis: vec![0; BQ * bk],
            brow: vec![za; bk],
            acc_k: vec![za; bk.max(BQ) * dp],
            acc_v: vec![za; bk * dvp],
            zeros: vec![za; bk],
        }
    }
}

/// `c[i*ldc + j] (+)= Σ_p A(i, p) · B(p, j)` for `i < m`, `j < n` over `kp` packed units of k (pairs for
/// `PAIR == 2`) on the micro-kernel `K`, with the operand layouts of [`Kern::gemm`]; `n % 16 == 0`. Each
/// element of `c` is summed in order of `p`, so the result depends only on the operands.
///
/// # Panics
/// When a range falls outside its slice (a bug: callers size every buffer for its tile).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn mm<K: Kern>(
    m: usize,
    n: usize,
    kp: usize,
    a: &[K::E],
    lda: usize,
    b: &[K::E],
    ldb: usize,
    c: &mut [K::A],
    ldc: usize,
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let pair = K::PAIR;
    assert!(n.is_multiple_of(16) && n <= ldc && c.len() >= (m - 1) * ldc + n);
    assert!(
        kp == 0 || (a.len() >= (m - 1) * lda + kp * pair && b.len() >= ((kp - 1) * ldb + n) * pair)
    );
    assert!((m == 1 || kp * pair <= lda) && (kp <= 1 || n <= ldb));
    // SAFETY: the asserts above put every element the product reads or writes inside its slice; `K` is
    // only instantiated inside entry points compiled for (and called on) CPUs with its features.
    unsafe {
        K::gemm(
            m,
            n,
            kp,
            a.as_ptr(),
            lda,
            b.as_ptr(),
            ldb,
            c.as_mut_ptr(),
            ldc,
            accumulate,
        )
    }
}

/// `dst[c * BQ + r] = src[r * BK + c]` for `r < m`, `c < n`, as operands (zero for the odd row's partner):
/// a tile transposed into the A operand of the dV and dK products. The tile is first converted into `stage`
/// as 32-bit units (one operand, or with `PAIR == 2` the operands of rows `2u` and `2u + 1`), which the
/// kernel's [`Kern::transpose_units`] transposes (16×16 blocks in registers on AVX-512).
#[inline(always)]
fn transpose<K: Kern>(
    src: &[K::A],
    bk: usize,
    m: usize,
    n: usize,
    stage: &mut [u32],
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let rows = m.next_multiple_of(pair);
    if std::mem::size_of::<K::E>() * pair != 4 {
        // f64 operands: element by element.
        for (c, col) in dst.chunks_exact_mut(BQ).take(n).enumerate() {
            for (r, x) in col[..m].iter_mut().enumerate() {
                *x = K::to_e(src[r * bk + c]);
            }
            col[m..rows].fill(K::E::default());
        }
        return;
    }
    let zeros = [K::A::ZERO; BK_MAX];
    for u in 0..rows / pair {
        let out = &mut stage[u * bk..u * bk + n];
        if pair == 1 {
            for (x, &a) in out.iter_mut().zip(&src[u * bk..u * bk + n]) {
                *x = unit::<K>(a, a);
            }
        } else {
            let lo = &src[2 * u * bk..2 * u * bk + n];
            let hi = if 2 * u + 1 < m {
                &src[(2 * u + 1) * bk..(2 * u + 1) * bk + n]
            } else {
                &zeros[..n]
            };
            for ((x, &a), &b) in out.iter_mut().zip(lo).zip(hi) {
                *x = unit::<K>(a, b);
            }
        }
    }
    assert!(stage.len() >= rows / pair * bk && dst.len() >= (n.max(1) - 1) * BQ + rows);
    // SAFETY: `stage` holds `rows / pair` rows of `bk` units, of which the first `n` are read; `dst` holds
    // `n` rows of `BQ / pair` 32-bit units (asserted; an operand unit is 4 bytes: checked above); the CPU has
    // `K`'s features (this runs inside its entry points).
    unsafe {
        K::transpose_units(
            stage.as_ptr().cast(),
            (bk * 4) as isize,
            rows / pair,
            n,
            dst.as_mut_ptr().cast(),
            BQ / pair,
        )
    }
}

/// The 32-bit unit of operands: `a` alone (4-byte operands), or `a` then `b` (2-byte operands, `PAIR == 2`).
#[inline(always)]
fn unit<K: Kern>(a: K::A, b: K::A) -> u32 {
    if std::mem::size_of::<K::E>() == 4 {
        // SAFETY: the operand is 4 bytes of plain data (f32), and every bit pattern is a valid u32.
        unsafe { std::mem::transmute_copy::<K::E, u32>(&K::to_e(a)) }
    } else {
        assert!(std::mem::size_of::<[K::E; 2]>() == 4);
        // SAFETY: two 2-byte operands of plain data (bf16 bits) make 4 bytes, little-endian `a` first,
        // and every bit pattern is a valid u32.
        unsafe { std::mem::transmute_copy::<[K::E; 2], u32>(&[K::to_e(a), K::to_e(b)]) }
    }
}

/// Row-major operand rows: `dst[r * ld + c] = src[b, h, r0 + r, c]` for `r < rows`, `c < width`, zeros for
/// `width <= c < ld` (and for a missing partner row when `PAIR == 2`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_a<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    ld: usize,
    dst: &mut [K::E],
) {
    for r in 0..rows {
        let out = &mut dst[r * ld..(r + 1) * ld];
        if width > 0 {
            // SAFETY: (b, h, r0 + r, 0) is in range (callers pass rows inside the dim) and width > 0.
            let p = unsafe { src.at(b, h, r0 + r, 0) };
            if src.st[3] == 1 {
                // SAFETY: the row's `width` elements are contiguous and in range.
                let row = unsafe { std::slice::from_raw_parts(p as *const T, width) };
                for (x, &y) in out[..width].iter_mut().zip(row) {
                    *x = K::load(y);
                }
            } else {
                for (c, x) in out[..width].iter_mut().enumerate() {
                    // SAFETY: c < width, the size of the last dim.
                    *x = K::load(unsafe { p.offset(c as isize * src.st[3]).read() });
                }
            }
        }
        out[width..].fill(K::E::default());
    }
    dst[rows * ld..rows.next_multiple_of(K::PAIR) * ld].fill(K::E::default());
}

/// `dst[at(r, c)] = src[b, h, r0 + r, c]` for `r < rows`, `c < width`, and zero for every other `(r, c)` of
/// the padded grid `grid = (rows', cols')`: rows of a strided input scattered into an operand layout.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scatter_rows<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    grid: (usize, usize),
    dst: &mut [K::E],
    at: impl Fn(usize, usize) -> usize,
) {
    for r in 0..grid.0 {
        if r < rows && width > 0 {
            // SAFETY: (b, h, r0 + r, 0) is in range (callers pass rows inside the dim) and width > 0.
            let p = unsafe { src.at(b, h, r0 + r, 0) };
            for c in 0..width {
                // SAFETY: c < width, the size of the last dim.
                dst[at(r, c)] = K::load(unsafe { p.offset(c as isize * src.st[3]).read() });
            }
        }
        let from = if r < rows { width } else { 0 };
        for c in from..grid.1 {
            dst[at(r, c)] = K::E::default();
        }
    }
}

/// Rows as the B operand of a product over them (`k` = the row): element `(r, j)` of rows `r0..r0 + rows`
/// at `((r / PAIR) * ld + j) * PAIR + r % PAIR`; zeros for `width <= j < ld` and a missing partner row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_b_rows<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    ld: usize,
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let grid = (rows.next_multiple_of(pair), ld);
    let at = |r: usize, j: usize| ((r / pair) * ld + j) * pair + r % pair;
    scatter_rows::<K, T>(src, b, h, r0, rows, width, grid, dst, at);
}

/// The kv rows `c0..c0 + n` transposed into a B operand: element `(e, c)` = `src[b, h, c0 + c, e]` at
/// `((e / PAIR) * BK + c) * PAIR + e % PAIR`; zeros for `n <= c < BK` and for `e` up to `width` rounded to even.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_t<K: Kern, T: Float>(
    src: &Strided<T>,
    b: usize,
    h: usize,
    c0: usize,
    n: usize,
    width: usize,
    bk: usize,
    dst: &mut [K::E],
) {
    let pair = K::PAIR;
    let grid = (bk, width.next_multiple_of(2));
    let at = |c: usize, e: usize| ((e / pair) * bk + c) * pair + e % pair;
    scatter_rows::<K, T>(src, b, h, c0, n, width, grid, dst, at);
}

/// Writes `src[r * ld + c] * factor` to `dst[b, h, r0 + r, c]` for `r < rows`, `c < width`.
///
/// # Safety
/// The rows must be in range of `dst` and written by no other thread.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn write_rows<T: Float, A: Acc>(
    dst: &Strided<T>,
    b: usize,
    h: usize,
    r0: usize,
    rows: usize,
    width: usize,
    src: &[A],
    ld: usize,
    factor: A,
) {
    if width == 0 {
        return;
    }
    for r in 0..rows {
        // SAFETY: in range by the caller's promise; the view has no internal overlap (validated), so these
        // elements belong to this item alone.
        unsafe {
            let p = dst.at(b, h, r0 + r, 0);
            for (c, &x) in src[r * ld..r * ld + width].iter().enumerate() {
                p.offset(c as isize * dst.st[3])
                    .write((x * factor).write::<T>());
            }
        }
    }
}

/// Turns the raw scores `q·k` in `p` (rows `q0..q0+m` of head `h`, kv tile `c0..c0+n`) into final logits:
/// scale, softcap (its derivative `1 - t²` into `g`), bias, and `-inf` for hidden pairs and padding columns.
/// `vis` must hold the tile's visibility when `cls` is partial.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn logits<T, A: Acc>(
    job: &Job<T, A>,
    p: &mut [A],
    g: &mut [A],
    vis: &[u8],
    brow: &mut [A],
    b: usize,
    h: usize,
    q0: usize,
    m: usize,
    c0: usize,
    n: usize,
    cls: BlockClass,
) {
    let bk = job.bk;
    for r in 0..m {
        let x = &mut p[r * bk..(r + 1) * bk];
        let scale = job.scale;
        x.iter_mut().for_each(|v| *v = *v * scale);
        if let Some((c, ic)) = job.softcap {
            for (v, gg) in x.iter_mut().zip(&mut g[r * bk..(r + 1) * bk]) {
                let t = (*v * ic).tanh();
                *v = c * t;
                *gg = A::ONE - t * t;
            }
        }
        if let Some(bias) = &job.bias {
            // SAFETY: (b, h, q0 + r) is in range of [B, H, Q] and c0 + n <= K.
            unsafe { bias.row(b, h, q0 + r, c0, &mut brow[..n], A::from_f64) };
            for (v, &bv) in x[..n].iter_mut().zip(&brow[..n]) {
                *v = *v + bv;
            }
        }
        if cls == BlockClass::Partial {
            for (v, &seen) in x[..n].iter_mut().zip(&vis[r * n..(r + 1) * n]) {
                if seen == 0 {
                    *v = A::NEG_INF;
                }
            }
        }
        x[n..].fill(A::NEG_INF);
    }
}

/// Recomputes `P` and `dS` of one (query tile, kv tile) pair into `sc.p` and `sc.ds` from the row-major
/// query and dO operand rows `qa`, `doa` of the tile and the packed `kt`, `vt` (and `vis` for a partial
/// tile); writes the tile of `grad_bias` when `write_bias`. With dropout, `sc.p` ends as the dropped weights
/// (for dV).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile<T, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    qa: &[K::E],
    doa: &[K::E],
    b: usize,
    h: usize,
    q0: usize,
    m: usize,
    c0: usize,
    n: usize,
    cls: BlockClass,
    write_bias: bool,
) {
    let Dims { d, dv, .. } = job.dims;
    let (dp, dvp, pair, bk) = (job.dp, job.dvp, K::PAIR, job.bk);
    let Scratch {
        kt,
        vt,
        p,
        ds,
        g,
        vis,
        brow,
        ..
    } = sc;
    let p = &mut p[..m * bk];
    mm::<K>(m, bk, d.div_ceil(pair), qa, dp, kt, bk, p, bk, false);
    logits(job, p, g, vis, brow, b, h, q0, m, c0, n, cls);
    for r in 0..m {
        let row = job.row(b, h, q0 + r);
        let (shift, norm) = (job.shift[row], job.norm[row]);
        let x = &mut p[r * bk..(r + 1) * bk];
        if shift.is_finite() {
            x.iter_mut()
                .for_each(|v| *v = (*v - shift).exp_nonpos() * norm);
        } else {
            x.fill(K::A::ZERO);
        }
    }
    let ds = &mut ds[..m * bk];
    mm::<K>(m, bk, dv.div_ceil(pair), doa, dvp, vt, bk, ds, bk, false);
    for r in 0..m {
        let delta = job.delta[job.row(b, h, q0 + r)];
        let pr = &mut p[r * bk..(r + 1) * bk];
        let dr = &mut ds[r * bk..(r + 1) * bk];
        if let Some(drop) = &job.drop {
            // The forward used P∘M/(1-p) (M the keep pattern): dP = (dO·Vᵀ)∘M/(1-p), and dV takes the same
            // dropped weights, so P is overwritten once dS no longer needs it.
            let (key, kept_scale) = (drop.row(b, h, q0 + r), K::A::from_f64(drop.scale));
            for (c, (x, pv)) in dr[..n].iter_mut().zip(pr.iter_mut()).enumerate() {
                let (dpv, pval) = if key.kept(c0 + c) {
                    (*x * kept_scale, *pv * kept_scale)
                } else {
                    (K::A::ZERO, K::A::ZERO)
                };
                *x = *pv * (dpv - delta);
                *pv = pval;
            }
            dr[n..].fill(K::A::ZERO);
        } else {
            for (x, &pv) in dr.iter_mut().zip(pr.iter()) {
                *x = pv * (*x - delta);
            }
        }
        if write_bias {
            if let Some(gb) = &job.grad_bias {
                // SAFETY: (b, h, q0 + r, c0..c0 + n) is in range; this kv tile's columns belong to this item.
                unsafe { gb.write_row([b, h, q0 + r, c0], &dr[..n]) };
            }
        }
        if job.softcap.is_some() {
            for (x, &gv) in dr.iter_mut().zip(&g[r * bk..(r + 1) * bk]) {
                *x = *x * gv;
            }
        }
    }
}

/// `dq[r] += Σ_c dS[r][c] K[c]` for the tile's `m` rows over its `n` kv columns (scale applied later).
#[inline(always)]
fn add_dq<K: Kern>(sc: &mut Scratch<K>, bk: usize, dp: usize, m: usize, n: usize, dq: &mut [K::A]) {
    let cols = n.next_multiple_of(K::PAIR);
    for (row, src) in sc
        .ds_e
        .chunks_exact_mut(bk)
        .zip(sc.ds.chunks_exact(bk))
        .take(m)
    {
        for (x, &y) in row[..cols].iter_mut().zip(&src[..cols]) {
            *x = K::to_e(y);
        }
    }
    mm::<K>(
        m,
        dp,
        n.div_ceil(K::PAIR),
        &sc.ds_e,
        bk,
        &sc.kr,
        dp,
        dq,
        dp,
        true,
    );
}

/// dK and dV of kv tile `kb` of `(b, kvh)`, over every query tile of every head of the group, whose query
/// and dO rows are packed in `rows` (`[G][Q'][..]`, or tile by tile when `rows.per_tile`). With `dq`
/// (`[G][Q'][dp]`, this group's rows of one partial dQ), also adds this kv tile's share of dQ into it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn kv_body<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    kvh: usize,
    kb: usize,
    mut dq: Option<&mut [K::A]>,
) {
    let Dims { g, q, k, d, dv, .. } = job.dims;
    let (dp, dvp, pair, bk) = (job.dp, job.dvp, K::PAIR, job.bk);
    let qpad = q.next_multiple_of(2);
    let c0 = kb * bk;
    let n = (k - c0).min(bk);
    pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
    pack_t::<K, T>(&job.v, b, kvh, c0, n, dv, bk, &mut sc.vt);
    if dq.is_some() {
        pack_b_rows::<K, T>(&job.k, b, kvh, c0, n, d, dp, &mut sc.kr);
    }
    sc.acc_k[..bk * dp].fill(K::A::ZERO);
    sc.acc_v[..bk * dvp].fill(K::A::ZERO);
    for gi in 0..g {
        let h = kvh * g + gi;
        for qb in 0..job.nqb() {
            let q0 = qb * BQ;
            let m = (q - q0).min(BQ);
            let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
            if cls == BlockClass::Empty {
                if let Some(gb) = &job.grad_bias {
                    for r in 0..m {
                        // SAFETY: in range; this kv tile's columns belong to this item.
                        unsafe { gb.write_row([b, h, q0 + r, c0], &sc.zeros[..n]) };
                    }
                }
                continue;
            }
            if cls == BlockClass::Partial {
                job.mask
                    .fill(b, h, q0..q0 + m, c0..c0 + n, &mut sc.vis[..m * n]);
            }
            let at = if rows.per_tile {
                rows.pack::<K, T>(job, b, h, q0, m, 0, true);
                0
            } else {
                gi * qpad + q0
            };
            let (qa, doa) = (&rows.q[at * dp..], &rows.dout[at * dvp..]);
            tile::<T, K>(job, sc, qa, doa, b, h, q0, m, c0, n, cls, true);
            // dV[c] += Σ_r P[r][c] dO[r];  dK[c] += Σ_r dS[r][c] Q[r]  (scale applied at the end).
            transpose::<K>(&sc.p, bk, m, n, &mut sc.stage, &mut sc.pt);
            transpose::<K>(&sc.ds, bk, m, n, &mut sc.stage, &mut sc.dst);
            let kp = m.div_ceil(pair);
            let (q_b, dout_b) = rows.b_rows(pair);
            let (qr, dor) = (&q_b[at * dp..], &dout_b[at * dvp..]);
            mm::<K>(n, dvp, kp, &sc.pt, BQ, dor, dvp, &mut sc.acc_v, dvp, true);
            mm::<K>(n, dp, kp, &sc.dst, BQ, qr, dp, &mut sc.acc_k, dp, true);
            if let Some(dq) = dq.as_deref_mut() {
                add_dq(sc, bk, dp, m, n, &mut dq[(gi * qpad + q0) * dp..]);
            }
        }
    }
    // SAFETY: rows c0..c0 + n of (b, kvh) are in range and belong to this item alone.
    unsafe {
        write_rows(&job.dk, b, kvh, c0, n, d, &sc.acc_k, dp, job.scale);
        write_rows(&job.dv, b, kvh, c0, n, dv, &sc.acc_v, dvp, K::A::ONE);
    }
}

/// Second pass: dQ of query tile `qb` of `(b, h)`, over every kv tile.
#[inline(always)]
fn q_body<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    h: usize,
    qb: usize,
) {
    let Dims { g, q, k, d, dv, .. } = job.dims;
    let (dp, bk) = (job.dp, job.bk);
    let kvh = h / g;
    let q0 = qb * BQ;
    let m = (q - q0).min(BQ);
    rows.pack::<K, T>(job, b, h, q0, m, 0, true);
    sc.acc_k[..BQ * dp].fill(K::A::ZERO);
    for kb in 0..job.nkb() {
        let c0 = kb * bk;
        let n = (k - c0).min(bk);
        let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
        if cls == BlockClass::Empty {
            continue;
        }
        pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
        pack_t::<K, T>(&job.v, b, kvh, c0, n, dv, bk, &mut sc.vt);
        pack_b_rows::<K, T>(&job.k, b, kvh, c0, n, d, dp, &mut sc.kr);
        if cls == BlockClass::Partial {
            job.mask
                .fill(b, h, q0..q0 + m, c0..c0 + n, &mut sc.vis[..m * n]);
        }
        tile::<T, K>(job, sc, &rows.q, &rows.dout, b, h, q0, m, c0, n, cls, false);
        let mut acc = std::mem::take(&mut sc.acc_k);
        add_dq(sc, bk, dp, m, n, &mut acc);
        sc.acc_k = acc;
    }
    // SAFETY: rows q0..q0 + m of (b, h) are in range and belong to this item alone.
    unsafe { write_rows(&job.dq, b, h, q0, m, d, &sc.acc_k, dp, job.scale) };
}

// The per-ISA entry points: the generic bodies above as [`Body`]s, compiled inside the target features of the
// micro-kernel `K` (so their element-wise loops vectorise for the ISA too).

struct KvItem<'a, 'j, T, K: Kern> {
    job: &'a Job<'j, T, K::A>,
    sc: &'a mut Scratch<K>,
    rows: &'a mut Packed<K::E>,
    b: usize,
    kvh: usize,
    kb: usize,
    dq: Option<&'a mut [K::A]>,
}

impl<T: Float, K: Kern> Body for KvItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        kv_body::<T, K>(
            self.job, self.sc, self.rows, self.b, self.kvh, self.kb, self.dq,
        )
    }
}

struct QItem<'a, 'j, T, K: Kern> {
    job: &'a Job<'j, T, K::A>,
    sc: &'a mut Scratch<K>,
    rows: &'a mut Packed<K::E>,
    b: usize,
    h: usize,
    qb: usize,
}

impl<T: Float, K: Kern> Body for QItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        q_body::<T, K>(self.job, self.sc, self.rows, self.b, self.h, self.qb)
    }
}

struct StatsItem<'a, 'j, T, K: Kern> {
    job: &'a Job<'j, T, K::A>,
    sc: &'a mut Scratch<K>,
    rows: &'a mut Packed<K::E>,
    b: usize,
    h: usize,
    shift: &'a mut [K::A],
    norm: &'a mut [K::A],
    delta: &'a mut [K::A],
}

impl<T: Float, K: Kern> Body for StatsItem<'_, '_, T, K> {
    type Out = ();
    #[inline(always)]
    fn run(self) {
        row_stats::<T, K>(
            self.job, self.sc, self.rows, self.b, self.h, self.shift, self.norm, self.delta,
        )
    }
}

/// Saved lse values at least this large in magnitude are too coarse in f32 to recover `P` from (their ulp
/// is 2^-13 or more): such rows (in practice, rows whose every logit is ~`finfo.min`) are recomputed.
const LSE_RECOMPUTE: f32 = 1024.0;

/// `Δ` of every row of `(b, h)`, and how to form its `P` (see [`Job::shift`]): from the saved lse, or, for
/// f64 inputs and rows whose saved lse is too coarse, recomputed as `(max, 1 / sum)` in `A`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_stats<T: Float, K: Kern>(
    job: &Job<T, K::A>,
    sc: &mut Scratch<K>,
    rows: &mut Packed<K::E>,
    b: usize,
    h: usize,
    shift: &mut [K::A],
    norm: &mut [K::A],
    delta: &mut [K::A],
) {
    type A<K> = <K as Kern>::A;
    let Dims { q, k, d, dv, g, .. } = job.dims;
    // f64 inputs recompute every row: the f32 lse would cap the f64 gradients' accuracy at ~1e-7.
    let mut redo = vec![!A::<K>::IS_F32; q];
    for i in 0..q {
        let mut acc = A::<K>::ZERO;
        for c in 0..dv {
            // SAFETY: (b, h, i, c) is in range of out and grad_out.
            let (o, go) = unsafe {
                (
                    job.out.at(b, h, i, c).read(),
                    job.dout.at(b, h, i, c).read(),
                )
            };
            acc = acc + A::<K>::read(o) * A::<K>::read(go);
        }
        if let Some(g) = &job.grad_lse {
            // SAFETY: (b, h, i) is in range of grad_lse (checked [B, H, Q]; its fourth stride is 0).
            acc = acc - A::<K>::from_f64(f64::from(unsafe { g.at(b, h, i, 0).read() }));
        }
        delta[i] = acc;
        // SAFETY: (b, h, i) is in range of lse (its fourth stride is 0).
        let l = unsafe { job.lse_in.at(b, h, i, 0).read() };
        shift[i] = A::<K>::from_f64(f64::from(l));
        norm[i] = A::<K>::ONE;
        redo[i] |= l.is_finite() && l.abs() >= LSE_RECOMPUTE;
    }
    // Online (max, sum) over the visible logits, then the sink.
    let (dp, kvh, bk) = (job.dp, h / g, job.bk);
    for qb in 0..job.nqb() {
        let q0 = qb * BQ;
        let m = (q - q0).min(BQ);
        if !redo[q0..q0 + m].contains(&true) {
            continue;
        }
        rows.pack::<K, T>(job, b, h, q0, m, 0, false);
        let mut mx = [A::<K>::NEG_INF; BQ];
        let mut sum = [A::<K>::ZERO; BQ];
        for kb in 0..job.nkb() {
            let c0 = kb * bk;
            let n = (k - c0).min(bk);
            let cls = job.mask.classify(b, h, q0..q0 + m, c0..c0 + n);
            if cls == BlockClass::Empty {
                continue;
            }
            pack_t::<K, T>(&job.k, b, kvh, c0, n, d, bk, &mut sc.kt);
            if cls == BlockClass::Partial {
                job.mask
                    .fill(b, h, q0..q0 + m, c0..c0 + n, &mut sc.vis[..m * n]);
            }
            let p = &mut sc.p[..m * bk];
            mm::<K>(
                m,
                bk,
                d.div_ceil(K::PAIR),
                &rows.q,
                dp,
                &sc.kt,
                bk,
                p,
                bk,
                false,
            );
            logits(
                job,
                p,
                &mut sc.g,
                &sc.vis,
                &mut sc.brow,
                b,
                h,
                q0,
                m,
                c0,
                n,
                cls,
            );
            for r in 0..m {
                let x = &p[r * bk..(r + 1) * bk];
                let top = x.iter().fold(A::<K>::NEG_INF, |a, &v| a.max(v));
                if top == A::<K>::NEG_INF {
                    continue;
                }
                let new = mx[r].max(top);
                let mut s = if mx[r] == A::<K>::NEG_INF {
                    A::<K>::ZERO
                } else {
                    sum[r] * (mx[r] - new).exp_nonpos()
                };
                for &v in x {
                    s = s + (v - new).exp_nonpos();
                }
                (mx[r], sum[r]) = (new, s);
            }
        }
        let sink = job.sinks.as_ref().map(|s| A::<K>::from_f64(s[h]));
        for r in (0..m).filter(|&r| redo[q0 + r]) {
            let (mut top, mut s) = (mx[r], sum[r]);
            if let Some(sk) = sink.filter(|&sk| sk > A::<K>::NEG_INF) {
                let new = top.max(sk);
                let kept = if top == A::<K>::NEG_INF {
                    A::<K>::ZERO
                } else {
                    s * (top - new).exp_nonpos()
                };
                (top, s) = (new, kept + (sk - new).exp_nonpos());
            }
            shift[q0 + r] = top;
            norm[q0 + r] = if top == A::<K>::NEG_INF {
                A::<K>::ONE
            } else {
                s.recip()
            };
        }
    }
}

/// The key tile width for this call: [`BK_MAX`] unless the mask's partial tiles would make the kernel
/// compute over 5% more pairs than at [`BK_MIN`] (sliding windows and short documents keep 64). Judged on
/// batch 0, head 0 and at most 256 query tiles spread over the rows; it depends on the inputs alone, never
/// on the thread count.
fn kv_tile_width(mask: &dyn MaskTiles, dims: &Dims) -> usize {
    let Dims { b, h, q, k, .. } = *dims;
    if b == 0 || h == 0 || q == 0 || k == 0 {
        return BK_MIN;
    }
    let nqb = q.div_ceil(BQ);
    let area = |bk: usize| -> usize {
        let mut total = 0;
        for qb in (0..nqb).step_by(nqb.div_ceil(256)) {
            let rows = qb * BQ..(qb * BQ + BQ).min(q);
            for t in 0..k.div_ceil(bk) {
                let cols = t * bk..(t * bk + bk).min(k);
                if mask.classify(0, 0, rows.clone(), cols.clone()) != BlockClass::Empty {
                    total += cols.len();
                }
            }
        }
        total
    };
    if area(BK_MAX) * 20 <= area(BK_MIN) * 21 {
        BK_MAX
    } else {
        BK_MIN
    }
}

/// How dQ is formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))] // the forced paths are for tests
pub(crate) enum DqPath {
    /// [`DqPath::Split`] when the partial dQs fit [`SPLIT_BUDGET`], else [`DqPath::TwoPass`]; decided by
    /// the shapes alone, so the result never depends on the thread count.
    Auto,
    /// A second pass over query tiles recomputes `P` and `dS` (no extra memory, two more products).
    TwoPass,
    /// The kv pass also forms dQ, into this many partial buffers summed in a fixed order.
    Split(usize),
}

/// Bytes the partial dQs of [`DqPath::Split`] may take.
const SPLIT_BUDGET: usize = 256 << 20;
/// Most partial dQs (more would use more memory).
const SPLIT_MAX: usize = 4;
/// Work items the split path aims for: below this many `(b, kv head)` pairs, the kv tiles are split into
/// up to [`SPLIT_MAX`] chunks. A constant, not the thread count, so that gradients never depend on it; each
/// extra chunk costs a partial dQ and another packing of the group's rows, so no more are made than needed.
const SPLIT_ITEMS: usize = 8;

/// The number of partial dQs [`DqPath::Auto`] uses, or `None` for the two-pass path.
fn split_chunks(dims: &Dims, dp: usize, elem: usize, nkb: usize) -> Option<usize> {
    let bytes = dims.b * dims.h * dims.q * dp * elem;
    if bytes == 0 || nkb == 0 {
        return None;
    }
    let wanted = SPLIT_ITEMS.div_ceil(dims.b * dims.hkv).min(SPLIT_MAX);
    let chunks = (SPLIT_BUDGET / bytes).min(wanted).min(nkb);
    (chunks >= 1).then_some(chunks)
}

/// Runs the call on inputs of type `T` with micro-kernel `K` (whose features the CPU has: see
/// [`backward_with`]).
fn run<T: Float, K: Isa>(args: &AttentionGradArgs, chk: &Checked, tuning: Resolved) -> Result<()> {
    let (strategy, bk) = (tuning.dq, tuning.bk);
    type A<K> = <K as Kern>::A;
    let dims = chk.dims;
    let mut job = Job::<T, A<K>> {
        dims,
        q: Strided::of(args.query),
        k: Strided::of(args.key),
        v: Strided::of(args.value),
        out: Strided::of(args.out),
        dout: Strided::of(args.grad_out),
        lse_in: Strided::of(args.lse),
        grad_lse: args.grad_lse.map(Strided::of),
        dq: Strided::of(args.grad_query),
        dk: Strided::of(args.grad_key),
        dv: Strided::of(args.grad_value),
        bias: args.bias.zip(chk.bias_strides).map(|(t, st)| BiasRef {
            ptr: t.as_ptr(),
            dtype: t.dtype(),
            st,
        }),
        grad_bias: args.grad_bias.map(AnyOut::of),
        sinks: args.sinks.map(read_sinks),
        mask: args.mask,
        scale: A::<K>::from_f64(args.scale),
        softcap: args
            .softcap
            .map(|c| (A::<K>::from_f64(c), A::<K>::from_f64(1.0 / c))),
        drop: DropMask::new(args.dropout, dims.h, dims.q),
        shift: Vec::new(),
        norm: Vec::new(),
        delta: Vec::new(),
        dp: dims.d.div_ceil(16) * 16,
        dvp: dims.dv.div_ceil(16) * 16,
        bk,
    };
    let Dims {
        b: nb, h, hkv, q, ..
    } = dims;
    let zero = A::<K>::ZERO;
    let init = |job: &Job<T, A<K>>| (Scratch::<K>::new(job), Packed::<K::E>::new());
    threads::install(chk.threads, || {
        let rows = nb * h * q;
        let mut shift = vec![zero; rows];
        let mut norm = vec![zero; rows];
        let mut delta = vec![zero; rows];
        if q > 0 {
            shift
                .par_chunks_mut(q)
                .zip(norm.par_chunks_mut(q))
                .zip(delta.par_chunks_mut(q))
                .enumerate()
                .for_each_init(
                    || init(&job),
                    |(sc, pk), (bh, ((s, nm), dl))| {
                        // SAFETY: `K` is only chosen when the CPU has its features (`backward_with`).
                        unsafe {
                            K::enter(StatsItem::<T, K> {
                                job: &job,
                                sc,
                                rows: pk,
                                b: bh / h,
                                h: bh % h,
                                shift: s,
                                norm: nm,
                                delta: dl,
                            })
                        }
                    },
                );
        }
        (job.shift, job.norm, job.delta) = (shift, norm, delta);
        let job = &job;
        if let (Some(gs), Some(sinks)) = (args.grad_sinks.map(AnyOut::of), &job.sinks) {
            for (hh, &sink) in sinks.iter().enumerate() {
                let mut acc = 0.0f64;
                for b in 0..nb {
                    for i in 0..q {
                        let row = job.row(b, hh, i);
                        let shift = job.shift[row].to_f64();
                        if shift.is_finite() {
                            acc += (sink - shift).exp()
                                * job.norm[row].to_f64()
                                * job.delta[row].to_f64();
                        }
                    }
                }
                let grad = if acc == 0.0 { 0.0 } else { -acc };
                // SAFETY: hh < H, the only dim of grad_sinks; this thread is its only writer.
                unsafe { gs.write_row([hh, 0, 0, 0], &[grad]) };
            }
        }
        let nkb = job.nkb();
        let chunks = match strategy {
            DqPath::Auto => split_chunks(&dims, job.dp, std::mem::size_of::<A<K>>(), nkb),
            DqPath::TwoPass => None,
            DqPath::Split(p) => Some(p.clamp(1, nkb.max(1))),
        };
        let (g, qpad) = (dims.g, q.next_multiple_of(2));
        // The query and dO rows of one GQA group, packed once per item (when they fit the budget).
        let whole_group = Packed::<K::E>::group_fits::<K, T>(job, tuning.pack_budget);
        let pack_group = |pk: &mut Packed<K::E>, b: usize, kvh: usize| {
            pk.per_tile = !whole_group;
            if whole_group {
                for gi in 0..g {
                    pk.pack::<K, T>(job, b, kvh * g + gi, 0, q, gi * qpad, true);
                }
            }
        };
        let per = g * qpad * job.dp; // one group's rows of one partial dQ
        if chunks == Some(1) && per > 0 && nkb > 0 {
            // One pass, one item per (b, kvh): the item owns its group's dQ rows outright, so it accumulates
            // them in a buffer of its own (reused across items) and writes them when done.
            (0..nb * hkv).into_par_iter().for_each_init(
                || (init(job), vec![zero; per]),
                |((sc, pk), dq), bh| {
                    let (b, kvh) = (bh / hkv, bh % hkv);
                    pack_group(pk, b, kvh);
                    dq.fill(zero);
                    for kb in 0..nkb {
                        // SAFETY: as above.
                        unsafe {
                            K::enter(KvItem::<T, K> {
                                job,
                                sc,
                                rows: pk,
                                b,
                                kvh,
                                kb,
                                dq: Some(&mut dq[..]),
                            })
                        };
                    }
                    for gi in 0..g {
                        let rows = &dq[gi * qpad * job.dp..];
                        // SAFETY: rows 0..Q of (b, kvh * g + gi) are in range and belong to this item alone.
                        unsafe {
                            write_rows(
                                &job.dq,
                                b,
                                kvh * g + gi,
                                0,
                                q,
                                dims.d,
                                rows,
                                job.dp,
                                job.scale,
                            )
                        };
                    }
                },
            );
            return;
        }
        if let Some(chunks) = chunks.filter(|_| per > 0 && nkb > 0) {
            // One pass: item (chunk, b, kvh) owns kv tiles kb ≡ chunk (mod chunks) (interleaved, so causal
            // work is balanced) and its own partial dQ; the partials are summed in chunk order.
            let mut part = vec![zero; chunks * nb * hkv * per];
            part.par_chunks_mut(per).enumerate().for_each_init(
                || init(job),
                |(sc, pk), (idx, dq)| {
                    let (chunk, bh) = (idx / (nb * hkv), idx % (nb * hkv));
                    pack_group(pk, bh / hkv, bh % hkv);
                    for kb in (chunk..nkb).step_by(chunks) {
                        // SAFETY: as above.
                        unsafe {
                            K::enter(KvItem::<T, K> {
                                job,
                                sc,
                                rows: pk,
                                b: bh / hkv,
                                kvh: bh % hkv,
                                kb,
                                dq: Some(&mut *dq),
                            })
                        };
                    }
                },
            );
            let part = &part;
            (0..nb * h).into_par_iter().for_each(|bh| {
                let (b, hh) = (bh / h, bh % h);
                let (kvh, gi) = (hh / g, hh % g);
                let mut acc = vec![zero; q * job.dp];
                for chunk in 0..chunks {
                    let base = ((chunk * nb + b) * hkv + kvh) * per + gi * qpad * job.dp;
                    for (x, &y) in acc.iter_mut().zip(&part[base..base + q * job.dp]) {
                        *x = *x + y;
                    }
                }
                // SAFETY: rows 0..Q of (b, hh) are in range and belong to this item alone.
                unsafe { write_rows(&job.dq, b, hh, 0, q, dims.d, &acc, job.dp, job.scale) };
            });
            return;
        }
        (0..nb * hkv * nkb).into_par_iter().for_each_init(
            || (init(job), usize::MAX),
            |((sc, pk), packed_for), idx| {
                let (bh, kb) = (idx / nkb, idx % nkb);
                if *packed_for != bh {
                    pack_group(pk, bh / hkv, bh % hkv);
                    *packed_for = bh;
                }
                // SAFETY: as above.
                unsafe {
                    K::enter(KvItem::<T, K> {
                        job,
                        sc,
                        rows: pk,
                        b: bh / hkv,
                        kvh: bh % hkv,
                        kb,
                        dq: None,
                    })
                };
            },
        );
        let nqb = job.nqb();
        // Largest first: under a causal mask the last query tiles see the most keys.
        (0..nb * h * nqb).into_par_iter().for_each_init(
            || init(job),
            |(sc, pk), idx| {
                let (bh, qb) = (idx / nqb, nqb - 1 - idx % nqb);
                // SAFETY: as above.
                unsafe {
                    K::enter(QItem::<T, K> {
                        job,
                        sc,
                        rows: pk,
                        b: bh / h,
                        h: bh % h,
                        qb,
                    })
                };
            },
        );
    })
}

#[cfg(test)]
#[path = "backward_tests.rs"]
mod tests;
