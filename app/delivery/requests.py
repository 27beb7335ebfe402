"""Celery's request, telling the transport when a job's process died under it.

Celery requeues a job whose pool process died (`task_reject_on_worker_lost`) with the same call
it uses for a job that asked to be requeued (`Reject(requeue=True)`); only the first is a death
that counts towards the poison limit (`app.delivery.transport`). The app's tasks and the job
layer use this class (`Task.Request`), which tells the transport before Celery requeues.
"""

from __future__ import annotations

from typing import Any

from celery import Task as CeleryTask
from celery.exceptions import WorkerLostError
from celery.worker.request import Request as CeleryRequest

from app import running


class Request(CeleryRequest):  # type: ignore[misc]
    """A request whose requeue after WorkerLostError counts as a death of its message.

    A protocol 2 message whose body the transport's checks decoded already
    (`app.delivery.transport.Message.checked`) goes to the pool decoded, as Celery sends a
    protocol 1 message's: the pool does not decode its JSON once more."""

    def __init__(
        self, message: Any, *args: Any, body: Any = None, decoded: bool = False, **kwargs: Any
    ) -> None:
        if not decoded and getattr(message, "checked", False) and body is message.body:
            checked = message.payload  # (the checked body: nothing is decoded here)
            if isinstance(checked, list) and len(checked) == 3:
                body, decoded = checked, True
        super().__init__(message, *args, body=body, decoded=decoded, **kwargs)

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        exception = getattr(exc_info, "exception", None)
        exception = getattr(exception, "exc", exception)  # (ExceptionWithTraceback)
        if isinstance(exception, WorkerLostError):
            qos = getattr(getattr(self._message, "channel", None), "qos", None)
            died = getattr(qos, "died", None)
            if died is not None:
                died(self._message.delivery_tag)
        try:
            return super().on_failure(exc_info, send_failed_event, return_ok)
        finally:
            # A retry, reject or ignore ends here (after_return is not called for them): in
            # the job's thread on the solo and threads pools, the job's log context goes.
            running.outcome_logged()


class Task(CeleryTask):  # type: ignore[misc]
    """The app's base task: Celery's, with the request above, noting its log context and
    deadlines itself (app.running). The job layer's `Job` is one."""

    Request = f"{__name__}:Request"
    notes_running = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        request = self.request
        entered = running.enter(self, request)
        try:
            # Run by Celery's tracer (not called inline): its request is on the stack already.
            traced = entered and request.called_directly is False
            return self._execute(request, args, kwargs, traced)
        finally:
            running.leave(entered, request.is_eager)

    def _execute(
        self, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool = False
    ) -> Any:
        """What a call runs inside its log context: the body (the job layer wraps it)."""
        return self._run_body(args, kwargs, traced)

    def _run_body(self, args: tuple[Any, ...], kwargs: dict[str, Any], traced: bool) -> Any:
        """`run` itself when traced, as Celery's tracer calls a task with no `__call__` of its
        own (no second copy of the request pushed); Celery's `__call__`, which pushes one,
        when called inline."""
        if traced:
            return self.run(*args, **kwargs)
        return CeleryTask.__call__(self, *args, **kwargs)

    def after_return(self, *args: Any, **kwargs: Any) -> None:
        running.outcome_logged()
