"""The mailer renders each email type and maps every SMTP failure, against a real local server."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from email.message import EmailMessage
from typing import Any

import pytest

from app.devservers.smtp import SmtpServer
from app.services.mailer import (
    EMAIL_TYPES,
    MailError,
    MailTimeout,
    PermanentMailError,
    TransientMailError,
    UnknownEmailType,
    message_id,
    render,
    send,
)

SENDER = "shop@example.com"
CUSTOMER = "alice@example.com"

CONTEXTS: dict[str, dict[str, Any]] = {
    "order_confirmation": {"order_id": 42, "total": "19.9"},
    "insufficient_funds": {"payment_id": 7, "amount": Decimal("250")},
    "daily_report": {"date": dt.date(2024, 5, 1), "orders": 12, "revenue": 1234.5, "new_users": 3},
    "batch_completed": {"batch_id": 9, "items": 1000},
}


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    with SmtpServer() as server:
        yield server


def order_email(key: str = "order-42") -> EmailMessage:
    return render(
        "order_confirmation",
        to=CUSTOMER,
        sender=SENDER,
        context=CONTEXTS["order_confirmation"],
        message_id_key=key,
    )


def send_to(server: SmtpServer, message: EmailMessage, timeout: float = 5.0) -> None:
    send(message, host=server.host, port=server.port, timeout=timeout)


# --- rendering ---------------------------------------------------------------------------------


def test_order_confirmation_names_the_order_and_its_total() -> None:
    message = order_email()

    assert message["Subject"] == "Your order #42 is confirmed"
    assert message["To"] == CUSTOMER
    assert message["From"] == SENDER
    body = message.get_content()
    assert "order #42" in body
    assert "Order total: 19.90" in body


def test_insufficient_funds_names_the_payment_and_its_amount() -> None:
    message = render(
        "insufficient_funds",
        to=CUSTOMER,
        sender=SENDER,
        context=CONTEXTS["insufficient_funds"],
        message_id_key="payment-7",
    )

    assert message["Subject"] == "Payment #7 declined: insufficient funds"
    assert message["To"] == CUSTOMER
    body = message.get_content()
    assert "payment #7 of 250.00" in body
    assert "insufficient funds" in body


def test_daily_report_lists_the_days_figures_to_several_recipients() -> None:
    message = render(
        "daily_report",
        to="ops@example.com, cfo@example.com",
        sender=SENDER,
        context=CONTEXTS["daily_report"],
        message_id_key="report-2024-05-01",
    )

    assert message["Subject"] == "Daily report for 2024-05-01"
    assert [a.addr_spec for a in message["To"].addresses] == ["ops@example.com", "cfo@example.com"]
    body = message.get_content()
    assert "Orders:     12" in body
    assert "Revenue:    1,234.50" in body
    assert "New users:  3" in body


@pytest.mark.parametrize("email_type", EMAIL_TYPES)
def test_every_type_has_a_date_and_a_message_id_from_its_key(email_type: str) -> None:
    message = render(
        email_type, to=CUSTOMER, sender=SENDER, context=CONTEXTS[email_type], message_id_key="k"
    )

    assert message["Date"] is not None
    assert message["Message-ID"] == message_id("k")


def test_the_message_id_is_the_same_for_the_same_key_and_differs_for_another() -> None:
    first, again, other = order_email("order-42"), order_email("order-42"), order_email("order-43")

    assert first["Message-ID"] == again["Message-ID"]
    assert first["Message-ID"] != other["Message-ID"]
    digest = hashlib.sha256(b"order-42").hexdigest()[:32]
    assert first["Message-ID"] == f"<{digest}@jobs-service>"


def test_an_unknown_type_is_refused_by_name() -> None:
    with pytest.raises(UnknownEmailType, match="'welcome'"):
        render("welcome", to=CUSTOMER, sender=SENDER, context={}, message_id_key="k")


@pytest.mark.parametrize(
    ("email_type", "missing"),
    [
        ("order_confirmation", "total"),
        ("insufficient_funds", "payment_id"),
        ("daily_report", "revenue"),
    ],
)
def test_a_missing_context_key_is_named_rather_than_rendered(email_type: str, missing: str) -> None:
    context = {k: v for k, v in CONTEXTS[email_type].items() if k != missing}

    with pytest.raises(MailError, match=f"missing context: {missing}$"):
        render(email_type, to=CUSTOMER, sender=SENDER, context=context, message_id_key="k")


def test_a_none_value_counts_as_missing() -> None:
    with pytest.raises(MailError, match="missing context: order_id"):
        render(
            "order_confirmation",
            to=CUSTOMER,
            sender=SENDER,
            context={"order_id": None, "total": 1},
            message_id_key="k",
        )


def test_an_amount_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(MailError, match="'total' must be an amount"):
        render(
            "order_confirmation",
            to=CUSTOMER,
            sender=SENDER,
            context={"order_id": 1, "total": "lots"},
            message_id_key="k",
        )


@pytest.mark.parametrize("to", ["not an address", "", "alice@example.com\r\nBcc: eve@example.com"])
def test_a_bad_recipient_is_refused_before_sending(to: str) -> None:
    with pytest.raises(MailError, match="To"):
        render(
            "order_confirmation",
            to=to,
            sender=SENDER,
            context=CONTEXTS["order_confirmation"],
            message_id_key="k",
        )


def test_every_failure_is_a_mail_error() -> None:
    for cls in (TransientMailError, MailTimeout, PermanentMailError, UnknownEmailType):
        assert issubclass(cls, MailError)
    assert not issubclass(MailTimeout, TransientMailError)


# --- sending -----------------------------------------------------------------------------------


def test_a_sent_message_reaches_the_server_intact(smtp: SmtpServer) -> None:
    message = order_email()

    send_to(smtp, message)

    [received] = smtp.messages
    assert received.mail_from == SENDER
    assert received.rcpt_tos == (CUSTOMER,)
    assert received.message["Subject"] == "Your order #42 is confirmed"
    assert received.message["Message-ID"] == message_id("order-42")
    assert "Order total: 19.90" in received.message.get_content()
    assert smtp.messages_to(CUSTOMER.upper()) == [received]
    assert smtp.messages_to("bob@example.com") == []


def test_every_recipient_of_a_report_gets_it(smtp: SmtpServer) -> None:
    report = render(
        "daily_report",
        to="ops@example.com, cfo@example.com",
        sender=SENDER,
        context=CONTEXTS["daily_report"],
        message_id_key="report",
    )

    send_to(smtp, report)

    assert smtp.messages[0].rcpt_tos == ("ops@example.com", "cfo@example.com")
    assert len(smtp.messages_to("cfo@example.com")) == 1


def test_a_421_is_transient_and_nothing_is_stored(smtp: SmtpServer) -> None:
    smtp.fail_next(421)

    with pytest.raises(TransientMailError) as caught:
        send_to(smtp, order_email())

    assert caught.value.code == 421
    assert "421 Service not available" in str(caught.value)
    assert smtp.messages == []


def test_a_550_is_permanent_and_nothing_is_stored(smtp: SmtpServer) -> None:
    smtp.fail_next(550, message="No such user here")

    with pytest.raises(PermanentMailError) as caught:
        send_to(smtp, order_email())

    assert caught.value.code == 550
    assert "No such user here" in str(caught.value)
    assert smtp.messages == []


def test_a_dropped_connection_is_transient(smtp: SmtpServer) -> None:
    smtp.drop_next()

    with pytest.raises(TransientMailError) as caught:
        send_to(smtp, order_email())

    assert caught.value.code is None
    assert "closed the connection" in str(caught.value)
    assert smtp.messages == []


def test_a_reply_slower_than_the_timeout_is_a_timeout_though_the_mail_arrived(
    smtp: SmtpServer,
) -> None:
    smtp.delay_next(2.0)

    with pytest.raises(MailTimeout, match="may have accepted") as caught:
        send_to(smtp, order_email(), timeout=0.2)

    assert caught.value.code is None
    # The server stored it before stalling: the case a retry would deliver twice.
    [received] = smtp.messages
    assert received.message["Message-ID"] == message_id("order-42")


def test_a_reply_within_the_timeout_is_a_success(smtp: SmtpServer) -> None:
    smtp.delay_next(0.1)

    send_to(smtp, order_email(), timeout=2.0)

    assert len(smtp.messages) == 1


def test_a_closed_port_is_transient() -> None:
    # A bound socket that does not listen: connecting is refused, and no one else takes the port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]

        with pytest.raises(
            TransientMailError, match="connection failed while connecting"
        ) as caught:
            send(order_email(), host="127.0.0.1", port=port, timeout=2.0)

    assert caught.value.code is None
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)


def test_sending_works_again_once_the_faults_are_used_up(smtp: SmtpServer) -> None:
    smtp.fail_next(451, count=2)

    for _ in range(2):
        with pytest.raises(TransientMailError):
            send_to(smtp, order_email())
    send_to(smtp, order_email())

    assert len(smtp.messages) == 1


def test_faults_apply_in_the_order_they_were_set(smtp: SmtpServer) -> None:
    smtp.fail_next(550)
    smtp.drop_next()

    with pytest.raises(PermanentMailError):
        send_to(smtp, order_email())
    with pytest.raises(TransientMailError, match="closed the connection"):
        send_to(smtp, order_email())
    send_to(smtp, order_email())

    assert len(smtp.messages) == 1


def test_reset_forgets_messages_and_pending_faults(smtp: SmtpServer) -> None:
    send_to(smtp, order_email())
    smtp.fail_next(550)

    smtp.reset()
    send_to(smtp, order_email("after-reset"))

    assert [r.message["Message-ID"] for r in smtp.messages] == [message_id("after-reset")]


def test_clear_forgets_messages_but_keeps_faults(smtp: SmtpServer) -> None:
    send_to(smtp, order_email())
    smtp.fail_next(550)

    smtp.clear()

    assert smtp.messages == []
    with pytest.raises(PermanentMailError):
        send_to(smtp, order_email())


def test_errors_do_not_carry_the_message_body(smtp: SmtpServer) -> None:
    smtp.fail_next(421)
    smtp.fail_next(550)
    smtp.drop_next()
    smtp.delay_next(1.0)
    errors: list[MailError] = []

    for timeout in (2.0, 2.0, 2.0, 0.2):
        with pytest.raises(MailError) as caught:
            send_to(smtp, order_email(), timeout=timeout)
        errors.append(caught.value)

    assert [type(e) for e in errors] == [
        TransientMailError,
        PermanentMailError,
        TransientMailError,
        MailTimeout,
    ]
    for error in errors:
        assert "Order total" not in str(error)
        assert "Thank you" not in str(error)


def test_fault_arguments_are_checked(smtp: SmtpServer) -> None:
    with pytest.raises(ValueError, match="4xx or 5xx"):
        smtp.fail_next(250)
    with pytest.raises(ValueError, match="count"):
        smtp.drop_next(0)
    with pytest.raises(ValueError, match="seconds"):
        smtp.delay_next(-1)


def test_the_server_reports_its_real_port_and_waits_for_messages(smtp: SmtpServer) -> None:
    assert smtp.port > 0
    with pytest.raises(TimeoutError, match="expected 1 message"):
        smtp.wait_for_messages(1, timeout=0.05)

    send_to(smtp, order_email())

    assert len(smtp.wait_for_messages(1, timeout=1.0)) == 1


def test_a_server_with_latency_answers_every_message_that_much_later() -> None:
    with SmtpServer(latency=0.3) as server:
        for _ in range(2):
            started = time.monotonic()
            send_to(server, order_email())
            assert time.monotonic() - started >= 0.3
        assert len(server.messages) == 2
    with pytest.raises(ValueError, match="latency"):
        SmtpServer(latency=-1)


# --- kept sessions -----------------------------------------------------------------------------


def test_one_threads_messages_go_in_one_session(smtp: SmtpServer) -> None:
    for key in ("a", "b", "c"):
        send_to(smtp, order_email(key))

    peers = {received.peer for received in smtp.messages}
    assert len(smtp.messages) == 3
    assert len(peers) == 1


def test_each_thread_has_a_session_of_its_own(smtp: SmtpServer) -> None:
    threads = [
        threading.Thread(target=send_to, args=(smtp, order_email(f"t-{i}"))) for i in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len({received.peer for received in smtp.messages}) == 3


def test_after_a_failure_the_next_message_opens_a_new_session(smtp: SmtpServer) -> None:
    send_to(smtp, order_email("first"))
    smtp.fail_next(451)
    with pytest.raises(TransientMailError):
        send_to(smtp, order_email("refused"))
    send_to(smtp, order_email("after"))

    first, after = smtp.messages
    assert first.peer != after.peer


def test_a_session_the_server_closed_is_replaced_and_the_message_delivered(
    smtp: SmtpServer,
) -> None:
    send_to(smtp, order_email("before"))
    port = smtp.port
    smtp.stop()  # ends the session this thread keeps

    with SmtpServer(port=port) as restarted:
        send_to(restarted, order_email("after"))

        [received] = restarted.messages
        assert received.message["Message-ID"] == message_id("after")


def test_a_forked_child_opens_a_session_of_its_own(smtp: SmtpServer) -> None:
    send_to(smtp, order_email("parent-1"))

    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if its message went through
        code = 1
        try:
            send_to(smtp, order_email("child"))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    send_to(smtp, order_email("parent-2"))  # the parent's session was not disturbed

    parent_1, child, parent_2 = smtp.messages
    assert child.message["Message-ID"] == message_id("child")
    assert parent_1.peer == parent_2.peer != child.peer


def as_the_standard_policy_writes(message: EmailMessage) -> EmailMessage:
    """`message` made again by `EmailMessage()`'s default policy from its headers' text."""
    from email import policy

    standard = EmailMessage(policy=policy.default)
    for name, value in message.items():
        if name.lower() not in ("content-type", "content-transfer-encoding", "mime-version"):
            standard[name] = str(value)
    standard.set_content(message.get_content())
    return standard


def test_the_kept_header_classes_render_what_the_standard_policy_renders() -> None:
    """`POLICY` only keeps the classes the standard registry makes: every email type comes out
    byte for byte as `EmailMessage()`'s default policy writes it, names with non-ASCII too."""
    contexts: dict[str, dict[str, Any]] = {
        "order_confirmation": {"order_id": 7, "total": "12.5"},
        "insufficient_funds": {"payment_id": 3, "amount": 40},
        "daily_report": {"date": dt.date(2026, 1, 2), "orders": 5, "revenue": "9", "new_users": 1},
        "batch_completed": {"batch_id": 4, "items": 100},
    }
    for email_type, context in contexts.items():
        ours = render(
            email_type,
            to="Zoë Ünal <zoe@example.com>, b@example.org",
            sender="Jobs Service <jobs@example.com>",
            context=context,
            message_id_key=f"k-{email_type}",
        )
        standard = as_the_standard_policy_writes(ours)
        assert ours.as_bytes() == standard.as_bytes()
        assert type(ours["To"]).__mro__[1:] == type(standard["To"]).__mro__[1:]


def test_a_header_parsed_before_is_given_again_and_the_messages_stay_apart() -> None:
    """`POLICY` keeps the headers it parsed: the second email's From and To are the first's
    objects, its own Subject and Message-ID are its own, each message comes out as the standard
    policy writes it, and a bad value is refused however often it comes."""
    first = order_email("kept-1")
    second = render(
        "order_confirmation",
        to=CUSTOMER,
        sender=SENDER,
        context={"order_id": 43, "total": "1"},
        message_id_key="kept-2",
    )
    other = render(
        "order_confirmation",
        to="bob@example.com",
        sender=SENDER,
        context=CONTEXTS["order_confirmation"],
        message_id_key="kept-3",
    )
    assert second["From"] is first["From"] and second["To"] is first["To"]
    assert second["Content-Type"] is first["Content-Type"]
    assert [a.addr_spec for a in other["To"].addresses] == ["bob@example.com"]
    assert [a.addr_spec for a in first["To"].addresses] == [CUSTOMER]
    assert (first["Message-ID"], second["Message-ID"]) == (
        message_id("kept-1"),
        message_id("kept-2"),
    )
    assert "#43" in second["Subject"] and "#42" in first["Subject"]
    for message in (first, second, other):
        assert message.as_bytes() == as_the_standard_policy_writes(message).as_bytes()
    for _ in range(2):
        with pytest.raises(MailError, match="To"):
            render(
                "order_confirmation",
                to=f"{CUSTOMER}\r\nBcc: eve@example.com",
                sender=SENDER,
                context=CONTEXTS["order_confirmation"],
                message_id_key="kept-4",
            )
