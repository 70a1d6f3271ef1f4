"""Checks attnrs's CUDA delegation on a GPU machine: every backend the dispatch table can choose, against a
float64 CPU reference; SDPA's call forms (positional, keyword, 3-D/5-D, broadcast batch, enable_gqa) against
torch's SDPA on the GPU; and a tiny Llama with attn_implementation="attnrs" against "sdpa" on the GPU, eager and
under ``torch.compile(fullgraph=True)``.

    python scripts/gpu_check.py          # exits 1 on any mismatch, 2 without CUDA

Run it when a GPU machine is available; CI has none.
"""

from __future__ import annotations

import sys
import warnings

import torch

import attnrs
from attnrs import masks
from attnrs.attention.dispatch import choose_backend, flash_attn_available
from attnrs.attention.resolve import resolve_mask


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
            resolved = resolve_mask(case["mask"], case["is_causal"], (2, 8, 256, 256), q.device)
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
    failures += check_score_mods()
    failures += check_varlen()
    failures += check_sdpa_call_forms()
    failures += check_model()
    print("all CUDA paths agree" if failures == 0 else f"{failures} mismatches")
    return 1 if failures else 0


def check_score_mods() -> int:
    """score_mod on CUDA (backend="auto" hands it to flex_attention): an attnrs.scores value with a learned T5
    table and a plain callable, forward and the table's gradient, against the Rust kernel / math path on CPU."""
    from attnrs import scores

    failures = 0
    torch.manual_seed(1)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        q = torch.randn(1, 4, 128, 64, dtype=dtype)
        k = torch.randn(1, 2, 160, 64, dtype=dtype)
        v = torch.randn(1, 2, 160, 64, dtype=dtype)
        table = torch.randn(4, 32, requires_grad=True)
        for name, mod in (
            ("alibi + t5", scores.alibi(4) + scores.relative_bias(table, scores.t5_buckets(32, 128, True))),
            ("callable", lambda s, b, h, qi, ki: s * torch.cos(ki.to(s.dtype) / 7)),
        ):
            expected = attnrs.attention(q.double(), k.double(), v.double(), masks.causal(32), score_mod=mod)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = attnrs.attention(q.cuda(), k.cuda(), v.cuda(), masks.causal(32), score_mod=mod)
            error = (out.double().cpu() - expected).abs().max().item()
            ok = error <= (2e-2 if dtype != torch.float32 else 2e-3)
            failures += not ok
            print(f"  {'ok ' if ok else 'BAD'} score_mod {name:<12} {dtype} auto (flex on CUDA) max err {error:.2e}")
    return failures


def check_varlen() -> int:
    """attnrs.varlen_attention on CUDA (torch's varlen_attn) against the Rust kernel on CPU: packed causal with
    lse, and a paged decode."""
    from torch.nn.attention.varlen import AuxRequest

    failures = 0
    torch.manual_seed(2)
    lengths = [37, 1, 128, 64]
    cu = torch.tensor([0, 37, 38, 166, 230], dtype=torch.int32)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = (torch.randn(230, 8, 64, dtype=dtype) for _ in range(3))
        args = dict(window_size=(-1, 0), return_aux=AuxRequest(lse=True))
        want, want_lse = attnrs.varlen_attention(q, k, v, cu, cu, 128, 128, **args)
        try:
            got, lse = attnrs.varlen_attention(q.cuda(), k.cuda(), v.cuda(), cu.cuda(), cu.cuda(), 128, 128, **args)
        except (NotImplementedError, RuntimeError) as e:
            print(f"  {dtype} varlen unsupported here: {str(e)[:90]}")
            continue
        error = max((got.cpu().double() - want.double()).abs().max().item(),
                    (lse.cpu().double() - want_lse.double()).abs().max().item())
        ok = error <= 2e-2
        failures += not ok
        print(f"  {'ok ' if ok else 'BAD'} varlen causal {dtype} (torch varlen_attn on CUDA) max err {error:.2e}")
    del lengths
    return failures


def check_sdpa_call_forms() -> int:
    """attnrs.attention called exactly as SDPA is gives SDPA's answer on the GPU."""
    import torch.nn.functional as F

    failures = 0
    for dtype in (torch.float16, torch.float32):
        def r(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, device="cuda", dtype=dtype)

        q, k, v = r(2, 8, 64, 32), r(2, 2, 80, 32), r(2, 2, 80, 32)
        bool_mask = torch.rand(2, 1, 64, 80, device="cuda") > 0.3
        bool_mask[..., 0] = True
        forms = {
            "positional mask": ((q, k, v, bool_mask), {"enable_gqa": True}),
            "positional is_causal": ((q, k, v, None, 0.0, True), {"enable_gqa": True}),
            "keyword float mask": ((q, k, v), {"attn_mask": r(1, 8, 64, 80), "enable_gqa": True, "scale": 0.3}),
            "3-D": ((r(8, 64, 32), r(8, 80, 32), r(8, 80, 32)), {}),
            "5-D broadcast": ((r(2, 3, 4, 64, 32), r(1, 3, 4, 80, 32), r(1, 3, 4, 80, 32)), {"is_causal": True}),
            "dropout 1": ((q, k, v), {"dropout_p": 1.0, "enable_gqa": True}),
        }
        for name, (args, kwargs) in forms.items():
            want = F.scaled_dot_product_attention(*args, **kwargs)
            got = attnrs.attention(*args, **kwargs)
            error = (got.double() - want.double()).abs().max().item()
            ok = error <= (2e-2 if dtype != torch.float32 else 2e-3)
            failures += not ok
            print(f"  {'ok ' if ok else 'BAD'} {dtype} SDPA call form {name:<22} max err {error:.2e}")
    return failures


def check_model() -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    from attnrs.integrations.transformers import register

    register()  # idempotent
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
    failures = int(diff > 1e-3 or not same)
    model.set_attn_implementation("attnrs")
    torch._dynamo.reset()
    try:
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            logits = compiled(input_ids=ids, attention_mask=mask).logits
        compiled_diff = (logits - outputs["sdpa"][0])[mask.bool()].abs().max().item()
        print(f"  compiled model (fullgraph): max logit diff vs sdpa {compiled_diff:.2e}")
        failures += int(compiled_diff > 1e-3)
    except Exception as e:  # report and count: this is the check
        print(f"  BAD compiled model (fullgraph): {type(e).__name__}: {str(e)[:200]}")
        failures += 1
    return failures


if __name__ == "__main__":
    sys.exit(main())
