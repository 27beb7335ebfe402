"""A real SMTP server on loopback for development and tests, with injectable faults.

It speaks SMTP through aiosmtpd on a background thread, keeps every accepted message in memory,
and can be told to refuse, drop or stall the next messages at DATA, so tests exercise the
mailer's error handling against a real socket rather than a mock.

Run it for the demo with `python -m app.devservers.smtp --port 8025`.
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.parser
import email.policy
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import EmailMessage
from typing import NoReturn

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from app.devservers import Lifecycle, serve_until_stopped

# Named explicitly: under `python -m` __name__ would be "__main__".
log = logging.getLogger("app.devservers.smtp")

# aiosmtpd logs every command at INFO; that drowns test output and the demo's own lines.
for _name in ("mail.log", "mail.debug"):
    logging.getLogger(_name).setLevel(logging.WARNING)

#: Reply texts used by `fail_next` when no message is given.
_DEFAULT_REPLIES = {
    421: "Service not available, closing transmission channel",
    450: "Mailbox unavailable",
    451: "Local error in processing",
    452: "Insufficient system storage",
    550: "Mailbox unavailable",
    552: "Exceeded storage allocation",
    554: "Transaction failed",
}


@dataclass(frozen=True)
class Received:
    """One message the server accepted: its envelope and its content, parsed when first read
    (parsing every message as it arrives would cost the server more than the rest of the
    conversation, and the benchmarks run it on the cores they measure)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    raw: bytes
    #: The client's address and port: two messages with the same came in one SMTP session.
    peer: tuple[str, int] = ("", 0)

    @functools.cached_property
    def message(self) -> EmailMessage:
        """The message as the default policy parses it."""
        message = email.message_from_bytes(self.raw, policy=email.policy.default)
        # With policy.default the parser builds EmailMessage; typeshed only promises Message.
        assert isinstance(message, EmailMessage)
        return message


@dataclass(frozen=True)
class _Fail:
    reply: str


@dataclass(frozen=True)
class _Drop:
    pass


@dataclass(frozen=True)
class _Delay:
    seconds: float


_Fault = _Fail | _Drop | _Delay


class _State:
    """Messages and pending faults, shared by the server thread and the caller's thread."""

    def __init__(self, max_messages: int | None, latency: float = 0.0) -> None:
        self.latency = latency  # seconds before every reply to DATA
        self.changed = threading.Condition()
        self.messages: deque[Received] = deque(maxlen=max_messages)
        # One FIFO for all fault kinds, so `fail_next(421); drop_next()` means "the next
        # message is refused, the one after is dropped", in the order the test wrote them.
        self.faults: deque[_Fault] = deque()

    def next_fault(self) -> _Fault | None:
        with self.changed:
            return self.faults.popleft() if self.faults else None

    def store(self, received: Received) -> None:
        with self.changed:
            self.messages.append(received)
            self.changed.notify_all()


class _Handler:
    """aiosmtpd handler: applies the next fault, else stores the message."""

    def __init__(self, state: _State) -> None:
        self._state = state

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Called by aiosmtpd after the client's final dot; the returned line is the reply."""
        fault = self._state.next_fault()
        if isinstance(fault, _Fail):
            # A refused message is not stored: the client was told it was not delivered.
            return fault.reply
        if isinstance(fault, _Drop):
            await _hang_up(server)
        received = _parse(envelope, session)
        self._state.store(received)
        if log.isEnabledFor(logging.INFO):
            # The headers alone, with the legacy policy: a fraction of a full parse's cost.
            headers = email.parser.BytesHeaderParser().parsebytes(received.raw)
            log.info(
                "received mail from=%s to=%s subject=%r",
                received.mail_from,
                ",".join(received.rcpt_tos),
                str(headers.get("Subject", "")),
            )
        if isinstance(fault, _Delay):
            # Stored first, then slow to answer: the "delivered, but the client timed out" case.
            await asyncio.sleep(fault.seconds)
        if self._state.latency:
            await asyncio.sleep(self._state.latency)
        return "250 OK"


async def _hang_up(server: SMTP) -> NoReturn:
    """Close the connection without a reply, and wait to be cancelled."""
    transport = server.transport
    if isinstance(transport, asyncio.WriteTransport):
        transport.abort()  # no FIN-after-flush politeness: the client just loses the peer
    elif transport is not None:
        transport.close()
    # Never return: connection_lost() cancels this session's task, which ends it quietly,
    # instead of aiosmtpd going on to write a reply to a dead socket.
    await asyncio.get_running_loop().create_future()
    raise AssertionError("unreachable: the session is cancelled when its connection is lost")


def _parse(envelope: Envelope, session: Session) -> Received:
    raw = envelope.original_content
    if raw is None:  # aiosmtpd always sets it before DATA's hook; keep mypy and readers sure.
        raw = envelope.content if isinstance(envelope.content, bytes) else b""
    peer = session.peer if isinstance(session.peer, tuple) else ("", 0)
    return Received(
        mail_from=envelope.mail_from or "",
        rcpt_tos=tuple(envelope.rcpt_tos),
        raw=raw,
        peer=(str(peer[0]), int(peer[1])),
    )


class _Controller(Controller):
    """aiosmtpd's Controller that learns the real port when asked to bind port 0."""

    def _trigger_server(self) -> None:
        # Controller connects to self.port to finish its start-up; with port 0 that would be
        # port 0, so first read the port the kernel picked from the listening socket.
        if isinstance(self.server, asyncio.Server) and self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class SmtpServer(Lifecycle):
    """A local SMTP server on a background thread that stores what it receives."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        max_messages: int | None = None,
        latency: float = 0.0,
    ) -> None:
        """Listen on `host`:`port` once started; port 0 picks a free one.

        `max_messages` bounds the kept messages (oldest dropped), for a long-running demo.
        `latency` delays every reply to DATA by that many seconds, as a distant server would
        (the benchmarks' I/O-bound jobs).
        """
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self._host = host
        self._requested_port = port
        self._port = port
        self._state = _State(max_messages, latency)
        self._controller: _Controller | None = None

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The port the server listens on (the real one once started)."""
        return self._port

    @property
    def running(self) -> bool:
        """Whether the server is started."""
        return self._controller is not None

    def start(self) -> None:
        """Start listening; returns once the server answers connections."""
        if self._controller is not None:
            raise RuntimeError("SMTP server already running")
        # A Controller closes its event loop when stopped, so each start gets a new one.
        controller = _Controller(
            _Handler(self._state),
            hostname=self._host,
            port=self._requested_port,
            # A fixed greeting name: aiosmtpd would otherwise call socket.getfqdn(), which can
            # block on DNS for seconds on machines without a resolver.
            server_hostname="localhost",
        )
        controller.start()
        self._controller = controller
        self._port = controller.port

    def stop(self) -> None:
        """Stop listening and end open sessions; messages are kept. No-op when stopped."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    @property
    def messages(self) -> list[Received]:
        """A snapshot of the accepted messages, oldest first."""
        with self._state.changed:
            return list(self._state.messages)

    def messages_to(self, address: str) -> list[Received]:
        """The accepted messages whose envelope recipients include `address` (any case)."""
        wanted = address.strip().lower()
        return [m for m in self.messages if wanted in (r.lower() for r in m.rcpt_tos)]

    def wait_for_messages(self, count: int = 1, timeout: float = 5.0) -> list[Received]:
        """Wait until at least `count` messages are stored; TimeoutError if they don't come."""
        deadline = time.monotonic() + timeout
        with self._state.changed:
            while len(self._state.messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"expected {count} message(s) within {timeout:g} s, "
                        f"got {len(self._state.messages)}"
                    )
                self._state.changed.wait(remaining)
            return list(self._state.messages)

    def clear(self) -> None:
        """Forget the accepted messages."""
        with self._state.changed:
            self._state.messages.clear()

    def reset(self) -> None:
        """Forget the accepted messages and every pending fault."""
        with self._state.changed:
            self._state.messages.clear()
            self._state.faults.clear()

    def fail_next(self, code: int, count: int = 1, message: str | None = None) -> None:
        """Refuse the next `count` messages at DATA with `code` (4xx or 5xx); none is stored."""
        if not 400 <= code <= 599:
            raise ValueError(f"fail_next needs a 4xx or 5xx reply code, got {code}")
        text = message if message is not None else _DEFAULT_REPLIES.get(code, "Refused")
        if "\r" in text or "\n" in text:
            raise ValueError("fail_next message must be a single line")
        self._add(_Fail(f"{code} {text}"), count)

    def drop_next(self, count: int = 1) -> None:
        """Close the connection at DATA without replying, for the next `count` messages."""
        self._add(_Drop(), count)

    def delay_next(self, seconds: float, count: int = 1) -> None:
        """Store the next `count` messages but wait `seconds` before replying to DATA."""
        if seconds < 0:
            raise ValueError(f"delay_next needs seconds >= 0, got {seconds}")
        self._add(_Delay(seconds), count)

    def _add(self, fault: _Fault, count: int) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}")
        with self._state.changed:
            self._state.faults.extend([fault] * count)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m app.devservers.smtp", description="Local development SMTP server."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8025, help="port to listen on (0: any)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds to wait before each reply to DATA"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    # The demo may run for days: keep only the latest messages in memory.
    server = SmtpServer(args.host, args.port, max_messages=1000, latency=args.latency)
    return serve_until_stopped(server, "smtp server", f"{args.host}:{args.port}")


if __name__ == "__main__":
    raise SystemExit(main())
