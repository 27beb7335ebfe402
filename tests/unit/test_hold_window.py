"""The threads worker's hold window (app.delivery.window.HoldWindow): the floor while the pace
is unknown or slow, growing with the pace to the most, and back down when the pace falls."""

from __future__ import annotations

import pytest

from app.delivery.window import SAMPLE, HoldWindow


def paced(window: HoldWindow, per_second: float, start: float, samples: int = 4) -> float:
    """Settle at `per_second` for `samples` measures; the time after them."""
    now = start
    window.size(now)
    for _ in range(samples):
        window.settled(round(per_second * SAMPLE))
        now += SAMPLE
        window.size(now)
    return now


def test_the_floor_until_a_pace_is_measured() -> None:
    window = HoldWindow(threads=8, least=2, most=4, ahead=0.02)
    assert window.size(100.0) == 16
    window.settled(10_000)
    assert window.size(100.0 + SAMPLE / 2) == 16  # (not measured yet)


def test_a_fast_pace_holds_the_most_and_a_slow_one_the_floor() -> None:
    fast = HoldWindow(threads=8, least=2, most=4, ahead=0.02)
    assert fast.size(paced(fast, 2000, 0.0)) == 32  # 40 jobs in 20 ms: more than the most
    middle = HoldWindow(threads=8, least=2, most=4, ahead=0.02)
    assert middle.size(paced(middle, 600, 0.0)) == 20  # 12 in 20 ms: 8 running, 12 behind
    slow = HoldWindow(threads=8, least=2, most=4, ahead=0.02)
    assert slow.size(paced(slow, 100, 0.0)) == 16  # 2 in 20 ms


def test_the_window_shrinks_when_the_pace_falls() -> None:
    window = HoldWindow(threads=8, least=2, most=4, ahead=0.02)
    now = paced(window, 2000, 0.0)
    assert window.size(now) == 32
    later = paced(window, 0, now, samples=8)  # (each measure halves it: the mean of two)
    assert window.size(later) == 16


def test_ahead_zero_is_the_floor_whatever_the_pace() -> None:
    window = HoldWindow(threads=4, least=1, most=4, ahead=0.0)
    assert window.size(paced(window, 100_000, 0.0)) == 4


@pytest.mark.parametrize(
    "threads, least, most, ahead",
    [(0, 2, 4, 0.02), (8, 0, 4, 0.02), (8, 3, 2, 0.02), (8, 2, 4, -1)],
)
def test_a_window_that_cannot_be_is_refused(
    threads: int, least: int, most: int, ahead: float
) -> None:
    with pytest.raises(ValueError, match="hold window"):
        HoldWindow(threads, least, most, ahead)
