"""Checks attnrs's CUDA delegation on a GPU machine: every backend the dispatch table can choose, against a
float64 CPU reference, plus a tiny Llama with attn_implementation="attnrs" against "sdpa" on the GPU.

    python scripts/gpu_check.py          # exits 1 on any mismatch, 2 without CUDA

Run it when a GPU machine is available; CI has none.
"""

from __future__ import annotations

import sys
import warnings

import torch

import attnrs
from attnrs import masks
from attnrs.attention import _resolve_mask
from attnrs.dispatch import choose_backend, flash_attn_available


def reference(q, k, v, mask, is_causal, softcap, sinks):  # type: ignore[no-untyped-def]
    return attnrs.attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                            mask.cpu() if isinstance(mask, torch.Tensor) else mask, is_causal=is_causal,
                            softcap=softcap, sinks=None if sinks is None else sinks.double().cpu(), backend="math")


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    print(f"attnrs {attnrs.__version__}, torch {torch.__version__}, {torch.cuda.get_device_name()}, "
          f"flash-attn importable: {flash_attn_available()}")
    failures = 0
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.randn(2, 8, 256, 64, device="cuda", dtype=dtype)
        k = torch.randn(2, 2, 256, 64, device="cuda", dtype=dtype)
        v = torch.randn(2, 2, 256, 64, device="cuda", dtype=dtype)
        valid = torch.ones(2, 256, dtype=torch.bool)
        valid[1, :40] = False
        cases = {
            "none": dict(mask=None, is_causal=False),
            "causal": dict(mask=None, is_causal=True),
            "sliding 32": dict(mask=masks.sliding_window(32), is_causal=False),
            "padding & causal": dict(mask=masks.padding(valid) & masks.causal(), is_causal=False),
            "dense bool": dict(mask=(torch.rand(2, 1, 256, 256, device="cuda") > 0.3) | torch.eye(256, device="cuda",
                                                                                                dtype=torch.bool),
                               is_causal=False),
            "softcap + sinks": dict(mask=None, is_causal=True, softcap=20.0, sinks=torch.randn(8, device="cuda")),
        }
        for name, case in cases.items():
            softcap, sinks = case.get("softcap"), case.get("sinks")
            resolved = _resolve_mask(case["mask"], case["is_causal"], (2, 8, 256, 256), q.device)
            chosen, reason = choose_backend(q, k, v, resolved, softcap, sinks, 0.0, False)
            expected = reference(q, k, v, case["mask"], case["is_causal"], softcap, sinks)
            for backend in ("auto", "sdpa", "flex", "flash", "math"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        out = attnrs.attention(q, k, v, case["mask"], is_causal=case["is_causal"], softcap=softcap,
                                               sinks=sinks, backend=backend)
                    except NotImplementedError as e:
                        print(f"  {dtype} {name:<18} {backend:<6} unsupported: {str(e)[:70]}")
                        continue
                    except ImportError:
                        print(f"  {dtype} {name:<18} {backend:<6} not installed")
                        continue
                error = (out.double().cpu() - expected).abs().max().item()
                tolerance = 2e-2 if dtype != torch.float32 else 2e-3
                ok = error <= tolerance
                failures += not ok
                label = f"{backend} -> {chosen} ({reason})" if backend == "auto" else backend
                print(f"  {'ok ' if ok else 'BAD'} {dtype} {name:<18} {label:<70} max err {error:.2e}")
    failures += check_model()
    print("all CUDA paths agree" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def check_model() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnrs.integrations.transformers import register

    register()
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).cuda().eval()
    ids = torch.randint(1, 100, (2, 12), device="cuda")
    mask = torch.ones(2, 12, dtype=torch.long, device="cuda")
    mask[1, :3] = 0
    outputs = {}
    for impl in ("sdpa", "attnrs"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        outputs[impl] = (logits, tokens)
    diff = (outputs["attnrs"][0] - outputs["sdpa"][0])[mask.bool()].abs().max().item()
    same = torch.equal(outputs["attnrs"][1], outputs["sdpa"][1])
    print(f"  model: max logit diff {diff:.2e}, generated tokens equal: {same}")
    return int(diff > 1e-3 or not same)


if __name__ == "__main__":
    sys.exit(main())
