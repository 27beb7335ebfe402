"""No-op tasks the overhead benchmark drains: one through the job layer, one bare Celery."""

from __future__ import annotations

from app import celery
from app.jobs.base import job


@job("jobs.bench_noop", ignore_result=True)
def bench_noop(n: int) -> None:
    """Nothing, through the whole job layer (checks, instrumentation, policies)."""


@celery.task(name="bench.bare_noop", ignore_result=True)
def bare_noop(n: int) -> None:
    """Nothing, as a bare Celery task."""
