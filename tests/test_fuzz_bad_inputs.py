"""Bad inputs, each called in a child process (issue #15): wrong ranks, dtypes, devices (meta tensors), shapes,
NaN/inf scalars, huge ints, floats where ints are expected, negative and huge sizes, tables whose batch is
neither 1 nor B, sparse/nested tensors, bad ``ATTNRS_NUM_THREADS``.

A crash (abort, segfault, out of memory under the child's 4 GiB address-space limit) or a hang is a failure of
the test named after the input, not a dead test run; so is an untyped error (not an :class:`attnrs.AttnrsError`
or the documented builtin), an :class:`attnrs.InternalError` (a panic), or a message that does not name the
argument. The inputs are in :mod:`fuzz_bad_cases`; all of them run in one child process, once per test module
(the risky ones, huge sizes and thread counts, each in a fork of it; a fresh child after any crash).
"""

from __future__ import annotations

import pytest
from fuzz_bad_cases import CASES
from fuzz_support import Outcome, run_in_children, typed_error_problem


@pytest.fixture(scope="module")
def outcomes() -> dict[str, Outcome]:
    names = sorted(CASES, key=lambda n: CASES[n].risky)  # the ones that may crash last: fewer fresh children
    risky = [n for n in names if CASES[n].risky]
    return run_in_children("fuzz_bad_cases", names, timeouts={n: c.timeout for n, c in CASES.items()}, fork=risky)


def _params() -> list[object]:
    return [
        pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=case.xfail)) if case.xfail else name
        for name, case in CASES.items()
    ]


@pytest.mark.parametrize("name", _params())
def test_bad_input_raises_a_typed_error_in_a_child(name: str, outcomes: dict[str, Outcome]) -> None:
    case, outcome = CASES[name], outcomes[name]
    if case.may_return and outcome.kind == "returned":
        return
    problem = typed_error_problem(outcome, case.words, case.allowed)
    assert problem is None, f"{name}: {problem}"
