"""Development stand-ins for the outside world: an SMTP server and a payment gateway."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Protocol, Self


class Server(Protocol):
    """What `serve_until_stopped` needs of a dev server."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Lifecycle:
    """`with server:` starts it and stops it, for a class with `start` and `stop`."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def serve_until_stopped(server: Server, name: str, where: str) -> int:
    """Run `server` in the foreground until SIGINT or SIGTERM; 1 if it cannot start."""
    log = logging.getLogger(__name__)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server.start()
        except OSError as exc:
            print(f"{name}: cannot listen on {where}: {exc}", file=sys.stderr)
            return 1
        log.info("%s listening on %s", name, where)
        try:
            # A timed wait, so the main thread regularly returns to run the signal handler.
            while not stopping.wait(0.5):
                pass
        finally:
            server.stop()
        log.info("%s stopped", name)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
