//! The CPU attention kernel: forward (prefill and split-KV decode) and backward.
//!
//! One entry point, [`attention_forward`], computes
//!
//! ```text
//! s[b,h,i,j]   = scale * q[b,h,i,:] · k[b,h/G,j,:]            (G = H / Hkv query heads per kv head)
//! s            = head_scale[h] * s + distance[h, j - i + Q - 1] + key[b, h, j]   (score-mod terms, if any:
//!                                                                 see `score`)
//! s            = softcap * tanh(s / softcap)                    (when softcap is given)
//! s            = s + bias[b,h,i,j]                              (when bias is given; -inf excludes the pair)
//! s            = -inf where the mask hides (i, j)
//! out[b,h,i,:] = Σ_j exp(s_ij - m) v[b,h/G,j,:] / (Σ_j exp(s_ij - m) + exp(sink_h - m))
//!                (with dropout: each term of the numerator kept with probability 1 - p, scaled by 1/(1-p))
//! lse[b,h,i]   = ln(Σ_j exp(s_ij) + exp(sink_h))
//! ```
//!
//! How it runs: work items are (batch, kv head, query block); the query rows of all `G` heads of a GQA group
//! are stacked into one block so every packed K/V tile serves all of them. For each kv tile the mask
//! ([`crate::mask::tiles::MaskTiles`]) is asked for the tile's class: empty tiles are skipped, full tiles
//! run with no mask work, partial tiles get their visibility bytes. `S = Q·Kᵀ` and `O += P·V` run on a register-blocked micro-kernel
//! ([`gemm`]) over packed operands; every variant shares one online-softmax step ([`softmax`]). When there
//! is a single query block per kv head (decode: few query rows), the KV length is split across threads and
//! the partial results are merged by their log-sum-exp.
//!
//! Dtypes: q, k, v and out share one of f32, bf16, f16 (computed with f32 accumulators) or f64 (computed in
//! f64 throughout: the reference / gradcheck path). ISA: AVX-512F (f32 micro-kernel), AVX-512 BF16
//! (`vdpbf16ps` for both products when the inputs are bf16), AVX2+FMA, and a portable path that is correct
//! everywhere. The CPU is inspected once ([`crate::isa::Isa::get`]); [`attention_forward_with`] forces a path (tests).
//!
//! Layout, by phase (each module's docs say what it owns):
//!
//! | module | owns |
//! |---|---|
//! | `args` | [`AttentionArgs`] and its one validation, [`AttentionArgs::check`] (every argument error message) |
//! | `dispatch` | [`Backend`], and the one dtype × ISA table every phase runs through |
//! | `gemm` | the micro-kernel trait and one file per ISA: `portable`, `avx2`, `avx512` |
//! | `pack` | strided input rows packed into operand layouts (forward K/V tiles, backward rows) |
//! | `ragged` | [`RaggedArgs`]: variable-length sequences and paged KV, checked; the per-sequence window mask |
//! | `score` | [`ScoreTerms`]: the score mod's operands (head scales, distance and key terms) as rows |
//! | `softmax` | the online-softmax step, finishing and merging rows |
//! | `dropout` | [`Dropout`], the keep pattern both passes regenerate |
//! | `strided` | typed raw views of validated tensors |
//! | `forward` | `tile` (shared per-tile step), `item` (packed path), `prefill`, `split_kv`, `decode_avx512` |
//! | `backward` | [`AttentionGradArgs`], `job`, `tile` (one query × key tile), `stats` (per-row Δ), `schedule` |
//! | `tests` | every kernel test: forward and backward against f64 references, errors, helpers |

mod args;
mod backward;
mod dispatch;
mod dropout;
mod forward;
mod gemm;
mod pack;
mod ragged;
mod score;
mod softmax;
mod strided;

#[cfg(test)]
mod tests;

pub use args::{AttentionArgs, Checked, F32Precision};
pub use backward::{AttentionGradArgs, attention_backward, attention_backward_with};
pub use dispatch::Backend;
pub use dropout::{Dropout, keep_pattern};
pub use ragged::RaggedArgs;
pub use score::ScoreTerms;

use crate::Result;

/// Computes attention (see the module docs) into `args.out` (and `args.lse`), on the best path for this CPU.
///
/// Every argument is validated first; a bad one yields an [`Error`] naming it and nothing is written.
pub fn attention_forward(args: &AttentionArgs) -> Result<()> {
    attention_forward_with(args, Backend::Auto)
}

/// [`attention_forward`] on a chosen [`Backend`].
pub fn attention_forward_with(args: &AttentionArgs, backend: Backend) -> Result<()> {
    let plan = args.check()?;
    let backend = backend.resolve_for(plan.dtype, args.f32_precision)?;
    if plan.dims.is_empty() {
        return Ok(());
    }
    forward::run(args, &plan, backend, forward::ROWS, None)
}

/// Attention over a ragged batch (see [`RaggedArgs`]): `args` holds batch-1 views (query and out
/// `[1, H, Tq, ·]`, lse `[1, H, Tq]`, key and value `[1, Hkv, Tk, ·]`), whose rows `ragged` splits into
/// sequences that never see each other; each sequence's mask is its bottom-right aligned window. `args.mask`
/// is not read (callers pass none); a bias, score terms and dropout are refused. Prefill items are query blocks
/// of every sequence together, so threads are balanced by tokens; decode (few rows per sequence) splits keys.
pub fn attention_forward_ragged(args: &AttentionArgs, ragged: &RaggedArgs) -> Result<()> {
    attention_forward_ragged_with(args, ragged, Backend::Auto)
}

/// [`attention_forward_ragged`] on a chosen [`Backend`].
pub fn attention_forward_ragged_with(
    args: &AttentionArgs,
    ragged: &RaggedArgs,
    backend: Backend,
) -> Result<()> {
    let plan = args.check()?;
    let refused = [
        ("bias", args.bias.is_some()),
        ("score_mod", !args.score.is_empty()),
        ("dropout_p", args.dropout.is_some()),
    ];
    if let Some((name, _)) = refused.iter().find(|(_, given)| *given) {
        return Err(crate::Error::value(
            *name,
            "none in a ragged (varlen) call",
            "given",
        ));
    }
    if plan.dims.b != 1 {
        let got = format!("batch size {}", plan.dims.b);
        return Err(crate::Error::shape(
            "query",
            "batch-1 views of packed rows",
            got,
        ));
    }
    let ragged = ragged.check(plan.dims.q, plan.dims.k)?;
    let backend = backend.resolve_for(plan.dtype, args.f32_precision)?;
    forward::run(args, &plan, backend, forward::ROWS, Some(&ragged))
}
