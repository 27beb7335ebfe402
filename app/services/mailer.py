"""Rendering and sending the service's emails over SMTP; knows nothing of Celery or databases.

`render` builds the message for one of `EMAIL_TYPES`. A context that lacks a key the type needs
(or holds None for it) raises `MailError` naming the keys: an email saying "Order #None" to a
customer is worse than no email, and the caller's bug is then visible in its error.

`send` hands the message to an SMTP server and turns every failure into one of:

- `TransientMailError`: a 4xx reply, a dropped or refused connection; retrying may help.
- `PermanentMailError`: a 5xx reply; retrying the same message cannot help.
- `MailTimeout`: the server stopped answering. If that happened after the message was sent,
  the server may have accepted it, so a retry can deliver it twice; the Message-ID that
  `render` derives from `message_id_key` lets the receiving side recognise the duplicate.

No exception text contains the message body, so it is safe to log and to store.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import select
import smtplib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import default as default_policy
from email.utils import format_datetime
from typing import Any

from app.services.kept import Kept

EMAIL_TYPES = ("order_confirmation", "insufficient_funds", "daily_report", "batch_completed")

#: A kept SMTP session unused for longer is closed rather than used again (servers drop idle
#: sessions after a few minutes: Postfix's smtpd_timeout and aiosmtpd's are 300 s).
SESSION_IDLE_SECONDS = 60.0
#: Messages sent in one SMTP session before it is ended and a new one opened.
SESSION_MAX_MESSAGES = 100

#: The right-hand side of every Message-ID this service generates.
MESSAGE_ID_DOMAIN = "jobs-service"


class MailError(Exception):
    """An email could not be rendered or sent; `code` is the SMTP reply code, if any."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientMailError(MailError):
    """The server or network failed in a way a later attempt may not (4xx, lost connection)."""


class MailTimeout(MailError):
    """The server stopped answering in time; it may or may not have accepted the message."""


class PermanentMailError(MailError):
    """The server refused the message for good (5xx): sending it again cannot help."""


class UnknownEmailType(MailError):
    """The email type is not one of EMAIL_TYPES."""


# --- rendering ---------------------------------------------------------------------------------


#: Parsed headers kept (see `_HeaderClasses`): the constant ones and the recent values.
PARSED_HEADERS = 1024


class _HeaderClasses(HeaderRegistry):
    """The standard library's header registry, each header's class made once, and the headers
    it parsed from the same name and text given again.

    `HeaderRegistry.__getitem__` builds a new class with `type()` on every lookup, several per
    header set, about 10 us each: a third of rendering an email. The class it builds for a
    name never changes, so it is kept.

    Parsing a header takes 15 to 45 us (the email package's parser makes a token object per
    word), and most of an email's headers are the same from one email to the next: its From,
    the three `set_content` writes, its Date within a second, its To for a recipient written to
    before. A header is an immutable `str` whose parse the message only reads, so the one parsed
    for a name and text is given again for them (the last PARSED_HEADERS kept).
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}
        self._parsed = functools.lru_cache(maxsize=PARSED_HEADERS)(super().__call__)

    def __call__(self, name: str, value: Any) -> BaseHeader:
        if type(value) is str:  # (a datetime, say, is parsed each time)
            return self._parsed(name, value)
        return super().__call__(name, value)

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


#: The email package's default policy (what `EmailMessage()` uses), its header classes kept.
POLICY = default_policy.clone(header_factory=_HeaderClasses())

_SIGNATURE = "\n-- \nThe jobs-service team\n"


def _order_confirmation(ctx: Mapping[str, Any]) -> tuple[str, str]:
    order_id = ctx["order_id"]
    total = _money(ctx, "total")
    subject = f"Your order #{order_id} is confirmed"
    body = (
        "Hello,\n\n"
        f"Thank you for your order #{order_id}. We have received it and are preparing it.\n\n"
        f"Order total: {total}\n\n"
        "We will write again when it ships.\n"
    )
    return subject, body


def _insufficient_funds(ctx: Mapping[str, Any]) -> tuple[str, str]:
    payment_id = ctx["payment_id"]
    amount = _money(ctx, "amount")
    subject = f"Payment #{payment_id} declined: insufficient funds"
    body = (
        "Hello,\n\n"
        f"We could not complete payment #{payment_id} of {amount}: the account has "
        "insufficient funds.\n\n"
        "Please add funds or choose another payment method, then try again.\n"
    )
    return subject, body


def _daily_report(ctx: Mapping[str, Any]) -> tuple[str, str]:
    date = ctx["date"]
    # A date or datetime prints as ISO 8601 either way; a string is taken as it is.
    day = date.isoformat() if isinstance(date, dt.date) else str(date)
    subject = f"Daily report for {day}"
    body = (
        f"Daily report for {day}\n\n"
        f"Orders:     {ctx['orders']}\n"
        f"Revenue:    {_money(ctx, 'revenue')}\n"
        f"New users:  {ctx['new_users']}\n"
    )
    return subject, body


def _batch_completed(ctx: Mapping[str, Any]) -> tuple[str, str]:
    batch_id, items = ctx["batch_id"], ctx["items"]
    subject = f"Batch #{batch_id} completed"
    body = f"Batch #{batch_id} has finished all {items} of its items.\n"
    return subject, body


#: Each type's builder and the context keys it reads (checked before building).
_TEMPLATES: dict[str, tuple[tuple[str, ...], Callable[[Mapping[str, Any]], tuple[str, str]]]] = {
    "order_confirmation": (("order_id", "total"), _order_confirmation),
    "insufficient_funds": (("payment_id", "amount"), _insufficient_funds),
    "daily_report": (("date", "orders", "revenue", "new_users"), _daily_report),
    "batch_completed": (("batch_id", "items"), _batch_completed),
}


def _money(ctx: Mapping[str, Any], key: str) -> str:
    """Format an amount with two decimals; arguments arrive as JSON, so strings are accepted."""
    value = ctx[key]
    # bool is an int to Python, but True is no amount; float goes through str() so that 0.1
    # is 0.10 and not 0.1000000000000000055511151231257827.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise MailError(f"context key {key!r} must be an amount, got {type(value).__name__}")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise MailError(f"context key {key!r} must be an amount, got {value!r}") from None
    if not amount.is_finite():
        raise MailError(f"context key {key!r} must be a finite amount, got {value!r}")
    return f"{amount.quantize(Decimal('0.01')):,}"


def message_id(key: str) -> str:
    """The Message-ID for `key`: the same key always gives the same id."""
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return f"<{digest}@{MESSAGE_ID_DOMAIN}>"


def render(
    email_type: str,
    *,
    to: str,
    sender: str,
    context: Mapping[str, Any],
    message_id_key: str,
) -> EmailMessage:
    """Build the email of `email_type` to `to` (one address, or several comma-separated)."""
    template = _TEMPLATES.get(email_type)
    if template is None:
        raise UnknownEmailType(
            f"unknown email type {email_type!r}; expected one of {', '.join(EMAIL_TYPES)}"
        )
    required, build = template
    missing = [key for key in required if context.get(key) is None]
    if missing:
        raise MailError(f"{email_type} email is missing context: {', '.join(missing)}")
    if not message_id_key:
        raise MailError("message_id_key must not be empty: it makes the Message-ID stable")
    subject, body = build(context)

    message = EmailMessage(policy=POLICY)
    for name, value in (("From", sender), ("To", to), ("Subject", subject)):
        try:
            message[name] = value
        except ValueError as exc:  # a CR or LF, which would let a value forge more headers
            raise MailError(f"invalid {name} header for {email_type} email: {exc}") from None
    for name in ("From", "To"):
        _check_addresses(message, name, email_type)
    message["Date"] = format_datetime(dt.datetime.now(dt.UTC))
    message["Message-ID"] = message_id(message_id_key)
    message.set_content(body + _SIGNATURE)
    return message


def _check_addresses(message: EmailMessage, name: str, email_type: str) -> None:
    # The email package records a malformed address as a defect rather than raising; the SMTP
    # server would refuse it later with a less helpful error, so refuse it here.
    header = message[name]
    addresses = getattr(header, "addresses", ())
    if not addresses or header.defects or any("@" not in a.addr_spec for a in addresses):
        raise MailError(f"invalid {name} address for {email_type} email: {str(header)!r}")


# --- sending -----------------------------------------------------------------------------------


def send(message: EmailMessage, *, host: str, port: int, timeout: float = 10.0) -> None:
    """Deliver `message` to its To/Cc/Bcc addresses through the SMTP server at host:port.

    The session is kept open after a delivered message and used again by the same thread's
    next message to the same server (see `_Sessions`); after any failure it is closed.
    """
    where = f"SMTP server {host}:{port}"
    stage = "connecting"
    session: _Session | None = None
    delivered = False
    try:
        session = _sessions.take(host, port, timeout)
        # STARTTLS and login() would go here, when the session is opened; the loopback dev
        # server needs neither.
        stage = "sending the message"
        refused = session.client.send_message(message)
        if refused:
            # Some recipients took it and some did not: report the refusals, or they go unseen.
            raise _refused_error(where, refused)
        delivered = True
    except (smtplib.SMTPException, OSError) as exc:  # every smtplib error is an OSError too
        raise _mail_error(exc, where, stage, timeout) from exc
    finally:
        if session is not None:
            if delivered:
                _sessions.keep(host, port, timeout, session)
            else:
                # After an error the session's state is unknown (a late reply may still be on
                # its way), so it is not used again, nor asked to QUIT: just closed.
                session.client.close()


@dataclass
class _Session:
    """A kept SMTP session and the messages delivered in it."""

    client: smtplib.SMTP
    messages: int = 0


class _Sessions:
    """Each thread's open SMTP session, one per server, for its next message.

    A new session costs a TCP handshake and three round trips (greeting, EHLO, and QUIT at
    the end) on top of the message's own. A kept session the server has closed since (idle
    timeout, restart) is found before it is used (`_closing`), so that case opens a new
    session instead of failing the message. Closed after any failure (its state unknown),
    after SESSION_IDLE_SECONDS unused, and after SESSION_MAX_MESSAGES messages (servers limit
    them).
    """

    def __init__(self) -> None:
        self.kept: Kept[_Session] = Kept(SESSION_IDLE_SECONDS, lambda s: s.client.close())

    def take(self, host: str, port: int, timeout: float) -> _Session:
        kept = self.kept.take((host, port, timeout), lambda s: not _closing(s.client))
        return kept or _Session(smtplib.SMTP(host, port, timeout=timeout))

    def keep(self, host: str, port: int, timeout: float, session: _Session) -> None:
        session.messages += 1
        if session.messages < SESSION_MAX_MESSAGES:
            self.kept.keep((host, port, timeout), session)
            return
        try:
            session.client.quit()
        except (smtplib.SMTPException, OSError):
            session.client.close()


_sessions = _Sessions()


def _closing(client: smtplib.SMTP) -> bool:
    """Whether the server has closed the idle session, or said something (a 421 before it
    closes it): either makes its socket readable. Looked at without a round trip, as urllib3
    looks at a pooled connection; a session closed after this look fails at MAIL FROM,
    before anything of the message is sent, and the job's retry opens a new one."""
    sock = client.sock
    if sock is None:
        return True
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _mail_error(exc: OSError, where: str, stage: str, timeout: float) -> MailError:
    """Map an smtplib or socket error to the MailError a caller decides retries on."""
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return _refused_error(where, exc.recipients)
    if isinstance(exc, smtplib.SMTPResponseException):  # greeting, HELO, MAIL, DATA refused
        return _reply_error(where, stage, exc.smtp_code, exc.smtp_error)
    # smtplib turns a timeout while reading a reply into SMTPServerDisconnected raised from
    # within the handler of the TimeoutError, so the timeout is only visible as its context.
    if isinstance(exc, TimeoutError) or isinstance(exc.__context__, TimeoutError):
        detail = f"{where} did not answer within {timeout:g} s while {stage}"
        if stage != "connecting":
            detail += "; it may have accepted the message"
        return MailTimeout(detail)
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return TransientMailError(f"{where} closed the connection while {stage}")
    if isinstance(exc, smtplib.SMTPException):  # e.g. SMTPUTF8 needed but not offered
        return PermanentMailError(f"{where} cannot take the message: {exc}")
    # Refused, reset, unreachable, unknown host: network trouble, worth another attempt.
    return TransientMailError(f"{where} connection failed while {stage}: {_describe(exc)}")


def _reply_error(where: str, stage: str, code: int, reply: bytes | str) -> MailError:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    detail = f"{where} replied {code} {text.strip()} while {stage}"
    if 500 <= code <= 599:
        return PermanentMailError(detail, code=code)
    # 4xx is transient by definition; smtplib reports a garbled reply as -1, also worth a retry.
    return TransientMailError(detail, code=code if code > 0 else None)


def _refused_error(where: str, refused: Mapping[str, tuple[int, bytes]]) -> MailError:
    if not refused:
        return PermanentMailError(f"{where} was given no recipients")
    parts = [
        f"{address} ({code} {reply.decode('utf-8', 'replace').strip()})"
        for address, (code, reply) in refused.items()
    ]
    detail = f"{where} refused recipient(s): {', '.join(parts)}"
    permanent = [code for code, _ in refused.values() if 500 <= code <= 599]
    if permanent:
        return PermanentMailError(detail, code=permanent[0])
    first = next(iter(refused.values()))[0]
    return TransientMailError(detail, code=first if first > 0 else None)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
