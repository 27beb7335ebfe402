"""The retry waits follow ActiveJob's formulas; checked with a seeded random source."""

from __future__ import annotations

import random

import pytest

from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.errors import JobDeclarationError
from app.jobs.policies import DiscardOn, RetryOn, find_policy


class Timeout(Exception):
    pass


def test_polynomial_wait_is_executions_to_the_fourth_plus_two_plus_jitter() -> None:
    policy = RetryOn(Timeout, wait="polynomial", attempts=10)
    expected_rng = random.Random(7)
    rng = random.Random(7)

    for executions in range(1, 6):
        delay = executions**4
        expected = delay + expected_rng.random() * delay * 0.15 + 2
        assert policy.wait_seconds(executions, rng) == pytest.approx(expected)


def test_polynomial_wait_without_jitter_is_exact() -> None:
    policy = RetryOn(Timeout, wait="polynomial", jitter=0)
    assert [policy.wait_seconds(n) for n in (1, 2, 3, 4)] == [3, 18, 83, 258]


def test_exponential_wait_doubles_from_its_base_and_stops_at_its_cap() -> None:
    policy = RetryOn(Timeout, wait="exponential", base=1.5, max_wait=20, jitter=0)
    assert [policy.wait_seconds(n) for n in (1, 2, 3, 4)] == [3, 6, 12, 20]


def test_a_fixed_wait_gets_up_to_fifteen_percent_jitter() -> None:
    policy = RetryOn(Timeout, wait=60)
    rng, expected_rng = random.Random(3), random.Random(3)
    assert policy.wait_seconds(1, rng) == pytest.approx(60 + expected_rng.random() * 60 * 0.15)
    for _ in range(200):
        assert 60 <= policy.wait_seconds(1, rng) < 69


def test_a_callable_wait_gets_the_execution_count_and_no_jitter() -> None:
    policy = RetryOn(Timeout, wait=lambda executions: executions * 10.0)
    assert [policy.wait_seconds(n) for n in (1, 2, 3)] == [10, 20, 30]


def test_no_wait_is_capped_unless_the_policy_says_so() -> None:
    # Retries wait in Redis's scheduled set, not in a worker: no visibility timeout bounds them.
    policy = RetryOn(Timeout, wait="polynomial", attempts=25, jitter=0)
    assert policy.wait_seconds(24) == 24**4 + 2  # 3 days 20 hours
    capped = RetryOn(Timeout, wait="polynomial", attempts=25, jitter=0, max_wait=3600)
    assert capped.wait_seconds(24) == 3600
    assert RetryOn(Timeout, wait=30 * 86400).wait_seconds(1, random.Random(1)) >= 30 * 86400


def test_the_default_database_retry_follows_activejobs_schedule_for_about_three_weeks() -> None:
    # ActiveJob's :polynomially_longer over 25 attempts (Sidekiq's default retry count): the
    # 24 waits between them sum to n**4 + 2 each, plus up to 15 % jitter on the n**4.
    assert DATABASE_UNAVAILABLE.wait == "polynomial"
    assert DATABASE_UNAVAILABLE.attempts == 25
    rng = random.Random(5)
    total = sum(DATABASE_UNAVAILABLE.wait_seconds(n, rng) for n in range(1, 25))
    bare = sum(n**4 + 2 for n in range(1, 25))
    assert bare <= total <= bare * 1.15
    assert 18 * 86400 < total < 22 * 86400


@pytest.mark.parametrize(
    "declare",
    [
        lambda: RetryOn(),
        lambda: RetryOn("Timeout"),  # type: ignore[arg-type]
        lambda: RetryOn(Timeout, attempts=0),
        lambda: RetryOn(Timeout, wait="linear"),  # type: ignore[arg-type]
        lambda: RetryOn(Timeout, jitter=2),
        lambda: RetryOn(Timeout, wait=-1),
        lambda: RetryOn(Timeout, wait=61, max_wait=60),
        lambda: RetryOn(Timeout, max_wait=0),
        lambda: RetryOn(Timeout, wait=float("inf")),
        lambda: DiscardOn(Timeout, callback="log it"),  # type: ignore[arg-type]
    ],
)
def test_a_policy_that_cannot_be_honoured_is_refused_at_declaration(declare: object) -> None:
    with pytest.raises(JobDeclarationError):
        declare()  # type: ignore[operator]


def test_the_first_declared_matching_policy_applies() -> None:
    broad, narrow = RetryOn(Exception), RetryOn(Timeout)
    assert find_policy([narrow, broad], Timeout()) is narrow
    assert find_policy([broad, narrow], Timeout()) is broad
    assert find_policy([narrow], ValueError()) is None
