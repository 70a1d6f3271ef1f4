"""Score mods as values: ``attnrs.scores``.

A :class:`ScoreMod` changes attention logits before the softmax, as FlexAttention's ``score_mod`` does, in a form
the Rust kernel evaluates inside its tile loop: ``cap(multiplier[h] * score + additive terms)``, with terms that
depend on the relative position (:func:`alibi`, :func:`relative_bias`, :func:`bias_table`) or on the key alone
(``alibi(form="key")``, ``bias_table(document_ids=...)``). Compose them with ``+``, :meth:`ScoreMod.then` and
:func:`compose`. Every ``ScoreMod`` is also a valid FlexAttention ``score_mod``.

Modules: :mod:`~attnrs.scores.score_mod` (the value, its constructors, composition and the kernel's operands,
:meth:`ScoreMod.terms`), :mod:`~attnrs.scores.buckets` (T5 and clamped bucket functions, the standard ALiBi
slopes).
"""

from __future__ import annotations

from .buckets import BucketFn, alibi_slopes, clamp_buckets, t5_buckets
from .score_mod import ScoreMod, ScoreTerms, alibi, bias_table, compose, relative_bias, scale, softcap

__all__ = [
    "BucketFn",
    "ScoreMod",
    "ScoreTerms",
    "alibi",
    "alibi_slopes",
    "bias_table",
    "clamp_buckets",
    "compose",
    "relative_bias",
    "scale",
    "softcap",
    "t5_buckets",
]
