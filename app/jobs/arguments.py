"""Checking a job's arguments against its signature, and keeping personal data out of logs."""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache
from typing import Annotated, Any, Union, get_args, get_origin, get_type_hints

from app.jobs.errors import DeserializationError

REDACTED = "[REDACTED]"
#: Longer strings are cut short where arguments are shown.
MAX_LOGGED_STRING = 200
#: Argument and key names whose values never reach a log line or a message's argsrepr.
SENSITIVE_NAMES = frozenset(
    {
        "email",
        "to",
        "recipient",
        "card_token",
        "card_number",
        "cvv",
        "password",
        "token",
        "secret",
        "address",
        "phone",
        "full_name",
        "first_name",
        "last_name",
    }
)

Check = Callable[[Any], str | None]

#: The most a job's arguments may weigh as JSON. Jobs take ids and small values; megabytes
#: of arguments are a producer's bug (or worse) and would sit in Redis and in every log line.
MAX_ARGUMENT_BYTES = 256 * 1024


def check_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise DeserializationError if the arguments weigh more than MAX_ARGUMENT_BYTES."""
    try:
        size = len(json.dumps([list(args), dict(kwargs)], default=str))
    except (TypeError, ValueError) as exc:
        raise DeserializationError(f"arguments are not JSON values: {exc}") from None
    if size > MAX_ARGUMENT_BYTES:
        raise DeserializationError(
            f"arguments weigh {size} bytes as JSON, more than the {MAX_ARGUMENT_BYTES} allowed"
        )


def positive(value: Any) -> str | None:
    """A check for `Annotated[int, positive]`: ids of rows start at 1."""
    return None if value > 0 else f"must be positive, got {value!r}"


#: The id of a row: an int >= 1. Anything else names a row that cannot exist.
RowId = Annotated[int, positive]


@cache
def _signature(func: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    # A job is declared once and called many times: read its signature and hints once.
    return inspect.signature(func), get_type_hints(func, include_extras=True)


def bind_arguments(
    func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    """Bind and check `args` / `kwargs` for `func`, or raise DeserializationError."""
    signature, hints = _signature(func)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise DeserializationError(f"arguments do not fit {signature}: {exc}") from None
    for name, value in bound.arguments.items():
        if name in hints:
            problem = _check(value, hints[name])
            if problem is not None:
                raise DeserializationError(f"argument {name!r} {problem}")
    return bound


def _check(value: Any, hint: Any) -> str | None:
    origin = get_origin(hint)
    if hint is Any:
        return None
    if origin is Annotated:
        inner, *checks = get_args(hint)
        problem = _check(value, inner)
        if problem is not None:
            return problem
        for check in checks:
            if callable(check):
                found: str | None = check(value)
                if found is not None:
                    return found
        return None
    if origin in (Union, types.UnionType):
        options = get_args(hint)
        problems = [_check(value, option) for option in options]
        if any(p is None for p in problems):
            return None
        return f"must be one of {_describe(hint)}, got {value!r}"
    if hint is type(None):
        return None if value is None else f"must be null, got {value!r}"
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return None if ok else f"must be a number, got {value!r}"
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    base = origin or hint
    if base in (dict, Mapping, typing.Mapping):
        return None if isinstance(value, dict) else f"must be an object, got {value!r}"
    if base in (list, Sequence, typing.Sequence, tuple):
        return None if isinstance(value, list | tuple) else f"must be a list, got {value!r}"
    if isinstance(base, type):
        return None if isinstance(value, base) else f"must be {base.__name__}, got {value!r}"
    return None


def _describe(hint: Any) -> str:
    return " | ".join(getattr(a, "__name__", str(a)) for a in get_args(hint))


def redact(value: Any, sensitive: Iterable[str] = SENSITIVE_NAMES) -> Any:
    """`value` with sensitive keys' values, at any depth, replaced by [REDACTED]; long text cut."""
    names = frozenset(sensitive)
    if isinstance(value, Mapping):
        return {
            k: REDACTED if str(k).lower() in names else redact(v, names) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, names) for v in value]
    if isinstance(value, str) and len(value) > MAX_LOGGED_STRING:
        return f"{value[:40]}…[{len(value)} characters]"  # logs stay lines, not megabytes
    return value


def redacted_arguments(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    sensitive: Iterable[str] = SENSITIVE_NAMES,
) -> dict[str, Any]:
    """The call's arguments by parameter name, sensitive ones redacted; never raises."""
    names = frozenset(sensitive)
    try:
        arguments: dict[str, Any] = dict(
            _signature(func)[0].bind_partial(*args, **kwargs).arguments
        )
    except TypeError:
        arguments = {**{f"arg{i}": a for i, a in enumerate(args)}, **dict(kwargs)}
    return redact(arguments, names)  # type: ignore[no-any-return]
