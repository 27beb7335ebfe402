"""Connections a thread keeps open between uses: its SMTP sessions, its gateway connections.

`Kept` holds each thread's open connection per key (a server's address). A connection is
handed out again only in the process that opened it (a forked child's copy is its parent's
to use), while it has been unused for less than `idle_seconds`, and while the caller's
`usable` check says so; otherwise it is closed and the caller opens a new one. Per thread,
because neither smtplib.SMTP nor http.client.HTTPConnection is safe to share.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

C = TypeVar("C")


class Kept(threading.local, Generic[C]):
    """Each thread's open connection per key, kept between uses."""

    def __init__(self, idle_seconds: float, close: Callable[[C], None]) -> None:
        self.idle_seconds = idle_seconds
        self.close = close
        # key -> (connection, the process that opened it, when it was kept: monotonic)
        self.open: dict[Hashable, tuple[C, int, float]] = {}

    def take(self, key: Hashable, usable: Callable[[C], bool] | None = None) -> C | None:
        """The connection kept under `key`, or None (the caller opens one)."""
        kept = self.open.pop(key, None)
        if kept is None:
            return None
        connection, pid, since = kept
        if (
            pid == os.getpid()
            and time.monotonic() - since < self.idle_seconds
            and (usable is None or usable(connection))
        ):
            return connection
        self.close(connection)
        return None

    def keep(self, key: Hashable, connection: C) -> None:
        """Keep `connection` for this thread's next `take(key)`."""
        self.open[key] = (connection, os.getpid(), time.monotonic())
