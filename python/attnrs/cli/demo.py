"""``python -m attnrs demo``: a small model from an embedded config, in the setting where attnrs pays off (a
sliding-window family, a long left-padded batch, then decoding; bf16 where the CPU computes it fast), run with
``attn_implementation="eager"``, ``"sdpa"`` and ``"attnrs"`` side by side: prefill time and how much of it was
attention, decode tokens/s, peak memory, and parity of the logits and generated tokens against eager. Nothing is
downloaded; the weights are random with a fixed seed."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gc
import itertools
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import attnrs

from .plots import cpu_name
from .progress import progress

# Llama-architecture configs small enough for a laptop CPU, with attention a large share of a long prompt's time.
FAMILIES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 256}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"sliding_window": 256, "attn_logit_softcapping": 50.0, "head_dim": 64},
    ),
}
BASE = dict(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=8192,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
IMPLEMENTATIONS = ("eager", "sdpa", "attnrs")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fast_bf16() -> bool:
    """Whether attnrs's bf16 path computes in bf16 here (rather than widening to f32, slower than f32 itself)."""
    return attnrs.kernel_path("bfloat16")[0] in ("avx512_bf16", "amx")


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class PeakMemory:
    """The peak resident memory of this process above its size at the start of a block, from the kernel's own
    high-water mark (Linux: ``/proc/self/clear_refs`` resets it). Everything counts: torch's tensors, the Rust
    kernel's buffers, the allocator's slack. ``None`` where the kernel does not offer it."""

    def __init__(self) -> None:
        self.peak_bytes: int | None = None

    @staticmethod
    def _status_kib(field: str) -> int:
        with open("/proc/self/status") as f:
            found = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
        if found is None:
            raise OSError(field)
        return int(found.group(1))

    def __enter__(self) -> PeakMemory:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so the start is what is live
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset the high-water mark to the current resident size
            self._start = self._status_kib("VmRSS")
        except OSError:
            self._start = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start >= 0:
            with contextlib.suppress(OSError):
                self.peak_bytes = (self._status_kib("VmHWM") - self._start) * 1024


class AttentionClock:
    """Adds up the wall time of the model's attention calls: the registry entry of ``impl`` (or the modeling
    module's ``eager_attention_forward``) is wrapped for the duration of the block and restored after."""

    def __init__(self, model: torch.nn.Module, impl: str) -> None:
        self.seconds = 0.0
        self._impl = impl
        self._module: Any = sys.modules[type(model).__module__]  # the modeling file, e.g. modeling_mistral

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def __enter__(self) -> AttentionClock:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._impl == "eager":
            self._original = self._module.eager_attention_forward
            self._module.eager_attention_forward = self._timed(self._original)
        else:
            self._local = ALL_ATTENTION_FUNCTIONS._local_mapping.get(self._impl)
            ALL_ATTENTION_FUNCTIONS[self._impl] = self._timed(ALL_ATTENTION_FUNCTIONS[self._impl])
        return self

    def __exit__(self, *exc: object) -> None:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if self._impl == "eager":
            self._module.eager_attention_forward = self._original
        elif self._local is not None:
            ALL_ATTENTION_FUNCTIONS[self._impl] = self._local
        else:
            ALL_ATTENTION_FUNCTIONS._local_mapping.pop(self._impl, None)


@dataclasses.dataclass
class Result:
    prefill: float = float("inf")  # seconds to the first token of a generate (the prefill), best of the repeats
    prefill_attention: float = 0.0  # of which in attention calls (in that run)
    decode: float = float("inf")  # seconds of a decode step (median of a run's steps), best of the repeats
    decode_attention: float = 0.0  # of which in attention calls (in that run, median)
    peak_bytes: int | None = None  # peak memory of a generate above its start, the most of the repeats
    logits: torch.Tensor | None = None  # the prompt's logits, for parity
    tokens: torch.Tensor | None = None  # the generated tokens


def _generate(model: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, impl: str, r: Result) -> None:
    """One greedy ``generate``, timed by a stopping criterion that never stops: the time to its first token is the
    prefill, the steps after it are decode steps; their attention time is read off an :class:`AttentionClock`."""
    import transformers

    stamps: list[tuple[float, float]] = []

    class Stamp(transformers.StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stamps.append((time.perf_counter(), clock.seconds))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with PeakMemory() as memory, AttentionClock(model, impl) as clock:
        start = time.perf_counter()
        tokens = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            stopping_criteria=transformers.StoppingCriteriaList([Stamp()]),
        )
    r.tokens = tokens[:, ids.shape[1] :]
    if stamps[0][0] - start < r.prefill:
        r.prefill, r.prefill_attention = stamps[0][0] - start, stamps[0][1]
    steps = sorted(b[0] - a[0] for a, b in itertools.pairwise(stamps))
    if steps[len(steps) // 2] < r.decode:
        attention = sorted(b[1] - a[1] for a, b in itertools.pairwise(stamps))
        r.decode, r.decode_attention = steps[len(steps) // 2], attention[len(attention) // 2]
    if memory.peak_bytes is not None:
        r.peak_bytes = max(r.peak_bytes or 0, memory.peak_bytes)


def _ratio(sdpa: float, ours: float) -> str:
    return f"{sdpa / ours:.2f}x" if ours > 0 else "n/a"


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def run_demo(
    family: str = "mistral",
    length: int = 2048,
    batch: int = 2,
    new_tokens: int = 16,
    dtype: str = "auto",
    repeats: int = 2,
) -> int:
    import transformers

    from ..integrations.transformers import register

    if length < 16 or batch < 1 or new_tokens < 2 or repeats < 1:
        raise ValueError("demo: --length must be >= 16, --batch >= 1, --new-tokens >= 2 and --repeats >= 1")
    register()
    chosen = dtype if dtype != "auto" else ("bfloat16" if fast_bf16() else "float32")
    torch_dtype = DTYPES[chosen]
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**{**BASE, **extra})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).to(torch_dtype).eval()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.vocab_size, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):  # left padding of different lengths, up to half the prompt
        mask[row, : row * length // (2 * batch)] = 0

    window = getattr(config, "sliding_window", None)
    path, why = attnrs.kernel_path(chosen)
    print(
        f"{family}-style model{f' (sliding window {window})' if window else ''}: {config.num_hidden_layers} layers, "
        f"hidden {config.hidden_size}, {config.num_attention_heads} heads ({config.num_key_value_heads} kv), {chosen}"
    )
    print(
        f"batch {batch} x {length} tokens, left-padded (the last row has {int((mask[-1] == 0).sum())} pad tokens), "
        f"then {new_tokens} greedy tokens; {plural(torch.get_num_threads(), 'thread')}"
    )
    print(f"cpu: {cpu_name()}; attnrs kernel path for {chosen}: {path}, {why}")
    if dtype == "auto" and chosen == "float32":
        print(
            "dtype: float32, as this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX): bf16 would be widened to f32 "
            "and run slower (--dtype bfloat16 runs it anyway)"
        )
    elif chosen == "bfloat16" and not fast_bf16():
        print("note: this CPU has no bf16 arithmetic (AVX-512 BF16 or AMX): bf16 runs widened, slower than float32")

    impls = []
    for impl in IMPLEMENTATIONS:  # transformers refuses sdpa for some families (Gemma2 among them)
        try:
            model.set_attn_implementation(impl)
            impls.append(impl)
        except ValueError as e:
            print(f"{impl}: not run, transformers refuses it for this family ({str(e).split('.')[0]})")
    peer = "sdpa" if "sdpa" in impls else "eager"
    results = {impl: Result() for impl in impls}
    with torch.no_grad():
        for impl in impls:  # warm-up: thread pools, first-call costs
            model.set_attn_implementation(impl)
            model.generate(ids[:, -16:], attention_mask=mask[:, -16:], max_new_tokens=2, do_sample=False)
        # Alternating, so that a noisy moment does not land on one of them; eager (the reference) runs once.
        steps = [f"{impl} generate" for rep in range(repeats) for impl in impls if rep == 0 or impl != "eager"]
        steps += [f"{impl} logits" for impl in impls]
        bar = progress(steps, "demo", unit="step")
        for step in bar:
            bar.note(step)
            impl, what = step.split()
            model.set_attn_implementation(impl)
            if what == "generate":
                _generate(model, ids, mask, new_tokens, impl, results[impl])
            else:
                results[impl].logits = model(input_ids=ids, attention_mask=mask).logits.float()

    real = mask.bool()
    reference = results["eager"]
    assert reference.logits is not None and reference.tokens is not None
    print()
    print(
        "prefill: time to the first token of generate, attention: its attention calls; decode: the median step "
        "after it,\nin tokens/s of the batch; peak: resident memory of a generate above its start; best of "
        f"{plural(repeats, 'run')} (eager: 1)\n"
    )
    print(
        f"{'':<8} {'prefill ms':>11} {'attention ms':>13} {'decode tok/s':>13} {'peak MiB':>9} "
        f"{'max |logit - eager|':>20} {'tokens = eager':>15}"
    )
    worst = 0.0
    for impl in impls:
        r = results[impl]
        assert r.logits is not None and r.tokens is not None
        diff = (r.logits - reference.logits)[real].abs().max().item()
        if impl != "eager":
            worst = max(worst, diff)
        same = torch.equal(r.tokens, reference.tokens)
        print(
            f"{impl:<8} {r.prefill * 1e3:>11.1f} {r.prefill_attention * 1e3:>13.1f} {batch / r.decode:>13.1f} "
            f"{_mib(r.peak_bytes):>9} {'(reference)' if impl == 'eager' else f'{diff:.2e}':>20} "
            f"{'(reference)' if impl == 'eager' else str(same):>15}"
        )
    ours, theirs = results["attnrs"], results[peer]
    print()
    print(
        f"attnrs vs {peer}: prefill {_ratio(theirs.prefill, ours.prefill)} "
        f"(its attention {_ratio(theirs.prefill_attention, ours.prefill_attention)}), "
        f"decode {_ratio(theirs.decode, ours.decode)}"
        + (
            f", peak memory {ours.peak_bytes / theirs.peak_bytes:.2f}x {peer}'s"
            if ours.peak_bytes and theirs.peak_bytes
            else ""
        )
    )
    for line in _explain(results, peer, window, length, config.num_hidden_layers):
        print(line)
    tolerance = 1e-3 if torch_dtype == torch.float32 else 0.25
    return 0 if worst < tolerance else 1


def _explain(results: dict[str, Result], peer: str, window: int | None, length: int, layers: int) -> list[str]:
    """Plain sentences on why the numbers are what they are, including where attnrs is not faster than ``peer``
    (sdpa, or eager where transformers refuses sdpa)."""
    ours, theirs = results["attnrs"], results[peer]
    lines = []
    if window and window < length:
        lines.append(
            f"why: with a {window}-token window each query sees at most {window} of {length} keys; at prefill "
            f"attnrs skips the blocks the mask hides, {peer} gets a dense mask and computes every block."
        )
    share = ours.prefill_attention / ours.prefill if ours.prefill > 0 else 0.0
    if ours.prefill >= theirs.prefill:
        lines.append(
            f"not faster at prefill here: attention is {share:.0%} of attnrs's prefill, "
            f"{ours.prefill_attention * 1e3:.0f} ms against {peer}'s {theirs.prefill_attention * 1e3:.0f} ms; "
            "the rest of the model is the same torch code for both."
        )
    else:
        lines.append(
            f"the rest of the prefill (projections, MLP, norms) is the same torch code for both: attention is "
            f"{share:.0%} of attnrs's prefill and {theirs.prefill_attention / theirs.prefill:.0%} of {peer}'s."
        )
    if ours.decode >= 0.95 * theirs.decode:
        per_call, their_per_call = ours.decode_attention / layers, theirs.decode_attention / layers
        lines.append(
            f"not faster at decode here: an attention call takes {per_call * 1e3:.2f} ms in attnrs against "
            f"{their_per_call * 1e3:.2f} ms in {peer} ({ours.decode_attention / ours.decode:.0%} of attnrs's step). "
            "With one query row per sequence a call has little arithmetic, and attnrs's fixed cost per call (the "
            "Python checks and mask resolution, the hand-off to its thread pool) outweighs it; the kernel gains on "
            "larger calls (python -m attnrs bench, decode rows)."
        )
    return lines
