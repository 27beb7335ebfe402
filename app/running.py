"""What a job's thread notes while the job runs: its log context (`app.logs`) and, on the threads
pool, its deadlines for the time-limit watchdog (`app.threads`).

The app's task classes note them themselves (`app.jobs.base.Job` and
`app.delivery.requests.Task`), not Celery's `task_prerun` / `task_postrun` signals: with a
receiver connected, Celery dispatches both signals around every job (about 9 us of a no-op's
59 us trace in one process; BENCHMARKS.md, "The hot path, eighth run").

- **Entering**, at the top of the task's `__call__`, in the job's thread: the job's name, task
  id and correlation id for its log lines, and its deadlines. A task called inline inside a
  running job (`other_task(...)` in its body, or `perform_now`) keeps the outer job's.
- **Leaving**, at the end of `__call__`: the deadlines are forgotten, and a limit exception the
  watchdog raised that has not reached the thread yet is withdrawn, before the worker's own
  code runs there again.
- **The log context outlives `__call__`** until Celery has logged the outcome, so that its
  "succeeded", "retry" and failure lines, and the job layer's dead-letter line, carry the
  job's fields. `after_return` clears it (success and failure), and so does the request's
  failure callback (retry, reject, ignore: in the job's thread on the solo and threads pools);
  at the latest, the thread's next job replaces it. An eager call clears it as it leaves: its
  caller's thread is not a job's.
- **Other tasks.** A task whose class is neither of the app's (`base=celery.Task` given
  explicitly) gets the same from the two signals, connected at `worker_init` only when the
  worker has such a task (`connect_signals_if_needed`).
"""

from __future__ import annotations

import threading
from typing import Any

from celery import signals

from app import logs, threads

#: The thread ident of each thread running a job's outermost call -> that job's task id.
_entered: dict[int, str] = {}
_get_ident = threading.get_ident


def enter(task: Any, request: Any) -> bool:
    """The job starts in this thread: note its log context and deadlines. False when it runs
    inline inside another job (which keeps its own): then `leave` does nothing either."""
    ident = _get_ident()
    if ident in _entered:
        return False
    task_id = request.id or ""
    logs.note_job(task.name, task_id, request)
    threads.job_started(task_id, task)
    _entered[ident] = task_id  # (last: a note that raised leaves nothing entered)
    return True


def leave(entered: bool, eager: bool) -> None:
    """The job's `__call__` ends: forget its deadlines (and its log context, when eager)."""
    if not entered:
        return
    ident = _get_ident()
    try:
        threads.job_finished(_entered.get(ident, ""))
    finally:  # (a limit exception arriving here still leaves the thread free for its next job)
        _entered.pop(ident, None)
        if eager:
            logs.forget_job()


def outcome_logged() -> None:
    """Celery has logged the job's outcome: its log context goes, unless a job still runs in
    this thread (an inline call's `after_return` inside the outer job's body)."""
    if _get_ident() not in _entered:
        logs.forget_job()


# A task of another class: the signals ----------------------------------------------------------


def _signal_prerun(task: Any = None, **_: Any) -> None:
    if task is None or getattr(task, "notes_running", False):
        return
    enter(task, task.request)


def _signal_postrun(task_id: str | None = None, task: Any = None, **_: Any) -> None:
    if task is None or getattr(task, "notes_running", False):
        return
    ident = _get_ident()
    if _entered.get(ident) == (task_id or ""):
        leave(True, eager=True)  # (postrun comes after Celery's lines: nothing is left to log)


def connect_signals_if_needed(sender: Any = None, **_: Any) -> None:
    """`worker_init`: connect `task_prerun` / `task_postrun` if a registered task notes
    nothing itself. (With none connected, Celery sends neither.)"""
    app = getattr(sender, "app", None)
    tasks = getattr(app, "tasks", None) or {}
    if all(getattr(task, "notes_running", False) for task in tasks.values()):
        return
    signals.task_prerun.connect(_signal_prerun, weak=False, dispatch_uid="running-prerun")
    signals.task_postrun.connect(_signal_postrun, weak=False, dispatch_uid="running-postrun")
