"""torch.compile of attnrs: structural masks trace into one graph, new padding needs no recompilation, and tiny
transformers models with attn_implementation="attnrs" compile with fullgraph=True and match eager.

Backends: "aot_eager" (dynamo + AOTAutograd, no code generation) everywhere except one model test on
"inductor" (C++ code generation with the machine's compiler), which keeps this file within a few minutes on two
cores. References are torch's SDPA on a dense mask built here from torch ops, torch's own ``create_block_mask``,
and transformers' eager / sdpa attention on the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import attnrs
from attnrs import _attnrs
from attnrs.errors import ArgumentError
from attnrs.masks.grid import Grid
from attnrs.masks.program import encode_program

B, H, L, D = 2, 4, 16, 8


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _qkv(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, generator=gen) for _ in range(3))  # type: ignore[return-value]


def _left_padding(pads: tuple[int, ...]) -> torch.Tensor:
    mask2d = torch.ones(B, L, dtype=torch.bool)
    for b, pad in enumerate(pads):
        mask2d[b, :pad] = False
    return mask2d


def _documents(cuts: tuple[int, ...]) -> torch.Tensor:
    """Document ids [B, L]: row b starts a new document at position cuts[b] (and at L // 4)."""
    ids = torch.zeros(B, L, dtype=torch.int64)
    for b, cut in enumerate(cuts):
        ids[b, L // 4 :] += 1
        ids[b, cut:] += 1
    return ids


# Each case: a function of (q, k, v, table) that builds its mask inside the traced code and calls attention, and
# the same mask as a dense bool [B, 1, L, L] built from torch ops (the SDPA reference).
_pos = torch.arange(L)
_causal = _pos[None, :] <= _pos[:, None]


def _causal_padding(q: Any, k: Any, v: Any, mask2d: Any) -> Any:
    return attnrs.attention(q, k, v, attnrs.masks.causal() & attnrs.masks.padding(mask2d))


def _window_padding(q: Any, k: Any, v: Any, mask2d: Any) -> Any:
    return attnrs.attention(q, k, v, attnrs.masks.sliding_window(5) & attnrs.masks.padding(mask2d))


def _documents_causal(q: Any, k: Any, v: Any, ids: Any) -> Any:
    return attnrs.attention(q, k, v, attnrs.masks.document(ids) & attnrs.masks.causal())


CASES: dict[str, tuple[Callable[..., Any], Callable[[Any], torch.Tensor], Callable[[tuple[int, ...]], Any]]] = {
    "causal&padding": (_causal_padding, lambda m: (_causal & m[:, None, None, :]), _left_padding),
    "window&padding": (
        _window_padding,
        lambda m: (_causal & (_pos[None, :] > _pos[:, None] - 5) & m[:, None, None, :]),
        _left_padding,
    ),
    "documents&causal": (
        _documents_causal,
        lambda ids: (_causal & (ids[:, None, :, None] == ids[:, None, None, :])),
        _documents,
    ),
}


def _check_against_sdpa(got: torch.Tensor, q: Any, k: Any, v: Any, dense: torch.Tensor) -> None:
    """Rows that see a key match SDPA on the dense mask; rows that see none are zeros (attnrs's rule)."""
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    sees = dense.expand(B, H, L, L).any(-1)
    torch.testing.assert_close(got[sees], expected[sees], rtol=1e-5, atol=1e-5)
    assert bool((got[~sees] == 0).all())


@pytest.mark.parametrize("case", list(CASES))
def test_explain_reports_one_graph_and_no_break(case: str) -> None:
    fn, dense_of, table_of = CASES[case]
    q, k, v = _qkv()
    table = table_of((0, 5))
    explanation = torch._dynamo.explain(fn)(q, k, v, table)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v, table)
    torch.testing.assert_close(got, fn(q, k, v, table), rtol=0, atol=0)
    _check_against_sdpa(got, q, k, v, dense_of(table))


@pytest.mark.parametrize("case", list(CASES))
def test_new_table_of_the_same_shape_does_not_recompile(case: str) -> None:
    fn, dense_of, table_of = CASES[case]
    q, k, v = _qkv(1)
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    first, second = table_of((0, 5)), table_of((7, 2))
    compiled(q, k, v, first)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled(q, k, v, second)
    assert counter.frame_count == 1
    _check_against_sdpa(got, q, k, v, dense_of(second))


def test_gradients_flow_through_a_compiled_mask() -> None:
    q, k, v = (t.requires_grad_() for t in _qkv(2))
    mask2d = _left_padding((3, 0))
    compiled = torch.compile(_causal_padding, backend="aot_eager", fullgraph=True)
    compiled(q, k, v, mask2d).square().sum().backward()
    grads = [t.grad for t in (q, k, v)]
    qr, kr, vr = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dense = _causal & mask2d[:, None, None, :]
    out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=dense)
    out = torch.where(dense.any(-1, keepdim=True), out, 0.0)  # rows that see nothing are zeros in attnrs
    out.square().sum().backward()
    for got, want in zip(grads, (qr.grad, kr.grad, vr.grad)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_bad_table_values_are_typed_errors_at_run_time() -> None:
    """Values unknown while tracing are checked by Rust when the operator runs, naming the argument."""

    def fn(q: Any, k: Any, v: Any, lengths: Any) -> Any:
        return attnrs.attention(q, k, v, attnrs.masks.prefix_lm(lengths))

    q, k, v = _qkv(3)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    compiled(q, k, v, torch.tensor([4, 9]))
    with pytest.raises(ArgumentError, match="prefix_lengths"):
        compiled(q, k, v, torch.tensor([4, -1]))
    with pytest.raises(ArgumentError, match="prefix_lengths"):
        fn(q, k, v, torch.tensor([4, -1]))  # eagerly too


_SAMPLES = {
    "causal": lambda: attnrs.masks.causal(3),
    "window&padding": lambda: attnrs.masks.sliding_window(3) & attnrs.masks.padding(_left_padding((2, 0))),
    "bidirectional_window|~chunked": lambda: (
        attnrs.masks.sliding_window(2, causal=False) | ~attnrs.masks.chunked(4, torch.tensor([1, 3]))
    ),
    "documents&prefix": lambda: attnrs.masks.document(_documents((9, 11))) & attnrs.masks.prefix_lm([3, 5]),
    "nested shifts": lambda: ~(~attnrs.masks.causal().shifted(2, -1)).shifted(-2, 1) & attnrs.masks.bidirectional(),
    "overlay|empty": lambda: attnrs.masks.sliding_window_overlay(4) | ~attnrs.masks.bidirectional(),
}


@pytest.mark.parametrize("name", list(_SAMPLES))
@pytest.mark.parametrize("offsets", [(0, 0), (3, 0), (-2, 5)])
def test_torch_built_program_is_the_rust_operand(name: str, offsets: tuple[int, int]) -> None:
    mask = _SAMPLES[name]()
    grid = Grid(B, 1, L, L, *offsets)
    want = bytes(_attnrs.mask_operand(mask.to_rust(grid), *offsets))
    assert bytes(encode_program(mask, *offsets).numpy()) == want


def test_operand_mask_decodes_programs_and_refuses_malformed_ones() -> None:
    mask = attnrs.masks.causal() & attnrs.masks.padding(_left_padding((3, 0)))
    program = encode_program(mask, 0, 0)
    decoded = _attnrs.operand_mask(program)
    assert decoded is not None
    assert bytes(_attnrs.mask_operand(decoded, 0, 0)) == bytes(program.numpy())
    assert _attnrs.operand_mask(torch.empty(0, dtype=torch.uint8)) is None
    with pytest.raises(ArgumentError, match="^mask_program: "):
        _attnrs.operand_mask(program[:-1])
    with pytest.raises(attnrs.errors.DtypeError, match="^mask_program: "):
        _attnrs.operand_mask(program.view(torch.int64) if program.numel() % 8 == 0 else program.float())


def test_block_tables_op_passes_opcheck() -> None:
    mask = attnrs.masks.sliding_window(5) & attnrs.masks.padding(_left_padding((6, 0)))
    torch.library.opcheck(torch.ops.attnrs.block_tables, (encode_program(mask, 0, 0), B, 2, L, L - 3, 4, 8))


def test_block_mask_built_while_compiling_equals_torch_and_eager() -> None:
    def tables(mask2d: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = attnrs.masks.sliding_window(5) & attnrs.masks.padding(mask2d)
        bm = attnrs.create_block_mask(mask, B, None, L, L, BLOCK_SIZE=4)
        return bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, bm.q_num_blocks

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(tables, backend=counter, fullgraph=True)
    for pads in ((0, 6), (9, 1)):
        mask2d = _left_padding(pads)
        got = compiled(mask2d)

        def mask_mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            return (kv <= q) & (kv > q - 5) & mask2d[b, kv]

        ref = torch_create_block_mask(mask_mod, B, None, L, L, device="cpu", BLOCK_SIZE=4)
        for g, want in zip(got, (ref.kv_num_blocks, ref.kv_indices, ref.full_kv_num_blocks, ref.full_kv_indices)):
            assert torch.equal(g, want)
        for g, e in zip(got, tables(mask2d)):
            assert torch.equal(g, e)
    assert counter.frame_count == 1


# -- tiny transformers models ------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")

from attnrs.integrations.transformers import register  # noqa: E402

register()

SMALL = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=101, max_position_embeddings=128, pad_token_id=0)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 5}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 16, "sliding_window": 5,
                                                     "attn_logit_softcapping": 5.0}),
}


def _model(name: str, impl: str) -> Any:
    config_cls, model_cls, extra = MODELS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**SMALL, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    model.set_attn_implementation(impl)
    return model


def _batch(pad: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch of 2 of length L: row 1 has ``pad`` padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (2, L), generator=gen)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, :pad] = 0
    ids[1, :pad] = 0
    return ids, mask


@pytest.mark.parametrize(
    ("name", "backend", "reference"),
    [("llama", "inductor", "sdpa"), ("mistral", "aot_eager", "eager"), ("gemma2", "aot_eager", "eager")],
)
def test_tiny_model_compiles_fullgraph_and_matches_eager(name: str, backend: str, reference: str) -> None:
    model = _model(name, "attnrs")
    ref_model = _model(name, reference)
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        for i, pad in enumerate((4, 9)):  # the second padding must reuse the graph
            ids, mask = _batch(pad)
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(input_ids=ids, attention_mask=mask).logits
            eager = model(input_ids=ids, attention_mask=mask).logits
            expected = ref_model(input_ids=ids, attention_mask=mask).logits
            rows = mask.bool()
            torch.testing.assert_close(got[rows], eager[rows], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got[rows], expected[rows], rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1


def test_one_row_compiles_and_packed_position_ids_keep_documents_apart() -> None:
    """Batch 1: position_ids that restart (packed documents) reuse the graph and stay apart, like separate runs."""
    model, ref_model = _model("llama", "attnrs"), _model("llama", "sdpa")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    ids = torch.randint(1, 100, (1, L), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(1, L, dtype=torch.long)
    cut = 6
    with torch.no_grad():
        for i, pos in enumerate((torch.arange(L)[None], torch.cat([torch.arange(cut), torch.arange(L - cut)])[None])):
            with torch._dynamo.config.patch(error_on_recompile=i > 0):
                got = compiled(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            torch.testing.assert_close(got, model(input_ids=ids, attention_mask=mask, position_ids=pos).logits,
                                       rtol=1e-4, atol=1e-4)
        first, second = ref_model(input_ids=ids[:, :cut]).logits, ref_model(input_ids=ids[:, cut:]).logits
    torch.testing.assert_close(got, torch.cat([first, second], 1), rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1
