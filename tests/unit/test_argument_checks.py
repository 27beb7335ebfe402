"""The quick paths of app.jobs.arguments give what the general algorithm gives.

`check_size`, `bind_arguments` and `redacted_arguments` run for every job enqueued (many
thousands in one `perform_all_later`). For the usual call (a few ids by position) they skip
json.dumps, `Signature.bind` and `_check`'s general dispatch; these tests hold each quick
path to the result of the general one, on the calls it takes and the ones it must not.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import pytest

from app.jobs import arguments
from app.jobs.arguments import (
    MAX_ARGUMENT_BYTES,
    SENSITIVE_NAMES,
    RowId,
    bind_arguments,
    check_size,
    redact,
    redacted_arguments,
)
from app.jobs.errors import DeserializationError


def ids(order_id: RowId) -> None: ...
def pair(a: int, b: float = 1.0) -> None: ...
def loose(a, b=None, *, c=3):  # type: ignore[no-untyped-def]
    ...
def variadic(a: int, *rest: int, **extra: Any) -> None: ...
def optional(user_id: RowId | None, kind: str, email: str | None = None) -> None: ...
def positional_only(a: int, /, b: str = "x") -> None: ...
def nothing() -> None: ...


FUNCTIONS: list[Callable[..., Any]] = [
    ids,
    pair,
    loose,
    variadic,
    optional,
    positional_only,
    nothing,
]
CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((), {}),
    ((1,), {}),
    ((0,), {}),
    ((-3,), {}),
    ((True,), {}),
    ((1.5,), {}),
    (("7",), {}),
    ((None,), {}),
    ((1, 2), {}),
    ((1, 2.5), {}),
    ((1, "x"), {}),
    ((1, 2, 3), {}),
    ((1, 2, 3, 4), {}),
    ((None, "kind"), {}),
    ((5, "kind", "a@b.c"), {}),
    ((), {"order_id": 3}),
    ((1,), {"b": 2}),
    ((), {"a": 1, "b": 2}),
    ((1,), {"c": 9}),
    ((1,), {"email": "a@b.c", "kind": "k"}),
    ((1,), {"a": 2}),
]


def general_bind(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """bind_arguments as it was: Signature.bind, then `_check` of each annotated argument."""
    signature, hints = arguments._signature(func)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise DeserializationError(
            f"arguments do not fit: expected ({arguments._parameters(signature)}), "
            f"got {arguments._shape(args, kwargs)}: {exc}"
        ) from None
    for name, value in bound.arguments.items():
        if name in hints:
            problem = arguments._check(value, hints[name])
            if problem is not None:
                raise DeserializationError(f"argument {name!r} {problem}")
    return bound


def outcome(call: Callable[[], Any]) -> Any:
    try:
        return ("ok", call())
    except Exception as exc:
        return ("raised", type(exc), str(exc))


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_binding_gives_what_signature_bind_and_check_give(func: Callable[..., Any]) -> None:
    for args, kwargs in CALLS:
        quick = outcome(partial(bind_arguments, func, args, kwargs))
        general = outcome(partial(general_bind, func, args, kwargs))
        assert quick == general, (func.__name__, args, kwargs)
        if quick[0] == "ok":
            assert isinstance(quick[1], inspect.BoundArguments)
            assert list(quick[1].arguments.items()) == list(general[1].arguments.items())


@pytest.mark.parametrize("func", FUNCTIONS, ids=lambda f: f.__name__)
def test_redacted_arguments_are_those_bind_partial_gives(func: Callable[..., Any]) -> None:
    sensitive = SENSITIVE_NAMES | {"kind"}
    for args, kwargs in [*CALLS, (("a@b.c",) * 6, {})]:
        try:
            expected = dict(arguments._signature(func)[0].bind_partial(*args, **kwargs).arguments)
        except TypeError:
            expected = {**{f"arg{i}": a for i, a in enumerate(args)}, **kwargs}
        got = redacted_arguments(func, args, kwargs, sensitive)
        assert got == redact(expected, sensitive), (func.__name__, args, kwargs)
        assert list(got) == list(expected)


@pytest.mark.parametrize(
    "hint",
    [int, float, str, type(None), RowId, int | None, RowId | None, list[int], dict[str, Any], Any],
    ids=repr,
)
def test_a_compiled_check_finds_what_check_finds(hint: Any) -> None:
    check = arguments._compile(hint)
    for value in [0, 1, -1, True, False, 1.0, "1", None, [1], (1,), {"a": 1}, object()]:
        assert check(value) == arguments._check(value, hint), (hint, value)


def general_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    return outcome(lambda: len(json.dumps([list(args), dict(kwargs)], default=str)))


SIZE_CASES: list[tuple[tuple[Any, ...], dict[Any, Any]]] = [
    ((), {}),
    ((1, 2, 3), {}),
    ((2**63, -(2**63), 2**64 - 1, -(2**64) + 1), {}),
    ((2**64, 10**5000), {}),  # beyond the quick path; the second is too long for int -> str
    ((1.5, float("nan"), float("inf"), -1.7976931348623157e308, 5e-324), {}),
    ((True, None, "é☃😀", '\x00\n"\\'), {"key": "value", "é": 1}),
    (("x" * (MAX_ARGUMENT_BYTES // 12 - 20),), {}),  # within the quick path's bound
    (("x" * (MAX_ARGUMENT_BYTES // 12 + 20),), {}),  # beyond its bound, yet small enough
    (("x" * MAX_ARGUMENT_BYTES,), {}),  # too big
    (("😀" * (MAX_ARGUMENT_BYTES // 12),), {}),  # too big only once escaped
    (([1, 2], {"a": 1}), {}),
    ((object(),), {}),
    ((), {1: "int key"}),
    ((), {("a", "b"): "tuple key"}),
]


@pytest.mark.parametrize("case", SIZE_CASES, ids=[str(i) for i in range(len(SIZE_CASES))])
def test_check_size_passes_and_refuses_what_json_says(
    case: tuple[tuple[Any, ...], dict[Any, Any]],
) -> None:
    args, kwargs = case
    general = general_size(args, kwargs)
    too_big = general[0] == "raised" or general[1] > MAX_ARGUMENT_BYTES
    if arguments._surely_small(args, kwargs):
        assert not too_big  # the quick path only ever passes what would pass anyway
    if too_big:
        with pytest.raises(DeserializationError):
            check_size(args, kwargs)
    else:
        check_size(args, kwargs)


def test_redacting_a_scalar_returns_it() -> None:
    for value in [0, 1.5, True, None]:
        assert redact(value) is value
    assert redact({"email": "a@b.c", "n": 1}) == {"email": "[REDACTED]", "n": 1}
