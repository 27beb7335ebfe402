"""Test helpers, as ActiveJob::TestHelper gives Rails: capture enqueued jobs, assert, run them.

    def test_enqueues_email_notification(enqueued_jobs):
        process_order.perform_now(order_id)
        enqueued_jobs.assert_enqueued(send_email, args=[user_id, "order_confirmation"])

Load the fixture with `pytest_plugins = ["app.jobs.testing"]`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytest

from app.jobs import base
from app.jobs.base import Job, Prepared


class EnqueuedJobs:
    """Jobs enqueued while capturing, in order, instead of published to the broker."""

    def __init__(self) -> None:
        self.jobs: list[Prepared] = []

    def __len__(self) -> int:
        return len(self.jobs)

    def matching(
        self,
        job: Job | None = None,
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
    ) -> list[Prepared]:
        """The captured jobs that fit every criterion given."""
        return [
            p
            for p in self.jobs
            if (job is None or p.job.name == job.name)
            and (args is None or list(p.args) == list(args))
            and (kwargs is None or p.kwargs == dict(kwargs))
            and (queue is None or p.queue == queue)
        ]

    def assert_enqueued(
        self,
        job: Job,
        *,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        queue: str | None = None,
        count: int | None = None,
    ) -> list[Prepared]:
        """Fail unless `job` was enqueued (exactly `count` times, if given) with these values."""
        found = self.matching(job, args=args, kwargs=kwargs, queue=queue)
        wanted = f"{job.name} args={args} kwargs={kwargs} queue={queue}"
        if count is None and not found:
            raise AssertionError(f"expected {wanted} to be enqueued; enqueued: {self.describe()}")
        if count is not None and len(found) != count:
            raise AssertionError(
                f"expected {wanted} enqueued {count} times, found "
                f"{len(found)}; enqueued: {self.describe()}"
            )
        return found

    def assert_no_enqueued(self, job: Job | None = None) -> None:
        """Fail if any job (or any `job`) was enqueued."""
        found = self.matching(job)
        if found:
            raise AssertionError(
                f"expected no {'jobs' if job is None else job.name} enqueued; "
                f"enqueued: {self.describe()}"
            )

    def perform_enqueued_jobs(self, *, only: Job | None = None, limit: int | None = None) -> int:
        """Run the captured jobs inline (and those they enqueue), oldest first; return how many.

        Retries a job enqueues are run too, so a job that keeps failing with a retried
        exception runs until its policy gives up and raises.
        """
        performed = 0
        while limit is None or performed < limit:
            pending = [p for p in self.jobs if only is None or p.job.name == only.name]
            if not pending:
                return performed
            item = pending[0]
            self.jobs.remove(item)
            item.job.apply(
                item.args,
                item.kwargs,
                task_id=item.task_id,
                throw=True,
                headers=item.options.get("headers"),
                retries=item.options.get("retries", 0),
            ).get()
            performed += 1
        return performed

    def clear(self) -> None:
        """Forget what was captured."""
        self.jobs.clear()

    def describe(self) -> str:
        """The captured jobs, one short line each."""
        return (
            "; ".join(f"{p.job.name}{list(p.args)} {p.kwargs} queue={p.queue}" for p in self.jobs)
            or "nothing"
        )


@contextmanager
def capturing_jobs() -> Iterator[EnqueuedJobs]:
    """Capture every job enqueued in the block instead of publishing it."""
    enqueued = EnqueuedJobs()
    previous, base.capture = base.capture, enqueued.jobs
    try:
        yield enqueued
    finally:
        base.capture = previous


@pytest.fixture
def enqueued_jobs() -> Iterator[EnqueuedJobs]:
    """Capture the jobs a test enqueues; assert on them or run them with perform_enqueued_jobs."""
    with capturing_jobs() as enqueued:
        yield enqueued
