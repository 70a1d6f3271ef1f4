"""attnrs's registries behave exactly like transformers' GeneralInterface, AttentionInterface and
AttentionMaskInterface: the same operation sequences give the same observable results on both."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import attnrs
from attnrs import AttentionInterface, AttentionMaskInterface, GeneralInterface

transformers = pytest.importorskip("transformers")
from transformers.masking_utils import AttentionMaskInterface as HFAttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface as HFAttentionInterface  # noqa: E402
from transformers.utils.generic import GeneralInterface as HFGeneralInterface  # noqa: E402


def _fn(i: int) -> Callable[..., Any]:
    def attention_fn(*args: Any, **kwargs: Any) -> int:
        return i

    attention_fn.index = i  # type: ignore[attr-defined]
    return attention_fn


FUNCTIONS = [_fn(i) for i in range(4)]
NAMES = ["a", "b", "c", "d"]


def _observe(value: Any) -> Any:
    """A comparable picture of a result: functions by their index, containers element-wise."""
    if callable(value) and hasattr(value, "index"):
        return ("fn", value.index)
    if isinstance(value, (list, tuple)):
        return [_observe(v) for v in value]
    return value


def _apply(cls: type, instances: list[Any], op: tuple) -> Any:
    kind, target, name, fn_index = op
    obj = cls if target == "class" else instances[target]
    fn = FUNCTIONS[fn_index]
    try:
        if kind == "register":
            return _observe(obj.register(name, fn))
        if kind == "setitem":
            obj[name] = fn
            return None
        if kind == "delitem":
            del obj[name]
            return None
        if kind == "getitem":
            return _observe(obj[name])
        if kind == "get":
            return _observe(obj.get(name, "missing"))
        if kind == "contains":
            return name in obj
        if kind == "len":
            return len(obj)
        if kind == "keys":
            return list(obj)
        if kind == "items":
            return _observe(sorted(obj.items(), key=lambda kv: kv[0]))
        if kind == "valid_keys":
            return obj.valid_keys()
        if kind == "pop":
            return _observe(obj.pop(name, "missing"))
        if kind == "pop_strict":
            return _observe(obj.pop(name))
        if kind == "global_pop":
            return _observe(cls._global_mapping.pop(name, "missing"))
        if kind == "clear":
            obj.clear()
            return None
        if kind == "eq":
            return obj == instances[1 - target]
        raise AssertionError(kind)
    except Exception as e:  # the exception type is part of the observable behaviour
        return ("raised", "KeyError" if isinstance(e, KeyError) else type(e).__name__)


INSTANCE_OPS = ["setitem", "delitem", "getitem", "get", "contains", "len", "keys", "items", "valid_keys",
                "pop", "pop_strict", "clear", "eq"]
operation = st.one_of(
    st.tuples(st.just("register"), st.sampled_from(["class", 0, 1]), st.sampled_from(NAMES), st.integers(0, 3)),
    st.tuples(st.just("global_pop"), st.just("class"), st.sampled_from(NAMES), st.just(0)),
    st.tuples(st.sampled_from(INSTANCE_OPS), st.sampled_from([0, 1]), st.sampled_from(NAMES), st.integers(0, 3)),
)


def _replay(hf_cls: type, our_cls: type, ops: list[tuple]) -> None:
    hf_instances, our_instances = [hf_cls(), hf_cls()], [our_cls(), our_cls()]
    for step, op in enumerate(ops):
        expected = _apply(hf_cls, hf_instances, op)
        got = _apply(our_cls, our_instances, op)
        assert got == expected, f"step {step} {op}: transformers gave {expected!r}, attnrs gave {got!r}"
        for hf_obj, our_obj in zip(hf_instances, our_instances):
            assert list(our_obj) == list(hf_obj)


@given(st.lists(operation, max_size=30))
def test_random_sequences_match_general_interface(ops: list[tuple]) -> None:
    # Fresh subclasses with empty global mappings on both sides.
    class HF(HFGeneralInterface):
        _global_mapping: dict = {}

    class Ours(GeneralInterface):
        pass

    _replay(HF, Ours, ops)


@pytest.mark.parametrize(
    ("hf_cls", "our_cls"),
    [(HFAttentionInterface, AttentionInterface), (HFAttentionMaskInterface, AttentionMaskInterface)],
)
def test_the_real_interfaces_behave_alike(hf_cls: type, our_cls: type) -> None:
    """The same sequence on the real classes (fresh names, cleaned up afterwards)."""
    tag = uuid.uuid4().hex[:8]
    names = [f"x{tag}{i}" for i in range(3)]
    ops = [
        ("getitem", 0, names[0], 0),
        ("register", "class", names[0], 1),
        ("getitem", 1, names[0], 0),
        ("setitem", 0, names[1], 2),
        ("contains", 1, names[1], 0),
        ("contains", 0, names[1], 0),
        ("setitem", 0, names[0], 3),  # a local override of a global entry
        ("getitem", 0, names[0], 0),
        ("getitem", 1, names[0], 0),
        ("delitem", 0, names[0], 0),  # removes the local override only
        ("getitem", 0, names[0], 0),
        ("delitem", 0, names[0], 0),  # global entries cannot be deleted through an instance
        ("register", 1, names[2], 2),  # register through an instance writes the class mapping
        ("getitem", 0, names[2], 0),
        ("global_pop", "class", names[0], 0),
        ("getitem", 1, names[0], 0),
        ("global_pop", "class", names[2], 0),
    ]
    # A lookup of a missing name loads the installed kernel plugins first, which adds their entries: load them now,
    # so the lengths below move only with the sequence (the test then passes alone as in the full suite).
    attnrs.load_plugins()
    hf_instances, our_instances = [hf_cls(), hf_cls()], [our_cls(), our_cls()]
    hf_before, our_before = len(hf_instances[0]), len(our_instances[0])
    for op in ops:
        assert _apply(our_cls, our_instances, op) == _apply(hf_cls, hf_instances, op), op
        # Lengths move together: the builtin entries differ, the changes must not.
        assert len(our_instances[0]) - our_before == len(hf_instances[0]) - hf_before
        assert [k for k in our_instances[0] if tag in k] == [k for k in hf_instances[0] if tag in k]


def test_get_interface_validates_like_transformers() -> None:
    hf, ours = HFAttentionInterface(), AttentionInterface()

    def default() -> None:
        pass

    for name in ("eager", None, "sdpa", "paged|sdpa"):
        assert (ours.get_interface(name, default) is default) == (hf.get_interface(name, default) is default), name
    with pytest.raises(KeyError) as hf_err:
        hf.get_interface("nope", default)
    with pytest.raises(KeyError) as our_err:
        ours.get_interface("nope", default)
    assert isinstance(our_err.value, attnrs.UnknownNameError)
    assert str(hf_err.value).strip("'\"") in str(our_err.value)  # transformers' wording ...
    assert "sdpa" in str(our_err.value)  # ... plus the valid names
    # A local entry is found by get_interface on that instance only.
    ours["local_only"] = FUNCTIONS[0]
    assert ours.get_interface("local_only", default) is FUNCTIONS[0]
    with pytest.raises(KeyError):
        AttentionInterface().get_interface("local_only", default)
    # Registering "eager" overrides every model's default, as in transformers.
    AttentionInterface.register("eager", FUNCTIONS[1])
    try:
        assert ours.get_interface("eager", default) is FUNCTIONS[1]
    finally:
        AttentionInterface._global_mapping.pop("eager")


def test_not_a_dict_and_dict_like() -> None:
    registry = AttentionInterface()
    assert not isinstance(registry, dict)
    assert list(registry.keys()) == registry.valid_keys() == list(registry)
    assert dict(registry.items())["sdpa"] is registry["sdpa"]


@pytest.mark.parametrize(
    ("key", "value", "error"),
    [
        (1, FUNCTIONS[0], TypeError),
        (None, FUNCTIONS[0], TypeError),
        ("", FUNCTIONS[0], ValueError),
        ("ok_name", 42, TypeError),
        ("ok_name", "not callable", TypeError),
    ],
)
def test_bad_registrations_raise_and_store_nothing(key: Any, value: Any, error: type) -> None:
    registry = AttentionInterface()
    before = list(registry)
    with pytest.raises(error) as info:
        AttentionInterface.register(key, value)
    assert "name" in str(info.value) or "callable" in str(info.value)
    with pytest.raises(error):
        registry[key] = value
    assert list(registry) == before
    assert "ok_name" not in registry


def test_bad_capabilities_store_nothing() -> None:
    name = f"caps{uuid.uuid4().hex[:6]}"
    with pytest.raises(attnrs.ArgumentError, match="capabilities"):
        AttentionInterface.register(name, FUNCTIONS[0], capabilities={"speed": "fast"})
    with pytest.raises(ValueError, match="dtypes"):
        AttentionInterface.register(name, FUNCTIONS[0], capabilities={"dtypes": ["int7"]})
    assert name not in AttentionInterface()


def test_capabilities_round_trip() -> None:
    import torch

    name = f"caps{uuid.uuid4().hex[:6]}"
    caps = {"devices": [torch.device("cpu")], "dtypes": [torch.float32, torch.bfloat16], "mask_kinds": ["dense"],
            "backward": True, "lse": True}
    AttentionInterface.register(name, FUNCTIONS[0], capabilities=caps)
    try:
        assert AttentionInterface().capabilities(name) == {
            "devices": ["cpu"], "dtypes": ["torch.float32", "torch.bfloat16"], "mask_kinds": ["dense"],
            "backward": True, "lse": True,
        }
        AttentionInterface.register(name, FUNCTIONS[1])  # re-registering without capabilities clears them
        assert AttentionInterface().capabilities(name) is None
        with pytest.raises(KeyError):
            AttentionInterface().capabilities("definitely-not-registered")
    finally:
        AttentionInterface._global_mapping.pop(name)


def test_many_threads_register_and_look_up() -> None:
    class Stress(GeneralInterface):
        pass

    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        try:
            local = Stress()
            barrier.wait()
            for i in range(300):
                name = f"t{t}-{i % 20}"
                Stress.register(name, FUNCTIONS[t % 4])
                assert Stress()[name] is FUNCTIONS[t % 4]
                local[f"local{i % 5}"] = FUNCTIONS[i % 4]
                assert local[f"local{i % 5}"] is FUNCTIONS[i % 4]
                keys = list(local)
                assert len(keys) == len(set(keys))
                if i % 7 == 0:
                    Stress._global_mapping.pop(name, None)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for t in range(8):
        assert Stress()[f"t{t}-19"] is FUNCTIONS[t % 4]  # i = 299: 299 % 20 == 19, 299 % 7 != 0
