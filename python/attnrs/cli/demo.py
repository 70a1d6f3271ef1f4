"""``python -m attnrs demo``: a small model from an embedded config runs with ``attn_implementation="attnrs"``
and with ``"sdpa"``, side by side: a left-padded batch (parity of the logits) and a greedy ``generate``
(tokens equal), with timings. Nothing is downloaded; weights are random with a fixed seed."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

# Llama-architecture configs small enough for a laptop CPU, large enough that attention matters.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 128}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"sliding_window": 128, "attn_logit_softcapping": 50.0, "head_dim": 64},
    ),
}
BASE = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def _progress(items: list[str]) -> Iterator[str]:
    """A one-line progress bar on stderr (plain text, so it works everywhere)."""
    for i, item in enumerate(items):
        done = int(24 * i / len(items))
        sys.stderr.write(f"\r[{'#' * done}{'.' * (24 - done)}] {item:<40}")
        sys.stderr.flush()
        yield item
    sys.stderr.write(f"\r[{'#' * 24}] done{' ' * 40}\n")


def _timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    result = fn()  # warm-up (and the result we compare)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def run_demo(
    family: str = "llama",
    length: int = 512,
    batch: int = 4,
    new_tokens: int = 32,
    dtype: str = "float32",
    repeats: int = 2,
) -> int:
    import transformers

    from ..integrations.transformers import register

    register()
    config_name, model_name, extra = FAMILIES[family]
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(torch_dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):  # left padding of different lengths
        mask[row, : row * length // (2 * batch)] = 0
    print(
        f"{family}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads "
        f"({config.num_key_value_heads} kv), {dtype}; batch {batch} x {length} tokens, left-padded; "
        f"greedy generate of {new_tokens} tokens; {torch.get_num_threads()} threads"
    )
    results: dict[str, dict[str, Any]] = {}
    steps = [f"{impl}: {what}" for impl in ("sdpa", "attnrs") for what in ("prefill", "generate")]
    for step in _progress(steps):
        impl, what = step.split(": ")
        model.set_attn_implementation(impl)
        with torch.no_grad():
            if what == "prefill":
                logits, seconds = _timed(lambda: model(input_ids=ids, attention_mask=mask).logits, repeats)
                results.setdefault(impl, {}).update(logits=logits, prefill=seconds)
            else:
                tokens, seconds = _timed(
                    lambda: model.generate(
                        ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens
                    ),
                    max(1, repeats - 1),
                )
                results[impl].update(tokens=tokens, generate=seconds)
    real = mask.bool()
    diff = (results["attnrs"]["logits"] - results["sdpa"]["logits"])[real].abs().max().item()
    same = torch.equal(results["attnrs"]["tokens"], results["sdpa"]["tokens"])
    print(f"{'':<10} {'prefill ms':>12} {'generate ms':>12} {'tokens/s':>10}")
    for impl in ("sdpa", "attnrs"):
        r = results[impl]
        print(
            f"{impl:<10} {r['prefill'] * 1e3:>12.1f} {r['generate'] * 1e3:>12.1f} "
            f"{batch * new_tokens / r['generate']:>10.1f}"
        )
    speedup = results["sdpa"]["prefill"] / results["attnrs"]["prefill"]
    gen_speedup = results["sdpa"]["generate"] / results["attnrs"]["generate"]
    print(f"parity: max |logit difference| on real tokens {diff:.2e}; generated tokens equal: {same}")
    print(f"speed: attnrs / sdpa = {speedup:.2f}x prefill, {gen_speedup:.2f}x generate")
    tolerance = 1e-3 if torch_dtype == torch.float32 else 0.25
    return 0 if diff < tolerance else 1
