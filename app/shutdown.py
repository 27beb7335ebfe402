"""Is this worker stopping? The flag continuable jobs read at each checkpoint.

A warm shutdown (SIGTERM, SIGINT) reaches the worker's main process only; its prefork pool
processes go on running their jobs. So the main process makes the flag in shared memory when
the worker starts (`worker_init`, before the pool forks, so every pool process, replacements
included, maps the same byte) and sets it on `worker_shutting_down`. With `-P threads` or
`-P solo` the jobs run in the main process and read the same byte.
"""

from __future__ import annotations

import ctypes
import multiprocessing
from typing import Any, Protocol


class _Flag(Protocol):
    value: bool


class _LocalFlag:
    """The flag of a process that is no worker (perform_now, tests): never shared."""

    value = False


_flag: _Flag = _LocalFlag()


def share_with_pool(**_: Any) -> None:
    """`worker_init`: make the flag in memory the pool processes will share (not yet set)."""
    global _flag
    _flag = multiprocessing.RawValue(ctypes.c_bool, False)


def announce(**_: Any) -> None:
    """`worker_shutting_down`: tell every job of this worker it is stopping."""
    _flag.value = True


def stopping() -> bool:
    """Whether this worker is shutting down (read by continuations at each checkpoint)."""
    return bool(_flag.value)


def reset() -> None:
    """Clear the flag (tests that stop an in-process worker's jobs and carry on)."""
    _flag.value = False
