"""An argument error says which argument, what was expected in a caller's words, what came."""

from __future__ import annotations

import pytest

from app.jobs import daily_report, large_data_process, process_order, send_email
from app.jobs.arguments import MAX_ROW_ID, bind_arguments
from app.jobs.errors import DeserializationError


def refusal(job: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(DeserializationError) as caught:
        bind_arguments(job.run, args, kwargs)  # type: ignore[attr-defined]
    return str(caught.value)


def test_a_bad_optional_date_says_a_date_as_yyyy_mm_dd_was_expected() -> None:
    assert refusal(daily_report, "2026-13-45") == (
        "argument 'date' must be a date as YYYY-MM-DD, got '2026-13-45'"
    )


def test_too_many_arguments_name_the_parameters_expected_and_what_came() -> None:
    assert refusal(process_order, 1, 2, 3) == (
        "arguments do not fit: expected (order_id), got 3 positional arguments: "
        "too many positional arguments"
    )


def test_an_unknown_keyword_is_named_and_the_optional_parameters_show_their_defaults() -> None:
    message = refusal(send_email, 1, "order_confirmation", colour="red")

    assert "expected (user_id, email_type, idempotency_key=None, context=None)" in message
    assert "keyword 'colour'" in message


def test_an_id_beyond_what_a_row_can_have_is_refused() -> None:
    assert "must be a row id up to" in refusal(process_order, MAX_ROW_ID + 1)
    bind_arguments(process_order.run, (MAX_ROW_ID,), {})  # the largest id fits


def test_an_unknown_email_type_is_refused_when_the_job_is_enqueued() -> None:
    with pytest.raises(DeserializationError, match=r"argument 'email_type' must be an email type"):
        send_email.delay(1, "nope")  # refused before anything is published


def test_a_wrong_kind_of_value_is_named_in_json_words() -> None:
    assert refusal(send_email, 1, "order_confirmation", 5) == (
        "argument 'idempotency_key' must be text, got 5"
    )
    assert refusal(large_data_process, 1, "x") == "argument 'cursor' must be an integer, got 'x'"
