"""A Celery service for background jobs; `celery -A app worker` finds `app.celery` here."""

from app.celery_app import celery_app as celery

__all__ = ["celery"]
