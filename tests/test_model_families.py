"""transformers families with attn_implementation="attnrs" against eager, through the same checker as
``python -m attnrs models`` (attnrs.integrations.transformers.families): logits (1e-4 relative) and greedy
generation on a tiny random left-padded batch, with a check that attnrs was actually called.

By default a subset chosen to cover each feature the families use runs (CI time); ``ATTNRS_FULL_SWEEP=1`` runs
every model type of the causal-LM, masked-LM and seq2seq-LM mappings (about 280 pairs, several minutes), where a
family whose tiny config eager itself cannot run ("not built") or that never calls attnrs ("not routed") is
reported in the test's output, and only a family that runs and differs fails. The bf16 check likewise runs on a
subset by default and on every causal family that passes fp32 with ``ATTNRS_FULL_SWEEP=1``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from attnrs.integrations.transformers.families import (
    Family,
    Result,
    bfloat16_errors,
    check_family,
    families,
)

# model type -> what it covers
SUBSET = {
    "llama": "plain causal, GQA",
    "mistral": "sliding window",
    "qwen2_moe": "sliding_window=0 (no window) with an unused sliding mask built",
    "gemma2": "softcap, sliding",
    "gpt_oss": "sinks per head (s_aux)",
    "inkling2_text": "sinks per row, position_bias",
    "doge": "declares flex support but merges only tensor masks",
    "deepseek_v32": "multi-head latent attention, sparse top-k indices",
    "bigbird_pegasus": "no flex support: adds the mask to its scores",
    "t5": "seq2seq, position_bias, cross-attention",
    "modernbert": "encoder, local attention",
    "bert": "encoder; decoder with cross-attention keywords",
}
FULL = os.environ.get("ATTNRS_FULL_SWEEP") == "1"


def _chosen() -> list[Family]:
    return [f for f in families() if FULL or f.model_type in SUBSET]


def test_the_subset_names_installed_families() -> None:
    installed = {f.model_type for f in families()}
    assert set(SUBSET) <= installed, set(SUBSET) - installed
    assert set(BF16_SUBSET) <= set(SUBSET), set(BF16_SUBSET) - set(SUBSET)


FP32: dict[Family, Result] = {}  # test_family_matches_eager's results, for the bf16 test


@pytest.mark.parametrize("family", _chosen(), ids=lambda f: f"{f.model_type}-{f.task}")
def test_family_matches_eager(family: Family) -> None:
    result = FP32[family] = check_family(family)
    if FULL and result.status in ("not built", "not routed"):
        pytest.skip(f"{result.status}: {result.detail}")  # listed in the output, not an attnrs failure
    assert result.status == "pass", result.detail


# bf16: the causal families checked by default (each also in SUBSET, whose fp32 result the bf16 test reuses); every
# causal family that passes fp32 with ATTNRS_FULL_SWEEP=1.
BF16_SUBSET = {
    "llama": "plain causal, GQA",
    "mistral": "sliding window",
    "gemma2": "softcap, sliding",
    "gpt_oss": "sinks per head, MoE",
    "deepseek_v32": "multi-head latent attention, sparse top-k indices",
}
# attnrs bf16 may be this much further from fp32 eager than eager's bf16 (plus 1e-3 of the logit scale, a floor
# under the smallest errors, about 2e-3). Both round the same inputs to bf16 in different places, so which of two
# such maxima is larger is chance: over the 166 causal families of transformers 5.24 the ratio (attnrs / eager)
# has median 1.00, 98th percentile 1.34 and, dense families, a maximum of 1.34. A systematic loss of precision
# (an accumulator or the probabilities rounded to bf16 block by block) would put dense families at 2 and more.
BF16_FACTOR = 1.5
# MoE families whose routing is discontinuous in the router's scores: a bf16 rounding difference, attnrs's or
# eager's, moves one token to other experts (or other expert weights) and that token's logits by several times
# the rounding error. Seen with this seed (non-strict: another transformers may route both alike).
BF16_ROUTING_FLIPS = {
    "phimoe": "sparsemixer's threshold mask: one token's expert weight changes by 0.5 in layer 1 (attnrs bf16), "
    "its logits by 2e-2 against 4e-3 for the others",
    "qwen2_moe": "top-k routing: attnrs bf16 sends token 18 to other experts in layer 0 (eager bf16 does the same "
    "to token 0 in layer 1)",
}


def _bfloat16_chosen() -> list[Family]:
    return [f for f in families() if f.task == "causal" and (FULL or f.model_type in BF16_SUBSET)]


@pytest.mark.parametrize("family", _bfloat16_chosen(), ids=lambda f: f.model_type)
def test_bfloat16_is_no_further_from_fp32_than_eagers_bfloat16(family: Family) -> None:
    """Every causal family that matches eager in fp32 (the subset by default): attnrs's bf16 logits are no
    further from fp32 eager than eager's own bf16 logits are, within BF16_FACTOR (see there)."""
    fp32 = FP32.get(family) or check_family(family)
    if fp32.status != "pass":
        pytest.skip(f"fp32 {fp32.status}")
    errors = bfloat16_errors(family)
    if errors is None:
        pytest.skip("eager itself cannot run this tiny model in bf16")
    eager, ours = errors
    if family.model_type in BF16_ROUTING_FLIPS and not ours <= BF16_FACTOR * eager + 1e-3:
        pytest.xfail(f"{BF16_ROUTING_FLIPS[family.model_type]}: attnrs {ours:.2e}, eager {eager:.2e}")
    assert ours <= BF16_FACTOR * eager + 1e-3, f"attnrs bf16 {ours:.2e} vs eager bf16 {eager:.2e} (relative to fp32)"


def test_the_readme_lists_exactly_the_families_that_cannot_reach_attnrs() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    generated = subprocess.run([sys.executable, str(root / "scripts" / "unrouted_families.py")], capture_output=True,
                               text=True, timeout=300, check=True).stdout.strip()
    assert generated in (root / "README.md").read_text(), "run: python scripts/unrouted_families.py --write"
