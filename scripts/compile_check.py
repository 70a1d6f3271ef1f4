"""torch.compile check of attn_implementation="attnrs" on tiny random Llama, Mistral (sliding window) and Gemma2
(softcap) models with a left-padded batch of 2.

For each model it prints the graph and break counts ``torch._dynamo.explain`` reports, the recompilations a second
padding mask of the same shape causes (0 expected), and the prefill time of the compiled model (inductor) next to
the same model compiled with "sdpa" ("eager" for Gemma2, whose softcap transformers' SDPA path lacks) and the
attnrs model not compiled: calls alternate between them, and the medians of CPU time (``time.process_time``,
steadier than wall time on a shared machine) are reported with their ratio. On a loaded machine ``--threads 1``
gives steadier numbers (idle worker threads of two pools spinning against each other inflate both).

    python scripts/compile_check.py [--length 64] [--reps 15] [--backend inductor] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time
from typing import Any

import torch
import torch._dynamo
import torch._dynamo.testing
import transformers

from attnrs.integrations.transformers import register

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=101,
    max_position_embeddings=512,
    pad_token_id=0,
)
# name -> (config class, model class, config extras, the compiled peer: Gemma2's softcap has no SDPA path)
MODELS: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "sdpa"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}, "sdpa"),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 16, "sliding_window": 8, "attn_logit_softcapping": 5.0},
        "eager",
    ),
}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def build(name: str, impl: str) -> Any:
    config_cls, model_cls, extra, _ = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**SMALL, **extra})).eval()
    model.set_attn_implementation(impl)
    return model


def batch(length: int, pad: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(pad)
    ids = torch.randint(1, 100, (2, length), generator=gen)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def check(name: str, length: int, reps: int, backend: str) -> None:
    first, second = batch(length, length // 4), batch(length, length // 2)
    model = build(name, "attnrs")
    with torch.no_grad():
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(**first)
        torch._dynamo.reset()
        counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        compiled(**first)
        frames = counter.frame_count
        got = compiled(**second).logits
        recompiles = counter.frame_count - frames
        want = model(**second).logits
        rows = second["attention_mask"].bool()
        err = (got[rows] - want[rows]).abs().max().item()

        peer_name = MODELS[name][3]
        peer = torch.compile(build(name, peer_name), backend=backend, fullgraph=True)
        peer(**first)
        times: dict[str, list[float]] = {"attnrs": [], "peer": [], "eager": []}
        for _ in range(reps):
            for key, fn in (("attnrs", compiled), ("peer", peer), ("eager", model)):
                start = time.process_time()
                fn(**first)
                times[key].append(time.process_time() - start)
    a, s, e = (statistics.median(times[key]) for key in ("attnrs", "peer", "eager"))
    print(
        f"{name:8s} graphs={explanation.graph_count} breaks={explanation.graph_break_count} "
        f"recompiles_on_new_padding={recompiles} max|compiled-eager|={err:.1e}  "
        f"prefill cpu-time median: attnrs {a * 1e3:.2f} ms, {peer_name} {s * 1e3:.2f} ms (ratio {a / s:.2f}; "
        f"attnrs not compiled {e * 1e3:.2f} ms)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=64, help="sequence length of the batch (default 64)")
    parser.add_argument("--reps", type=int, default=15, help="timed calls per implementation (default 15)")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (attnrs follows it)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    register()
    print(
        f"CPU: {cpu_model()}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"threads {torch.get_num_threads()}, batch 2 x {args.length} (left-padded), backend {args.backend}"
    )
    for name in MODELS:
        check(name, args.length, args.reps, args.backend)


if __name__ == "__main__":
    main()
