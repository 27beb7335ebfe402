"""Business logic the jobs call. It takes a session, may flush, never commits, knows no Celery."""
