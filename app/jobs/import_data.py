"""jobs.import_data(import_id)."""

from __future__ import annotations

from app.db import session_scope
from app.delivery.flow import Limit
from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.policies import RetryOn
from app.services import imports


@job(
    "jobs.import_data",
    queue_as="low",
    # One run per import across every worker; the others wait in the scheduled set for the
    # slot. The NOWAIT row lock stays as the database's guarantee (a slot lives in Redis and
    # lapses after `duration`; RabbitMQ has none): its retry now fires only in those cases.
    limits_concurrency=Limit(to=1, key=lambda import_id: import_id, duration=3600),
    retry_on=[RetryOn(imports.ImportInProgress, wait=30, attempts=10), DATABASE_UNAVAILABLE],
)
def import_data(import_id: RowId) -> str:
    """Import the CSV of products the import names; a completed import is a no-op."""
    with session_scope() as session:
        outcome = imports.run_import(session, import_id)
    return outcome.status
