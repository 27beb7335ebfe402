"""Sidekiq's weighted queue order for Celery's Redis transport.

Sidekiq checks its queues in a random order weighted by their weights, so with
`urgent 6, default 3, low 1` urgent work is usually taken first and low work is never starved.
kombu's Redis channel asks a "cycle" object for the queue order before every fetch (kombu's
BRPOP, or app.broker's fetch script) and takes from the first non-empty queue of that order;
`queue_order_strategy` in the transport options names the cycle class. `WeightedCycle` is
that class: each call orders the queues by a weighted draw without replacement, so a queue
comes first with probability weight / sum of weights (6/10, 3/10, 1/10).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping


class WeightedCycle:
    """A kombu queue cycle that orders queues by a weighted random draw on every poll."""

    def __init__(
        self,
        items: Iterable[str] | None = None,
        weights: Mapping[str, int] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.items: list[str] = list(items or [])
        self._weights = dict(weights) if weights is not None else None
        self._rng = rng or random.Random()

    @property
    def weights(self) -> Mapping[str, int]:
        """Weights by queue name: those given, else celeryconfig's `queue_weights`."""
        if self._weights is None:
            from app.celery_app import celery_app  # the worker's configured app

            self._weights = dict(celery_app.conf.get("queue_weights") or {})
        return self._weights

    def update(self, items: Iterable[str]) -> None:
        """The queues the channel consumes from now."""
        self.items[:] = list(items)

    def consume(self, n: int) -> list[str]:
        """The order in which to check the queues for the next message."""
        remaining = list(self.items[:n])
        weights = self.weights
        order: list[str] = []
        while remaining:
            # A queue without a weight (one added at run time) counts as weight 1.
            chosen = self._rng.choices(remaining, [weights.get(q, 1) for q in remaining])[0]
            order.append(chosen)
            remaining.remove(chosen)
        return order

    def rotate(self, last_used: str) -> str:
        """Nothing to rotate: every poll draws afresh."""
        return last_used
