"""Every transformers model family, tried with ``attn_implementation="attnrs"`` against ``"eager"``.

:func:`families` enumerates the installed transformers' causal-LM, masked-LM and seq2seq-LM auto mappings;
:func:`check_family` builds a tiny random model of one (the family's default config scaled down by
:func:`tiny_config`, fixed seed, parameters that start at zero randomised so that a dropped input shows), runs a
left-padded batch of 2 with eager and with attnrs (counting the calls that reach attnrs, so "passed" means attnrs
ran), compares logits (relative 1e-4) and, for generative families, 8 greedily generated tokens. ``python -m
attnrs models`` prints the table; ``tests/test_model_families.py`` asserts it.
"""

from __future__ import annotations

import inspect
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Family",
    "Result",
    "check_family",
    "families",
    "routes_through_interface",
    "tiny_config",
    "unrouted_families",
]

# The sizes a tiny config gets, by attribute name, wherever the family's config has an int attribute of that name.
TINY_SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "d_model": 64,
    "encoder_layers": 2,
    "decoder_layers": 2,
    "encoder_attention_heads": 4,
    "decoder_attention_heads": 4,
    "encoder_ffn_dim": 128,
    "decoder_ffn_dim": 128,
    "d_ff": 128,
    "d_kv": 16,
    "num_layers": 2,
    "num_decoder_layers": 2,
    "num_heads": 4,
    "n_head": 4,
    "n_layer": 2,
    "n_embd": 64,
    "moe_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "index_topk": 4,  # sparse top-k key selection (DeepSeek-V3.2 style) that selects fewer keys than there are
    "n_group": 1,  # grouped expert routing: one group of the tiny experts
    "topk_group": 1,
    "vocab_size": 256,
}
# Multi-head latent attention (DeepSeek-V2 style) has its own head dims; they replace head_dim there, and its keys
# are expanded to every head (as many key/value heads as query heads).
MLA_SIZES = {"kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
             "qk_head_dim": 16, "head_dim": 8, "index_head_dim": 16, "index_n_heads": 4,
             "num_key_value_heads": 4}  # fmt: skip
MAX_PARAMETERS = 20 * 10**6  # a tiny config that stays bigger than this is not built (some are gigabytes)
TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id")
MASKS = {"causal": "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "masked": "MODEL_FOR_MASKED_LM_MAPPING_NAMES",
         "seq2seq": "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"}  # fmt: skip


@dataclass(frozen=True)
class Family:
    """One model type and the head class the auto mapping gives it for a task."""

    model_type: str
    task: str  # causal | masked | seq2seq
    class_name: str


@dataclass
class Result:
    family: Family
    status: str  # pass | fail | not routed | not built
    detail: str = ""
    logit_error: float = 0.0
    features: list[str] = field(default_factory=list)
    seconds: float = 0.0


def families() -> list[Family]:
    """Every (model type, task) of the installed transformers' causal-LM, masked-LM and seq2seq-LM mappings."""
    from transformers.models.auto import modeling_auto

    out = []
    for task, mapping_name in MASKS.items():
        for model_type, class_name in getattr(modeling_auto, mapping_name).items():
            name = class_name[0] if isinstance(class_name, (list, tuple)) else class_name
            out.append(Family(model_type, task, name))
    return out


def _uses_interface(model_class: type) -> bool:
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(inspect.getmodule(model_class))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False


def routes_through_interface(family: Family) -> bool:
    """Whether the family's modeling code, or that of a model it is composed of (its config's ``sub_configs``),
    looks attention functions up in ``ALL_ATTENTION_FUNCTIONS``; the others hard-code their attention and so
    cannot reach attnrs. Read from the source, without building a model."""
    import transformers
    from transformers import CONFIG_MAPPING
    from transformers.models.auto import modeling_auto

    model_class = getattr(transformers, family.class_name, None)
    if model_class is not None and _uses_interface(model_class):
        return True
    if family.model_type not in CONFIG_MAPPING:  # a lazy mapping: index it, its .get() does not load
        return False
    config_class = CONFIG_MAPPING[family.model_type]
    try:  # the default config names its parts' model types (the class may only say AutoConfig)
        config = config_class()
        parts = [getattr(config, name, None) for name in getattr(config_class, "sub_configs", {}) or {}]
    except Exception:  # a default config that does not validate: read the class attribute alone
        parts = list((getattr(config_class, "sub_configs", {}) or {}).values())
    for part in parts:
        name = modeling_auto.MODEL_MAPPING_NAMES.get(getattr(part, "model_type", ""))
        sub_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if sub_class is not None and _uses_interface(sub_class):
            return True
    return False


def unrouted_families() -> list[str]:
    """The model types (of :func:`families`) whose attention cannot reach attnrs (:func:`routes_through_interface`
    is False for every task of the type), sorted: the README's list."""
    routed: dict[str, bool] = {}
    for family in families():
        routed[family.model_type] = routed.get(family.model_type, False) or routes_through_interface(family)
    return sorted(model_type for model_type, ok in routed.items() if not ok)


def _configs(config: Any) -> Iterator[Any]:
    yield config
    for name in ("text_config", "decoder", "encoder", "audio_config", "vision_config"):
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _configs(sub)


def tiny_config(model_type: str) -> Any:
    """The family's default config scaled down: every size attribute in :data:`TINY_SIZES` it has, token ids
    inside the tiny vocabulary, ``layer_types`` cut to the layer count (sub-configs likewise)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type)
    for part in _configs(config):
        for name, value in TINY_SIZES.items():
            current = getattr(part, name, None)
            if isinstance(current, int) and not isinstance(current, bool):
                try:
                    setattr(part, name, value)
                except AttributeError:  # a derived property
                    pass
        for name in TOKEN_IDS:
            current = getattr(part, name, None)
            if isinstance(current, int) and current >= TINY_SIZES["vocab_size"]:
                setattr(part, name, 1)
        if getattr(part, "is_encoder_decoder", False) and getattr(part, "decoder_start_token_id", 0) is None:
            part.decoder_start_token_id = 0
        if getattr(part, "kv_lora_rank", None):  # multi-head latent attention: its own head dims
            for name, value in MLA_SIZES.items():
                if getattr(part, name, None) is not None:
                    setattr(part, name, value)
        if isinstance(getattr(part, "rotary_dim", None), int):
            part.rotary_dim = 8  # at most the tiny head dim
        _keep_every_layer_type(part)
    return config


def _keep_every_layer_type(config: Any) -> None:
    """``layer_types`` cut to the first layer of each kind (at least two layers), so that a hybrid model keeps an
    attention layer (and its other kinds) in the tiny config."""
    layer_types = getattr(config, "layer_types", None)
    if (
        not isinstance(layer_types, list)
        or not layer_types
        or not isinstance(getattr(config, "num_hidden_layers", None), int)
    ):
        return
    kept = list(dict.fromkeys(layer_types))
    kept = (kept * 2)[: max(2, len(kept))]
    try:
        config.layer_types = kept
        config.num_hidden_layers = len(kept)
    except AttributeError:  # derived properties
        pass


def _features(config: Any) -> list[str]:
    """What the family's attention uses, read from its config."""
    found = []
    for part in _configs(config):
        if getattr(part, "sliding_window", None) or getattr(part, "use_sliding_window", False):
            found.append("sliding")
        if getattr(part, "attn_logit_softcapping", None):
            found.append("softcap")
        if getattr(part, "kv_lora_rank", None):
            found.append("MLA")
        if getattr(part, "is_encoder_decoder", False):
            found.append("cross-attention")
        if getattr(part, "relative_attention_num_buckets", None):
            found.append("position_bias")
    return sorted(set(found))


def _randomise_zero_parameters(model: torch.nn.Module) -> None:
    """Parameters that start at zero (sinks, gates, some norms) get random values, so a dropped input shows."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.numel() and not name.endswith("bias") and bool((p == 0).all()):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def _counting(counter: list[int]) -> Callable[..., Any]:
    from .forward import attention_forward

    def counted(*args: Any, **kwargs: Any) -> Any:
        counter[0] += 1
        return attention_forward(*args, **kwargs)

    return counted


_COUNTED = "attnrs_counted"  # the name the checker registers a counting "attnrs" under


def check_family(family: Family, dtype: torch.dtype = torch.float32, generate_tokens: int = 8) -> Result:
    """Eager vs attnrs on a tiny random model of ``family`` (see the module documentation)."""
    import transformers
    from transformers.masking_utils import AttentionMaskInterface as HFMasks
    from transformers.modeling_utils import AttentionInterface as HFAttention

    from .mask_builders import attention_forward_mask

    started = time.perf_counter()
    counter = [0]
    HFAttention.register(_COUNTED, _counting(counter))
    HFMasks.register(_COUNTED, attention_forward_mask)
    result = Result(family, "not built")
    try:
        model_class = getattr(transformers, family.class_name)
        config = tiny_config(family.model_type)
        result.features = _features(config)
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            size = sum(p.numel() for p in model_class._from_config(config, attn_implementation="eager").parameters())
        if size > MAX_PARAMETERS:
            result.detail = f"the tiny config still has {size / 1e6:.0f}M parameters (over {MAX_PARAMETERS // 10**6}M)"
            return result
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = model_class._from_config(config, attn_implementation="eager", dtype=dtype).eval()
            _randomise_zero_parameters(model)
            inputs = _inputs(config, family)
            with torch.no_grad():
                reference = model(**inputs).logits.float()
                try:
                    reference_tokens = _generate(model, inputs, family, generate_tokens)
                except Exception as error:  # eager cannot generate with this tiny config: compare logits only
                    reference_tokens, generate_tokens = None, 0
                    result.detail = f"(no generation: eager raised {type(error).__name__}) "
        result.status = "fail"
        model.set_attn_implementation(_COUNTED)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.no_grad():
                logits = model(**inputs).logits.float()
                tokens = _generate(model, inputs, family, generate_tokens)
        if counter[0] == 0:
            result.status = "not routed"
            result.detail = "attnrs was never called" + (
                "" if routes_through_interface(family) else " (its code does not use ALL_ATTENTION_FUNCTIONS)"
            )
            return result
        rows = _compared_rows(inputs, logits)
        scale = reference[rows].abs().max().clamp_min(1e-6)
        result.logit_error = float((logits[rows] - reference[rows]).abs().max() / scale)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        if not result.logit_error <= tolerance:
            result.detail += f"logits differ from eager by {result.logit_error:.2e} (relative)"
        elif tokens is not None and not torch.equal(tokens, reference_tokens):  # type: ignore[arg-type]
            result.detail += "greedy generation differs from eager"
        else:
            result.status = "pass"
    except Exception as error:  # the checker reports every failure with where it happened
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else ""
        message = str(error).splitlines()[0][:160] if str(error) else ""
        result.detail += f"{type(error).__name__}: {message} ({where})"
    finally:
        result.seconds = time.perf_counter() - started
    return result


def _inputs(config: Any, family: Family) -> dict[str, torch.Tensor]:
    """A left-padded batch of 2 (12 tokens; the second row's first 3 are padding)."""
    vocab = min(int(getattr(config, "vocab_size", None) or TINY_SIZES["vocab_size"]), TINY_SIZES["vocab_size"])
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, vocab, (2, 12), generator=generator)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if family.task == "seq2seq":
        inputs["decoder_input_ids"] = torch.randint(3, vocab, (2, 5), generator=generator)
    return inputs


def _compared_rows(inputs: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """The logit rows eager defines: real tokens (padding rows are arbitrary in eager too)."""
    if logits.shape[1] == inputs["attention_mask"].shape[1]:
        return inputs["attention_mask"].bool()
    return torch.ones(logits.shape[:2], dtype=torch.bool)


def _generate(model: Any, inputs: dict[str, torch.Tensor], family: Family, tokens: int) -> torch.Tensor | None:
    if family.task == "masked" or tokens == 0 or not hasattr(model, "generate"):
        return None
    kwargs = {k: v for k, v in inputs.items() if k != "decoder_input_ids"}
    out: torch.Tensor = model.generate(**kwargs, max_new_tokens=tokens, do_sample=False, min_new_tokens=tokens)
    return out


def bfloat16_errors(family: Family) -> tuple[float, float]:
    """(eager bf16, attnrs bf16) logit errors relative to fp32 eager, on the tiny model of ``family``: attnrs in
    bf16 should be no further from fp32 than eager's own bf16 is."""
    import transformers

    config = tiny_config(family.model_type)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = getattr(transformers, family.class_name)._from_config(config, attn_implementation="eager").eval()
        _randomise_zero_parameters(model)
        inputs = _inputs(config, family)
        with torch.no_grad():
            reference = model(**inputs).logits.float()
            model.to(torch.bfloat16)
            eager = model(**inputs).logits.float()
            model.set_attn_implementation("attnrs")
            ours = model(**inputs).logits.float()
    rows = _compared_rows(inputs, reference)
    scale = reference[rows].abs().max().clamp_min(1e-6)
    return (
        float((eager[rows] - reference[rows]).abs().max() / scale),
        float((ours[rows] - reference[rows]).abs().max() / scale),
    )
