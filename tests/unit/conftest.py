"""Unit tests reach no broker: every job they enqueue is captured, as Rails' test adapter does."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.jobs.testing import EnqueuedJobs, capturing_jobs


@pytest.fixture(autouse=True)
def no_broker() -> Iterator[EnqueuedJobs]:
    with capturing_jobs() as enqueued:
        yield enqueued
