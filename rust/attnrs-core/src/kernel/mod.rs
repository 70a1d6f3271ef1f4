//! The CPU attention kernel: forward (prefill) and split-KV decode.
//!
//! One entry point, [`attention_forward`], computes
//!
//! ```text
//! s[b,h,i,j]   = scale * q[b,h,i,:] · k[b,h/G,j,:]            (G = H / Hkv query heads per kv head)
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
//! ([`MaskTiles`]) is asked for the tile's class: empty tiles are skipped, full tiles run with no mask work,
//! partial tiles get their visibility bytes. `S = Q·Kᵀ` and `O += P·V` run on a register-blocked micro-kernel
//! ([`gemm`]) over packed operands; every variant shares one online-softmax step ([`softmax`]). When there
//! is a single query block per kv head (decode: few query rows), the KV length is split across threads and
//! the partial results are merged by their log-sum-exp.
//!
//! Dtypes: q, k, v and out share one of f32, bf16, f16 (computed with f32 accumulators) or f64 (computed in
//! f64 throughout: the reference / gradcheck path). ISA: AVX-512F (f32 micro-kernel), AVX-512 BF16
//! (`vdpbf16ps` for both products when the inputs are bf16), AVX2+FMA, and a portable path that is correct
//! everywhere. The CPU is inspected once ([`Isa::get`]); [`attention_forward_with`] forces a path (tests).

mod backward;
#[cfg(target_arch = "x86_64")]
mod decode;
mod driver;
mod dropout;
mod gemm;
mod plan;
mod softmax;

#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use backward::{attention_backward, attention_backward_with, AttentionGradArgs};
pub use dropout::{keep_pattern, Dropout};

use crate::block::MaskTiles;
use crate::isa::Isa;
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
    /// `s = c * tanh(s / c)` after scaling, before bias and mask; `c` must be finite and positive.
    pub softcap: Option<f64>,
    /// Optional `[H]` of any float dtype: `exp(sink_h)` joins each row's softmax denominator (GPT-OSS sinks).
    pub sinks: Option<&'a TensorView>,
    /// Optional dropout on the normalised weights (see [`Dropout`]): dropped weights are zeroed, kept ones
    /// scaled by `1 / (1 - p)`; `lse` is not affected.
    pub dropout: Option<Dropout>,
    /// Worker threads (a private pool; 0 means 1).
    pub num_threads: usize,
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
            .field("sinks", &self.sinks.map(|t| t.shape().to_vec()))
            .field("dropout", &self.dropout)
            .field("num_threads", &self.num_threads)
            .finish_non_exhaustive()
    }
}

/// Which micro-kernels to run. [`Backend::Auto`] picks the best the CPU has; the others force a path and
/// fail with [`Error::Unsupported`] when the CPU lacks it. f64 inputs always run the portable f64 path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Backend {
    /// The best available path (AVX-512 BF16 for bf16 inputs, then AVX-512F, then AVX2+FMA, then portable).
    #[default]
    Auto,
    /// Plain Rust, no `target_feature`: correct on every CPU.
    Portable,
    /// AVX2 + FMA, f32 accumulation.
    Avx2,
    /// AVX-512F, f32 accumulation (bf16 inputs are widened to f32).
    Avx512,
    /// AVX-512 BF16 dot products for bf16 inputs (other dtypes run [`Backend::Avx512`]).
    Avx512Bf16,
}

impl Backend {
    /// The concrete path `self` resolves to on this CPU for inputs of `dtype`.
    pub fn resolve(self, dtype: DType) -> Result<Backend> {
        let isa = Isa::get();
        let avx2 = isa.avx2 && isa.fma;
        let missing =
            |what: &str| Err(Error::Unsupported(format!("the {what} kernel on this CPU")));
        let chosen = match self {
            Backend::Auto if isa.avx512bf16 && dtype == DType::BF16 => Backend::Avx512Bf16,
            Backend::Auto if isa.avx512f => Backend::Avx512,
            Backend::Auto if avx2 => Backend::Avx2,
            Backend::Auto | Backend::Portable => Backend::Portable,
            Backend::Avx2 if avx2 => Backend::Avx2,
            Backend::Avx512 if isa.avx512f => Backend::Avx512,
            Backend::Avx512Bf16 if isa.avx512bf16 && dtype == DType::BF16 => Backend::Avx512Bf16,
            Backend::Avx512Bf16 if isa.avx512bf16 => Backend::Avx512,
            Backend::Avx2 => return missing("AVX2+FMA"),
            Backend::Avx512 => return missing("AVX-512F"),
            Backend::Avx512Bf16 => return missing("AVX-512 BF16"),
        };
        Ok(if dtype == DType::F64 {
            Backend::Portable
        } else {
            chosen
        })
    }
}

/// Computes attention (see the module docs) into `args.out` (and `args.lse`), on the best path for this CPU.
///
/// Every argument is validated first; a bad one yields an [`Error`] naming it and nothing is written.
pub fn attention_forward(args: &AttentionArgs) -> Result<()> {
    attention_forward_with(args, Backend::Auto)
}

/// [`attention_forward`] on a chosen [`Backend`].
pub fn attention_forward_with(args: &AttentionArgs, backend: Backend) -> Result<()> {
    let plan = plan::Plan::new(args)?;
    let backend = backend.resolve(plan.dtype)?;
    if plan.dims.is_empty() {
        return Ok(());
    }
    driver::run(args, &plan, backend, driver::ROWS)
}
