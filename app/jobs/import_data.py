"""jobs.import_data(import_id)."""

from __future__ import annotations

from app.db import session_scope
from app.delivery.flow import Limit
from app.jobs.arguments import RowId
from app.jobs.base import job
from app.jobs.common import DATABASE_UNAVAILABLE
from app.jobs.continuable import Step, step
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
    continuable=True,
    max_resumptions=100,
)
def import_data(import_id: RowId) -> str:
    """Import the CSV of products the import names, a committed chunk at a time, then mark it
    completed; a warm shutdown stops it after the chunk in hand, to resume after it. A
    completed or failed import is a no-op."""
    step("import", lambda s: import_chunks(s, import_id))
    step("finish", lambda s: finish(import_id))
    with session_scope() as session:
        return imports.import_status(session, import_id)


def import_chunks(s: Step, import_id: int) -> None:
    """The `import` step: one checkpoint per chunk, the cursor being the rows seen so far."""
    source = imports.Source()  # one open file across this run's chunks
    try:
        while True:
            with s.checkpoint() as session:
                chunk = imports.import_chunk(session, import_id, source)
                s.advance(chunk.rows_seen)
            if chunk.last:
                return
    finally:
        source.close()


def finish(import_id: int) -> None:
    """The `finish` step: an import whose rows are all in is completed."""
    with session_scope() as session:
        imports.complete_import(session, import_id)
