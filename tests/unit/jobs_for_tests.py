"""Jobs declared only for the job layer's unit tests; they touch no database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.jobs.arguments import RowId
from app.jobs.base import Job, job
from app.jobs.policies import DiscardOn, RetryOn


class Flaky(Exception):
    """Retried three times, polynomially longer."""


class Shaky(Exception):
    """Retried twice, after 10 seconds."""


class Gone(Exception):
    """Discarded, with a callback."""


class Unexpected(Exception):
    """Covered by no policy."""


#: What `scripted` raises on each execution, in order; None means succeed.
SCRIPT: list[type[Exception] | None] = []
RUNS: list[dict[str, Any]] = []
DISCARDED: list[tuple[str, str]] = []


def remember_discard(job: Job, error: BaseException) -> None:
    DISCARDED.append((job.name, str(error)))


@job(
    "jobs.test_scripted",
    retry_on=[
        RetryOn(Flaky, wait="polynomial", attempts=3),
        RetryOn(Shaky, wait=10, attempts=2),
    ],
    discard_on=[DiscardOn(Gone, callback=remember_discard)],
)
def scripted(item_id: RowId, note: str = "") -> str:
    """Raise what SCRIPT says next, or return."""
    RUNS.append({"item_id": item_id, "note": note})
    outcome = SCRIPT.pop(0) if SCRIPT else None
    if outcome is not None:
        raise outcome(f"run {len(RUNS)}")
    return f"done {item_id}"


def premium_first(customer_id: int, premium: bool) -> str:
    return "urgent" if premium else "default"


@job("jobs.test_place_order", queue_as=premium_first)
def place_order(customer_id: int, premium: bool) -> int:
    """Enqueue the confirmation, as the seed's order job does."""
    notify.delay(customer_id, "order_confirmation")
    return customer_id


@job("jobs.test_notify", queue_as="low")
def notify(customer_id: int, kind: str, email: str | None = None) -> None:
    """A notification; `email` is personal data."""


HOOK_LOG: list[str] = []


def tracing_hook(execution: Any) -> Any:
    from contextlib import contextmanager

    @contextmanager
    def around() -> Any:
        HOOK_LOG.append(f"before {execution.job_name} attempt {execution.attempt}")
        yield
        HOOK_LOG.append(f"after {execution.job_name}")

    return around()


@job("jobs.test_hooked", around_perform=[tracing_hook])
def hooked() -> None:
    HOOK_LOG.append("body")


Script = Callable[..., Any]
