"""Random (version 4) UUIDs as text, as `str(uuid.uuid4())` writes them, from the same source
(`os.urandom`): the task ids the job layer gives its messages and the delivery tags of the bulk
path's, at a third of uuid4's cost one at a time and less again many at a time."""

from __future__ import annotations

import os

#: The variant nibble (RFC 4122: 10xx) for each random hex digit it replaces.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def random_uuid() -> str:
    """One random UUID."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


def random_uuids(count: int) -> list[str]:
    """`count` random UUIDs, from one read of `os.urandom` (called afresh each time, so a
    forked process never repeats its parent's)."""
    h = os.urandom(16 * count).hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[h[i + 16]]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]
