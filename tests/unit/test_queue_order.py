"""The weighted queue order: the first queue checked is drawn with probability weight / total."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from app.queue_order import WeightedCycle
from app.settings import ConfigError, load_settings

QUEUES = ["urgent", "default", "low"]
WEIGHTS = {"urgent": 6, "default": 3, "low": 1}


def test_every_poll_orders_all_queues_once() -> None:
    cycle = WeightedCycle(QUEUES, WEIGHTS, random.Random(1))
    for _ in range(100):
        assert sorted(cycle.consume(3)) == sorted(QUEUES)


def test_the_first_queue_is_drawn_six_three_one() -> None:
    cycle = WeightedCycle(QUEUES, WEIGHTS, random.Random(42))

    firsts = Counter(cycle.consume(3)[0] for _ in range(20_000))

    for queue, weight in WEIGHTS.items():
        assert firsts[queue] / 20_000 == pytest.approx(weight / 10, abs=0.015)


def test_a_queue_without_a_weight_counts_as_one_and_update_replaces_the_queues() -> None:
    cycle = WeightedCycle([], {"urgent": 1}, random.Random(3))
    cycle.update(["urgent", "extra"])
    firsts = Counter(cycle.consume(2)[0] for _ in range(4000))
    assert firsts["extra"] / 4000 == pytest.approx(0.5, abs=0.04)
    assert cycle.rotate("extra") == "extra"


def test_the_weights_come_from_celeryconfig_by_default() -> None:
    assert WeightedCycle(QUEUES).weights == WEIGHTS


def test_weights_and_order_are_configured_without_code() -> None:
    settings = load_settings(
        {"QUEUE_WEIGHTS": "urgent=10, default=5, low=2", "QUEUE_ORDER": "strict"}
    )
    assert settings.queue_weights == {"urgent": 10, "default": 5, "low": 2}
    assert settings.queue_order == "strict"


@pytest.mark.parametrize(
    "bad",
    [
        "urgent=6,default=3",
        "urgent=6,default=3,low=0",
        "urgent=6,default=3,low=x",
        "urgent=6,default=3,low=1,x=1",
    ],
)
def test_bad_weights_name_the_variable(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"^QUEUE_WEIGHTS: expected weights"):
        load_settings({"QUEUE_WEIGHTS": bad})
