"""The service's configuration: every environment variable is read and checked here, once.

A bad value raises `ConfigError` naming the variable and what was expected; a password in a
URL never appears in a message. `DATABASE_URL` / `BROKER_URL` left unset mean "use the
embedded default" (see `app.embedded`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from app.delivery.window import HOLD_AHEAD

#: Where the embedded servers keep their data unless APP_STATE_DIR says otherwise.
DEFAULT_STATE_DIR = Path(__file__).resolve().parent.parent / ".state"

#: Broker URL schemes kombu can reach that this service supports.
BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp")
#: The most replicas BROKER_WAIT_REPLICAS may wait for.
MAX_WAIT_REPLICAS = 16

LOG_FORMATS = ("text", "json")
#: The queues every worker consumes, most urgent first, and their default weights.
QUEUES = ("urgent", "default", "low")
DEFAULT_QUEUE_WEIGHTS = {"urgent": 6, "default": 3, "low": 1}
QUEUE_ORDERS = ("weighted", "strict", "round_robin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_PASSWORD_IN_URL = re.compile(r"(?P<head>://[^:/@\s]*:)[^@\s]*@")


class ConfigError(ValueError):
    """A configuration variable has a value the service cannot use."""

    def __init__(self, variable: str, expected: str, got: str | None = None) -> None:
        self.variable = variable
        detail = f"{variable}: expected {expected}"
        if got is not None:
            detail += f", got {got!r}"
        super().__init__(detail)


def redact_url(url: str) -> str:
    """Return `url` with any password replaced by `***`, whether or not it parses."""
    return _PASSWORD_IN_URL.sub(r"\g<head>***@", url)


@dataclass(frozen=True)
class Settings:
    """Checked configuration. `None` URLs mean the embedded default is to be used."""

    database_url: str | None
    broker_url: str | None
    result_backend: str | None
    statsd_host: str
    statsd_port: int
    statsd_prefix: str
    app_timezone: str
    smtp_host: str
    smtp_port: int
    log_format: str
    log_level: str
    state_dir: Path
    mail_from: str
    report_recipients: tuple[str, ...]
    payment_gateway_url: str
    queue_order: str
    queue_weights: dict[str, int]
    queue_depth_interval: float
    beat_redis_url: str | None
    visibility_timeout: float
    heartbeat_timeout: float
    poison_after: int
    outbox_relay: bool
    task_events: bool
    payment_gateway_rate: int
    sentinel_master: str | None = None
    wait_replicas: int = 0
    threads_prefetch: int = 2
    threads_hold_ahead: float = HOLD_AHEAD
    statsd_flush_interval: float = 1.0

    def redacted(self) -> dict[str, str]:
        """The settings as strings fit for a log line: passwords hidden."""
        shown: dict[str, str] = {}
        for name, value in self.__dict__.items():
            text = "" if value is None else str(value)
            shown[name] = redact_url(text) if "url" in name or "backend" in name else text
        return shown


def _database_url(raw: str) -> str:
    expected = "a PostgreSQL URL such as postgresql://user:password@host:5432/database"
    try:
        url: URL = make_url(raw)
    except (ArgumentError, ValueError):
        raise ConfigError("DATABASE_URL", expected, redact_url(raw)) from None
    backend = url.get_backend_name()
    driver = url.get_driver_name() if "+" in url.drivername else None
    if backend not in ("postgresql", "postgres"):
        raise ConfigError("DATABASE_URL", expected, redact_url(raw))
    if driver not in (None, "psycopg"):
        raise ConfigError(
            "DATABASE_URL", "the psycopg (v3) driver, postgresql+psycopg://…", redact_url(raw)
        )
    if not url.database:
        raise ConfigError(
            "DATABASE_URL", expected + " (the database name is missing)", redact_url(raw)
        )
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _broker_url(raw: str) -> str:
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if scheme not in BROKER_SCHEMES:
        raise ConfigError(
            "BROKER_URL",
            "a URL starting with one of " + ", ".join(f"{s}://" for s in BROKER_SCHEMES),
            redact_url(raw),
        )
    if scheme == "sentinel":
        parse_sentinel_url(raw)
    return raw


@dataclass(frozen=True)
class SentinelUrl:
    """A `sentinel://host:port;sentinel://host2:port2` broker URL, as kombu reads it: the
    sentinels to ask, and the password and database (of the first URL) for the master."""

    sentinels: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    db: int


def parse_sentinel_url(raw: str) -> SentinelUrl:
    """The parts of a sentinel:// broker URL; ConfigError (naming BROKER_URL) if it has none."""
    expected = (
        "sentinel://host:port URLs separated by ';', such as "
        "sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379"
    )
    sentinels: list[tuple[str, int]] = []
    first = None
    for part in raw.split(";"):
        part = part.strip()
        if not part:
            continue
        parts = urlsplit(part)
        try:
            port = parts.port or 26379
        except ValueError:
            raise ConfigError("BROKER_URL", expected, redact_url(raw)) from None
        if parts.scheme != "sentinel" or not parts.hostname:
            raise ConfigError("BROKER_URL", expected, redact_url(raw))
        sentinels.append((parts.hostname, port))
        first = first or parts
    if first is None:
        raise ConfigError("BROKER_URL", expected, redact_url(raw))
    db = first.path.strip("/") or "0"
    if not db.isdigit():
        raise ConfigError(
            "BROKER_URL", expected + " (the database is a number: /0)", redact_url(raw)
        )
    return SentinelUrl(tuple(sentinels), first.username or None, first.password, int(db))


def _sentinel_master(env: Mapping[str, str], broker_url: str | None) -> str | None:
    raw = env.get("BROKER_SENTINEL_MASTER", "").strip()
    sentinel = broker_url is not None and broker_url.startswith("sentinel://")
    if sentinel and not raw:
        raise ConfigError(
            "BROKER_SENTINEL_MASTER",
            "the master name the sentinels monitor (as in `sentinel monitor NAME ...`), "
            "required with a sentinel:// BROKER_URL",
        )
    if raw and not sentinel:
        raise ConfigError(
            "BROKER_SENTINEL_MASTER", "to be set only with a sentinel:// BROKER_URL", raw
        )
    if raw and not re.fullmatch(r"[A-Za-z0-9_.:-]+", raw):
        raise ConfigError(
            "BROKER_SENTINEL_MASTER",
            "a master name of letters, digits and _ . : - (as the sentinels know it)",
            raw,
        )
    return raw or None


def _wait_replicas(env: Mapping[str, str], broker_url: str | None) -> int:
    raw = env.get("BROKER_WAIT_REPLICAS", "").strip()
    if not raw:
        return 0
    if not raw.isdigit() or int(raw) > MAX_WAIT_REPLICAS:
        raise ConfigError(
            "BROKER_WAIT_REPLICAS",
            f"a whole number of replicas from 0 to {MAX_WAIT_REPLICAS}",
            raw,
        )
    if (
        int(raw)
        and broker_url is not None
        and not broker_url.startswith(("redis", "rediss", "sentinel"))
    ):
        raise ConfigError(
            "BROKER_WAIT_REPLICAS", "a Redis or sentinel:// BROKER_URL (it is Redis's WAIT)", raw
        )
    return int(raw)


def _result_backend(raw: str | None, broker_url: str | None) -> str | None:
    if raw:
        if "://" not in raw:
            raise ConfigError(
                "RESULT_BACKEND",
                "a Celery result backend URL such as redis://host:6379/0 or rpc://",
                redact_url(raw),
            )
        return raw
    if broker_url is None or broker_url.startswith(("redis", "rediss", "sentinel")):
        return broker_url  # None: resolved with the embedded broker
    return "rpc://"


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ConfigError(name, "a TCP port number between 1 and 65535", raw)
    return int(raw)


def _choice(
    env: Mapping[str, str],
    name: str,
    choices: tuple[str, ...],
    default: str,
    *,
    upper: bool = False,
) -> str:
    raw = env.get(name, "").strip() or default
    value = raw.upper() if upper else raw.lower()
    if value not in choices:
        raise ConfigError(name, "one of " + ", ".join(choices), raw)
    return value


def _timezone(raw: str) -> str:
    try:
        ZoneInfo(raw)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            "APP_TIMEZONE", "an IANA time zone name such as UTC or Europe/Berlin", raw
        ) from None
    return raw


def _host(env: Mapping[str, str], name: str, default: str) -> str:
    raw = env.get(name, "").strip() or default
    if any(c.isspace() for c in raw) or "/" in raw:
        raise ConfigError(name, "a host name or IP address", raw)
    return raw


def _prefix(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", raw):
        raise ConfigError(
            "STATSD_PREFIX",
            "dot-separated words of letters, digits and underscores, such as jobs_service",
            raw,
        )
    return raw


_EMAIL = re.compile(r"[^@\s,]+@[^@\s,]+")


def _email(name: str, raw: str) -> str:
    if not _EMAIL.fullmatch(raw):
        raise ConfigError(name, "an email address such as jobs@example.com", raw)
    return raw


def _emails(name: str, raw: str) -> tuple[str, ...]:
    addresses = tuple(a.strip() for a in raw.split(",") if a.strip())
    for address in addresses:
        if not _EMAIL.fullmatch(address):
            raise ConfigError(name, "comma-separated email addresses", raw)
    return addresses


def _http_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(name, "an http:// or https:// URL", redact_url(raw))
    return raw.rstrip("/")


def _queue_weights(raw: str) -> dict[str, int]:
    expected = "weights for urgent, default and low, such as urgent=6,default=3,low=1"
    weights: dict[str, int] = {}
    for part in raw.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in QUEUES or not value.isdigit() or int(value) < 1 or name in weights:
            raise ConfigError("QUEUE_WEIGHTS", expected + " (each a whole number >= 1)", raw)
        weights[name] = int(value)
    if set(weights) != set(QUEUES):
        raise ConfigError("QUEUE_WEIGHTS", expected, raw)
    return weights


def _seconds(name: str, raw: str, default: float) -> float:
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value <= 86400:
        raise ConfigError(name, "a number of seconds between 0 and 86400", raw)
    return value


def _bounded(name: str, raw: str, default: float, least: float) -> float:
    value = _seconds(name, raw, default)
    if value < least:
        raise ConfigError(name, f"a number of seconds between {least:g} and 86400", raw)
    return value


def _seconds_from_zero(name: str, raw: str, default: float, most: float, zero: str) -> float:
    """Seconds from 0 (which means `zero`) to `most`; `default` when unset."""
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 <= value <= most:
        raise ConfigError(name, f"a number of seconds from 0 ({zero}) to {most:g}", raw)
    return value


def _flush_interval(raw: str) -> float:
    return _seconds_from_zero(
        "STATSD_FLUSH_INTERVAL", raw, 1.0, 60, "a datagram a metric, unbatched"
    )


def _hold_ahead(raw: str) -> float:
    return _seconds_from_zero(
        "THREADS_HOLD_AHEAD",
        raw,
        HOLD_AHEAD,
        1,
        "hold THREADS_PREFETCH a thread, whatever the pace",
    )


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= 1000:
        raise ConfigError(name, "a whole number from 1 to 1000", raw)
    return int(raw)


def _redis_url(name: str, raw: str) -> str:
    if urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(name, "a redis://, rediss:// or unix:// URL", redact_url(raw))
    return raw


def redis_client_url(broker_url: str) -> str | None:
    """The redis-py URL of a Redis broker URL (kombu's redis+socket:// is redis-py's unix://)."""
    parts = urlsplit(broker_url)
    if parts.scheme in ("redis", "rediss"):
        return broker_url
    if parts.scheme == "redis+socket":
        query = parts.query.replace("virtual_host=", "db=")
        return f"unix://{parts.path}" + (f"?{query}" if query else "")
    return None


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read and check the configuration from `env` (the process environment by default)."""
    env = os.environ if env is None else env
    database_url = env.get("DATABASE_URL", "").strip()
    broker_url = env.get("BROKER_URL", "").strip()
    checked_broker = _broker_url(broker_url) if broker_url else None
    return Settings(
        database_url=_database_url(database_url) if database_url else None,
        broker_url=checked_broker,
        result_backend=_result_backend(
            env.get("RESULT_BACKEND", "").strip() or None, checked_broker
        ),
        statsd_host=_host(env, "STATSD_HOST", "127.0.0.1"),
        statsd_port=_port(env, "STATSD_PORT", 8125),
        statsd_prefix=_prefix(env.get("STATSD_PREFIX", "").strip() or "jobs_service"),
        app_timezone=_timezone(env.get("APP_TIMEZONE", "").strip() or "UTC"),
        smtp_host=_host(env, "SMTP_HOST", "127.0.0.1"),
        smtp_port=_port(env, "SMTP_PORT", 8025),
        log_format=_choice(env, "LOG_FORMAT", LOG_FORMATS, "text"),
        log_level=_choice(env, "LOG_LEVEL", LOG_LEVELS, "INFO", upper=True),
        state_dir=Path(env.get("APP_STATE_DIR", "").strip() or DEFAULT_STATE_DIR),
        mail_from=_email("MAIL_FROM", env.get("MAIL_FROM", "").strip() or "jobs@example.com"),
        report_recipients=_emails(
            "REPORT_RECIPIENTS", env.get("REPORT_RECIPIENTS", "").strip() or "ops@example.com"
        ),
        payment_gateway_url=_http_url(
            "PAYMENT_GATEWAY_URL",
            env.get("PAYMENT_GATEWAY_URL", "").strip() or "http://127.0.0.1:8090",
        ),
        queue_order=_choice(env, "QUEUE_ORDER", QUEUE_ORDERS, "weighted"),
        queue_weights=_queue_weights(env.get("QUEUE_WEIGHTS", "").strip())
        if env.get("QUEUE_WEIGHTS", "").strip()
        else dict(DEFAULT_QUEUE_WEIGHTS),
        queue_depth_interval=_seconds(
            "QUEUE_DEPTH_INTERVAL", env.get("QUEUE_DEPTH_INTERVAL", "").strip(), 10.0
        ),
        beat_redis_url=_redis_url("BEAT_REDIS_URL", env.get("BEAT_REDIS_URL", "").strip())
        if env.get("BEAT_REDIS_URL", "").strip()
        else None,
        visibility_timeout=_seconds(
            "BROKER_VISIBILITY_TIMEOUT",
            env.get("BROKER_VISIBILITY_TIMEOUT", "").strip(),
            6 * 3600.0,
        ),
        heartbeat_timeout=_bounded(
            "WORKER_HEARTBEAT_TIMEOUT", env.get("WORKER_HEARTBEAT_TIMEOUT", "").strip(), 5.0, 3.0
        ),
        poison_after=_count(env, "POISON_AFTER", 3),
        outbox_relay=_choice(env, "OUTBOX_RELAY", ("true", "false"), "true") == "true",
        task_events=_choice(env, "TASK_EVENTS", ("true", "false"), "false") == "true",
        payment_gateway_rate=_count(env, "PAYMENT_GATEWAY_RATE", 20),
        sentinel_master=_sentinel_master(env, checked_broker),
        wait_replicas=_wait_replicas(env, checked_broker),
        threads_prefetch=_count(env, "THREADS_PREFETCH", 2),
        threads_hold_ahead=_hold_ahead(env.get("THREADS_HOLD_AHEAD", "").strip()),
        statsd_flush_interval=_flush_interval(env.get("STATSD_FLUSH_INTERVAL", "").strip()),
    )


@dataclass(frozen=True)
class Endpoints:
    """The database and broker this process talks to, embedded default resolved."""

    database_url: str
    broker_url: str
    result_backend: str


@cache
def get_settings() -> Settings:
    """The process's settings, read once."""
    return load_settings()


def get_database_url() -> str:
    """The database in use: the configured one, or the embedded PostgreSQL (started if need be).

    Only the database: a migration or a query must not start an embedded Redis.
    """
    return get_settings().database_url or _embedded_url("database_url")


def get_broker_url() -> str:
    """The broker in use: the configured one, or the embedded Redis (started if need be)."""
    return get_settings().broker_url or _embedded_url("broker_url")


def _embedded_url(which: str) -> str:
    """The URL of the one embedded server `which` names, started if need be (and only it)."""
    from app import embedded  # only development and tests reach this

    database = which == "database_url"
    running = embedded.ensure_running(
        get_settings().state_dir, postgres=database, redis=not database
    )
    url = running.database_url if database else running.broker_url
    assert url is not None
    return url


@cache
def get_endpoints() -> Endpoints:
    """The URLs in use: those configured, or the embedded servers' (started if need be)."""
    settings = get_settings()
    database_url, broker_url = settings.database_url, settings.broker_url
    if database_url is None or broker_url is None:
        from app import embedded  # only development and tests reach this

        running = embedded.ensure_running(
            settings.state_dir,
            postgres=database_url is None,
            redis=broker_url is None,
        )
        database_url = database_url or running.database_url
        broker_url = broker_url or running.broker_url
    assert database_url is not None and broker_url is not None
    return Endpoints(
        database_url=database_url,
        broker_url=broker_url,
        result_backend=settings.result_backend or broker_url,
    )
