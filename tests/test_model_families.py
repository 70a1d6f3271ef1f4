"""transformers families with attn_implementation="attnrs" against eager, through the same checker as
``python -m attnrs models`` (attnrs.integrations.transformers.families): logits (1e-4 relative) and greedy
generation on a tiny random left-padded batch, with a check that attnrs was actually called.

By default a subset chosen to cover each feature the families use runs (CI time); ``ATTNRS_FULL_SWEEP=1`` runs
every model type of the causal-LM, masked-LM and seq2seq-LM mappings (about 280 pairs, several minutes), where a
family whose tiny config eager itself cannot run ("not built") or that never calls attnrs ("not routed") is
reported in the test's output, and only a family that runs and differs fails.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from attnrs.integrations.transformers.families import (  # noqa: E402
    Family,
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


# Families whose attnrs run differs from eager for a reason the checker found and the entry explains; strict: a
# fix makes the test fail until the entry goes.
KNOWN_DIFFERENCES = {
    "blt": "rows that see no key: attnrs gives zeros, eager the mean of the values; BLT pools its byte positions "
    "(the left padding too) into patches, so the padding rows reach the real ones",
}


@pytest.mark.parametrize("family", _chosen(), ids=lambda f: f"{f.model_type}-{f.task}")
def test_family_matches_eager(family: Family) -> None:
    result = check_family(family)
    if FULL and result.status in ("not built", "not routed"):
        pytest.skip(f"{result.status}: {result.detail}")  # listed in the output, not an attnrs failure
    if family.model_type in KNOWN_DIFFERENCES:
        assert result.status == "fail", f"{result.status}: remove {family.model_type} from KNOWN_DIFFERENCES"
        pytest.xfail(f"{KNOWN_DIFFERENCES[family.model_type]}: {result.detail}")
    assert result.status == "pass", result.detail


@pytest.mark.parametrize("family", [f for f in families() if f.model_type in ("llama", "gemma2", "mistral")
                                    and f.task == "causal"], ids=lambda f: f.model_type)
def test_bfloat16_is_no_further_from_fp32_than_eagers_bfloat16(family: Family) -> None:
    """Dense families only: in MoE families bf16 rounding flips expert routing, a difference attention cannot
    cause or prevent."""
    eager, ours = bfloat16_errors(family)
    assert ours <= 1.5 * eager + 1e-3, f"attnrs bf16 {ours:.2e} vs eager bf16 {eager:.2e} (relative to fp32 eager)"


def test_the_readme_lists_exactly_the_families_that_cannot_reach_attnrs() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    generated = subprocess.run([sys.executable, str(root / "scripts" / "unrouted_families.py")], capture_output=True,
                               text=True, timeout=300, check=True).stdout.strip()
    assert generated in (root / "README.md").read_text(), "run: python scripts/unrouted_families.py --write"
