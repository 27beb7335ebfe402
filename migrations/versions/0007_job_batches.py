"""job batches

A batch of jobs with callbacks (app/jobs/batches.py): `job_batches` keeps the counters and when
each callback was enqueued, `job_batch_jobs` each member and where it stands.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 14:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_batches",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("parent_id", sa.BigInteger(), nullable=True),
        sa.Column("description", sa.String(length=255), nullable=True),
        sa.Column("callbacks", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("pending", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("failed", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("dead", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("succeeded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("died_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("pending >= 0", name=op.f("ck_job_batches_pending_not_negative")),
        sa.CheckConstraint("pending <= total", name=op.f("ck_job_batches_pending_within_total")),
        sa.ForeignKeyConstraint(
            ["parent_id"], ["job_batches.id"], name=op.f("fk_job_batches_parent_id_job_batches")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_job_batches")),
    )
    op.create_index("ix_job_batches_parent_id", "job_batches", ["parent_id"], unique=False)
    op.create_table(
        "job_batch_jobs",
        sa.Column("batch_id", sa.BigInteger(), nullable=False),
        sa.Column("task_id", sa.String(length=255), nullable=False),
        sa.Column("job_name", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="pending", nullable=False),
        sa.Column("failures", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint(
            "status IN ('pending', 'succeeded', 'dead')",
            name=op.f("ck_job_batch_jobs_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["job_batches.id"],
            name=op.f("fk_job_batch_jobs_batch_id_job_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("batch_id", "task_id", name=op.f("pk_job_batch_jobs")),
    )


def downgrade() -> None:
    op.drop_table("job_batch_jobs")
    op.drop_index("ix_job_batches_parent_id", table_name="job_batches")
    op.drop_table("job_batches")
