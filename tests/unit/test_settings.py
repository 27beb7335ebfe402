"""Configuration: defaults, normalisation, and one clear error per bad variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import DEFAULT_STATE_DIR, ConfigError, load_settings, redact_url


def test_with_nothing_set_defaults_apply_and_urls_are_left_to_the_embedded_default() -> None:
    settings = load_settings({})

    assert settings.database_url is None
    assert settings.broker_url is None
    assert settings.result_backend is None
    assert (settings.statsd_host, settings.statsd_port) == ("127.0.0.1", 8125)
    assert settings.statsd_prefix == "jobs_service"
    assert settings.app_timezone == "UTC"
    assert (settings.smtp_host, settings.smtp_port) == ("127.0.0.1", 8025)
    assert (settings.log_format, settings.log_level) == ("text", "INFO")
    assert settings.state_dir == DEFAULT_STATE_DIR
    assert settings.mail_from == "jobs@example.com"
    assert settings.report_recipients == ("ops@example.com",)
    assert settings.payment_gateway_url == "http://127.0.0.1:8090"
    assert settings.task_events is False
    assert settings.payment_gateway_rate == 20
    assert settings.threads_prefetch == 2


def test_task_events_are_off_unless_asked_for() -> None:
    assert load_settings({"TASK_EVENTS": "true"}).task_events is True
    assert load_settings({"TASK_EVENTS": "false"}).task_events is False


def test_values_are_read_from_the_environment() -> None:
    settings = load_settings(
        {
            "DATABASE_URL": "postgres://app:pw@db:5433/jobs",
            "BROKER_URL": "redis://cache:6380/2",
            "STATSD_HOST": "metrics",
            "STATSD_PORT": "9125",
            "STATSD_PREFIX": "shop.jobs",
            "APP_TIMEZONE": "Europe/Berlin",
            "SMTP_HOST": "mail",
            "SMTP_PORT": "2525",
            "LOG_FORMAT": "JSON",
            "LOG_LEVEL": "debug",
            "APP_STATE_DIR": "/var/lib/jobs",
            "THREADS_PREFETCH": "1",
            "THREADS_HOLD_AHEAD": "0.05",
            "STATSD_FLUSH_INTERVAL": "0.25",
        }
    )

    assert settings.database_url == "postgresql+psycopg://app:pw@db:5433/jobs"
    assert settings.broker_url == "redis://cache:6380/2"
    assert settings.result_backend == "redis://cache:6380/2"
    assert (settings.statsd_host, settings.statsd_port, settings.statsd_prefix) == (
        "metrics",
        9125,
        "shop.jobs",
    )
    assert settings.app_timezone == "Europe/Berlin"
    assert (settings.smtp_host, settings.smtp_port) == ("mail", 2525)
    assert (settings.log_format, settings.log_level) == ("json", "DEBUG")
    assert settings.state_dir == Path("/var/lib/jobs")
    assert settings.threads_prefetch == 1
    assert settings.threads_hold_ahead == 0.05
    assert settings.statsd_flush_interval == 0.25


def test_statsd_batches_a_second_by_default_and_zero_sends_each_metric_alone() -> None:
    assert load_settings({}).statsd_flush_interval == 1.0
    assert load_settings({"STATSD_FLUSH_INTERVAL": "0"}).statsd_flush_interval == 0.0


def test_the_hold_window_looks_20_ms_ahead_by_default_and_zero_turns_it_off() -> None:
    assert load_settings({}).threads_hold_ahead == 0.02
    assert load_settings({"THREADS_HOLD_AHEAD": "0"}).threads_hold_ahead == 0.0


def test_a_rabbitmq_broker_gets_the_rpc_result_backend() -> None:
    settings = load_settings({"BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//"})
    assert settings.result_backend == "rpc://"


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DATABASE_URL", "mysql://u:pw@h/db", "a PostgreSQL URL"),
        ("DATABASE_URL", "postgresql://u:pw@h:port/db", "a PostgreSQL URL"),
        ("DATABASE_URL", "postgresql+psycopg2://u:pw@h/db", "the psycopg (v3) driver"),
        ("DATABASE_URL", "postgresql://u:pw@h:5432/", "the database name is missing"),
        ("DATABASE_URL", "not a url", "a PostgreSQL URL"),
        ("BROKER_URL", "http://u:pw@h/0", "a URL starting with one of redis://"),
        ("BROKER_URL", "localhost:6379", "a URL starting with one of redis://"),
        ("RESULT_BACKEND", "nowhere", "a Celery result backend URL"),
        ("STATSD_PORT", "0", "a TCP port number"),
        ("STATSD_PORT", "eighty", "a TCP port number"),
        ("SMTP_PORT", "70000", "a TCP port number"),
        ("STATSD_HOST", "bad host", "a host name"),
        ("STATSD_PREFIX", "jobs service", "dot-separated words"),
        ("APP_TIMEZONE", "Mars/Olympus_Mons", "an IANA time zone name"),
        ("LOG_FORMAT", "xml", "one of text, json"),
        ("LOG_LEVEL", "loud", "one of DEBUG"),
        ("MAIL_FROM", "jobs at example", "an email address"),
        ("REPORT_RECIPIENTS", "ops@example.com, nobody", "comma-separated email addresses"),
        ("PAYMENT_GATEWAY_URL", "ftp://u:pw@gw", "an http:// or https:// URL"),
        ("TASK_EVENTS", "yes", "one of true, false"),
        ("PAYMENT_GATEWAY_RATE", "0", "a whole number from 1 to 1000"),
        ("THREADS_PREFETCH", "0", "a whole number from 1 to 1000"),
        ("THREADS_PREFETCH", "two", "a whole number from 1 to 1000"),
        ("STATSD_FLUSH_INTERVAL", "-1", "a number of seconds from 0"),
        ("STATSD_FLUSH_INTERVAL", "61", "a number of seconds from 0"),
        ("STATSD_FLUSH_INTERVAL", "nan", "a number of seconds from 0"),
        ("STATSD_FLUSH_INTERVAL", "soon", "a number of seconds from 0"),
        ("THREADS_HOLD_AHEAD", "-0.1", "a number of seconds from 0"),
        ("THREADS_HOLD_AHEAD", "2", "a number of seconds from 0"),
        ("THREADS_HOLD_AHEAD", "nan", "a number of seconds from 0"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_was_expected(
    variable: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value})

    message = str(caught.value)
    assert caught.value.variable == variable
    assert message.startswith(f"{variable}: expected ")
    assert expected in message
    assert "pw@" not in message


def test_a_password_in_a_url_is_never_shown() -> None:
    assert redact_url("postgresql://app:s3cret@db/jobs") == "postgresql://app:***@db/jobs"
    assert redact_url("redis://:s3cret@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"
    shown = load_settings({"DATABASE_URL": "postgresql://app:s3cret@db/jobs"}).redacted()
    assert "s3cret" not in repr(shown)
    assert shown["database_url"] == "postgresql+psycopg://app:***@db/jobs"
