"""The Celery application. Every setting lives in `app/celeryconfig.py`; nothing is set here."""

from __future__ import annotations

from celery import Celery

from app import logs  # noqa: F401  (connects the log set-up and job-context signals)

celery_app = Celery("jobs_service", task_cls="app.delivery.requests:Task")
celery_app.config_from_object("app.celeryconfig")
