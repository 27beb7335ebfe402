"""What a message must be before a consumer sees it: kombu's envelope, then Celery's protocol.

A producer nobody here wrote (celery-node, celery-ts, Celery 3's protocol 1, a hand-built
message in another language) can send anything. kombu's consumer and Celery's request parser
raise on shapes they do not expect, and some of those errors stop the whole worker. Every field
those parsers read is checked here first; a message that fails a check never reaches them and
is dead-lettered with the reason this module gives.

`envelope_problem` checks what kombu reads (any kombu consumer). `task_problem` checks what
Celery's worker reads (protocol 2, or protocol 1 for Celery 3 producers), including that the job
is one this worker knows.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from collections.abc import Callable, Mapping
from typing import Any

from celery.utils.time import maybe_iso8601

#: Content types a Celery message may have here (celeryconfig accepts JSON only).
ACCEPTED_CONTENT = frozenset({"application/json"})
#: Body encodings kombu's virtual transport can decode.
BODY_ENCODINGS = frozenset({"base64"})
#: How deep a message's JSON may nest (the envelope, and the body). Python's recursion limit
#: (1000) is shared with the worker's own stack: a message nested close to it decodes here and
#: raises RecursionError in whatever handles it next (pickling it for the pool), which stops
#: the worker.
MAX_DEPTH = 100

_OPTIONAL_TEXT = (
    "root_id",
    "parent_id",
    "group",
    "shadow",
    "lang",
    "origin",
    "meth",
    "argsrepr",
    "kwargsrepr",
    "taskset",
    "x-correlation-id",
)


class Malformed(ValueError):
    """The message cannot become a request; the text says why."""


def envelope_problem(payload: Any, raw: bytes | str | None = None) -> str | None:
    """Why kombu could not make a message of `payload` (a decoded envelope, from `raw` if
    given), or None."""
    try:
        _check_envelope(payload, raw)
    except Malformed as exc:
        return str(exc)
    return None


def task_problem(
    payload: Any, known: Callable[[str], bool], raw: bytes | str | None = None
) -> str | None:
    """Why Celery's worker could not make a request of the envelope `payload` (from `raw` if
    given), or None. Checks the envelope too, as `envelope_problem`."""
    return checked_task(payload, known, raw)[0]


def checked_task(
    payload: Any, known: Callable[[str], bool], raw: bytes | str | None = None
) -> tuple[str | None, Any]:
    """`task_problem`'s answer, and with none the body as kombu's message would decode it
    (its `payload`) where the check's own decoding of it is exactly that, else None: the body
    decoded once, not again by the worker's main thread and once more by its pool."""
    try:
        _check_envelope(payload, raw)
        body, text = _check_task(payload, known)
    except Malformed as exc:
        return str(exc), None
    return None, body if _decodes_alike(text) else None


def _decodes_alike(text: str) -> bool:
    """Whether json.loads reads `text` as kombu's JSON decoding does: no object kombu's
    object hook turns into a value (no `__type__` key; a key escaped in \\u form could spell
    one)."""
    return "__type__" not in text and "\\u" not in text


def _check_envelope(payload: Any, raw: bytes | str | None = None) -> None:
    if not isinstance(payload, dict):
        raise Malformed(f"the envelope is a JSON {_kind(payload)}, not an object")
    _check_depth(payload, "the envelope", raw)
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        raise Malformed(f"properties is {_kind(properties)}, not an object")
    info = properties.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        raise Malformed(f"properties.delivery_info is {_kind(info)}, not an object")
    encoding = properties.get("body_encoding")
    if encoding is not None and not (isinstance(encoding, str) and encoding in BODY_ENCODINGS):
        raise Malformed(f"properties.body_encoding {_short(encoding)} is not base64")
    _optional(properties, "priority", int, "properties.priority")
    for name in ("correlation_id", "reply_to"):
        _optional(properties, name, str, f"properties.{name}")
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        raise Malformed(f"headers is {_kind(headers)}, not an object")
    for name in ("content-type", "content-encoding"):
        _optional(payload, name, str, name)
    body = payload.get("body")
    if body is not None and not isinstance(body, str):
        raise Malformed(f"body is {_kind(body)}, not a string")


def _check_task(payload: dict[str, Any], known: Callable[[str], bool]) -> tuple[Any, str]:
    """Raise Malformed for what Celery's worker could not run; the body, decoded, and the
    text it was decoded from."""
    content_type = payload.get("content-type")
    if content_type not in ACCEPTED_CONTENT:
        raise Malformed(f"content-type {_short(content_type)} is not accepted (JSON only)")
    encoding = payload.get("content-encoding")
    if encoding not in (None, "utf-8", "utf8"):
        raise Malformed(f"content-encoding {_short(encoding)} is not utf-8")
    body, raw = _decode_body(payload)
    _check_depth(body, "the body", raw)
    headers = payload.get("headers") or {}
    if "task" in headers:  # protocol 2: the task in the headers, the arguments in the body
        fields: Mapping[str, Any] = headers
        if not (isinstance(body, list) and len(body) == 3):
            raise Malformed("a protocol 2 body is [args, kwargs, embed]; got " + _kind(body))
        args, kwargs, embed = body
        if embed is not None and not isinstance(embed, dict):
            raise Malformed(f"the body's embed is {_kind(embed)}, not an object")
        _check_canvas(embed or {})
    else:  # protocol 1 (Celery 3): everything in the body
        if not isinstance(body, dict):
            raise Malformed("no headers.task, and the body is not a protocol 1 object")
        # With args in the body, Celery lets the message's headers override the body's fields
        # (celery.worker.strategy.hybrid_to_proto2): check what it will read.
        fields = {**body, **headers} if "args" in body else body
        args, kwargs = body.get("args", []), body.get("kwargs", {})
        _optional(body, "utc", bool, "utc")
        _check_canvas(body)
    if not isinstance(args, list):
        raise Malformed(f"args is {_kind(args)}, not a list")
    if not isinstance(kwargs, dict):
        raise Malformed(f"kwargs is {_kind(kwargs)}, not an object")
    task, task_id = fields.get("task"), fields.get("id")
    if not isinstance(task, str) or not task:
        raise Malformed(f"task is {_kind(task)}, not a job name")
    if not isinstance(task_id, str) or not task_id:
        raise Malformed(f"id is {_kind(task_id)}, not a task id")
    if not known(task):
        raise Malformed(f"no job is registered as {_short(task)}")
    for name in _OPTIONAL_TEXT:
        _optional(fields, name, str, name)
    _optional(fields, "ignore_result", bool, "ignore_result")
    for name in ("group_index", "replaced_task_nesting"):
        _optional(fields, name, int, name)
    retries = fields.get("retries")
    if retries is not None and not (_is_int(retries) and retries >= 0):
        raise Malformed(f"retries is {_short(retries)}, not a count")
    _check_timelimit(fields.get("timelimit"))
    for name in ("eta", "expires"):
        _check_time(fields, name)
    stamped = fields.get("stamped_headers")
    if stamped is not None and not (
        isinstance(stamped, list) and all(isinstance(name, str) for name in stamped)
    ):  # (the worker looks each name up in a dict: a list or an object there stops it)
        raise Malformed("stamped_headers is not a list of header names")
    _optional(fields, "stamps", dict, "stamps")
    # The job layer's own headers (app.jobs.base).
    executions = fields.get("job_executions")
    if executions is not None and not (
        isinstance(executions, dict) and all(_is_int(v) for v in executions.values())
    ):
        raise Malformed("job_executions is not an object of counts")
    for name in ("job_enqueued_at", "job_first_enqueued_at"):
        enqueued = fields.get(name)
        if enqueued is not None and not (_is_number(enqueued) and math.isfinite(enqueued)):
            raise Malformed(f"{name} is {_short(enqueued)}, not a time")
    return body, raw


def decoded_body(payload: Mapping[str, Any]) -> Any:
    """The body of a checked envelope as JSON; Malformed if it is not."""
    return _decode_body(payload)[0]


def _decode_body(payload: Mapping[str, Any]) -> tuple[Any, str]:
    """The body as JSON, and the text it was read from.

    Bytes are read as kombu reads them: strict UTF-8, then JSON. (json.loads given the bytes
    would also read UTF-16 and UTF-32, a UTF-8 byte-order mark and lone surrogates, all of
    which kombu's decoding refuses: such a body passed here, then Celery's consumer dropped
    it with only a log line.)"""
    body = payload.get("body")
    if body is None:
        raise Malformed("the message has no body")
    text = body
    if (payload.get("properties") or {}).get("body_encoding") == "base64":
        try:
            raw = base64.b64decode(body.encode(), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError, AttributeError):
            raise Malformed("the body is not valid base64") from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise Malformed("the body is not UTF-8 text") from None
    if not isinstance(text, str):
        raise Malformed(f"the body is {_kind(text)}, not text")
    try:
        return json.loads(text), text
    except (ValueError, RecursionError):
        raise Malformed("the body is not JSON") from None


def _check_depth(value: Any, what: str, raw: bytes | str | None = None) -> None:
    if raw is not None and _brackets(raw) <= MAX_DEPTH:
        return  # each level is a [ or { of the text it was decoded from: no need to walk it
    pending = [(value, 1)]  # (no recursion here: the point is not to run out of stack)
    while pending:
        item, level = pending.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            if level > MAX_DEPTH:
                raise Malformed(f"{what} nests deeper than {MAX_DEPTH} levels")
            pending.extend((child, level + 1) for child in item)


def _brackets(raw: bytes | str) -> int:
    if isinstance(raw, bytes):
        return raw.count(b"[") + raw.count(b"{")
    return raw.count("[") + raw.count("{")


def _check_canvas(embed: Mapping[str, Any]) -> None:
    for name in ("callbacks", "errbacks", "chain"):
        value = embed.get(name)
        if value is not None and not (
            isinstance(value, list) and all(_is_signature(s) for s in value)
        ):
            raise Malformed(f"{name} is not a list of signatures")
    chord = embed.get("chord")
    if chord is not None and not _is_signature(chord):
        raise Malformed("chord is not a signature")


def _is_signature(value: Any) -> bool:
    return isinstance(value, dict) and isinstance(value.get("task"), str)


def _check_timelimit(value: Any) -> None:
    if value is None:
        return
    if not (isinstance(value, list) and len(value) == 2):
        raise Malformed(f"timelimit is {_short(value)}, not [hard, soft]")
    for limit in value:
        if limit is not None and not (_is_number(limit) and 0 <= limit < 10**9):
            raise Malformed(f"timelimit holds {_short(limit)}, not a number of seconds")


def _check_time(fields: Mapping[str, Any], name: str) -> None:
    value = fields.get(name)
    if value is None:
        return
    if not isinstance(value, str):
        raise Malformed(f"{name} is {_kind(value)}, not an ISO 8601 time")
    try:  # as Celery's request parses it (an empty string parses as None, which it raises on)
        parsed = maybe_iso8601(value)
        parsed.replace(tzinfo=parsed.tzinfo or dt.UTC).timestamp()
    except (ValueError, OverflowError, OSError, TypeError, AttributeError):
        raise Malformed(f"{name} {_short(value)} is not an ISO 8601 time") from None


def _optional(fields: Mapping[str, Any], name: str, kind: type, label: str) -> None:
    value = fields.get(name)
    if value is None:
        return
    if kind is int:
        ok = _is_int(value)
    elif kind is bool:
        ok = isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise Malformed(f"{label} is {_kind(value)}, not {kind.__name__}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if value is None:
        return "missing"
    names = {dict: "object", list: "array", str: "string", bool: "boolean"}
    return names.get(type(value), "number" if _is_number(value) else type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def describe(raw: bytes) -> dict[str, Any]:
    """What can be read of a raw message for its dead-letter entry: task id, job, arguments."""
    found: dict[str, Any] = {"task_id": None, "job_name": None, "args": [], "kwargs": {}}
    try:
        payload = json.loads(raw)
        headers = payload.get("headers") or {}
        body = decoded_body(payload)
    except Exception:
        return found
    if isinstance(headers, dict) and "task" in headers and isinstance(body, list) and body:
        fields: Any = headers
        args = body[0]
        kwargs = body[1] if len(body) > 1 else {}
    elif isinstance(body, dict):
        fields, args, kwargs = body, body.get("args"), body.get("kwargs")
    else:
        return found
    for key, name in (("task_id", "id"), ("job_name", "task")):
        if isinstance(fields.get(name), str):
            found[key] = fields[name][:255]
    if isinstance(args, list) and isinstance(kwargs, dict):
        try:  # (arguments nested deeper would not survive being stored)
            _check_depth([args, kwargs], "the arguments")
        except Malformed:
            return found
        found["args"], found["kwargs"] = args, kwargs
    return found
