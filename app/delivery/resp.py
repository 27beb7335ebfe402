"""Redis commands packed by hand in RESP, Redis's wire protocol, for the hot paths that send
the same kind of command many times (the worker's fetch, the bulk path's LPUSHes): one
`bytes.join` instead of redis-py's packing, argument by argument."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def bulk_string(arg: Any) -> bytes:
    """One argument of a command, as RESP's bulk string (text as UTF-8)."""
    data = arg if isinstance(arg, bytes) else str(arg).encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def command(name: str, *args: Any, more: Iterable[str | bytes] = ()) -> bytes:
    """The command `name args... more...`, packed; `more` (many texts, the values of an
    LPUSH) is encoded in one pass."""
    listed = [name, *args]
    values = [value if isinstance(value, bytes) else value.encode() for value in more]
    return b"".join(
        [
            b"*%d\r\n" % (len(listed) + len(values)),
            *map(bulk_string, listed),
            *(b"$%d\r\n%s\r\n" % (len(data), data) for data in values),
        ]
    )
