"""dead letters by job

An index on (job_name, id): the web view's Dead page (and `dead-letters list --job`) lists one
job's entries newest first, a page at a time, without scanning the store.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 15:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_dead_letters_job_name_id"), "dead_letters", ["job_name", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_dead_letters_job_name_id"), table_name="dead_letters")
