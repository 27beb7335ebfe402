"""Per-exception retry and discard policies, as ActiveJob's `retry_on` / `discard_on`.

Attempts are counted per policy (per declared exception class), across retries, in the
message header `job_executions`; the waits follow ActiveJob's formulas (see the README).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from app.jobs.errors import JobDeclarationError

#: Rails' default jitter: a random extra of up to 15 % of the wait.
DEFAULT_JITTER = 0.15

WaitAlgorithm = Literal["polynomial", "exponential"]
Wait = float | int | WaitAlgorithm | Callable[[int], float]
Discarded = Callable[[Any, BaseException], None]

_rng = random.Random()


@dataclass(frozen=True)
class RetryOn:
    """Retry when one of `exceptions` is raised, up to `attempts` executions for them.

    `wait` is seconds, "polynomial" (executions**4 + 2 s), "exponential" (base * 2**executions
    s), or a callable of the execution count returning seconds; `max_wait`, if given, caps it.
    A retry waits in Redis's scheduled set (app.delivery.scheduled), not in a worker, so no
    wait is too long: `RetryOn(E, wait="polynomial", attempts=25)` retries for about three
    weeks, as ActiveJob's `:polynomially_longer` and Sidekiq's default retry do.
    """

    exceptions: tuple[type[BaseException], ...]
    wait: Wait = 3
    attempts: int = 5
    jitter: float = DEFAULT_JITTER
    base: float = 1.0
    max_wait: float | None = None

    def __init__(
        self,
        *exceptions: type[BaseException],
        wait: Wait = 3,
        attempts: int = 5,
        jitter: float = DEFAULT_JITTER,
        base: float = 1.0,
        max_wait: float | None = None,
    ) -> None:
        _check_exceptions("RetryOn", exceptions)
        if not isinstance(attempts, int) or attempts < 1:
            raise JobDeclarationError(f"RetryOn attempts must be an integer >= 1, got {attempts!r}")
        if not 0 <= jitter <= 1:
            raise JobDeclarationError(f"RetryOn jitter must be between 0 and 1, got {jitter!r}")
        if max_wait is not None and not (
            isinstance(max_wait, int | float) and 0 < max_wait < float("inf")
        ):
            raise JobDeclarationError(
                f"RetryOn max_wait must be a positive number of seconds or None, got {max_wait!r}"
            )
        if isinstance(wait, str) and wait not in ("polynomial", "exponential"):
            raise JobDeclarationError(
                f"RetryOn wait must be seconds, 'polynomial', 'exponential' or a callable, "
                f"got {wait!r}"
            )
        if isinstance(wait, int | float) and not (
            0 <= wait < float("inf") and (max_wait is None or wait <= max_wait)
        ):
            ceiling = "" if max_wait is None else f", at most max_wait ({max_wait:g})"
            raise JobDeclarationError(
                f"RetryOn wait must be a number of seconds >= 0{ceiling}, got {wait!r}"
            )
        for name, value in (
            ("exceptions", tuple(exceptions)),
            ("wait", wait),
            ("attempts", attempts),
            ("jitter", jitter),
            ("base", base),
            ("max_wait", max_wait),
        ):
            object.__setattr__(self, name, value)

    @property
    def key(self) -> str:
        """The name its executions are counted under in the message headers."""
        return ",".join(_qualified(e) for e in self.exceptions)

    def wait_seconds(self, executions: int, rng: random.Random = _rng) -> float:
        """How long to wait before the next attempt after `executions` failed ones."""
        wait = self.wait
        if callable(wait):
            seconds = float(wait(executions))  # ActiveJob adds no jitter to a custom wait
        elif wait == "polynomial":
            delay = float(executions**4)
            seconds = delay + _jitter(delay, self.jitter, rng) + 2
        elif wait == "exponential":
            delay = self.base * 2.0 ** min(executions, 1000)
            if self.max_wait is not None:
                delay = min(delay, self.max_wait)
            seconds = delay + _jitter(delay, self.jitter, rng)
        else:
            delay = float(wait)
            seconds = delay + _jitter(delay, self.jitter, rng)
        seconds = max(0.0, seconds)
        return seconds if self.max_wait is None else min(seconds, self.max_wait)


@dataclass(frozen=True)
class DiscardOn:
    """End the job without retry when one of `exceptions` is raised; call `callback` once."""

    exceptions: tuple[type[BaseException], ...]
    callback: Discarded | None = field(default=None)

    def __init__(self, *exceptions: type[BaseException], callback: Discarded | None = None) -> None:
        _check_exceptions("DiscardOn", exceptions)
        if callback is not None and not callable(callback):
            raise JobDeclarationError(f"DiscardOn callback must be callable, got {callback!r}")
        object.__setattr__(self, "exceptions", tuple(exceptions))
        object.__setattr__(self, "callback", callback)


Policy = RetryOn | DiscardOn


def find_policy(policies: Sequence[Policy], error: BaseException) -> Policy | None:
    """The first declared policy whose exceptions match `error`, or None."""
    for policy in policies:
        if isinstance(error, policy.exceptions):
            return policy
    return None


def counted_executions(header: Mapping[str, Any] | None, policy: RetryOn) -> int:
    """Executions already failed under `policy`, as the message headers carry them."""
    if not isinstance(header, Mapping):
        return 0
    value = header.get(policy.key, 0)
    return value if isinstance(value, int) and value >= 0 else 0


def _jitter(delay: float, jitter: float, rng: random.Random) -> float:
    return 0.0 if jitter == 0 else rng.random() * delay * jitter


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_exceptions(what: str, exceptions: Sequence[object]) -> None:
    if not exceptions or not all(
        isinstance(e, type) and issubclass(e, BaseException) for e in exceptions
    ):
        raise JobDeclarationError(f"{what} needs one or more exception classes, got {exceptions!r}")
