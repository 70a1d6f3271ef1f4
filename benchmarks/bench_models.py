"""A Llama-shaped model with 2 layers of real size (hidden 2048, 32 heads, 8 KV heads): attnrs vs sdpa vs eager.

    python benchmarks/bench_models.py                  # bf16 and fp32: padded prefill 4096, sliding variant,
                                                       # 128 generated tokens at 8k context
    python benchmarks/bench_models.py --quick          # 1024-token prefill, 2k context, 16 tokens

Ratios say how many times faster attnrs is than each peer in the same run. Random weights, fixed seed.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch
import transformers

from attnrs.cli.progress import echo, progress
from attnrs.integrations.transformers import register

IMPLEMENTATIONS = ("attnrs", "sdpa", "eager")


def model_for(dtype: torch.dtype, sliding_window: int | None) -> Any:
    config = transformers.MistralConfig(
        vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=16384, sliding_window=sliding_window, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(config).to(dtype).eval()


def best_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        gc.collect()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eager_fits(batch: int, length: int, dtype: torch.dtype) -> bool:
    # eager materialises [B, H, L, L] scores and their softmax in fp32 (twice): keep under ~10 GiB.
    return 2 * batch * 32 * length * length * 4 < 10 * 2**30


def prefill(dtype: torch.dtype, length: int, sliding: int | None, repeats: int) -> dict[str, float]:
    model = model_for(dtype, sliding)
    ids = torch.randint(1, 32000, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, : length // 4] = 0  # the second row is left-padded by a quarter
    results = {}
    for impl in IMPLEMENTATIONS:
        if impl == "eager" and not eager_fits(2, length, dtype):
            continue
        model.set_attn_implementation(impl)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # warm-up
            results[impl] = best_s(lambda: model(input_ids=ids, attention_mask=mask), repeats)
    return results


class StepClock(transformers.StoppingCriteria):
    """Never stops generation; records when each generated token is done (generate asks after every token)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def decode(dtype: torch.dtype, context: int, new_tokens: int) -> dict[str, float]:
    """Tokens per second of greedy decoding after a `context`-token prompt: `new_tokens` steps timed from the
    first token (the prefill's) to the last, within one generate call (subtracting a separate prefill run's time
    let the prefill's run-to-run noise into the figure, and could leave nothing or less)."""
    model = model_for(dtype, None)
    ids = torch.randint(1, 32000, (1, context), generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in IMPLEMENTATIONS:
        if impl == "eager" and not eager_fits(1, context, dtype):
            continue
        model.set_attn_implementation(impl)
        clock = StepClock()
        with torch.no_grad():
            model.generate(
                ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                stopping_criteria=transformers.StoppingCriteriaList([clock]),
            )
        if len(clock.times) != new_tokens + 1:
            raise RuntimeError(f"{impl}: generate made {len(clock.times)} tokens, {new_tokens + 1} were asked for")
        results[impl] = new_tokens / (clock.times[-1] - clock.times[0])
    return results


def report(title: str, results: dict[str, float], unit: str, higher_is_better: bool = False) -> None:
    ours = results["attnrs"]
    cells = []
    for impl, value in results.items():
        ratio = value / ours if not higher_is_better else ours / value
        shown = f"{value * 1e3:.0f} ms" if unit == "ms" else f"{value:.1f} tok/s"
        cells.append(f"{impl} {shown}" + ("" if impl == "attnrs" else f" ({ratio:.2f}x)"))
    echo(f"{title:<40} " + " | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated: bfloat16 (bf16), float32 (fp32)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    aliases = {"bf16": "bfloat16", "fp32": "float32", "bfloat16": "bfloat16", "float32": "float32"}
    unknown = [n for n in args.dtypes.split(",") if n not in aliases]
    if unknown:
        parser.error(f"--dtypes: unknown dtype {unknown[0]!r}; expected some of bfloat16 (bf16), float32 (fp32)")
    args.dtypes = ",".join(aliases[n] for n in args.dtypes.split(","))
    register()
    length, context, new_tokens = (1024, 2048, 16) if args.quick else (4096, 8192, 128)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          "(x) = how many times faster attnrs is")
    steps = [(name, step) for name in args.dtypes.split(",") for step in ("prefill", "sliding", "decode")]
    bar = progress(steps, "models", unit="run")
    for name, step in bar:
        dtype = getattr(torch, name)
        bar.note(f"{name} {step}")
        if step == "prefill":
            report(f"{name} prefill {length} left-padded B2", prefill(dtype, length, None, args.repeats), "ms")
        elif step == "sliding":
            report(f"{name} prefill {length} sliding 512 B2", prefill(dtype, length, 512, args.repeats), "ms")
        else:
            report(f"{name} decode {new_tokens} tokens at {context}", decode(dtype, context, new_tokens), "tok/s",
                   higher_is_better=True)


if __name__ == "__main__":
    main()
