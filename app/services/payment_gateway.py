"""The payment gateway's HTTP client: one charge per idempotency key, failures as typed errors.

It knows nothing of Celery or SQLAlchemy. The exception classes say what a caller may do next:

- `PaymentDeclined` (`InsufficientFunds`, `CardExpired`): the gateway answered no; retrying the
  same card will not change that.
- `GatewayTimeout`: the request may or may not have reached the gateway. Retrying is safe only
  because every charge carries an idempotency key the gateway honours: a retry with the same key
  returns the charge already made instead of making a second one.
- `GatewayUnavailable`: the gateway answered 5xx (or 429) or refused the connection; nothing was
  charged, retry later.
- `GatewayRejected`: the gateway refused the request itself (4xx); retrying the same request
  cannot succeed.

A card token never appears in an error message: it is a credential, and messages end up in logs,
job results and the dead-letter store.
"""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from app.services.kept import Kept

#: The longest piece of a gateway's error text copied into an exception message.
_MAX_DETAIL = 200


class GatewayError(Exception):
    """A charge did not produce a `Charge`; the subclass says why."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        #: The HTTP status the gateway answered, or None when no answer arrived.
        self.status = status
        #: The gateway's machine-readable error code (such as "insufficient_funds"), if any.
        self.code = code


class PaymentDeclined(GatewayError):
    """The gateway declined the card (HTTP 402); not worth retrying as is."""


class InsufficientFunds(PaymentDeclined):
    """The card has too little money for the charge."""


class CardExpired(PaymentDeclined):
    """The card is past its expiry date."""


class GatewayTimeout(GatewayError):
    """No answer arrived (timeout or dropped connection): the charge may or may not exist."""


class GatewayUnavailable(GatewayError):
    """The gateway answered 5xx or 429, or refused the connection: nothing was charged."""


class GatewayRejected(GatewayError):
    """The gateway refused the request itself (4xx): the same request will never succeed."""


@dataclass(frozen=True)
class Charge:
    """A charge the gateway made."""

    charge_id: str
    amount: Decimal
    status: str


#: 402 error codes with a more specific exception than PaymentDeclined.
_DECLINES: dict[str, type[PaymentDeclined]] = {
    "insufficient_funds": InsufficientFunds,
    "card_expired": CardExpired,
}


class PaymentGatewayClient:
    """Charges cards through the gateway's HTTP API; safe to share between threads."""

    def __init__(self, base_url: str, timeout: float = 5.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._path = parts.path.rstrip("/") + "/v1/charges"

    def charge(
        self, *, idempotency_key: str, amount: Decimal, card_token: str, currency: str = "USD"
    ) -> Charge:
        """Charge `amount` to the card once per idempotency key; raise a `GatewayError` if not."""
        if not idempotency_key:
            raise ValueError("idempotency_key must not be empty")
        # A float cannot hold most cent values exactly; refuse it rather than round silently.
        if not isinstance(amount, Decimal):
            raise TypeError(f"amount must be a Decimal, got {type(amount).__name__}")
        if not amount.is_finite() or amount <= 0:
            raise ValueError(f"amount must be a positive finite Decimal, got {amount}")
        if not card_token:
            raise ValueError("card_token must not be empty")

        # The amount travels as a string ("12.50"); the "f" format never yields "1E+1".
        amount_text = format(amount, "f")
        body = json.dumps(
            {"amount": amount_text, "currency": currency, "card_token": card_token}
        ).encode()
        what = f"charge of {amount_text} {currency} (idempotency key {idempotency_key!r})"
        status, payload = self._post(body, idempotency_key, what)
        if status in (200, 201):
            return _charge_from(payload, what)
        raise _error_for(status, payload, what, card_token)

    def _post(self, body: bytes, idempotency_key: str, what: str) -> tuple[int, bytes]:
        """Send one POST and read the whole reply; map transport failures to GatewayError.

        The connection is kept for this thread's next charge to the same gateway (HTTP
        keep-alive, see `_connections`). A kept connection the gateway has closed since fails
        before any reply; the request then goes once more on a new connection, which is safe
        because the gateway charges once per idempotency key.
        """
        key = (self._https, self._host, self._port, self.timeout)
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Idempotency-Key": idempotency_key,
        }
        kept = _connections.take(key)
        connection = kept or _new_connection(key)
        done = False
        try:
            try:
                connection.request("POST", self._path, body=body, headers=headers)
                response = connection.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                if kept is None:
                    raise
                connection.close()
                connection = _new_connection(key)
                connection.request("POST", self._path, body=body, headers=headers)
                response = connection.getresponse()
            reply = response.status, response.read()
            done = not response.will_close
        except ConnectionRefusedError as exc:
            # Refused means nothing was received, so nothing can have been charged.
            raise GatewayUnavailable(
                f"payment gateway at {self.base_url} refused the connection; {what} not made"
            ) from exc
        except TimeoutError as exc:
            raise GatewayTimeout(
                f"payment gateway at {self.base_url} did not answer within {self.timeout:g}s; "
                f"{what} has an unknown outcome, retry with the same key"
            ) from exc
        except (ConnectionError, http.client.HTTPException) as exc:
            # Reset, broken pipe, RemoteDisconnected (closed before a status line), a truncated
            # body: the request may have been processed, so the outcome is unknown.
            raise GatewayTimeout(
                f"connection to the payment gateway at {self.base_url} dropped before a full "
                f"answer ({type(exc).__name__}); {what} has an unknown outcome, "
                "retry with the same key"
            ) from exc
        except OSError as exc:
            # Name resolution failed, no route to host...: the request never left.
            raise GatewayUnavailable(
                f"payment gateway at {self.base_url} unreachable ({exc}); {what} not made"
            ) from exc
        finally:
            # Kept only after a whole reply on a connection the gateway keeps open.
            if done:
                _connections.keep(key, connection)
            else:
                connection.close()
        return reply


_ConnectionKey = tuple[bool, str | None, int | None, float]

#: Each thread's open connection to each gateway (HTTP keep-alive): a new one costs a TCP
#: handshake (and a TLS one over https) per charge. Not used again after 15 s unused (servers
#: close idle connections after a while).
_connections: Kept[http.client.HTTPConnection] = Kept(15.0, lambda c: c.close())


def _new_connection(key: _ConnectionKey) -> http.client.HTTPConnection:
    https, host, port, timeout = key
    connection_class = http.client.HTTPSConnection if https else http.client.HTTPConnection
    return connection_class(host or "", port, timeout=timeout)


def _json_object(payload: bytes) -> dict[str, Any] | None:
    """The reply as a JSON object, or None if it is anything else."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _charge_from(payload: bytes, what: str) -> Charge:
    """The Charge a 2xx reply describes."""
    data = _json_object(payload)
    try:
        if data is None:
            raise TypeError("not a JSON object")
        charge_id, amount, status = data["id"], data["amount"], data["status"]
        if not isinstance(charge_id, str) or not charge_id or not isinstance(status, str):
            raise TypeError("id and status must be strings")
        return Charge(charge_id=charge_id, amount=Decimal(str(amount)), status=status)
    except (KeyError, TypeError, InvalidOperation) as exc:
        # The gateway said yes but in a form we cannot read: the charge probably exists, so this
        # is neither retryable nor a decline; a person must look.
        raise GatewayError(
            f"payment gateway accepted the {what} with an unreadable reply: {exc}"
        ) from exc


def _error_for(status: int, payload: bytes, what: str, card_token: str) -> GatewayError:
    """The exception for a non-2xx reply."""
    data = _json_object(payload) or {}
    code = data.get("error") if isinstance(data.get("error"), str) else None
    message = data.get("message") if isinstance(data.get("message"), str) else None
    detail = ": ".join(part for part in (code, message) if part) or "no error detail"
    # The gateway's text is outside our control and may echo the request, so strip the token.
    detail = detail.replace(card_token, "[card token]")[:_MAX_DETAIL]
    reply = f"HTTP {status} ({detail})"
    if status == 402:
        decline = _DECLINES.get(code or "", PaymentDeclined)
        return decline(f"{what} declined: {reply}", status=status, code=code)
    # 429 asks us to come back later: like a 5xx, a retry with the same key is the answer.
    if status >= 500 or status == 429:
        return GatewayUnavailable(
            f"payment gateway unavailable: {reply}; retry the {what} later",
            status=status,
            code=code,
        )
    if 400 <= status < 500:
        return GatewayRejected(
            f"payment gateway rejected the {what}: {reply}", status=status, code=code
        )
    return GatewayError(
        f"payment gateway gave an unexpected answer to the {what}: {reply}",
        status=status,
        code=code,
    )
