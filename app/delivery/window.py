"""How many messages a threads worker holds: at least a floor per thread, more when its jobs are
short.

A threads worker holds messages beyond the ones its threads run, so that a thread whose job
ends takes the next at once. Two per thread (THREADS_PREFETCH) suit jobs of tens of
milliseconds: a message arriving behind the held ones waits for about one job's run. Jobs of a
fraction of a millisecond drain that window faster than the event loop refills it, and the
threads wait on the loop: the worker ran a no-op 10 to 15% faster holding four per thread.
Holding four of jobs that take seconds, though, would keep a worker sitting on messages that
an idle worker could run. So the window follows the worker's pace: the messages queued behind
the running ones may be as many as the worker settles in `ahead` seconds (THREADS_HOLD_AHEAD,
20 ms), from the floor up to `most` per thread (MOST_PER_THREAD, Celery's own default prefetch
multiplier). A message arriving behind them waits for about `ahead`, or one job's run.

`HoldWindow` is the channel's (`app.delivery.transport.Channel`, transport option
`hold_window`): it counts the deliveries settled and, at most every SAMPLE seconds, measures
the pace from them.
"""

from __future__ import annotations

import math

#: Seconds of the worker's pace the messages queued behind its running jobs may hold.
HOLD_AHEAD = 0.02
#: The most messages per thread (Celery's default `worker_prefetch_multiplier`).
MOST_PER_THREAD = 4
#: Seconds between two measures of the pace (each the mean of the last and the new one).
SAMPLE = 0.25


class HoldWindow:
    """The hold window of one consuming channel, its `size` from its pace."""

    def __init__(self, threads: int, least: int, most: int, ahead: float) -> None:
        if threads < 1 or least < 1 or most < least or ahead < 0:
            raise ValueError(
                f"a hold window needs threads >= 1, 1 <= least <= most and ahead >= 0; got "
                f"threads={threads}, least={least}, most={most}, ahead={ahead}"
            )
        self.threads, self.least, self.most, self.ahead = threads, least, most, ahead
        self.floor = threads * least
        self.rate = 0.0  # deliveries settled per second
        self._settled = 0
        self._since: float | None = None

    def settled(self, count: int) -> None:
        """`count` deliveries were settled (acknowledged, rejected or given back)."""
        self._settled += count

    def size(self, now: float) -> int:
        """The messages the channel may hold now."""
        since = self._since
        if since is None:
            self._since = now
        elif now - since >= SAMPLE:
            measured = self._settled / (now - since)
            self.rate = (self.rate + measured) / 2 if self.rate else measured
            self._settled, self._since = 0, now
        wanted = self.threads + math.ceil(self.rate * self.ahead)
        return max(self.floor, min(self.threads * self.most, wanted))
