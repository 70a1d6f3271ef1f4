"""attn_implementation="attnrs" on tiny random models of many families, against transformers' eager.

One table: a new family is one line. Configs are tiny (hidden 64, 2 layers) with fixed seeds; nothing is
downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attnrs  # noqa: E402
from attnrs.integrations.transformers import register  # noqa: E402

register()

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=101,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass
class Family:
    name: str
    make: Callable[[], Any]
    kind: str = "decoder"  # decoder | encoder | seq2seq


def _decoder(config_cls: str, model_cls: str, **extra: Any) -> Callable[[], Any]:
    def make() -> Any:
        config = getattr(transformers, config_cls)(**{**SMALL, "num_key_value_heads": 2, **extra})
        return getattr(transformers, model_cls)(config)

    return make


def _bert() -> Any:
    config = transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     vocab_size=101, max_position_embeddings=128)
    return transformers.BertModel(config)


def _modernbert() -> Any:
    config = transformers.ModernBertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                           num_attention_heads=4, vocab_size=101, max_position_embeddings=128,
                                           local_attention=4, global_attn_every_n_layers=2, pad_token_id=0)
    return transformers.ModernBertModel(config)


def _t5() -> Any:
    # No dropout: training gradients are compared with eager's, and attnrs's attention dropout draws a different
    # (counter-based) pattern than torch's (tested on its own below).
    config = transformers.T5Config(d_model=64, d_ff=96, d_kv=16, num_layers=2, num_heads=4, vocab_size=101,
                                   decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    return transformers.T5ForConditionalGeneration(config)


FAMILIES = [
    Family("llama", _decoder("LlamaConfig", "LlamaForCausalLM")),
    Family("mistral", _decoder("MistralConfig", "MistralForCausalLM", sliding_window=4)),
    Family("qwen2", _decoder("Qwen2Config", "Qwen2ForCausalLM")),
    Family("qwen3", _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=16)),
    Family("gemma", _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=16)),
    Family("gemma2", _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=16, sliding_window=4,
                              attn_logit_softcapping=5.0)),
    Family("gemma3", _decoder("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=16, sliding_window=4,
                              layer_types=["sliding_attention", "full_attention"])),
    Family("gpt_oss", _decoder("GptOssConfig", "GptOssForCausalLM", head_dim=16, sliding_window=4, num_local_experts=2,
                               num_experts_per_tok=2)),  # every expert used: no routing flips in bf16
    Family("phi3", _decoder("Phi3Config", "Phi3ForCausalLM")),
    Family("olmo2", _decoder("Olmo2Config", "Olmo2ForCausalLM")),
    Family("cohere2", _decoder("Cohere2Config", "Cohere2ForCausalLM", sliding_window=4,
                               layer_types=["sliding_attention", "full_attention"])),
    Family("bert", _bert, "encoder"),
    Family("modernbert", _modernbert, "encoder"),
    Family("t5", _t5, "seq2seq"),
]
DECODERS = [f for f in FAMILIES if f.kind == "decoder"]


def build(family: Family, impl: str, dtype: torch.dtype = torch.float32) -> Any:
    torch.manual_seed(0)
    model = family.make().to(dtype).eval()
    model.set_attn_implementation(impl)
    if family.name == "gpt_oss":  # random sinks, so they matter
        with torch.no_grad():
            for module in model.modules():
                if hasattr(module, "sinks"):
                    module.sinks.normal_()
    return model


def inputs(batch: int = 2, length: int = 10, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (batch, length), generator=gen)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, :pad] = 0  # left padding
    ids[1, :pad] = 0
    return ids, mask


def run(model: Any, family: Family, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if family.kind == "seq2seq":
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
    out = model(input_ids=ids, attention_mask=mask)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_logits_match_eager_with_left_padding(family: Family) -> None:
    ids, mask = inputs()
    with torch.no_grad():
        expected = run(build(family, "eager"), family, ids, mask)
        got = run(build(family, "attnrs"), family, ids, mask)
    rows = mask.bool() if family.kind != "seq2seq" else torch.ones(got.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(got[rows], expected[rows], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_bf16_is_as_close_to_fp32_as_eager_bf16(family: Family) -> None:
    ids, mask = inputs()
    rows = mask.bool()
    with torch.no_grad():
        reference = run(build(family, "eager"), family, ids, mask)[rows]
        eager_error = (run(build(family, "eager", torch.bfloat16), family, ids, mask)[rows].float() - reference).abs()
        our_error = (run(build(family, "attnrs", torch.bfloat16), family, ids, mask)[rows].float() - reference).abs()
    assert our_error.mean() <= 1.5 * eager_error.mean() + 1e-3
    assert our_error.max() <= 2.0 * eager_error.max() + 1e-2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", DECODERS, ids=lambda f: f.name)
def test_greedy_generate_matches_eager(family: Family, cache: str) -> None:
    ids, mask = inputs(length=8)
    kwargs: dict[str, Any] = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    expected = build(family, "eager").generate(ids, **kwargs)
    got = build(family, "attnrs").generate(ids, **kwargs)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("family", [f for f in DECODERS if f.name in ("llama", "mistral", "gemma2")],
                         ids=lambda f: f.name)
def test_packed_position_ids_equal_separate_runs(family: Family) -> None:
    """Two documents packed in one row stay isolated, also when a cache exists and transformers drops the
    packed mask."""
    model = build(family, "attnrs")
    gen = torch.Generator().manual_seed(2)
    first, second = torch.randint(1, 100, (1, 6), generator=gen), torch.randint(1, 100, (1, 5), generator=gen)
    packed = torch.cat([first, second], dim=1)
    position_ids = torch.cat([torch.arange(6), torch.arange(5)])[None]
    with torch.no_grad():
        separate = torch.cat([model(input_ids=first).logits, model(input_ids=second).logits], dim=1)
        for use_cache in (False, True):
            together = model(input_ids=packed, position_ids=position_ids, use_cache=use_cache).logits
            torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-4)


def test_custom_4d_mask_shared_prefix() -> None:
    """transformers' test_custom_4d_attention_mask: a shared prefix with two continuations in one row."""
    family = FAMILIES[0]
    model = build(family, "attnrs")
    gen = torch.Generator().manual_seed(3)
    prefix, cont_a, cont_b = (torch.randint(1, 100, (1, n), generator=gen) for n in (4, 3, 3))
    row = torch.cat([prefix, cont_a, cont_b], dim=1)
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    mask[0, 0, :7, :7] = torch.ones(7, 7, dtype=torch.bool).tril()
    mask[0, 0, 7:, :4] = True
    mask[0, 0, 7:, 7:] = torch.ones(3, 3, dtype=torch.bool).tril()
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 4, 5, 6]])
    additive = torch.where(mask, 0.0, torch.finfo(torch.float32).min)
    with torch.no_grad():
        separate = model(input_ids=torch.cat([prefix, cont_b], dim=1)).logits[:, -1]
        for custom in (mask, additive):
            together = model(input_ids=row, attention_mask=custom, position_ids=position_ids).logits[:, -1]
            torch.testing.assert_close(together, separate, rtol=1e-4, atol=1e-4)


def test_switching_implementation_at_run_time() -> None:
    family = FAMILIES[0]
    model = build(family, "eager")
    ids, mask = inputs()
    with torch.no_grad():
        eager = run(model, family, ids, mask)
        model.config._attn_implementation = "attnrs"
        via_config = run(model, family, ids, mask)
        model.set_attn_implementation("sdpa")
        model.set_attn_implementation("attnrs")
        via_setter = run(model, family, ids, mask)
    rows = mask.bool()
    torch.testing.assert_close(via_config[rows], eager[rows], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(via_setter[rows], eager[rows], rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "attnrs"


def _grads(model: Any, family: Family, checkpointing: bool) -> dict[str, torch.Tensor]:
    model.train()
    if checkpointing:
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    ids, mask = inputs()
    if family.kind == "seq2seq":
        loss = model(input_ids=ids, attention_mask=mask, labels=ids[:, :5].contiguous()).loss
    else:
        # A label is predicted from the previous position; where that is padding (its row sees no key, which
        # eager turns into mean(V) and SDPA and attnrs into 0) the prediction is meaningless, so it is ignored.
        predicted_from_padding = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], dim=1) == 0
        labels = ids.masked_fill((mask == 0) | predicted_from_padding, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("family", [f for f in FAMILIES if f.name in ("llama", "gemma2", "gpt_oss", "t5")],
                         ids=lambda f: f.name)
def test_training_gradients_match_eager(family: Family, checkpointing: bool) -> None:
    expected = _grads(build(family, "eager"), family, checkpointing)
    got = _grads(build(family, "attnrs"), family, checkpointing)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)


def test_output_attentions_returns_weights() -> None:
    family = FAMILIES[0]
    ids, mask = inputs()
    with torch.no_grad():
        eager = build(family, "eager")(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        ours = build(family, "attnrs")(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert len(ours) == len(eager)
    for a, b in zip(ours, eager):
        rows = mask.bool()[:, None, :, None].expand_as(a)
        torch.testing.assert_close(a[rows], b[rows], rtol=1e-4, atol=1e-5)


def test_register_is_idempotent_and_pairs_the_mask_builder() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert register() == register() == "attnrs"
    assert "attnrs" in ALL_ATTENTION_FUNCTIONS and "attnrs" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    with pytest.raises(ValueError, match="flash"):
        register("my_flash")
    assert register("attnrs_eager_copy", attnrs.functions.eager_attention_forward) == "attnrs_eager_copy"
    ALL_ATTENTION_FUNCTIONS._global_mapping.pop("attnrs_eager_copy")
    ALL_MASK_ATTENTION_FUNCTIONS._global_mapping.pop("attnrs_eager_copy")


def test_unexpected_masks_raise_typed_errors() -> None:
    from attnrs.integrations.transformers import attention_forward

    module = torch.nn.Module()
    q = k = v = torch.randn(1, 2, 3, 8)
    with pytest.raises(attnrs.ShapeError, match="attention_mask"):
        attention_forward(module, q, k, v, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(attnrs.DtypeError, match="attention_mask"):
        attention_forward(module, q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.int64))
    with pytest.raises(attnrs.DtypeError, match="attention_mask"):
        attention_forward(module, q, k, v, "causal")
    with pytest.raises(attnrs.UnsupportedError, match="unknown_kwarg"):  # refused by name, never dropped
        attention_forward(module, q, k, v, None, unknown_kwarg=1)
    out, weights = attention_forward(module, q, k, v, None, use_cache=True)  # known to change nothing
    assert out.shape == (1, 3, 2, 8) and weights is None


def test_twenty_training_steps_track_sdpa() -> None:
    """A tiny Llama trained for 20 AdamW steps with attnrs and with sdpa: the loss curves agree."""
    family = FAMILIES[0]
    gen = torch.Generator().manual_seed(7)
    batches = [torch.randint(1, 100, (2, 16), generator=gen) for _ in range(4)]
    curves = {}
    for impl in ("sdpa", "attnrs"):
        model = build(family, impl).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for step in range(20):
            ids = batches[step % len(batches)]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        curves[impl] = torch.tensor(losses)
    assert curves["attnrs"][-1] < curves["attnrs"][0] - 0.5, "the model learns"
    torch.testing.assert_close(curves["attnrs"], curves["sdpa"], rtol=1e-3, atol=1e-3)


def test_attention_dropout_in_training_is_reproducible_and_checkpoint_safe() -> None:
    """attention_dropout > 0 in train mode runs the Rust kernel's dropout: a run repeats under torch.manual_seed,
    gradient checkpointing (which re-runs the forward) gives the gradients of the plain run, and eval mode
    drops nothing."""
    make = _decoder("LlamaConfig", "LlamaForCausalLM", attention_dropout=0.3)
    ids, mask = inputs()

    def grads(checkpointing: bool, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = make()
        model.set_attn_implementation("attnrs")
        model.train()
        if checkpointing:
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        torch.manual_seed(seed)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, plain = grads(False, 5)
    again_loss, again = grads(False, 5)
    ckpt_loss, ckpt = grads(True, 5)
    other_loss, _ = grads(False, 6)
    assert torch.equal(loss, again_loss) and all(torch.equal(plain[n], again[n]) for n in plain)
    assert torch.equal(loss, ckpt_loss) and plain.keys() == ckpt.keys()
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    assert not torch.equal(loss, other_loss), "a different seed drops different weights"
    torch.manual_seed(0)
    model = make()
    model.set_attn_implementation("attnrs")
    eager = make()
    with torch.no_grad():
        eager.load_state_dict(model.state_dict())
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        ours = model.eval()(input_ids=ids, attention_mask=mask).logits
        theirs = eager.eval()(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # padded rows differ by design (eager averages V where attnrs gives 0)
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-4, atol=1e-5)
