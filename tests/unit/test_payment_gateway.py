"""The payment gateway client against the real simulator, over loopback HTTP."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import pytest

from app.devservers.gateway import GatewaySimulator
from app.services.payment_gateway import (
    CardExpired,
    Charge,
    GatewayError,
    GatewayRejected,
    GatewayTimeout,
    GatewayUnavailable,
    InsufficientFunds,
    PaymentDeclined,
    PaymentGatewayClient,
)

AMOUNT = Decimal("12.50")


@pytest.fixture
def gateway() -> Iterator[GatewaySimulator]:
    with GatewaySimulator() as simulator:
        yield simulator


@pytest.fixture
def client(gateway: GatewaySimulator) -> PaymentGatewayClient:
    return PaymentGatewayClient(gateway.url, timeout=2.0)


def http(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One raw request to the simulator: (status, decoded JSON body), errors included."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


def test_a_successful_charge_returns_the_charge(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    charge = client.charge(idempotency_key="order-1", amount=AMOUNT, card_token="tok_ok")

    assert isinstance(charge, Charge)
    assert charge.charge_id.startswith("ch_")
    assert charge.amount == Decimal("12.50")
    assert charge.status == "succeeded"
    [made] = gateway.charges
    assert (made.id, made.idempotency_key, made.amount) == (charge.charge_id, "order-1", AMOUNT)
    assert made.card_token_last4 == "k_ok"


def test_the_amount_travels_as_an_exact_decimal_string(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    charge = client.charge(idempotency_key="k", amount=Decimal("0.10"), card_token="tok_ok")

    assert charge.amount == Decimal("0.10")
    status, listing = http("GET", f"{gateway.url}/_charges")
    assert status == 200
    assert listing["charges"][0]["amount"] == "0.10"
    # The simulator refuses a float amount, as the client must never send one.
    status, body = http(
        "POST",
        f"{gateway.url}/v1/charges",
        {"amount": 12.5, "card_token": "tok_ok"},
        {"Idempotency-Key": "float"},
    )
    assert (status, body["error"]) == (400, "invalid_amount")
    with pytest.raises(TypeError, match="Decimal"):
        client.charge(idempotency_key="k2", amount=12.5, card_token="tok_ok")  # type: ignore[arg-type]


def test_the_same_key_twice_charges_once(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    first = client.charge(idempotency_key="order-2", amount=AMOUNT, card_token="tok_ok")
    second = client.charge(idempotency_key="order-2", amount=AMOUNT, card_token="tok_ok")

    assert second == first
    assert len(gateway.charges) == 1
    assert gateway.requests == 2


def test_different_keys_charge_separately(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    first = client.charge(idempotency_key="a", amount=AMOUNT, card_token="tok_ok")
    second = client.charge(idempotency_key="b", amount=AMOUNT, card_token="tok_ok")

    assert first.charge_id != second.charge_id
    assert [c.idempotency_key for c in gateway.charges] == ["a", "b"]


def test_concurrent_requests_with_one_key_charge_once(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    start = threading.Barrier(8)
    results: list[Charge] = []
    errors: list[BaseException] = []

    def pay() -> None:
        start.wait()
        try:
            results.append(
                client.charge(idempotency_key="race", amount=AMOUNT, card_token="tok_ok")
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=pay) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)

    assert errors == []
    assert len(results) == 8
    assert len({charge.charge_id for charge in results}) == 1
    assert len(gateway.charges) == 1
    assert gateway.requests == 8


def test_reusing_a_key_with_other_parameters_is_rejected(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    client.charge(idempotency_key="order-3", amount=AMOUNT, card_token="tok_ok")

    with pytest.raises(GatewayRejected) as caught:
        client.charge(idempotency_key="order-3", amount=Decimal("99.00"), card_token="tok_ok")

    assert caught.value.status == 422
    assert caught.value.code == "idempotency_key_reused"
    with pytest.raises(GatewayRejected):
        client.charge(idempotency_key="order-3", amount=AMOUNT, card_token="tok_other")
    assert len(gateway.charges) == 1


@pytest.mark.parametrize(
    ("token", "exception", "code"),
    [
        ("tok_insufficient_funds", InsufficientFunds, "insufficient_funds"),
        ("tok_expired", CardExpired, "card_expired"),
    ],
)
def test_declines_raise_their_own_exception_and_are_remembered(
    gateway: GatewaySimulator,
    client: PaymentGatewayClient,
    token: str,
    exception: type[PaymentDeclined],
    code: str,
) -> None:
    with pytest.raises(exception) as caught:
        client.charge(idempotency_key="declined", amount=AMOUNT, card_token=token)

    assert isinstance(caught.value, PaymentDeclined)
    assert (caught.value.status, caught.value.code) == (402, code)
    assert code in str(caught.value)
    assert token not in str(caught.value)
    assert token not in repr(caught.value)
    # The decline is stored under the key: the same key answers the same, charging nothing.
    with pytest.raises(exception):
        client.charge(idempotency_key="declined", amount=AMOUNT, card_token=token)
    assert gateway.charges == []
    assert gateway.requests == 2


def test_an_outage_is_unavailable_and_a_retry_with_the_key_charges_once(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    gateway.fail_next(2)

    for _ in range(2):
        with pytest.raises(GatewayUnavailable) as caught:
            client.charge(idempotency_key="order-4", amount=AMOUNT, card_token="tok_secret_4242")
        assert caught.value.status == 503
        assert "tok_secret_4242" not in str(caught.value)
    assert gateway.charges == []

    charge = client.charge(idempotency_key="order-4", amount=AMOUNT, card_token="tok_secret_4242")
    again = client.charge(idempotency_key="order-4", amount=AMOUNT, card_token="tok_secret_4242")

    assert again == charge
    assert [c.id for c in gateway.charges] == [charge.charge_id]
    assert gateway.requests == 4


def test_a_timeout_after_the_charge_is_retried_without_charging_twice(
    gateway: GatewaySimulator,
) -> None:
    client = PaymentGatewayClient(gateway.url, timeout=0.2)
    gateway.timeout_next(1, seconds=2.0)

    started = time.monotonic()
    with pytest.raises(GatewayTimeout) as caught:
        client.charge(idempotency_key="order-5", amount=AMOUNT, card_token="tok_secret_4242")
    assert time.monotonic() - started < 1.5
    assert caught.value.status is None
    assert "tok_secret_4242" not in str(caught.value)
    # The gateway charged before stalling: the client's timeout hid a real charge.
    [made] = gateway.charges
    assert made.idempotency_key == "order-5"

    retried = client.charge(idempotency_key="order-5", amount=AMOUNT, card_token="tok_secret_4242")

    assert retried.charge_id == made.id
    assert len(gateway.charges) == 1
    assert gateway.requests == 2


def test_a_closed_port_is_unavailable() -> None:
    with GatewaySimulator() as simulator:
        url = simulator.url
    client = PaymentGatewayClient(url, timeout=1.0)

    with pytest.raises(GatewayUnavailable) as caught:
        client.charge(idempotency_key="order-6", amount=AMOUNT, card_token="tok_secret_4242")

    assert "refused" in str(caught.value)
    assert "tok_secret_4242" not in str(caught.value)


def test_a_request_without_a_key_is_refused(gateway: GatewaySimulator) -> None:
    status, body = http(
        "POST", f"{gateway.url}/v1/charges", {"amount": "12.50", "card_token": "tok_ok"}
    )

    assert (status, body["error"]) == (400, "missing_idempotency_key")
    assert gateway.charges == []
    assert gateway.requests == 1


def test_a_400_from_the_gateway_is_rejected_and_not_retryable(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    with pytest.raises(GatewayRejected) as caught:
        client.charge(idempotency_key="x" * 300, amount=AMOUNT, card_token="tok_ok")

    assert caught.value.status == 400
    assert caught.value.code == "invalid_idempotency_key"
    assert not isinstance(caught.value, GatewayTimeout | GatewayUnavailable | PaymentDeclined)
    assert gateway.charges == []


class _EchoingHandler(BaseHTTPRequestHandler):
    """A careless gateway that echoes the request body in its error message."""

    def do_POST(self) -> None:
        sent = self.rfile.read(int(self.headers["Content-Length"])).decode()
        body = json.dumps({"error": "bad_request", "message": f"cannot process {sent}"}).encode()
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_a_card_token_echoed_by_the_gateway_is_kept_out_of_the_message() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoingHandler)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        host, port = server.server_address[:2]
        client = PaymentGatewayClient(f"http://{host!s}:{port}", timeout=2.0)
        with pytest.raises(GatewayRejected) as caught:
            client.charge(idempotency_key="k", amount=AMOUNT, card_token="tok_secret_4242")
    finally:
        server.shutdown()
        server.server_close()
        thread.join()

    message = str(caught.value)
    assert "cannot process" in message
    assert "tok_secret_4242" not in message
    assert "[card token]" in message


def test_the_http_control_endpoints(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    status, state = http("POST", f"{gateway.url}/_control", {"fail_next": 1})
    assert (status, state["fail_next"]) == (200, 1)
    with pytest.raises(GatewayUnavailable):
        client.charge(idempotency_key="order-7", amount=AMOUNT, card_token="tok_secret_4242")
    charge = client.charge(idempotency_key="order-7", amount=AMOUNT, card_token="tok_secret_4242")

    status, listing = http("GET", f"{gateway.url}/_charges")
    assert status == 200
    assert listing == {
        "charges": [
            {
                "id": charge.charge_id,
                "idempotency_key": "order-7",
                "amount": "12.50",
                "currency": "USD",
                "card_token_last4": "4242",
            }
        ],
        "requests": 2,
    }
    assert "tok_secret_4242" not in json.dumps(listing)

    status, state = http("POST", f"{gateway.url}/_control", {"timeout_next": 1, "seconds": 2})
    assert status == 200
    assert (state["timeout_next"], state["seconds"]) == (1, 2.0)
    with pytest.raises(GatewayTimeout):
        PaymentGatewayClient(gateway.url, timeout=0.2).charge(
            idempotency_key="order-8", amount=AMOUNT, card_token="tok_ok"
        )
    assert len(gateway.charges) == 2

    status, body = http("POST", f"{gateway.url}/_control", {"fail_next": -1})
    assert (status, body["error"]) == (400, "invalid_request")

    status, _ = http("POST", f"{gateway.url}/_reset", {})
    assert status == 200
    assert gateway.charges == []
    assert gateway.requests == 0
    # The reset forgot the key too: the same key now charges anew.
    again = client.charge(idempotency_key="order-7", amount=AMOUNT, card_token="tok_secret_4242")
    assert again.charge_id != charge.charge_id
    assert len(gateway.charges) == 1


def test_the_client_refuses_bad_arguments_before_sending(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    with pytest.raises(ValueError, match="idempotency_key"):
        client.charge(idempotency_key="", amount=AMOUNT, card_token="tok_ok")
    with pytest.raises(ValueError, match="positive"):
        client.charge(idempotency_key="k", amount=Decimal("0"), card_token="tok_ok")
    with pytest.raises(ValueError, match="http"):
        PaymentGatewayClient("ftp://example.com")
    assert gateway.requests == 0


def test_every_client_error_is_a_gateway_error() -> None:
    for exception in (
        PaymentDeclined,
        InsufficientFunds,
        CardExpired,
        GatewayTimeout,
        GatewayUnavailable,
        GatewayRejected,
    ):
        assert issubclass(exception, GatewayError)
    assert issubclass(InsufficientFunds, PaymentDeclined)
    assert issubclass(CardExpired, PaymentDeclined)


def test_a_gateway_with_latency_answers_every_charge_that_much_later() -> None:
    with GatewaySimulator(latency=0.3) as simulator:
        client = PaymentGatewayClient(simulator.url, timeout=5.0)
        for key in ("late-1", "late-2"):
            started = time.monotonic()
            client.charge(idempotency_key=key, amount=AMOUNT, card_token="tok_ok")
            assert time.monotonic() - started >= 0.3
        assert len(simulator.charges) == 2
    with pytest.raises(ValueError, match="latency"):
        GatewaySimulator(latency=-1)


# --- keep-alive --------------------------------------------------------------------------------


def test_one_threads_charges_share_one_connection(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    for key in ("ka-1", "ka-2", "ka-3"):
        client.charge(idempotency_key=key, amount=AMOUNT, card_token="tok_ok")
    # Another client object of the same gateway, in the same thread: the same connection.
    PaymentGatewayClient(gateway.url, timeout=2.0).charge(
        idempotency_key="ka-4", amount=AMOUNT, card_token="tok_ok"
    )

    assert [c.idempotency_key for c in gateway.charges] == ["ka-1", "ka-2", "ka-3", "ka-4"]
    assert gateway.connections == 1


def test_each_thread_has_a_connection_of_its_own(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    def charge(key: str) -> None:
        client.charge(idempotency_key=key, amount=AMOUNT, card_token="tok_ok")

    threads = [threading.Thread(target=charge, args=(f"t-{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(gateway.charges) == 3
    assert gateway.connections == 3


def test_a_kept_connection_the_gateway_closed_is_replaced_and_the_charge_made_once(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    client.charge(idempotency_key="before", amount=AMOUNT, card_token="tok_ok")
    port = urlsplit(gateway.url).port or 0
    gateway.stop()  # closes the connection this thread keeps
    with GatewaySimulator(port=port) as restarted:
        charge = client.charge(idempotency_key="after", amount=AMOUNT, card_token="tok_ok")

        [made] = restarted.charges
        assert (made.id, made.idempotency_key) == (charge.charge_id, "after")
        assert restarted.connections == 1
        assert restarted.requests == 1


def test_a_gateway_gone_since_the_last_charge_is_unavailable_not_a_timeout(
    gateway: GatewaySimulator, client: PaymentGatewayClient
) -> None:
    client.charge(idempotency_key="before", amount=AMOUNT, card_token="tok_ok")
    gateway.stop()

    # The kept connection is dead; the request goes again on a new one, which is refused:
    # nothing can have been charged, which a timeout ("unknown outcome") would not say.
    with pytest.raises(GatewayUnavailable, match="refused"):
        client.charge(idempotency_key="after", amount=AMOUNT, card_token="tok_ok")
