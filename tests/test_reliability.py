"""Issue #15's defects, one test each: sizes that would abort the interpreter, tables that do not fit the batch,
NaN that was hidden, scalars float32 cannot hold, and arguments whose refusal was untyped. The fuzz suite
(tests/test_fuzz*.py) keeps them from coming back in other forms."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import attnrs
from attnrs import masks
from attnrs.errors import ArgumentError, AttnrsError, LayoutError, ShapeError

GIB = 1 << 30


def run_isolated(code: str, *, memory_limit: int = 6 * GIB, timeout: float = 120) -> str:
    """Runs ``code`` in a fresh interpreter whose data segment is capped (RLIMIT_DATA: a runaway allocation fails
    there instead of eating the machine), and returns its stdout; a crash or a hang fails the test."""
    prelude = textwrap.dedent(
        f"""
        import resource
        resource.setrlimit(resource.RLIMIT_DATA, ({memory_limit}, {memory_limit}))
        import torch, attnrs
        from attnrs import masks
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"the child died (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return proc.stdout


# -- 1. sizes are checked before anything is allocated ---------------------------------------------------------


TOO_LARGE = (
    "1, 1, 2**40, 2**40, BLOCK_SIZE=2**20",
    "1, 1, 2**62, 2**62, BLOCK_SIZE=2**40",
    "1, 1, 1, 2**30, BLOCK_SIZE=1",
)


def test_a_block_mask_too_large_for_the_machine_is_refused_before_allocating() -> None:
    # One child for all cases (each child pays for importing torch).
    out = run_isolated(
        f"""
        import time
        for args in {TOO_LARGE!r}:
            t = time.perf_counter()
            try:
                eval(f"attnrs.create_block_mask(masks.causal(), {{args}})")
            except attnrs.ArgumentError as e:
                print("refused", round(time.perf_counter() - t, 1), e)
        """
    )
    lines = out.splitlines()
    assert len(lines) == len(TOO_LARGE), out
    for line in lines:
        assert line.startswith("refused"), out
        assert "BLOCK_SIZE: expected sizes whose memory fits here" in line and "which needs" in line, out
        assert float(line.split()[1]) < 20, out  # counted, not built


def test_a_dense_mask_too_large_for_the_machine_is_refused_before_allocating() -> None:
    with pytest.raises(ArgumentError, match=r"Q_LEN/KV_LEN: expected sizes whose memory fits here .* needs 1\.0 TiB"):
        attnrs.create_dense_mask(masks.causal(), 1, 1, 2**20, 2**20)
    with pytest.raises(ArgumentError, match="needs"):
        attnrs.create_dense_mask(masks.causal(), 1, 1, 2**40, 2**40)


def test_an_output_too_large_for_the_machine_is_refused_before_allocating() -> None:
    q = torch.randn(1, 1, 1, 64).expand(2**20, 64, 2**20, 64)  # stride 0: describes 2^46 elements
    with pytest.raises(ArgumentError, match=r"query: expected sizes whose memory fits here .* an output of \[1048576"):
        attnrs.attention(q, q, q)
    with pytest.raises(ArgumentError, match="an output of"):
        kv = torch.randn(1, 1, 1, 64).expand(2**21, 64, 2**20, 64)
        attnrs.attention(q[:1], kv, kv)  # the batch broadcasts to the key's


def test_a_layout_whose_worst_case_does_not_fit_is_counted_then_built() -> None:
    # Under a 2 GiB limit (which the budget follows), 2^14 x 2^14 blocks of 1 would need 3 GiB if every block
    # were listed, so the blocks are counted first; the sliding window lists few of them, and the layout is built.
    out = run_isolated(
        """
        print(attnrs._attnrs.memory_budget())
        bm = attnrs.create_block_mask(masks.sliding_window(4), 1, 1, 2**14, 2**14, BLOCK_SIZE=1)
        print(int(bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum()))
        """,
        memory_limit=2 * GIB,
    )
    budget, listed = map(int, out.split())
    assert budget == 2 * GIB
    assert listed == 4 * 2**14 - 6
    assert attnrs._attnrs.memory_budget() > GIB  # this process has no such limit


# -- 2, 3. tables must fit the batch on every path ---------------------------------------------------------------


TABLE_MASKS = {
    "document": lambda: masks.document(torch.zeros(2, 8, dtype=torch.long)),
    "padding": lambda: masks.padding(torch.ones(2, 8, dtype=torch.bool)),
    "prefix_lm": lambda: masks.prefix_lm([1, 2]),
    "chunked": lambda: masks.chunked(2, left_padding=[0, 1]),
}


@pytest.mark.parametrize("batch", [3, 1])
@pytest.mark.parametrize("kind", sorted(TABLE_MASKS))
def test_tables_whose_batch_is_neither_one_nor_b_are_refused_by_attention(kind: str, batch: int) -> None:
    q = torch.randn(batch, 2, 8, 16)
    k = v = torch.randn(batch, 1, 8, 16)
    with pytest.raises(ShapeError, match=rf"batch: expected 1 or {batch} \(the batch size\), got 2"):
        attnrs.attention(q, k, v, TABLE_MASKS[kind](), enable_gqa=True)
    with pytest.raises(ShapeError, match=rf"expected 1 or {batch}"):
        attnrs.create_dense_mask(TABLE_MASKS[kind](), batch, 2, 8, 8)


@pytest.mark.parametrize("kind", sorted(TABLE_MASKS))
def test_tables_of_the_batch_size_are_used_row_by_row(kind: str) -> None:
    q, k, v = (torch.randn(2, 2, 8, 16, dtype=torch.float64) for _ in range(3))
    mask = TABLE_MASKS[kind]()
    dense = attnrs.create_dense_mask(mask, 2, 2, 8, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = attnrs.attention(q, k, v, mask)
    seen = dense.any(-1, keepdim=True)  # SDPA gives NaN where a row sees nothing; attnrs gives 0
    torch.testing.assert_close(got, torch.where(seen, expected, 0.0))


# -- 4. NaN in, NaN out (as torch's math path) -------------------------------------------------------------------


def _math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kw: object) -> torch.Tensor:
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, **kw)[0]


NAN_AT = {"query row": (0, 1, 5, 3), "key row": (0, 0, 4, 0), "value": (0, 1, 6, 2)}


def _nan_inputs(where: str, length: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Clean q, k, v ``[1, 2, length, 16]`` and the same with one NaN at ``NAN_AT[where]``."""
    torch.manual_seed(0)
    clean = tuple(torch.randn(1, 2, length, 16) for _ in range(3))
    bad = tuple(t.clone() for t in clean)
    bad[("query row", "key row", "value").index(where)][NAN_AT[where]] = float("nan")
    return clean, bad


def _must_be_nan(where: str, length: int, is_causal: bool) -> torch.Tensor:
    """The output entries the NaN reaches by the documented rule: its query row; the rows that see the NaN key; the
    rows that see the NaN value row, in its column."""
    b, h, i, c = NAN_AT[where]
    must = torch.zeros(1, 2, length, 16, dtype=torch.bool)
    rows = torch.arange(length)
    sees = rows >= i if is_causal else torch.ones(length, dtype=torch.bool)
    if where == "query row":
        must[b, h, i] = True
    elif where == "key row":
        must[b, h, sees] = True
    else:
        must[b, h, sees, c] = True
    return must


@pytest.mark.parametrize("length", [8, 80])
@pytest.mark.parametrize("where", sorted(NAN_AT))
@pytest.mark.parametrize("is_causal", [False, True])
def test_nan_inputs_give_nan_where_torch_math_does(where: str, is_causal: bool, length: int) -> None:
    clean, bad = _nan_inputs(where, length)
    math_bad = _math(*bad, is_causal=is_causal)
    got, lse = attnrs.attention(*bad, is_causal=is_causal, return_lse=True)
    must = _must_be_nan(where, length, is_causal)
    # The NaN reaches at least what it must, and nothing torch's math path keeps finite; the rest is exact.
    assert (got.isnan() | ~must).all(), "a NaN was hidden"
    assert (math_bad.isnan() | ~got.isnan()).all(), "a NaN appeared where torch's math path has none"
    if not is_causal:
        assert torch.equal(got.isnan(), math_bad.isnan())  # every pair visible: exactly torch's pattern
    finite = ~got.isnan()
    torch.testing.assert_close(got[finite], _math(*clean, is_causal=is_causal)[finite])
    # The LSE sees the scores only: NaN exactly in the rows whose query or a visible key is NaN.
    if where == "value":
        assert lse.isfinite().all()
    else:
        assert torch.equal(lse.isnan(), must.any(-1))


def test_nan_in_an_additive_mask_reaches_the_rows_it_touches() -> None:
    q, k, v = (torch.randn(1, 1, 6, 8) for _ in range(3))
    bias = torch.zeros(6, 6)
    bias[2, 4] = float("nan")
    got = attnrs.attention(q, k, v, attn_mask=bias)
    expected = _math(q, k, v, attn_mask=bias)
    torch.testing.assert_close(got, expected, equal_nan=True)
    assert got[0, 0, 2].isnan().all() and not got[0, 0, [0, 1, 3, 4, 5]].isnan().any()
    all_nan = torch.full((6, 6), float("nan"))
    assert attnrs.attention(q, k, v, attn_mask=all_nan).isnan().all()


def test_a_row_that_sees_no_key_is_still_zero_and_not_nan() -> None:
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[1] = False
    out, lse = attnrs.attention(q, k, v, attn_mask=keep, return_lse=True)
    assert torch.equal(out[0, 0, 1], torch.zeros(8)) and lse[0, 0, 1] == -math.inf


@pytest.mark.parametrize("where", sorted(NAN_AT))
def test_nan_gradients_follow_torch_math(where: str) -> None:
    # Every pair visible, so torch's math path is the exact reference for where NaN goes.
    _, bad = _nan_inputs(where, 80)
    q, k, v = (t.clone().requires_grad_() for t in bad)
    attnrs.attention(q, k, v).sum().backward()
    q2, k2, v2 = (t.clone().requires_grad_() for t in bad)
    _math(q2, k2, v2).sum().backward()
    for got, expected in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        assert got is not None and expected is not None
        assert torch.equal(got.isnan(), expected.isnan())
        torch.testing.assert_close(got, expected, equal_nan=True, atol=1e-5, rtol=1e-4)


def test_a_nan_query_row_under_a_causal_mask_gives_nan_gradients_to_what_it_sees() -> None:
    _, bad = _nan_inputs("query row", 80)
    q, k, v = (t.clone().requires_grad_() for t in bad)
    attnrs.attention(q, k, v, is_causal=True).sum().backward()
    assert q.grad is not None and k.grad is not None and v.grad is not None
    assert q.grad[0, 1, 5].isnan().all() and not q.grad[0, 1, torch.arange(80) != 5].isnan().any()
    assert v.grad[0, 1, :6].isnan().all()  # the keys row 5 sees
    assert not q.grad[0, 0].isnan().any() and not k.grad[0, 0].isnan().any()  # the other head


def test_a_nan_key_a_row_cannot_see_does_not_reach_it() -> None:
    q, k, v = (torch.randn(1, 1, 8, 8) for _ in range(3))
    k[0, 0, 6] = float("nan")
    out = attnrs.attention(q, k, v, is_causal=True)
    assert not out[0, 0, :6].isnan().any() and out[0, 0, 6:].isnan().all()


# -- 5. a mask called as a mask_mod agrees with its Rust evaluation --------------------------------------------


@pytest.mark.parametrize(
    "mask",
    [masks.bidirectional(), ~masks.bidirectional(), masks.causal() | masks.bidirectional(), masks.causal(-1)],
    ids=repr,
)
def test_masks_called_as_mask_mods_agree_with_rust_at_negative_positions(mask: masks.Mask) -> None:
    b, h = torch.arange(1)[:, None, None, None], torch.arange(1)[None, :, None, None]
    q, kv = torch.arange(-2, 4)[None, None, :, None], torch.arange(-3, 3)[None, None, None, :]
    called = mask(b, h, q, kv).expand(1, 1, 6, 6)
    evaluated = attnrs.create_dense_mask(mask, 1, 1, 6, 6, q_offset=-2, kv_offset=-3)
    assert torch.equal(called, evaluated)


# -- 6, 7, 8. typed refusals naming the argument -----------------------------------------------------------------


def test_a_single_capability_name_is_one_name() -> None:
    name = "attnrs_test_single_capability"
    attnrs.AttentionInterface.register(
        name, lambda *a, **k: None, capabilities={"devices": "cpu", "dtypes": torch.float32}
    )
    try:
        caps = attnrs.AttentionInterface().capabilities(name)
        assert caps is not None and caps["devices"] == ["cpu"] and caps["dtypes"] == ["torch.float32"]
    finally:
        del attnrs.AttentionInterface._global_mapping[name]


@pytest.mark.parametrize(
    ("capabilities", "message"),
    [
        (5, "capabilities: expected None or a dict, got int 5"),
        ({"devices": 5}, r"capabilities\['devices'\]: expected a list of names, got int 5"),
        ({"devices": [None]}, r"capabilities\['devices'\]: expected names \(str\), got NoneType"),
        ({"backward": 1}, r"capabilities\['backward'\]: expected a bool, got int 1"),
    ],
)
def test_bad_capabilities_are_argument_errors(capabilities: object, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        attnrs.AttentionInterface.register("attnrs_test_bad_caps", lambda *a, **k: None, capabilities=capabilities)  # type: ignore[arg-type]
    assert "attnrs_test_bad_caps" not in attnrs.AttentionInterface()


@pytest.mark.parametrize("scale", [1e39, -1e39, 3.5e38])
def test_a_scale_float32_cannot_hold_is_refused(scale: float) -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ArgumentError, match=r"scale: expected a finite number of magnitude at most 3\.403e"):
        attnrs.attention(q, q, q, scale=scale)


def test_a_softcap_whose_reciprocal_overflows_is_refused() -> None:
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ArgumentError, match="softcap: expected None or a positive finite number in"):
        attnrs.attention(q, q, q, softcap=1e-40)


def _qkv() -> torch.Tensor:
    return torch.randn(1, 1, 4, 8)


BAD_ARGUMENTS = {
    "sliding_window(2**70)": (
        lambda: masks.sliding_window(2**70),
        ArgumentError,
        "window: expected a positive integer of at most 9223372036854775807",
    ),
    "chunked(2**64)": (lambda: masks.chunked(2**64), ArgumentError, "size: expected a positive integer of at most"),
    "causal(2**63)": (lambda: masks.causal(2**63), ArgumentError, "offset: expected an integer of at most"),
    "create_block_mask lengths 2**64": (
        lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 2**64, 2**64),
        ArgumentError,
        "Q_LEN: expected a non-negative integer of at most",
    ),
    "create_block_mask B=-1": (
        lambda: attnrs.create_block_mask(masks.causal(), -1, 1, 4, 4),
        ArgumentError,
        "B: expected a non-negative integer, got -1",
    ),
    "BLOCK_SIZE=16.0": (
        lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 4, 4, BLOCK_SIZE=16.0),
        ArgumentError,
        r"BLOCK_SIZE: expected a positive int or a \(q, kv\) pair of them, got float 16.0",
    ),
    "BLOCK_SIZE=(16, 2**64)": (
        lambda: attnrs.create_block_mask(masks.causal(), 1, 1, 4, 4, BLOCK_SIZE=(16, 2**64)),
        ArgumentError,
        r"BLOCK_SIZE\[1\]: expected a positive integer of at most",
    ),
    "q_offset=2**63": (
        lambda: attnrs.attention(_qkv(), _qkv(), _qkv(), masks.causal(), q_offset=2**63),
        ArgumentError,
        "q_offset: expected an integer of at most",
    ),
    "shifted by 2**63": (
        lambda: masks.causal().shifted(2**63, 0),
        ArgumentError,
        "q_offset: expected an integer of at most",
    ),
    "sparse query": (
        lambda: attnrs.attention(_qkv().to_sparse(), _qkv(), _qkv()),
        LayoutError,
        "query: expected a dense",
    ),
    "nested key": (
        lambda: attnrs.attention(
            _qkv(), torch.nested.nested_tensor([torch.randn(1, 4, 8)], layout=torch.jagged), _qkv()
        ),
        LayoutError,
        "key: expected a dense",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_bad_arguments_are_typed_errors_naming_the_argument(case: str) -> None:
    call, error, message = BAD_ARGUMENTS[case]
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("value", ["2**70", str(2**70), "100000", "0", "-1", "abc"])
def test_bad_thread_counts_from_the_environment_are_argument_errors(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATTNRS_NUM_THREADS", value)
    q = _qkv()
    with pytest.raises(ArgumentError, match="ATTNRS_NUM_THREADS: expected a positive integer") as info:
        attnrs.attention(q, q, q)
    assert not isinstance(info.value, attnrs.errors.InternalError)


def test_every_error_here_is_an_attnrs_error() -> None:
    for call, error, _ in BAD_ARGUMENTS.values():
        assert issubclass(error, AttnrsError)
        with pytest.raises(AttnrsError):
            call()
