//! Score-mod terms: the canonical form the kernels evaluate inside their tile loops, with no `Q × K` tensor.
//!
//! Python's `attnrs.scores` values (ALiBi, T5-style relative biases, per-head scales, distance and document
//! tables, softcap) reduce to three small operands ([`ScoreTerms`]), built from their learned tables with torch
//! ops so that autograd reaches the tables through them:
//!
//! ```text
//! x[b,h,i,j] = head_scale[h] · s[b,h,i,j]                  (s = scale · q·k, the score a flex score_mod gets)
//!            + distance[h, j - i + Q - 1]                   (any function of the relative position, per head)
//!            + key[b, h, j]                                 (any function of the key, per batch and head)
//! x          = softcap · tanh(x / softcap)                  (when a softcap is given: applied last)
//! ```
//!
//! then the additive bias and the mask, as without terms. The distance operand has `Q + K - 1` entries per
//! head (`O(H·(Q+K))` memory): a row's terms over a tile are one contiguous slice of it, so adding them costs
//! one load and one add per logit. The backward returns the gradients of `distance` (summed over batch and
//! rows, deterministically: per-item partials reduced in a fixed order) and of `key` (per item, no reduction).

use std::any::Any;

use super::args::Dims;
use super::softmax::Acc;
use super::strided::BiasRef;
use crate::tensor::TensorView;
use crate::{Error, Result};

/// The score-mod operands of one call (see the module docs). All optional; any float dtype, any strides.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScoreTerms<'a> {
    /// `[H]`: multiplies head `h`'s scaled score.
    pub head_scale: Option<&'a TensorView>,
    /// `[H or 1, Q + K - 1]`: added to pair `(i, j)` at index `j - i + Q - 1`.
    pub distance: Option<&'a TensorView>,
    /// `[B or 1, H or 1, K]`: added to every pair with key `j`.
    pub key: Option<&'a TensorView>,
}

impl ScoreTerms<'_> {
    /// True when there are no terms (the score is the scaled `q·k`).
    pub fn is_empty(&self) -> bool {
        self.head_scale.is_none() && self.distance.is_none() && self.key.is_none()
    }

    /// The tensors, named, for the aliasing checks.
    pub(crate) fn named(&self) -> Vec<(&'static str, &TensorView)> {
        let mut v = Vec::new();
        v.extend(self.head_scale.map(|t| ("head_scale", t)));
        v.extend(self.distance.map(|t| ("score_distance", t)));
        v.extend(self.key.map(|t| ("score_key", t)));
        v
    }

    /// Dtypes and shapes against the call's sizes.
    pub(crate) fn check(&self, dims: &Dims) -> Result<()> {
        let Dims { b, h, q, k, .. } = *dims;
        if let Some(t) = self.head_scale {
            expect(
                t,
                "head_scale",
                &[&[h]],
                format!("[{h}] (one per query head)"),
            )?;
        }
        if let Some(t) = self.distance {
            let span = span(q, k);
            let want = format!("[{h} or 1, {span}] ([H or 1, Q + K - 1])");
            expect(t, "score_distance", &[&[h, span], &[1, span]], want)?;
        }
        if let Some(t) = self.key {
            let want = format!("[{b} or 1, {h} or 1, {k}] ([B or 1, H or 1, K])");
            let shapes: [&[usize]; 4] = [&[b, h, k], &[1, h, k], &[b, 1, k], &[1, 1, k]];
            expect(t, "score_key", &shapes, want)?;
        }
        Ok(())
    }
}

/// Entries per head of the distance operand: relative positions `j - i` from `-(Q - 1)` to `K - 1`.
pub(crate) fn span(q: usize, k: usize) -> usize {
    (q + k).saturating_sub(1)
}

fn expect(t: &TensorView, arg: &str, shapes: &[&[usize]], want: String) -> Result<()> {
    if !t.dtype().is_float() {
        return Err(Error::dtype(
            arg,
            super::args::FLOATS,
            t.dtype().torch_name(),
        ));
    }
    if shapes.contains(&t.shape()) {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("shape {want}"),
            format!("shape {:?}", t.shape()),
        ))
    }
}

/// The terms in the accumulator type, read once per call into contiguous rows.
#[derive(Debug)]
pub(crate) struct Terms<A> {
    head_scale: Option<Vec<A>>,
    /// `[dist_heads][span]`.
    distance: Option<Vec<A>>,
    dist_heads: usize,
    /// `[key_b][key_h][K]`.
    key: Option<Vec<A>>,
    key_b: usize,
    key_h: usize,
    q: usize,
    k: usize,
}

/// Reads a view of up to four dims, as `[d0, d1, d2, d3]` with leading 1s, into contiguous rows of `A`.
fn read_rows<A: Acc>(t: &TensorView, what: &str) -> Result<Vec<A>> {
    let n = t.ndim();
    let mut shape = [1usize; 4];
    let mut st = [0isize; 4];
    for i in 0..n {
        shape[4 - n + i] = t.shape()[i];
        st[4 - n + i] = t.strides()[i];
    }
    let mut out = crate::memory::zeroed::<A>(t.numel(), what)?;
    let view = BiasRef {
        ptr: t.as_ptr(),
        dtype: t.dtype(),
        st,
    };
    let width = shape[3];
    if width > 0 {
        let rows = (0..shape[0])
            .flat_map(|a| (0..shape[1]).flat_map(move |b| (0..shape[2]).map(move |c| (a, b, c))));
        for ((a, b, c), dst) in rows.zip(out.chunks_exact_mut(width)) {
            // SAFETY: (a, b, c, 0..width) is in range of the view's (padded) shape.
            unsafe { view.row(a, b, c, 0, dst, A::from_f64) };
        }
    }
    Ok(out)
}

impl<A: Acc> Terms<A> {
    /// Reads checked terms ([`ScoreTerms::check`]) for a call of `dims`.
    pub(crate) fn new(terms: &ScoreTerms, dims: &Dims) -> Result<Self> {
        Ok(Terms {
            head_scale: terms
                .head_scale
                .map(|t| read_rows(t, "the score's head scales"))
                .transpose()?,
            distance: terms
                .distance
                .map(|t| read_rows(t, "the score's distance terms"))
                .transpose()?,
            dist_heads: terms.distance.map_or(1, |t| t.shape()[0]),
            key: terms
                .key
                .map(|t| read_rows(t, "the score's key terms"))
                .transpose()?,
            key_b: terms.key.map_or(1, |t| t.shape()[0]),
            key_h: terms.key.map_or(1, |t| t.shape()[1]),
            q: dims.q,
            k: dims.k,
        })
    }

    /// Head `h`'s factor on the scaled score (1 without head scales).
    #[inline(always)]
    pub(crate) fn scale_of(&self, h: usize) -> A {
        self.head_scale.as_ref().map_or(A::ONE, |s| s[h])
    }

    /// Whether any head has a factor other than 1.
    pub(crate) fn has_scale(&self) -> bool {
        self.head_scale.is_some()
    }

    /// The additive terms of row `i` of `(b, h)` over columns `c0..c0 + n` (`c0 + n <= K`, `i < Q`): a slice
    /// of the distance row when that is the only term, else summed into `scratch` (length `>= n`).
    #[inline(always)]
    pub(crate) fn row<'s>(
        &'s self,
        b: usize,
        h: usize,
        i: usize,
        c0: usize,
        n: usize,
        scratch: &'s mut [A],
    ) -> Option<&'s [A]> {
        let dist = self.distance.as_ref().map(|d| {
            let span = span(self.q, self.k);
            let row = if self.dist_heads == 1 { 0 } else { h };
            let start = row * span + c0 + (self.q - 1) - i;
            &d[start..start + n]
        });
        let key = self.key.as_ref().map(|kt| {
            let bb = if self.key_b == 1 { 0 } else { b };
            let hh = if self.key_h == 1 { 0 } else { h };
            let start = (bb * self.key_h + hh) * self.k + c0;
            &kt[start..start + n]
        });
        match (dist, key) {
            (None, None) => None,
            (Some(x), None) | (None, Some(x)) => Some(x),
            (Some(x), Some(y)) => {
                for ((s, &a), &b) in scratch[..n].iter_mut().zip(x).zip(y) {
                    *s = a + b;
                }
                Some(&scratch[..n])
            }
        }
    }
}

/// [`Terms`] of either accumulator type, so the forward's job (generic over the input type only) can carry
/// them; each phase asks for its own accumulator's with [`AnyTerms::get`].
#[derive(Debug, Default)]
pub(crate) enum AnyTerms {
    #[default]
    None,
    F32(Terms<f32>),
    F64(Terms<f64>),
}

impl AnyTerms {
    /// The terms read in accumulator type `A` (f64 for f64 inputs, else f32), or `None` without terms.
    pub(crate) fn new<A: Acc>(terms: &ScoreTerms, dims: &Dims) -> Result<Self> {
        if terms.is_empty() {
            return Ok(AnyTerms::None);
        }
        Ok(if A::IS_F32 {
            AnyTerms::F32(Terms::new(terms, dims)?)
        } else {
            AnyTerms::F64(Terms::new(terms, dims)?)
        })
    }

    /// The terms as `Terms<A>` (`None` without terms, or if they were read for the other accumulator type).
    #[inline(always)]
    pub(crate) fn get<A: Acc>(&self) -> Option<&Terms<A>> {
        let any: &dyn Any = match self {
            AnyTerms::None => return None,
            AnyTerms::F32(t) => t,
            AnyTerms::F64(t) => t,
        };
        any.downcast_ref::<Terms<A>>()
    }
}
