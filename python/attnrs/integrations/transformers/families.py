"""Every transformers model family, tried with ``attn_implementation="attnrs"`` against ``"eager"``.

:func:`families` enumerates the installed transformers' causal-LM, masked-LM and seq2seq-LM auto mappings;
:func:`check_family` builds a tiny random model of one (the family's default config scaled down by
:func:`tiny_config`, fixed seed, parameters that start at zero randomised so that a dropped input shows), runs a
left-padded batch of 2 with eager and with attnrs (counting the calls that reach attnrs, so "passed" means attnrs
ran), compares logits (relative 1e-4) and, for generative families, 8 greedily generated tokens. Where the
scaled-down default config does not build, :data:`OVERRIDES` corrects it per family; :data:`NOT_BUILT` names the
families the checker cannot run, and why. ``python -m attnrs models`` prints the table;
``tests/test_model_families.py`` asserts it.
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
    "NOT_BUILT",
    "OVERRIDES",
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


def _hrm_layers(config: Any) -> None:
    """One block per stack: ``num_hidden_layers`` counts every attention call of the recurrent forward."""
    config.num_layers_per_stack = 1
    config.num_hidden_layers = config.H_cycles * (config.L_cycles + 1)


# Two layers of each kind, the last two reading the keys and values of the first two.
_KV_SHARING = {"layer_types": ["sliding_attention", "full_attention"] * 2, "num_hidden_layers": 4,
               "num_kv_shared_layers": 2}  # fmt: skip
_QSA = {"indexer_n_heads": 4, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
        "indexer_compress_ratio": 2}  # fmt: skip
# Per-family corrections to the scaled-down default config (applied after TINY_SIZES) where it does not build as it
# is: a None the modeling code needs as a number, a layer pattern whose attention layers lie past the tiny layer
# count, sizes that must agree. A dict sets attributes (a dict value, a sub-config's); a function edits the config.
# They change sizes and layer patterns only, never what is compared.
OVERRIDES: dict[str, dict[str, Any] | Callable[[Any], None]] = {
    # None defaults the modeling code reads as numbers
    "deepseek_v2": {"num_experts_per_tok": 2},
    "dots1": {"n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1},
    "hunyuan_v1_dense": {"head_dim": 16},
    "hunyuan_v1_moe": {"head_dim": 16},
    "ministral": {"head_dim": 16},
    "nemotron": {"num_key_value_heads": 2},
    "qwen4_exp": _QSA,  # QSA token selection (a budget of 8 of the 12 tokens)
    "qwen4_exp_text": _QSA,
    # sizes in sub-configs the scaling does not reach, or derived from the default sizes when the config was made
    "dbrx": {
        "attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0},  # read by the modeling code as numbers
        "ffn_config": {"hidden_size": 64, "ffn_hidden_size": 128},
    },
    # byte-level: hash n-gram tables, a global model as wide as cross_attn_k (2) patches of the local one, and the
    # layer count its cache is made for (which its config lacks)
    "blt": {
        "encoder_hash_byte_group_vocab": 256,
        "encoder_config": {"hidden_size_global": 128},
        "decoder_config": {"hidden_size_global": 128},
        "global_config": {"hidden_size": 128, "head_dim": 32},
        "num_hidden_layers": 2,
    },
    "vibevoice_asr": {
        f"{kind}_tokenizer_encoder_config": {"num_filters": 4, "depths": [1] * 7} for kind in ("acoustic", "semantic")
    },
    # hybrid layer patterns whose attention layers lie past the tiny layer count: one of each kind
    "bamba": {"attn_layer_indices": [1], "mamba_n_heads": 8, "mamba_d_head": 16},
    "granitemoehybrid": {"layer_types": ["linear_attention", "full_attention"], "mamba_n_heads": 8, "mamba_d_head": 16},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "recurrent_gemma": {"num_hidden_layers": 3, "lru_width": 64},  # recurrent, recurrent, attention
    "zamba": {
        "layers_block_type": ["linear_attention", "hybrid", "hybrid"],
        "num_hidden_layers": 3,
        "attention_hidden_size": 128,
        "attention_head_dim": 32,
        "mamba_dt_rank": 4,
    },
    "zamba2": {
        "layers_block_type": ["linear_attention", "hybrid"],
        "hybrid_layer_ids": [1],
        "mamba_headdim": 16,
        "attention_hidden_size": 128,
        "attention_head_dim": 32,
    },
    "esm": {"vocab_size": 256, "pad_token_id": 1},
    "esmc": {"num_key_value_heads": 4},  # its key norm spans the hidden size
    "mobilebert": {"embedding_size": 32},  # below the hidden size (the head projects the rest)
    "t5gemma": {"decoder": {"cross_attention_hidden_size": 64}},  # the encoder's (tiny) hidden size
    "gemma4_text": {"vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16},
    "gemma4": {"text_config": {"vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16}},
    "gemma3n_text": {"vocab_size_per_layer_input": 256, "hidden_size_per_layer_input": 16, **_KV_SHARING},
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
    "hrm_text": _hrm_layers,
    # one input, one recurrent (looped twice) and one output layer
    "dory": {
        "n_input_layers": 1,
        "n_recurrent_layers": 1,
        "n_output_layers": 1,
        "num_hidden_layers": 3,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    },
    "xmod": {"default_language": "en_XX"},
    # families whose attention transformers hard-codes ("not routed"): built all the same, so the sweep says so
    "funnel": {"block_sizes": [1, 1]},
    "prophetnet": {"num_encoder_layers": 2, "num_decoder_layers": 2},
    "reformer": {"axial_pos_embds_dim": [32, 32]},
    "squeezebert": {"embedding_size": 64},
    "rwkv": {"attention_hidden_size": 64},
    "luke": {"entity_vocab_size": 16, "entity_emb_size": 16},
    "perceiver": {"d_latents": 64, "num_latents": 16, "num_self_attends_per_block": 2},
    # state-space sizes that must match the tiny hidden size (heads x head dim = expand x hidden)
    "mamba2": {"num_heads": 8, "n_groups": 1},
    # one codebook: the input ids are (batch x codebooks, length)
    "musicgen": {"num_codebooks": 1},
    "musicgen_melody": {"num_codebooks": 1},
}
# Families the checker cannot build, and why.
_ASSISTANT = ("a draft model: every layer reads the keys and values of its target model's forward (shared_kv_states), "
              "which the checker does not run")  # fmt: skip
NOT_BUILT: dict[str, str] = {
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "voxtral_realtime": "a streaming speech model: every forward needs audio features (input_features), which the "
    "checker does not make",
}
# Families whose eager and sdpa disagree in transformers itself, so attnrs is compared with sdpa. BLT pools its byte
# positions, the left padding included, into patches, so rows that see no key reach the real tokens: eager's
# additive mask gives them the mean of the values, sdpa (and attnrs) zeros (1.3e-1 apart on the tiny config).
SDPA_REFERENCE: dict[str, str] = {
    "blt": "eager and sdpa differ on rows that see no key (the mean of the values vs zeros), which BLT pools",
}
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
    names = ("text_config", "decoder", "encoder", "audio_config", "vision_config", *_sub_configs(config))
    for name in dict.fromkeys(names):
        sub = _get(config, name)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _configs(sub)


def _sub_configs(config: Any) -> list[str]:
    return list(getattr(type(config), "sub_configs", None) or {})


def _get(config: Any, name: str) -> Any:
    """``config.name`` or None, also for a per-layer attribute of a heterogeneous config (its global value)."""
    if hasattr(config, "_getattr_without_heterogeneous_validation"):
        return config._getattr_without_heterogeneous_validation(name, None)
    return getattr(config, name, None)


def _part_for(config: Any, config_class: type | None) -> Any:
    """The part of a composite config that a head class takes (``Llama4ForCausalLM`` takes the text config of
    the ``llama4`` config), else the config itself."""
    if config_class is None or isinstance(config, config_class):
        return config
    for name in _sub_configs(config):
        if isinstance(_get(config, name), config_class):
            return _get(config, name)
    return config


def tiny_config(model_type: str, config_class: type | None = None) -> Any:
    """The family's default config scaled down: every size attribute in :data:`TINY_SIZES` it has, token ids
    inside the tiny vocabulary, ``layer_types`` cut to the layer count (sub-configs likewise; per-layer values of
    a heterogeneous config in proportion), then the family's :data:`OVERRIDES`. With ``config_class`` (the head
    class's), the part of a composite config of that class."""
    from transformers import AutoConfig

    config = _part_for(AutoConfig.for_model(model_type), config_class)
    for part in _configs(config):
        per_layer = _take_per_layer_overrides(part)
        originals = {name: _get(part, name) for name in {*TINY_SIZES, *MLA_SIZES}}
        for name, value in TINY_SIZES.items():
            current = getattr(part, name, None)
            if isinstance(current, int) and not isinstance(current, bool):
                try:
                    setattr(part, name, value)
                except (AttributeError, NotImplementedError):  # a derived property (its parts are in OVERRIDES)
                    pass
        for name in TOKEN_IDS:
            current = getattr(part, name, None)
            if isinstance(current, int) and current >= TINY_SIZES["vocab_size"]:
                setattr(part, name, 1)
        # Absent or None: an encoder-decoder cannot generate without one (T5's tiny configs lack the attribute).
        if getattr(part, "is_encoder_decoder", False) and getattr(part, "decoder_start_token_id", None) is None:
            part.decoder_start_token_id = 0
        if getattr(part, "kv_lora_rank", None):  # multi-head latent attention: its own head dims
            for name, value in MLA_SIZES.items():
                if getattr(part, name, None) is not None:
                    setattr(part, name, value)
        if isinstance(getattr(part, "rotary_dim", None), int):
            part.rotary_dim = 8  # at most the tiny head dim
        kept = _keep_every_layer_type(part)
        if per_layer is not None:
            _restore_per_layer_overrides(part, per_layer, kept, originals)
    _override(config, OVERRIDES.get(model_type, {}))
    return config


def _take_per_layer_overrides(config: Any) -> dict[int, dict[str, Any]] | None:
    """A heterogeneous config's per-layer values, removed (so that the global ones can be scaled), or None."""
    if not getattr(config, "is_heterogeneous", False):
        return None
    overrides = {i: dict(values) for i, values in config._heterogeneity_spec.per_layer_overrides.items()}
    config.per_layer_config = None
    return overrides


def _restore_per_layer_overrides(
    config: Any, overrides: dict[int, dict[str, Any]], kept: list[int], originals: dict[str, Any]
) -> None:
    """The per-layer values of the layers kept (``kept[i]``: the original index of tiny layer ``i``), each size
    scaled as its global value was (a full-attention head dim twice the sliding one stays twice the tiny one)."""

    def scaled(name: str, value: Any) -> Any:
        before, after = originals.get(name), _get(config, name)
        if isinstance(value, int) and isinstance(before, int) and before and isinstance(after, int):
            return max(1, round(value * after / before))
        return value

    tiny = {}
    for new, old in enumerate(kept):
        values = {name: scaled(name, value) for name, value in overrides.get(old, {}).items()}
        if values:
            tiny[new] = values
    config.per_layer_config = tiny


def _override(config: Any, values: dict[str, Any] | Callable[[Any], None]) -> None:
    """Sets ``values`` on ``config`` (a dict value for a sub-config attribute sets that sub-config's attributes),
    or calls it."""
    if callable(values):
        values(config)
        return
    for name, value in values.items():
        current = _get(config, name)
        if isinstance(value, dict) and hasattr(current, "to_dict"):
            _override(current, value)
        else:
            setattr(config, name, value)


def _keep_every_layer_type(config: Any) -> list[int]:
    """``layer_types`` cut to the first layer of each kind (at least two layers), so that a hybrid model keeps an
    attention layer (and its other kinds) in the tiny config. Returns the original index of each layer kept."""
    layer_types = _get(config, "layer_types")
    layers = _get(config, "num_hidden_layers")
    if not isinstance(layers, int):
        return []
    if not isinstance(layer_types, list) or not layer_types:
        return list(range(layers))
    first = {kind: layer_types.index(kind) for kind in dict.fromkeys(layer_types)}
    kept = (list(first.values()) * 2)[: max(2, len(first))]
    try:
        config.layer_types = [layer_types[i] for i in kept]
        config.num_hidden_layers = len(kept)
    except AttributeError:  # derived properties
        return list(range(layers))
    return kept


def _features(config: Any) -> list[str]:
    """What the family's attention uses, read from its config."""
    found = []
    for part in _configs(config):
        if _get(part, "sliding_window") or _get(part, "use_sliding_window"):
            found.append("sliding")
        if _get(part, "attn_logit_softcapping"):
            found.append("softcap")
        if _get(part, "kv_lora_rank"):
            found.append("MLA")
        if _get(part, "is_encoder_decoder"):
            found.append("cross-attention")
        if _get(part, "relative_attention_num_buckets"):
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
        if family.model_type in NOT_BUILT:
            result.detail = NOT_BUILT[family.model_type]
            return result
        config = tiny_config(family.model_type, model_class.config_class)
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
            against = reference_implementation(family)
            model = model_class._from_config(config, attn_implementation=against, dtype=dtype).eval()
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
        if against != "eager":
            result.detail = f"(compared with {against}: {SDPA_REFERENCE[family.model_type]}) " + result.detail
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
            result.detail += f"logits differ from {against} by {result.logit_error:.2e} (relative)"
        elif tokens is not None and not torch.equal(tokens, reference_tokens):  # type: ignore[arg-type]
            result.detail += f"greedy generation differs from {against}"
        else:
            result.status = "pass"
    except Exception as error:  # the checker reports every failure with where it happened
        frames = traceback.extract_tb(error.__traceback__)
        where = f"{frames[-1].filename.split('site-packages/')[-1]}:{frames[-1].lineno}" if frames else ""
        message = next((line for line in str(error).splitlines() if line.strip()), "")[:160]
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


def reference_implementation(family: Family) -> str:
    """What attnrs is compared with: "eager", or "sdpa" for the families of :data:`SDPA_REFERENCE`."""
    return "sdpa" if family.model_type in SDPA_REFERENCE else "eager"


def bfloat16_errors(family: Family) -> tuple[float, float] | None:
    """(eager bf16, attnrs bf16) logit errors relative to fp32 eager, on the tiny model of ``family``: attnrs in
    bf16 should be no further from fp32 than eager's own bf16 is. None where eager itself cannot run the model in
    bf16 (a part that stays fp32, say). "eager" here is :func:`reference_implementation`."""
    import transformers

    model_class = getattr(transformers, family.class_name)
    config = tiny_config(family.model_type, model_class.config_class)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_class._from_config(config, attn_implementation=reference_implementation(family)).eval()
        _randomise_zero_parameters(model)
        inputs = _inputs(config, family)
        with torch.no_grad():
            reference = model(**inputs).logits.float()
            model.to(torch.bfloat16)
            try:
                eager = model(**inputs).logits.float()
            except Exception:  # eager's own failure: nothing to compare attnrs with
                return None
            model.set_attn_implementation("attnrs")
            ours = model(**inputs).logits.float()
    rows = _compared_rows(inputs, reference)
    scale = reference[rows].abs().max().clamp_min(1e-6)
    return (
        float((eager[rows] - reference[rows]).abs().max() / scale),
        float((ours[rows] - reference[rows]).abs().max() / scale),
    )
