"""job continuations

`job_continuations` keeps each continuable job's progress (completed steps, the current step's
cursor, resumptions) under its task id; `records.times_processed` counts how often a record was
processed (1 once done), the evidence that a resumed walk repeats none.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-10 09:00:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "job_continuations",
        sa.Column("task_id", sa.String(length=255), nullable=False),
        sa.Column("job_name", sa.String(length=255), nullable=False),
        sa.Column(
            "completed_steps",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="[]",
            nullable=False,
        ),
        sa.Column("current_step", sa.String(length=255), nullable=True),
        sa.Column("cursor", postgresql.JSONB(none_as_null=True), nullable=True),
        sa.Column("resumptions", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "resumptions >= 0", name=op.f("ck_job_continuations_resumptions_not_negative")
        ),
        sa.PrimaryKeyConstraint("task_id", name=op.f("pk_job_continuations")),
    )
    op.create_index(
        op.f("ix_job_continuations_updated_at"), "job_continuations", ["updated_at"], unique=False
    )
    op.add_column(
        "records",
        sa.Column("times_processed", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.create_check_constraint(
        op.f("ck_records_times_processed_not_negative"), "records", "times_processed >= 0"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_records_times_processed_not_negative"), "records", type_="check")
    op.drop_column("records", "times_processed")
    op.drop_index(op.f("ix_job_continuations_updated_at"), table_name="job_continuations")
    op.drop_table("job_continuations")
