"""A payment-gateway simulator: a real HTTP server on loopback for the demo and the tests.

It speaks the API `app.services.payment_gateway` calls and honours idempotency keys as a real
gateway does: the first request with a key decides the outcome and is stored; a later request
with the same key gets the same answer and charges nothing.

Card tokens choose the outcome: `tok_insufficient_funds` and `tok_expired` are declined (402),
any other token is charged (201). Faults are injected from Python (`fail_next`, `timeout_next`)
or over HTTP:

    POST /_control  {"fail_next": 2}  or  {"timeout_next": 1, "seconds": 3}
    GET  /_charges  -> {"charges": [...], "requests": <charge requests received>}
    POST /_reset    forget every charge, key and fault

Run it on its own with `python -m app.devservers.gateway --port 8090`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import secrets
import socket
import sys
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from app.devservers import Lifecycle, serve_until_stopped

logger = logging.getLogger(__name__)

#: Card tokens the simulator declines, and the error code it answers with.
DECLINED_TOKENS = {
    "tok_insufficient_funds": "insufficient_funds",
    "tok_expired": "card_expired",
}

#: Request bodies larger than this are refused (413): no test needs more, and it bounds memory.
_MAX_BODY = 64 * 1024
#: The longest idempotency key accepted, as real gateways cap it.
_MAX_KEY = 255


@dataclass(frozen=True)
class SimulatedCharge:
    """A charge the simulator made; only the token's last four characters are kept visible."""

    id: str
    idempotency_key: str
    amount: Decimal
    currency: str
    card_token_last4: str


@dataclass(frozen=True)
class _Outcome:
    """The stored answer to an idempotency key, and the request that earned it."""

    status: int
    body: bytes
    amount: Decimal
    currency: str
    card_token: str


@dataclass(frozen=True)
class _Reply:
    """What the handler sends back, after sleeping `delay` seconds."""

    status: int
    body: bytes
    delay: float = 0.0


def _json(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload).encode()


def _error(status: int, code: str, message: str) -> _Reply:
    return _Reply(status, _json({"error": code, "message": message}))


class _GatewayState:
    """Everything the simulator remembers; every method is safe to call from any thread."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency  # seconds added before every reply
        # One lock around decide-and-store: concurrent requests with one key charge once.
        self._lock = threading.Lock()
        self._outcomes: dict[str, _Outcome] = {}
        self._charges: list[SimulatedCharge] = []
        self._requests = 0
        self._fail_budget = 0
        self._timeout_budget = 0
        self._timeout_seconds = 0.0

    def reset(self) -> None:
        with self._lock:
            self._outcomes.clear()
            self._charges.clear()
            self._requests = 0
            self._fail_budget = 0
            self._timeout_budget = 0
            self._timeout_seconds = 0.0

    def fail_next(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"fail_next expects a count >= 0, got {n}")
        with self._lock:
            self._fail_budget = n

    def timeout_next(self, n: int, seconds: float) -> None:
        if n < 0 or not seconds >= 0:
            raise ValueError(f"timeout_next expects n >= 0 and seconds >= 0, got {n}, {seconds}")
        with self._lock:
            self._timeout_budget = n
            self._timeout_seconds = float(seconds)

    @property
    def charges(self) -> list[SimulatedCharge]:
        with self._lock:
            return list(self._charges)

    @property
    def requests(self) -> int:
        with self._lock:
            return self._requests

    def charge(self, idempotency_key: str | None, raw_body: bytes) -> _Reply:
        """Answer one POST /v1/charges: decide, store, and say how long to stall."""
        with self._lock:
            self._requests += 1
            delay = 0.0
            if self._timeout_budget > 0:
                self._timeout_budget -= 1
                delay = self._timeout_seconds
            if self._fail_budget > 0:
                # An outage: nothing is charged and nothing is stored, so a retry decides afresh.
                self._fail_budget -= 1
                reply = _error(503, "unavailable", "injected failure")
            else:
                reply = self._decide(idempotency_key, raw_body)
        # The outcome is stored before the stall: a client that gives up has still been charged,
        # which is exactly the case idempotency keys exist for.
        return _Reply(reply.status, reply.body, delay + self.latency)

    def _decide(self, idempotency_key: str | None, raw_body: bytes) -> _Reply:
        """The answer for one request; the caller holds the lock."""
        if not idempotency_key:
            return _error(400, "missing_idempotency_key", "the Idempotency-Key header is required")
        if len(idempotency_key) > _MAX_KEY:
            return _error(400, "invalid_idempotency_key", f"longer than {_MAX_KEY} characters")
        parsed = _parse_charge(raw_body)
        if isinstance(parsed, _Reply):
            # Like real gateways, a request that fails validation stores no outcome.
            return parsed
        amount_text, amount, currency, card_token = parsed

        stored = self._outcomes.get(idempotency_key)
        if stored is not None:
            if (stored.amount, stored.currency, stored.card_token) != (
                amount,
                currency,
                card_token,
            ):
                return _error(
                    422,
                    "idempotency_key_reused",
                    "this idempotency key was used with different parameters",
                )
            return _Reply(stored.status, stored.body)

        if card_token in DECLINED_TOKENS:
            status, body = 402, _json({"error": DECLINED_TOKENS[card_token]})
        else:
            charge = SimulatedCharge(
                id=f"ch_{secrets.token_hex(12)}",
                idempotency_key=idempotency_key,
                amount=amount,
                currency=currency,
                card_token_last4=card_token[-4:],
            )
            self._charges.append(charge)
            status = 201
            body = _json({"id": charge.id, "amount": amount_text, "status": "succeeded"})
        self._outcomes[idempotency_key] = _Outcome(status, body, amount, currency, card_token)
        return _Reply(status, body)

    def control(self, raw_body: bytes) -> _Reply:
        """Answer POST /_control: set the fault budgets the JSON body names."""
        try:
            data = json.loads(raw_body or b"{}")
        except ValueError:
            return _error(400, "invalid_json", "the body must be a JSON object")
        if not isinstance(data, dict) or not data:
            return _error(400, "invalid_request", "expected fail_next and/or timeout_next")
        unknown = set(data) - {"fail_next", "timeout_next", "seconds"}
        if unknown:
            return _error(400, "invalid_request", f"unknown fields: {sorted(unknown)}")
        fail = data.get("fail_next")
        timeouts = data.get("timeout_next")
        seconds = data.get("seconds", 0)
        if fail is not None and not _count(fail):
            return _error(400, "invalid_request", "fail_next must be an integer >= 0")
        if timeouts is not None and not _count(timeouts):
            return _error(400, "invalid_request", "timeout_next must be an integer >= 0")
        if not _seconds(seconds):
            return _error(400, "invalid_request", "seconds must be a number >= 0")
        if fail is not None:
            self.fail_next(fail)
        if timeouts is not None:
            self.timeout_next(timeouts, seconds)
        with self._lock:
            state = {
                "fail_next": self._fail_budget,
                "timeout_next": self._timeout_budget,
                "seconds": self._timeout_seconds,
            }
        return _Reply(200, _json(state))

    def listing(self) -> _Reply:
        """Answer GET /_charges: every charge made (token last four only) and the request count."""
        with self._lock:
            charges = [
                {
                    "id": c.id,
                    "idempotency_key": c.idempotency_key,
                    "amount": str(c.amount),
                    "currency": c.currency,
                    "card_token_last4": c.card_token_last4,
                }
                for c in self._charges
            ]
            return _Reply(200, _json({"charges": charges, "requests": self._requests}))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _seconds(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0


def _parse_charge(raw_body: bytes) -> tuple[str, Decimal, str, str] | _Reply:
    """(amount text, amount, currency, card token) from a charge body, or the 400 to send."""
    try:
        data = json.loads(raw_body)
    except ValueError:
        return _error(400, "invalid_json", "the body must be a JSON object")
    if not isinstance(data, dict):
        return _error(400, "invalid_json", "the body must be a JSON object")
    amount_text = data.get("amount")
    # A float amount is a client bug (12.1 is not 12.10 in binary); refuse it as gateways do.
    if not isinstance(amount_text, str):
        return _error(400, "invalid_amount", 'amount must be a decimal string such as "12.50"')
    try:
        amount = Decimal(amount_text)
    except InvalidOperation:
        return _error(400, "invalid_amount", 'amount must be a decimal string such as "12.50"')
    if not amount.is_finite() or amount <= 0:
        return _error(400, "invalid_amount", "amount must be greater than zero")
    currency = data.get("currency", "USD")
    if not isinstance(currency, str) or not currency:
        return _error(400, "invalid_currency", "currency must be a non-empty string")
    card_token = data.get("card_token")
    if not isinstance(card_token, str) or not card_token:
        return _error(400, "invalid_card_token", "card_token must be a non-empty string")
    return amount_text, amount, currency, card_token


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying the simulator's state to its handlers."""

    daemon_threads = True
    # socketserver's default backlog of 5 drops bursts of connections (a SYN retry costs 1s).
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], state: _GatewayState, stopping: threading.Event
    ) -> None:
        super().__init__(address, _Handler)
        self.state = state
        # Set on stop: wakes handlers stalled by timeout_next so none outlives the server long.
        self.stopping = stopping
        # Open connections (HTTP/1.1 keeps them between requests), shut on stop: a stopped
        # gateway answers nothing more, on new connections or kept ones.
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.accepted = 0  # connections accepted in all

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
            self.accepted += 1
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def shut_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the state and writes the JSON reply."""

    server_version = "GatewaySimulator/1.0"
    # Keep-alive, as real gateways: a client may send its next charge on the same connection.
    protocol_version = "HTTP/1.1"
    # A kept connection idle this long is closed (the client stops reusing one sooner).
    timeout = 30
    # The reply's headers and body are two writes; with Nagle's algorithm on a kept connection
    # the body would wait for the client's delayed ACK of the headers (40 ms on Linux).
    disable_nagle_algorithm = True

    def do_POST(self) -> None:
        state = cast(_Server, self.server).state
        body = self._read_body()
        if body is None:
            return
        if self.path == "/v1/charges":
            reply = state.charge(self.headers.get("Idempotency-Key"), body)
        elif self.path == "/_control":
            reply = state.control(body)
        elif self.path == "/_reset":
            state.reset()
            reply = _Reply(200, _json({"reset": True}))
        else:
            reply = _error(404, "not_found", f"no such endpoint: POST {self.path}")
        self._send(reply)

    def do_GET(self) -> None:
        state = cast(_Server, self.server).state
        if self.path == "/_charges":
            self._send(state.listing())
        else:
            self._send(_error(404, "not_found", f"no such endpoint: GET {self.path}"))

    def _read_body(self) -> bytes | None:
        """The request body, or None after answering 400/413 for a bad Content-Length."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._send(_error(400, "invalid_request", "bad Content-Length"))
            return None
        if length > _MAX_BODY:
            self._send(_error(413, "too_large", f"bodies are limited to {_MAX_BODY} bytes"))
            return None
        return self.rfile.read(length)

    def _send(self, reply: _Reply) -> None:
        if reply.delay > 0:
            cast(_Server, self.server).stopping.wait(reply.delay)
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply.body)))
            self.end_headers()
            self.wfile.write(reply.body)
        except (BrokenPipeError, ConnectionResetError):
            # The client gave up while we stalled: the realistic timeout, not a server fault.
            logger.info(
                "%s %s: client disconnected after %.1fs", self.command, self.path, reply.delay
            )

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # One line per request through logging (silent unless configured, so tests stay quiet);
        # the idempotency key is shown, the body (with its card token) never is.
        key = self.headers.get("Idempotency-Key") if self.headers else None
        status = code.value if isinstance(code, HTTPStatus) else code
        suffix = f" (idempotency key {key})" if key else ""
        logger.info("%s %s -> %s%s", self.command, self.path, status, suffix)

    def log_message(self, format: str, *args: Any) -> None:
        # BaseHTTPRequestHandler writes errors to stderr; send them through logging instead.
        logger.info("%s: " + format, self.address_string(), *args)


class GatewaySimulator(Lifecycle):
    """A payment gateway on 127.0.0.1 that serves in a daemon thread; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, latency: float = 0.0) -> None:
        """`latency` delays every charge's reply by that many seconds, as a distant gateway
        would (the benchmarks' I/O-bound jobs)."""
        if latency < 0:
            raise ValueError(f"latency must be >= 0 seconds, got {latency}")
        self.host = host
        self.port = port
        self._state = _GatewayState(latency)
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the port and serve in a daemon thread; port 0 picks a free one."""
        if self._server is not None:
            raise RuntimeError("the gateway simulator is already running")
        self._stopping.clear()
        self._server = _Server((self.host, self.port), self._state, self._stopping)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"gateway-simulator:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the port; stalled requests are woken. Safe to call twice."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()
        server.shutdown()
        server.server_close()
        server.shut_connections()
        if thread is not None:
            thread.join()
        self._server = self._thread = None

    @property
    def url(self) -> str:
        """The base URL to give the client, such as http://127.0.0.1:54321."""
        if self._server is None:
            raise RuntimeError("the gateway simulator is not running; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def charges(self) -> list[SimulatedCharge]:
        """The successful charges made so far, oldest first."""
        return self._state.charges

    @property
    def requests(self) -> int:
        """How many charge requests arrived, including failed, declined and replayed ones."""
        return self._state.requests

    def fail_next(self, n: int) -> None:
        """Answer the next n charge requests with 503, charging and storing nothing."""
        self._state.fail_next(n)

    def timeout_next(self, n: int, seconds: float) -> None:
        """Stall the next n charge requests `seconds` after processing them, before replying."""
        self._state.timeout_next(n, seconds)

    @property
    def connections(self) -> int:
        """Connections accepted since start (a client keeping its connection uses one)."""
        server = self._server
        if server is None:
            return 0
        with server.connections_lock:
            return server.accepted

    def reset(self) -> None:
        """Forget every charge, stored key, request count and pending fault."""
        self._state.reset()


def main(argv: list[str] | None = None) -> int:
    """Run the simulator in the foreground until SIGINT or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m app.devservers.gateway", description="Run the payment-gateway simulator."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8090, help="port to bind (default 8090)")
    parser.add_argument(
        "--latency", type=float, default=0.0, help="seconds to wait before each charge's reply"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    simulator = GatewaySimulator(args.host, args.port, args.latency)
    return serve_until_stopped(simulator, "gateway simulator", f"{args.host}:{args.port}")


if __name__ == "__main__":
    sys.exit(main())
