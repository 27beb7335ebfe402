"""The retry waits follow ActiveJob's formulas; checked with a seeded random source."""

from __future__ import annotations

import random

import pytest

from app.jobs.errors import JobDeclarationError
from app.jobs.policies import MAX_RETRY_WAIT, DiscardOn, RetryOn, find_policy


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


def test_no_wait_exceeds_the_cap_kept_below_the_visibility_timeout() -> None:
    policy = RetryOn(Timeout, wait="polynomial", attempts=25)
    assert policy.wait_seconds(24, random.Random(1)) == MAX_RETRY_WAIT


@pytest.mark.parametrize(
    "declare",
    [
        lambda: RetryOn(),
        lambda: RetryOn("Timeout"),  # type: ignore[arg-type]
        lambda: RetryOn(Timeout, attempts=0),
        lambda: RetryOn(Timeout, wait="linear"),  # type: ignore[arg-type]
        lambda: RetryOn(Timeout, jitter=2),
        lambda: RetryOn(Timeout, wait=MAX_RETRY_WAIT + 1),
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
