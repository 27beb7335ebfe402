"""What a buggy producer in another language writes onto a queue: messages built by hand,
below kombu's encoder, and the hypothesis strategies that generate hostile ones.

- raw bytes, a marker among them;
- JSON that is not an object: arrays, strings and numbers (each carrying the marker, a number
  in its digits) and the literals null, true and false (found by their exact bytes);
- protocol 2 envelopes of the harness job `jobs.test_record_sku`, and protocol 1 ones (Celery
  3: the task, id and arguments in the body), with 1 to 3 mutations: a field of the envelope,
  its headers or properties, or of the decoded body, set to an arbitrary JSON value (or one
  aimed at the field: a time for an ETA, a registered job's name for a task) or deleted;
- each envelope in one of three flavours: kombu's (a base64 body, a delivery tag of its own),
  celery-ts's (the same delivery tag "celery" for every message), and a body kept as raw JSON
  text (no body_encoding); a base64 body's text now and then in UTF-16, UTF-32 or UTF-8 with
  a byte-order mark, which json.loads reads and kombu does not;
- now and then, arrays nested about as deep as Python's recursion limit, in the envelope, its
  headers or the job's arguments, or a payload of a megabyte.

Every JSON envelope carries its marker in the top-level key `x-marker`, which no mutation
touches.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery.utils.time import maybe_iso8601
from hypothesis import strategies as st

MARKER_KEY = "x-marker"
HARNESS_JOB = "jobs.test_record_sku"
GOOD_JOB = "jobs.update_inventory"
_markers = itertools.count(1)


def new_marker() -> str:
    """A marker unique in the run: digits only (a JSON number can carry it), fixed length (no
    marker holds another)."""
    return f"9{os.getpid() % 1000:03d}{next(_markers):08d}"


# JSON values --------------------------------------------------------------------------------

#: Keys a generated object draws from: ones Celery and kombu read, and any text.
FIELD_NAMES = st.sampled_from(
    [
        "task",
        "id",
        "args",
        "kwargs",
        "options",
        "subtask_type",
        "immutable",
        "chord_size",
        "headers",
        "properties",
        "body",
        "delivery_info",
        "routing_key",
        "exchange",
        "eta",
        "link",
        "link_error",
    ]
) | st.text(max_size=6)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and the infinities too: Python's json writes and reads them
    | st.text(max_size=12)
    | st.sampled_from(["", "0", "celery", HARNESS_JOB, "\x00", "\ud800", "é", "[]", "{}"])
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(FIELD_NAMES, children, max_size=4)
    ),
    max_leaves=12,
)


@dataclass(frozen=True)
class FromNow:
    """An ISO 8601 time this many seconds from when the message is built."""

    seconds: float
    offset_minutes: int | None = 0  # None: a naive time


def iso_times() -> st.SearchStrategy[Any]:
    offsets = st.none() | st.integers(-23 * 60 - 59, 23 * 60 + 59)
    fixed = st.builds(
        lambda when, offset: (
            when
            if offset is None
            else when.replace(tzinfo=dt.timezone(dt.timedelta(minutes=offset)))
        ).isoformat(),
        st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)),
        offsets,
    )
    near = st.builds(FromNow, st.floats(-7200, 20), offsets)
    odd = st.sampled_from(["", "now", "2024-13-45T99:99:99", "0001-01-01T00:00:00+23:59"])
    return fixed | near | odd


#: Job names: the harness job, Celery's own registered tasks, and names nothing registers.
CELERY_NAMES = f"""{HARNESS_JOB} celery.chord_unlock celery.group celery.chain celery.chord
    celery.map celery.starmap celery.chunks celery.accumulate celery.backend_cleanup
    jobs.no_such_job""".split()


def celery_names() -> st.SearchStrategy[str]:
    return st.sampled_from([*CELERY_NAMES, ""])


def signatures() -> st.SearchStrategy[Any]:
    return st.fixed_dictionaries(
        {"task": celery_names()},
        optional={
            "args": JSON_VALUES,
            "kwargs": JSON_VALUES,
            "options": JSON_VALUES,
            "subtask_type": st.sampled_from(["chain", "group", "chord", "xmap"]) | JSON_VALUES,
            "immutable": JSON_VALUES,
        },
    )


def timelimits() -> st.SearchStrategy[Any]:
    limit = st.none() | st.floats(0, 2) | st.integers(-5, 10**10)
    return st.lists(limit, min_size=0, max_size=3)


def base64_bodies() -> st.SearchStrategy[str]:
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    return (
        st.binary(max_size=40).map(encode)
        | JSON_VALUES.map(lambda v: encode(json.dumps(v).encode()))
        | st.text(max_size=20)
    )


#: Fields Celery and kombu take any text in.
TEXT_FIELDS = """argsrepr kwargsrepr root_id parent_id shadow lang correlation_id reply_to exchange
    routing_key taskset group"""
#: Values aimed at particular fields, drawn besides arbitrary JSON.
AIMED: dict[str, st.SearchStrategy[Any]] = {
    "task": celery_names(),
    "id": st.sampled_from(["", " ", "\n", "0", "celery"]) | st.text(min_size=1, max_size=8),
    "eta": iso_times(),
    "expires": iso_times(),
    "timelimit": timelimits(),
    "retries": st.integers(-3, 10**20),
    "group_index": st.integers(-3, 10**20),
    "job_executions": st.dictionaries(st.text(max_size=5), st.integers() | JSON_VALUES),
    "job_enqueued_at": st.floats() | st.integers(),
    "body_encoding": st.sampled_from(["base64", "utf-8", "", "gzip", "BASE64"]),
    "delivery_tag": st.sampled_from(["celery", "", "0"]) | st.integers(),
    "priority": st.integers(-10, 300),
    "content-type": st.sampled_from(
        [
            "application/json",
            "application/x-python-serialize",
            "application/x-yaml",
            "application/x-msgpack",
            "application/data",
            "text/plain",
            "",
        ]
    ),
    "content-encoding": st.sampled_from(["utf-8", "utf8", "binary", "latin-1", "UTF-8", ""]),
    "body": base64_bodies(),
    "callbacks": st.lists(signatures(), max_size=2),
    "errbacks": st.lists(signatures(), max_size=2),
    "chain": st.lists(signatures(), max_size=2),
    "chord": signatures(),
    "utc": st.booleans(),
    "ignore_result": st.booleans(),
    "stamped_headers": st.lists(st.text(max_size=5), max_size=2),
    "args": st.lists(JSON_VALUES, max_size=3),
    "kwargs": st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=2),
    "sku": st.text(max_size=10),
    "embed": st.fixed_dictionaries(
        {},
        optional={
            "callbacks": st.none() | st.lists(signatures(), max_size=2),
            "chain": st.none() | st.lists(signatures(), max_size=2),
            "chord": st.none() | signatures(),
        },
    ),
    "delivery_info": st.fixed_dictionaries(
        {},
        optional={
            name: st.text(max_size=8) | JSON_VALUES
            for name in ["exchange", "routing_key", "redelivered", "priority"]
        },
    ),
    **{name: st.text(max_size=10) for name in TEXT_FIELDS.split()},
}


# Messages -----------------------------------------------------------------------------------

DELETE = "<delete>"
Path_ = tuple[str | int, ...]

HEADER_FIELDS = """task id eta expires retries timelimit argsrepr kwargsrepr job_executions
    job_enqueued_at group_index root_id parent_id shadow lang ignore_result stamped_headers"""
PROPERTY_FIELDS = "delivery_info delivery_tag body_encoding priority correlation_id reply_to"
PROTOCOL1_FIELDS = """task id args kwargs eta expires retries timelimit utc callbacks errbacks
    chord taskset"""
#: Fields of the envelope a mutation may change or delete (both protocols).
ENVELOPE_PATHS: list[Path_] = [
    ("headers",),
    *(("headers", name) for name in HEADER_FIELDS.split()),
    ("properties",),
    *(("properties", name) for name in PROPERTY_FIELDS.split()),
    ("properties", "delivery_info", "exchange"),
    ("properties", "delivery_info", "routing_key"),
    ("content-type",),
    ("content-encoding",),
    ("body",),
]
#: Fields of the decoded body: protocol 2's [args, kwargs, embed], protocol 1's object.
BODY_PATHS: dict[int, list[Path_]] = {
    2: [
        (),
        (0,),
        (1,),
        (2,),
        (0, 0),
        *((2, name) for name in ["callbacks", "errbacks", "chain", "chord"]),
    ],
    1: [(), *((name,) for name in PROTOCOL1_FIELDS.split()), ("args", 0)],
}


@dataclass(frozen=True)
class Mutation:
    where: str  # "envelope" or "body"
    path: Path_
    value: Any  # DELETE deletes the field


@dataclass(frozen=True)
class Recipe:
    """What one hostile message is made of; `build` makes its bytes around a marker."""

    kind: str  # "raw", "array", "string", "number", "literal", "envelope"
    protocol: int = 2
    flavour: str = "kombu"  # "kombu", "celery-ts", "raw-body"
    mutations: tuple[Mutation, ...] = ()
    data: Any = None  # per kind: bytes around the marker, JSON values, the literal...
    nesting: int = 0  # arrays this deep (about Python's recursion limit, or past it)
    nested_in: str = "envelope"  # where: "envelope", "headers" or "args"
    padding: int = 0  # characters of padding in the envelope
    text_encoding: str = "utf-8"  # how a base64 body's text is encoded


@dataclass
class Hostile:
    recipe: Recipe
    raw: bytes
    marker: str | None  # None: a literal, found by its exact bytes
    task_id: str | None  # the id Celery would log, if the envelope carries one
    eta: float | None = None  # its ETA, if it has one: the worker may hold it until then
    ways: list[str] = field(default_factory=list)


def field_name(where: str, path: Path_, protocol: int) -> str:
    """The name `AIMED` knows the field at `path` by."""
    if not path:
        return "body" if where == "envelope" else "(decoded body)"
    if where == "body" and protocol == 2 and len(path) == 1:
        return ["args", "kwargs", "embed"][int(path[0])]
    if where == "body" and len(path) == 2 and path[-1] == 0:
        return "sku"  # the job's argument
    return str(path[-1])


def mutation(protocol: int) -> st.SearchStrategy[Mutation]:
    def at(where: str, path: Path_) -> st.SearchStrategy[Mutation]:
        aimed = AIMED.get(field_name(where, path, protocol))
        # Deleted, or set to a value aimed at the field (twice as likely), or any JSON value.
        twice = [aimed, aimed] if aimed is not None else []
        values = st.one_of(st.just(DELETE), *twice, JSON_VALUES)
        return st.builds(Mutation, st.just(where), st.just(path), values)

    return st.one_of(
        st.sampled_from(ENVELOPE_PATHS).flatmap(lambda p: at("envelope", p)),
        st.sampled_from(BODY_PATHS[protocol]).flatmap(lambda p: at("body", p)),
    )


@st.composite
def envelopes(draw: st.DrawFn) -> Recipe:
    protocol = draw(st.sampled_from([2, 2, 1]))
    return Recipe(
        "envelope",
        protocol=protocol,
        flavour=draw(st.sampled_from(["kombu", "celery-ts", "raw-body"])),
        mutations=tuple(draw(st.lists(mutation(protocol), min_size=1, max_size=3))),
        nesting=draw(st.sampled_from([0] * 12 + [900, 950, 980, 990, 999, 1200])),
        nested_in=draw(st.sampled_from(["envelope", "headers", "args"])),
        padding=draw(st.sampled_from([0] * 15 + [1_000_000])),
        # (json.loads reads these bytes; kombu's decoding, strict UTF-8, does not)
        text_encoding=draw(st.sampled_from(["utf-8"] * 12 + ["utf-16", "utf-32", "utf-8-sig"])),
    )


def recipes() -> st.SearchStrategy[Recipe]:
    raw = st.builds(
        lambda before, after: Recipe("raw", data=(before, after)),
        st.binary(max_size=40) | st.sampled_from([b"{", b'{"body": ', b"\x00", b"\xff\xfe"]),
        st.binary(max_size=40) | st.sampled_from([b"}", b"\x80", b"\n"]),
    )
    array = st.builds(
        lambda values, at: Recipe("array", data=(values, at)),
        st.lists(JSON_VALUES, max_size=4),
        st.integers(0, 4),
    )
    string = st.builds(
        lambda before, after: Recipe("string", data=(before, after)),
        st.text(max_size=10),
        st.text(max_size=10),
    )
    number = st.builds(
        lambda sign, tail: Recipe("number", data=(sign, tail)),
        st.sampled_from(["", "-"]),
        st.sampled_from(["", ".5", "e3", ".25E-7", "e400"]),
    )
    literal = st.sampled_from(["null", "true", "false"]).map(
        lambda text: Recipe("literal", data=text)
    )
    return st.one_of(raw, array, string, number, literal, envelopes(), envelopes(), envelopes())


def envelope(
    headers: dict[str, Any],
    body: Any,
    *,
    tag: str,
    flavour: str = "kombu",
    nesting: int = 0,
    text_encoding: str = "utf-8",
) -> dict[str, Any]:
    """A message as kombu's Redis transport stores it, written by hand (a base64 body's text
    encoded in `text_encoding`)."""
    text = nest(json.dumps(body), nesting)
    properties: dict[str, Any] = {
        "correlation_id": headers.get("id") or (body.get("id") if isinstance(body, dict) else None),
        "reply_to": str(uuid.uuid4()),
        "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": "default"},
        "priority": 0,
        "delivery_tag": tag,
    }
    if flavour != "raw-body":
        properties["body_encoding"] = "base64"
        text = base64.b64encode(text.encode(text_encoding)).decode()
    return {
        "body": text,
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": properties,
    }


def protocol2_headers(task: str, task_id: str, args: list[Any], lang: str = "py") -> dict[str, Any]:
    return {
        "lang": lang,
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": repr(tuple(args)),
        "kwargsrepr": "{}",
        "origin": "hostile-fuzz@test",
        "ignore_result": False,
    }


EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def apply(target: Any, path: Path_, value: Any) -> Any:
    """`target` with the field at `path` set to `value` (or deleted); unchanged if no such
    place exists (an earlier mutation replaced its parent)."""
    if not path:
        return target if value == DELETE else value
    node = target
    for key in path[:-1]:
        # (two branches, not one `or`: mypy narrows each on its own)
        if isinstance(node, dict) and isinstance(key, str) and key in node:  # noqa: SIM114
            node = node[key]
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return target
    last = path[-1]
    if isinstance(node, dict) and isinstance(last, str):
        if value == DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    elif isinstance(node, list) and isinstance(last, int) and last <= len(node):
        if last == len(node):  # one past the end: appended
            node.extend([] if value == DELETE else [value])
        elif value == DELETE:
            del node[last]
        else:
            node[last] = value
    return target


def resolve(value: Any) -> Any:
    if isinstance(value, FromNow):
        when = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=value.seconds)
        if value.offset_minutes is None:
            return when.replace(tzinfo=None).isoformat()
        return when.astimezone(dt.timezone(dt.timedelta(minutes=value.offset_minutes))).isoformat()
    if isinstance(value, list):
        return [resolve(v) for v in value]
    if isinstance(value, dict):
        return {k: resolve(v) for k, v in value.items()}
    return value


def build(recipe: Recipe, marker: str) -> Hostile:
    """The bytes of `recipe`'s message, carrying `marker`."""
    kind = recipe.kind
    if kind == "raw":
        before, after = recipe.data
        return Hostile(recipe, before + marker.encode() + after, marker, None)
    if kind == "array":
        values, at = recipe.data
        items = list(values)
        items.insert(min(at, len(items)), marker)
        return Hostile(recipe, json.dumps(items).encode(), marker, None)
    if kind == "string":
        before, after = recipe.data
        return Hostile(recipe, json.dumps(before + marker + after).encode(), marker, None)
    if kind == "number":
        sign, tail = recipe.data
        return Hostile(recipe, f"{sign}{marker}{tail}".encode(), marker, None)
    if kind == "literal":
        return Hostile(recipe, recipe.data.encode(), None, None)
    task_id, sku = f"hostile-{marker}", f"fuzz-{marker}"
    if recipe.protocol == 2:
        headers = protocol2_headers(
            HARNESS_JOB, task_id, [sku], "js" if recipe.flavour == "celery-ts" else "py"
        )
        body: Any = [[sku], {}, dict(EMBED)]
    else:
        headers = {}
        body = {
            "task": HARNESS_JOB,
            "id": task_id,
            "args": [sku],
            "kwargs": {},
            "retries": 0,
            "eta": None,
            "expires": None,
            "utc": True,
            "callbacks": None,
            "errbacks": None,
            "chord": None,
            "taskset": None,
            "timelimit": [None, None],
        }
    if recipe.nesting and recipe.nested_in == "args":
        body = apply(body, (0, 1) if recipe.protocol == 2 else ("args", 1), NESTED)
    for change in recipe.mutations:
        if change.where == "body":
            body = apply(body, change.path, resolve(change.value))
    tag = "celery" if recipe.flavour == "celery-ts" else str(uuid.uuid4())
    message: dict[str, Any] = {
        MARKER_KEY: marker,
        **envelope(
            headers,
            body,
            tag=tag,
            flavour=recipe.flavour,
            nesting=recipe.nesting,
            text_encoding=recipe.text_encoding,
        ),
    }
    for change in recipe.mutations:
        if change.where == "envelope":
            message = apply(message, change.path, resolve(change.value))
    if recipe.nesting and recipe.nested_in == "envelope":
        message["x-nested"] = NESTED
    elif recipe.nesting and recipe.nested_in == "headers":
        message = apply(message, ("headers", "x-nested"), NESTED)
    if recipe.padding:
        message["x-padding"] = "p" * recipe.padding
    raw = nest(json.dumps(message), recipe.nesting).encode()
    return Hostile(recipe, raw, marker, celery_id(message), celery_eta(message))


#: Stands for the deeply nested arrays, written out in the JSON text by `nest` (Python's json
#: could not write them).
NESTED = "<nested arrays>"


def nest(text: str, depth: int) -> str:
    return text.replace(json.dumps(NESTED), "[" * depth + "]" * depth) if depth else text


def celery_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The task fields Celery's worker reads from `message`: protocol 2's headers, or protocol
    1's body (overridden by the headers when the body holds args, as Celery does)."""
    headers = message.get("headers")
    if isinstance(headers, dict) and "task" in headers:
        return headers
    body = decoded(message)
    fields = body if isinstance(body, dict) else {}
    if "args" in fields and isinstance(headers, dict):
        fields = {**fields, **headers}
    return fields


def celery_id(message: dict[str, Any]) -> str | None:
    """The task id Celery's worker would read from `message`, if any."""
    found = celery_fields(message).get("id")
    return found if isinstance(found, str) and found else None


def celery_eta(message: dict[str, Any]) -> float | None:
    """When the ETA of `message` falls, if it has one Celery reads (a naive time is UTC)."""
    try:
        when = maybe_iso8601(celery_fields(message).get("eta"))
        return None if when is None else when.replace(tzinfo=when.tzinfo or dt.UTC).timestamp()
    except Exception:
        return None


def decoded(message: dict[str, Any]) -> Any:
    """The body of `message` as JSON, as kombu decodes it (strict UTF-8), or None."""
    body, properties = message.get("body"), message.get("properties")
    if not isinstance(body, str):
        return None
    text = body
    try:
        if isinstance(properties, dict) and properties.get("body_encoding") == "base64":
            text = base64.b64decode(body, validate=True).decode("utf-8")
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def good_message(product: int, key: str, tag: str) -> tuple[str, bytes]:
    """A valid protocol 2 message for the inventory job, written by hand; (task id, bytes)."""
    task_id = str(uuid.uuid4())
    args = [product, 1, key]
    message = envelope(protocol2_headers(GOOD_JOB, task_id, args), [args, {}, EMBED], tag=tag)
    return task_id, json.dumps(message).encode()
