"""``attn_implementation=name`` for every entry of attnrs's AttentionInterface, after a plain ``import attnrs``.

The import-order tests run in fresh interpreters (a subprocess each), since what they check is what importing
does. Models are tiny random Llamas built from configs with fixed seeds; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from typing import Any, Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnrs  # noqa: E402
from attnrs import AttentionInterface, AttentionMaskInterface  # noqa: E402
from attnrs.integrations.transformers import registration  # noqa: E402
from transformers import masking_utils, modeling_utils  # noqa: E402

# Shared by this process and the subprocesses: a tiny Llama, a left-padded batch, and logits compared on the
# rows that are real tokens.
PRELUDE = """
import json, sys, torch

def tiny_config():
    import transformers
    return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=101, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2)

def batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    ids[1, :3] = 0
    return ids, mask

def logits(model):
    ids, mask = batch()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits[mask.bool()]

def from_config(impl):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(), attn_implementation=impl).eval()

def max_diff(a, b):
    return float((a - b).abs().max())
"""
exec(PRELUDE)  # the same helpers in this process
tiny_config: Callable[[], Any]
logits: Callable[[Any], torch.Tensor]
from_config: Callable[[str], Any]
max_diff: Callable[[torch.Tensor, torch.Tensor], float]


def run_python(code: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Runs PRELUDE + ``code`` in a fresh interpreter; ``code`` prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---- import orders, in fresh interpreters ---------------------------------------------------------------------


def test_import_attnrs_first_then_transformers(tmp_path: Any) -> None:
    out = run_python(
        f"""
        import importlib.machinery, pickle
        import attnrs
        before = "transformers" in sys.modules or any(m.startswith("transformers.") for m in sys.modules)
        from transformers import AutoModelForCausalLM
        import transformers.modeling_utils as mu, transformers.masking_utils as ms
        eager = logits(from_config("eager"))
        model = from_config("attnrs")
        ours = logits(model)
        model.save_pretrained({str(tmp_path)!r})
        reloaded = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="attnrs").eval()
        switched = from_config("eager")
        switched.set_attn_implementation("attnrs")
        print(json.dumps({{
            "transformers_imported_by_attnrs": before,
            "from_config": max_diff(ours, eager),
            "impl": model.config._attn_implementation,
            "from_pretrained": max_diff(logits(reloaded), eager),
            "from_pretrained_impl": reloaded.config._attn_implementation,
            "set_attn_implementation": max_diff(logits(switched), eager),
            "pickled": max_diff(logits(pickle.loads(pickle.dumps(model))), eager),
            "loader_untouched": type(mu.__loader__) is importlib.machinery.SourceFileLoader
                                and mu.__spec__.loader is mu.__loader__,
            "mask_builder": ms.AttentionMaskInterface._global_mapping["attnrs"].__name__,
        }}))
        """
    )
    assert out["transformers_imported_by_attnrs"] is False
    assert out["impl"] == out["from_pretrained_impl"] == "attnrs"
    for key in ("from_config", "from_pretrained", "set_attn_implementation", "pickled"):
        assert out[key] < 1e-4, (key, out[key])
    assert out["loader_untouched"], "the module keeps its own loader"
    assert out["mask_builder"] == "attention_forward_mask"


@pytest.mark.parametrize(
    "first",
    [
        "import transformers",  # lazy: modeling_utils and masking_utils execute after attnrs is imported
        "import transformers.modeling_utils, transformers.masking_utils",  # both already executed
    ],
    ids=["lazy", "loaded"],
)
def test_import_transformers_first_then_attnrs(first: str) -> None:
    out = run_python(
        f"""
        {first}
        import attnrs
        eager = logits(from_config("eager"))
        model = from_config("attnrs")
        print(json.dumps({{"diff": max_diff(logits(model), eager), "impl": model.config._attn_implementation}}))
        """
    )
    assert out["impl"] == "attnrs" and out["diff"] < 1e-4, out


def test_reloading_transformers_modules_registers_again() -> None:
    out = run_python(
        """
        import importlib
        import attnrs
        import transformers.modeling_utils as mu, transformers.masking_utils as ms
        ms = importlib.reload(ms)  # rebuilds transformers' registries with its built-in entries only
        mu = importlib.reload(mu)
        print(json.dumps({
            "attention": "attnrs" in mu.AttentionInterface._global_mapping,
            "mask": "attnrs" in ms.AttentionMaskInterface._global_mapping,
            "sdpa_is_transformers": mu.AttentionInterface._global_mapping["sdpa"].__module__,
            "hooks": sum(hasattr(f, "_attnrs_post_import_hook") for f in sys.meta_path),
        }))
        """
    )
    assert out["attention"] and out["mask"], out
    assert out["sdpa_is_transformers"] == "transformers.integrations.sdpa_attention"
    assert out["hooks"] == 1


def test_the_environment_can_opt_out() -> None:
    out = run_python(
        """
        import attnrs
        import transformers.modeling_utils as mu
        try:
            from_config("attnrs")
            refused = None
        except ValueError as e:
            refused = str(e)
        from attnrs.integrations.transformers import register
        register()  # the explicit way still works
        print(json.dumps({
            "hooks": sum(hasattr(f, "_attnrs_post_import_hook") for f in sys.meta_path),
            "refused": refused,
            "after_register": from_config("attnrs").config._attn_implementation,
        }))
        """,
        env={"ATTNRS_DISABLE_AUTO_REGISTER": "1"},
    )
    assert out["hooks"] == 0
    assert out["refused"] and 'attn_implementation="attnrs"' in out["refused"]
    assert out["after_register"] == "attnrs"


# ---- entries registered in attnrs, in this process --------------------------------------------------------------


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


@pytest.fixture
def cleanup() -> Any:
    """Names to remove from both libraries' registries after the test."""
    names: list[str] = []
    yield names
    for name in names:
        for mapping in (AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping,
                        modeling_utils.AttentionInterface._global_mapping,
                        masking_utils.AttentionMaskInterface._global_mapping):
            mapping.pop(name, None)


def _recording(calls: list[Any]) -> Callable[..., Any]:
    def mine(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
             **kwargs: Any) -> Any:
        calls.append(attention_mask)
        return attnrs.functions.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    return mine


def test_a_python_entry_is_an_attn_implementation_with_a_mask_builder(cleanup: list[str]) -> None:
    name = _unique("mine")
    cleanup.append(name)
    calls: list[Any] = []
    fn = _recording(calls)
    AttentionInterface.register(name, fn)
    assert modeling_utils.AttentionInterface._global_mapping[name] is fn
    # No attnrs mask builder of that name: transformers' sdpa_mask, as its documentation says to register.
    assert masking_utils.AttentionMaskInterface._global_mapping[name] is masking_utils.sdpa_mask
    eager = logits(from_config("eager"))
    model = from_config(name)
    torch.testing.assert_close(logits(model), eager, rtol=1e-4, atol=1e-4)
    assert len(calls) == 2, "one call per layer"
    assert all(isinstance(m, torch.Tensor) and m.dtype == torch.bool for m in calls), "a padding mask was built"

    # A mask builder registered in attnrs later replaces the one transformers has for that name.
    built: list[dict[str, Any]] = []

    def builder(**kwargs: Any) -> Any:
        built.append(kwargs)
        return attnrs.mask_builders.sdpa_mask(**kwargs)

    AttentionMaskInterface.register(name, builder)
    assert masking_utils.AttentionMaskInterface._global_mapping[name] is builder
    calls.clear()
    torch.testing.assert_close(logits(model), eager, rtol=1e-4, atol=1e-4)
    assert built and len(calls) == 2


def test_every_way_of_writing_the_global_mapping_reaches_transformers(cleanup: list[str]) -> None:
    a, b, c, d = (_unique(p) for p in "abcd")
    cleanup.extend([a, b, c, d])
    fns = [_recording([]) for _ in range(4)]
    AttentionInterface._global_mapping[a] = fns[0]
    AttentionInterface._global_mapping.update({b: fns[1]})
    AttentionInterface._global_mapping.setdefault(c, fns[2])
    AttentionInterface._global_mapping |= {d: fns[3]}
    hf = modeling_utils.AttentionInterface._global_mapping
    assert [hf.get(n) for n in (a, b, c, d)] == fns
    AttentionInterface.register(a, fns[3])  # storing again replaces what attnrs put there
    assert hf[a] is fns[3]
    AttentionInterface._global_mapping.pop(a)  # removals stay in attnrs
    assert hf[a] is fns[3]


def test_transformers_entries_are_not_replaced(cleanup: list[str], caplog: pytest.LogCaptureFixture) -> None:
    hf = modeling_utils.AttentionInterface._global_mapping
    hf_masks = masking_utils.AttentionMaskInterface._global_mapping
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # attnrs's own "sdpa" entry (its plain-torch reference) never replaces transformers'.
    assert AttentionInterface()["sdpa"] is not sdpa_attention_forward
    assert hf["sdpa"] is sdpa_attention_forward and hf_masks["sdpa"] is masking_utils.sdpa_mask
    # An entry transformers got from elsewhere (a user, a Hub kernel) stays.
    theirs, ours = _recording([]), _recording([])
    name = _unique("theirs")
    cleanup.append(name)
    modeling_utils.AttentionInterface.register(name, theirs)
    AttentionInterface.register(name, ours)
    assert hf[name] is theirs and name not in hf_masks  # nor is a mask builder added for it
    # "eager" (each model's own function) and names transformers reads specially are not mirrored.
    flash, eager_before = _unique("my_flash"), hf.get("eager")
    cleanup.extend([flash])
    with caplog.at_level(logging.WARNING, logger="attnrs"):
        AttentionInterface.register(flash, ours)
    assert flash not in hf and "treats names containing 'flash'" in caplog.text
    AttentionInterface.register("eager", ours)
    try:
        assert hf.get("eager") is eager_before
    finally:
        AttentionInterface._global_mapping.pop("eager")


def test_native_kernels_are_attn_implementations_by_name(cleanup: list[str]) -> None:
    example = pytest.importorskip("attnrs_example_kernel", reason="pip install ./examples/native_kernel")
    # The installed plugin is there without any call: plugins are loaded when transformers is.
    assert "example" in modeling_utils.AttentionInterface._global_mapping
    name = _unique("native")
    cleanup.append(name)
    attnrs.register_native(name, example.kernel_capsule())
    assert masking_utils.AttentionMaskInterface._global_mapping[name] is attnrs.mask_builders.attention_forward_mask
    eager = logits(from_config("eager"))
    for impl in ("example", name):
        model = from_config(impl)
        assert model.config._attn_implementation == impl
        torch.testing.assert_close(logits(model), eager, rtol=1e-4, atol=1e-4)


def test_concurrent_registrations_all_reach_transformers(cleanup: list[str]) -> None:
    tag = uuid.uuid4().hex[:6]
    names = [[f"conc{tag}_{t}_{i}" for i in range(25)] for t in range(6)]
    cleanup.extend(n for row in names for n in row)
    fns = [_recording([]) for _ in range(6)]
    barrier = threading.Barrier(6)

    def worker(t: int) -> None:
        barrier.wait()
        for n in names[t]:
            AttentionInterface.register(n, fns[t])
            registration.sync()

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    hf = modeling_utils.AttentionInterface._global_mapping
    assert all(hf.get(n) is fns[t] for t in range(6) for n in names[t])


def test_disable_and_enable_auto_register(cleanup: list[str]) -> None:
    from attnrs.integrations.transformers import disable_auto_register, enable_auto_register

    before, after = _unique("before"), _unique("after")
    cleanup.extend([before, after])
    hf = modeling_utils.AttentionInterface._global_mapping
    disable_auto_register()
    try:
        assert not any(hasattr(f, "_attnrs_post_import_hook") for f in sys.meta_path)
        AttentionInterface.register(before, _recording([]))
        assert before not in hf
    finally:
        enable_auto_register()
    assert sum(hasattr(f, "_attnrs_post_import_hook") for f in sys.meta_path) == 1
    assert before in hf, "enabling again syncs what was registered meanwhile"
    AttentionInterface.register(after, _recording([]))
    assert after in hf
    enable_auto_register()  # idempotent
    assert sum(hasattr(f, "_attnrs_post_import_hook") for f in sys.meta_path) == 1
