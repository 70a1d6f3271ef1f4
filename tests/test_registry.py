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


# ---- _global_mapping is a dict, as transformers' is ----------------------------------------------------------

# The class of the global mappings (attnrs.registry.GlobalMapping), taken from the registry itself so that the
# tests above still run where it is missing.
GlobalMapping = type(AttentionInterface._global_mapping)


def _dict_op(mapping: Any, op: tuple) -> Any:
    """One dict operation on ``mapping`` (a dict or a GlobalMapping); the result in comparable form."""
    kind, name, fn_index = op
    fn = FUNCTIONS[fn_index]
    try:
        if kind == "setitem":
            mapping[name] = fn
            return None
        if kind == "delitem":
            del mapping[name]
            return None
        if kind == "update_mapping":
            return mapping.update({name: fn, "z": FUNCTIONS[0]})
        if kind == "update_pairs":
            return mapping.update([(name, fn)], z=FUNCTIONS[1])
        if kind == "setdefault":
            return _observe(mapping.setdefault(name, fn))
        if kind == "pop":
            return _observe(mapping.pop(name, "missing"))
        if kind == "pop_strict":
            return _observe(mapping.pop(name))
        if kind == "popitem":
            return _observe(list(mapping.popitem()))
        if kind == "get":
            return _observe(mapping.get(name))
        if kind == "getitem":
            return _observe(mapping[name])
        if kind == "contains":
            return name in mapping
        if kind == "clear":
            return mapping.clear()
        if kind == "ior":
            mapping |= {name: fn}
            return None
        raise AssertionError(kind)
    except Exception as e:  # the exception type is part of the observable behaviour
        return ("raised", "KeyError" if isinstance(e, KeyError) else type(e).__name__)


DICT_OPS = ["setitem", "delitem", "update_mapping", "update_pairs", "setdefault", "pop", "pop_strict", "popitem",
            "get", "getitem", "contains", "clear", "ior"]


@given(st.lists(st.tuples(st.sampled_from(DICT_OPS), st.sampled_from(NAMES), st.integers(0, 3)), max_size=30))
def test_global_mapping_behaves_like_a_dict(ops: list[tuple]) -> None:
    expected: dict[str, Any] = {}
    got = GlobalMapping()
    for step, op in enumerate(ops):
        assert _dict_op(got, op) == _dict_op(expected, op), f"step {step} {op}"
        assert list(got) == list(expected) and len(got) == len(expected)
        assert list(got.keys()) == list(expected.keys()) and list(reversed(got)) == list(reversed(expected))
        assert _observe(list(got.values())) == _observe(list(expected.values()))
        assert _observe(list(got.items())) == _observe([list(kv) for kv in expected.items()])
        assert got == expected and got.copy() == expected and type(got.copy()) is dict
        assert got.keys() | {"q"} == expected.keys() | {"q"}
        assert (got | {"q": FUNCTIONS[0]}) == (expected | {"q": FUNCTIONS[0]})
        assert ({"q": FUNCTIONS[0]} | got) == ({"q": FUNCTIONS[0]} | expected)


def test_the_interfaces_global_mappings_are_dict_like() -> None:
    import copy
    import pickle

    for cls in (AttentionInterface, AttentionMaskInterface):
        mapping = cls._global_mapping
        assert type(mapping) is GlobalMapping is attnrs.registry.GlobalMapping and not isinstance(mapping, dict)
        snapshot = mapping.copy()
        assert type(snapshot) is dict and list(snapshot) == list(mapping) and snapshot == mapping
        snapshot.pop("attnrs")  # the copy is independent
        assert "attnrs" in mapping
        assert dict(mapping) == {**mapping} == dict(mapping.items())
    mapping = GlobalMapping({"a": FUNCTIONS[0]}, b=FUNCTIONS[1])
    mapping.register("c", FUNCTIONS[2], {"backward": True})
    assert list(mapping) == ["a", "b", "c"]
    for other in (copy.copy(mapping), copy.deepcopy(mapping)):
        assert type(other) is GlobalMapping and other == mapping
        other["d"] = FUNCTIONS[3]
        assert "d" not in mapping
    picklable = GlobalMapping(sdpa=attnrs.functions.sdpa_attention_forward)  # functions pickle by reference
    assert pickle.loads(pickle.dumps(picklable)) == picklable
    again = GlobalMapping()
    again.update(mapping)  # from another GlobalMapping: the capabilities come along
    assert again.capabilities("c") is not None and again.capabilities("c")["backward"]
    assert again.capabilities("a") is None
    assert "GlobalMapping({'a': " in repr(mapping)


def test_transformers_general_interface_runs_on_a_global_mapping() -> None:
    """transformers' own GeneralInterface code (``update``, ``keys() | keys()``, ``{**mapping}``) works on it."""

    class HF(HFGeneralInterface):
        _global_mapping: Any = GlobalMapping()

    class HFDict(HFGeneralInterface):
        _global_mapping: dict = {}

    ops = [("register", "class", "a", 0), ("setitem", 0, "b", 1), ("register", 1, "b", 2), ("len", 0, "a", 0),
           ("keys", 0, "a", 0), ("getitem", 1, "b", 0), ("global_pop", "class", "a", 0), ("valid_keys", 0, "a", 0)]
    _replay(HFDict, HF, ops)


@pytest.mark.parametrize(
    ("action", "error", "argument"),
    [
        (lambda m: m.update({"ok": FUNCTIONS[0], "bad": 42}), TypeError, "callable"),
        (lambda m: m.update({"ok": FUNCTIONS[0], 7: FUNCTIONS[1]}), TypeError, "name"),
        (lambda m: m.update([("ok", FUNCTIONS[0]), "xyz"]), TypeError, "update"),
        (lambda m: m.update(ok=FUNCTIONS[0], bad=None), TypeError, "callable"),
        (lambda m: m.setdefault("ok"), TypeError, "callable"),
        (lambda m: m.__setitem__("", FUNCTIONS[0]), ValueError, "name"),
        (lambda m: m.__ior__({"ok": "not callable"}), TypeError, "callable"),
        (lambda m: m.subscribe(42), TypeError, "subscriber"),
    ],
)
def test_bad_dict_operations_raise_and_store_nothing(action: Callable[[Any], Any], error: type,
                                                     argument: str) -> None:
    mapping = GlobalMapping({"kept": FUNCTIONS[0]})
    with pytest.raises(error, match=argument):
        action(mapping)
    assert list(mapping) == ["kept"]  # all or nothing: "ok" was not stored either
    with pytest.raises(KeyError):
        GlobalMapping().popitem()


def test_subscribers_see_every_store_in_order() -> None:
    seen: list[tuple[str, Any]] = []

    def subscriber(name: str, value: Any) -> None:
        seen.append((name, _observe(value)))

    mapping = GlobalMapping()
    mapping.subscribe(subscriber)
    mapping.subscribe(subscriber)  # once only
    mapping["a"] = FUNCTIONS[0]
    mapping.register("b", FUNCTIONS[1], {"lse": True})
    mapping.update({"c": FUNCTIONS[2]}, d=FUNCTIONS[3])
    mapping.setdefault("a", FUNCTIONS[3])  # present: no store
    mapping.setdefault("e", FUNCTIONS[0])
    mapping |= {"a": FUNCTIONS[1]}
    mapping.pop("a")  # removals are not stores
    mapping.unsubscribe(subscriber)
    mapping["f"] = FUNCTIONS[0]
    assert seen == [("a", ("fn", 0)), ("b", ("fn", 1)), ("c", ("fn", 2)), ("d", ("fn", 3)), ("e", ("fn", 0)),
                    ("a", ("fn", 1))]


def test_setdefault_and_popitem_are_atomic_under_threads() -> None:
    mapping = GlobalMapping()
    winners: list[Any] = []
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        winners.append(mapping.setdefault("shared", FUNCTIONS[t % 4]))
        for i in range(50):
            mapping[f"t{t}-{i}"] = FUNCTIONS[0]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(w) for w in winners}) == 1 and winners[0] is mapping["shared"]
    popped: list[str] = []
    poppers = [threading.Thread(target=lambda: popped.extend(mapping.popitem()[0] for _ in range(50)))
               for _ in range(8)]
    for t in poppers:
        t.start()
    for t in poppers:
        t.join()
    assert len(popped) == len(set(popped)) == 400 and list(mapping) == ["shared"]
