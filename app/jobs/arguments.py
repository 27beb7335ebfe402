"""Checking a job's arguments against its signature, and keeping personal data out of logs."""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cache, partial
from itertools import chain
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


#: The most characters json.dumps writes for a float, a bool, None, or an int within
#: +-_SMALL_INT (a float's repr is at most 24 characters; 2**64 has 20 digits).
_SCALAR_JSON_CHARS = 25
_SMALL_INT = 2**64
#: The most characters json.dumps (ensure_ascii) writes per character of a str: 12 for a
#: character beyond the BMP (a surrogate pair of \uXXXX escapes), 6 for any other.
_JSON_CHARS_PER_CHAR = 12


def _surely_small(args: Sequence[Any], kwargs: Mapping[str, Any]) -> bool:
    """True if every value is a number, bool, None or str whose JSON (however escaped) cannot
    reach MAX_ARGUMENT_BYTES in total: such arguments serialize and pass `check_size`, so it
    need not serialize them. Anything else (containers, objects, huge ints) returns False."""
    size = 8  # [[], {}]
    for key in kwargs:
        if type(key) is not str:
            return False
        size += _JSON_CHARS_PER_CHAR * len(key) + 4  # "key": and a separator
    for value in chain(args, kwargs.values()):
        kind = type(value)
        if kind is int:
            if not -_SMALL_INT < value < _SMALL_INT:
                return False  # (a huge int may be beyond what int -> str converts)
            size += _SCALAR_JSON_CHARS + 2
        elif kind is str:
            size += _JSON_CHARS_PER_CHAR * len(value) + 4
        elif kind is float or kind is bool or value is None:
            size += _SCALAR_JSON_CHARS + 2
        else:
            return False
    return size <= MAX_ARGUMENT_BYTES


def check_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """Raise DeserializationError if the arguments weigh more than MAX_ARGUMENT_BYTES."""
    if _surely_small(args, kwargs):
        return
    try:
        size = len(json.dumps([list(args), dict(kwargs)], default=str))
    except (TypeError, ValueError) as exc:
        raise DeserializationError(f"arguments are not JSON values: {exc}") from None
    if size > MAX_ARGUMENT_BYTES:
        raise DeserializationError(
            f"arguments weigh {size} bytes as JSON, more than the {MAX_ARGUMENT_BYTES} allowed"
        )


#: The largest id a row can have (PostgreSQL's bigint).
MAX_ROW_ID = 2**63 - 1


def positive(value: Any) -> str | None:
    """A check for `Annotated[int, positive]`: ids of rows start at 1."""
    return None if value > 0 else f"must be positive, got {value!r}"


def _fits_a_row(value: Any) -> str | None:
    return None if value <= MAX_ROW_ID else f"must be a row id up to {MAX_ROW_ID}, got {value!r}"


#: The id of a row: an int from 1 to MAX_ROW_ID. Anything else names a row that cannot exist.
RowId = Annotated[int, positive, _fits_a_row]


@cache
def _signature(func: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, Any]]:
    # A job is declared once and called many times: read its signature and hints once.
    return inspect.signature(func), get_type_hints(func, include_extras=True)


_BY_POSITION = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


@cache
def _positional(func: Callable[..., Any]) -> tuple[tuple[str, ...], int] | None:
    """The parameter names of `func` and how many of them are required, when every parameter
    can be given by position and none is variadic or keyword-only (else None). A call of such
    a function with positional arguments only binds them to the first names, in order."""
    names: list[str] = []
    required = 0
    for parameter in _signature(func)[0].parameters.values():
        if parameter.kind not in _BY_POSITION:
            return None
        names.append(parameter.name)
        if parameter.default is inspect.Parameter.empty:
            required = len(names)  # (defaults come last among positional parameters)
    return tuple(names), required


@cache
def _checks(func: Callable[..., Any]) -> dict[str, Check]:
    """`_check` of each annotated parameter of `func`, compiled once."""
    return {name: _compile(hint) for name, hint in _signature(func)[1].items()}


def bind_arguments(
    func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
) -> inspect.BoundArguments:
    """Bind and check `args` / `kwargs` for `func`, or raise DeserializationError."""
    signature = _signature(func)[0]
    shape = _positional(func)
    if not kwargs and shape is not None and shape[1] <= len(args) <= len(shape[0]):
        # What signature.bind returns for this call, without its general algorithm.
        bound = inspect.BoundArguments(signature, dict(zip(shape[0], args, strict=False)))
    else:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise DeserializationError(
                f"arguments do not fit: expected ({_parameters(signature)}), "
                f"got {_shape(args, kwargs)}: {exc}"
            ) from None
    _check_values(func, bound.arguments)
    return bound


def _check_values(func: Callable[..., Any], arguments: Mapping[str, Any]) -> None:
    """Run each annotated parameter's check on its bound value; raise on the first problem."""
    checks = _checks(func)
    if not checks:
        return
    for name, value in arguments.items():
        check = checks.get(name)
        if check is not None:
            problem = check(value)
            if problem is not None:
                raise DeserializationError(f"argument {name!r} {problem}")


def checked_and_redacted(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    sensitive: frozenset[str] = SENSITIVE_NAMES,
) -> dict[str, Any]:
    """`bind_arguments`'s checks (raising as it does), then what `redacted_arguments` returns,
    binding the call once: what enqueueing a job needs of its arguments."""
    shape = _positional(func)
    if not kwargs and shape is not None and shape[1] <= len(args) <= len(shape[0]):
        arguments = dict(zip(shape[0], args, strict=False))  # what bind_arguments binds
        _check_values(func, arguments)
        return redact(arguments, sensitive)  # type: ignore[no-any-return]
    bind_arguments(func, args, kwargs)
    return redacted_arguments(func, args, kwargs, sensitive)


def _parameters(signature: inspect.Signature) -> str:
    """The parameters as a caller reads them: `order_id` or `context=None` (types left out)."""
    shown = []
    for parameter in signature.parameters.values():
        name = parameter.name
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            name = f"*{name}"
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            name = f"**{name}"
        elif parameter.default is not inspect.Parameter.empty:
            name = f"{name}={parameter.default!r}"
        shown.append(name)
    return ", ".join(shown)


def _shape(args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    """How many arguments came, and the keywords' names (values may be personal data)."""
    shown = f"{len(args)} positional argument{'' if len(args) == 1 else 's'}"
    if kwargs:
        shown += " and keyword " + ", ".join(repr(str(k)) for k in kwargs)
    return shown


def _no_problem(value: Any) -> None:
    return None


def _integer(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool)
    return None if ok else f"must be an integer, got {value!r}"


def _check_against(hint: Any, value: Any) -> str | None:
    return _check(value, hint)


def _compile(hint: Any) -> Check:
    """A function of a value returning what `_check(value, hint)` returns, quicker for the
    hints of ids (int, Annotated[int, positive], Any); other hints call `_check`."""
    if hint is Any:
        return _no_problem
    origin = get_origin(hint)
    if origin is Annotated:
        inner, *metadata = get_args(hint)
        check_inner = _compile(inner)
        extra = tuple(check for check in metadata if callable(check))

        def annotated(value: Any) -> str | None:
            problem = check_inner(value)
            if problem is not None:
                return problem
            for check in extra:
                found: str | None = check(value)
                if found is not None:
                    return found
            return None

        return annotated
    if hint is int:
        return _integer
    return partial(_check_against, hint)


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
        # `X | None` (an optional argument): what is wrong with it as an X.
        given = [(o, p) for o, p in zip(options, problems, strict=True) if o is not type(None)]
        if len(given) == 1:
            return given[0][1]
        return f"must be {' or '.join(_describe(o) for o in options)}, got {value!r}"
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
        return None if isinstance(value, base) else f"must be {_describe(base)}, got {value!r}"
    return None


#: What a type is called in a message to a caller (JSON's words, not Python's).
_KINDS = {int: "an integer", float: "a number", str: "text", bool: "true or false"}


def _describe(hint: Any) -> str:
    """A hint in a caller's words: `an integer`, `null`, `a list`."""
    if get_origin(hint) is Annotated:
        return _describe(get_args(hint)[0])
    if hint is type(None):
        return "null"
    base = get_origin(hint) or hint
    if base in (dict, Mapping, typing.Mapping):
        return "an object"
    if base in (list, Sequence, typing.Sequence, tuple):
        return "a list"
    return _KINDS.get(base, getattr(base, "__name__", str(base)))


def redact(value: Any, sensitive: Iterable[str] = SENSITIVE_NAMES) -> Any:
    """`value` with sensitive keys' values, at any depth, replaced by [REDACTED]; long text cut."""
    if type(value) in _SCALARS:  # nothing to redact or cut (the common case: ids)
        return value
    names = frozenset(sensitive)  # (the same object when given a frozenset)
    if type(value) is dict or isinstance(value, Mapping):
        return {
            k: REDACTED
            if str(k).lower() in names
            else v
            if type(v) in _SCALARS
            else redact(v, names)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [redact(v, names) for v in value]
    if isinstance(value, str) and len(value) > MAX_LOGGED_STRING:
        return f"{value[:40]}…[{len(value)} characters]"  # logs stay lines, not megabytes
    return value


_SCALARS = frozenset({int, float, bool, type(None)})


def redacted_arguments(
    func: Callable[..., Any],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    sensitive: Iterable[str] = SENSITIVE_NAMES,
) -> dict[str, Any]:
    """The call's arguments by parameter name, sensitive ones redacted; never raises."""
    names = frozenset(sensitive)
    shape = _positional(func)
    try:
        if not kwargs and shape is not None and len(args) <= len(shape[0]):
            # What bind_partial gives for this call, without its general algorithm.
            arguments: dict[str, Any] = dict(zip(shape[0], args, strict=False))
        else:
            arguments = dict(_signature(func)[0].bind_partial(*args, **kwargs).arguments)
    except TypeError:
        arguments = {**{f"arg{i}": a for i, a in enumerate(args)}, **dict(kwargs)}
    return redact(arguments, names)  # type: ignore[no-any-return]
