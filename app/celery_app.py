"""The Celery application. Every setting lives in `celeryconfig.py`; nothing is set here."""

from __future__ import annotations

from celery import Celery

celery_app = Celery("jobs_service")
celery_app.config_from_object("celeryconfig")
