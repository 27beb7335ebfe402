"""email deliveries to configured addresses; batch fan-out progress

Emails such as the daily report go to configured addresses rather than to a user, so
`email_deliveries.user_id` becomes optional and `recipient` records where each email went.
Batches record how far their fan-out got, so a re-run resumes instead of enqueueing again.
An import in progress is `processing` (was `running`), the word the other statuses use.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 11:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("email_deliveries", sa.Column("recipient", sa.Text(), nullable=True))
    # Existing deliveries went to their user's address.
    op.execute(
        "UPDATE email_deliveries d SET recipient = u.email FROM users u WHERE u.id = d.user_id"
    )
    op.alter_column("email_deliveries", "recipient", existing_type=sa.Text(), nullable=False)
    op.alter_column("email_deliveries", "user_id", existing_type=sa.BIGINT(), nullable=True)
    op.add_column(
        "batches", sa.Column("fanout_cursor", sa.BigInteger(), server_default="0", nullable=False)
    )
    op.add_column("batches", sa.Column("fanned_out_at", sa.DateTime(timezone=True)))
    _import_statuses("running", "processing")


def downgrade() -> None:
    _import_statuses("processing", "running")
    op.drop_column("batches", "fanned_out_at")
    op.drop_column("batches", "fanout_cursor")
    # Deliveries to configured addresses cannot exist in the older schema.
    op.execute("DELETE FROM email_deliveries WHERE user_id IS NULL")
    op.alter_column("email_deliveries", "user_id", existing_type=sa.BIGINT(), nullable=False)
    op.drop_column("email_deliveries", "recipient")


def _import_statuses(old: str, new: str) -> None:
    op.drop_constraint(op.f("ck_imports_status_known"), "imports", type_="check")
    op.execute(f"UPDATE imports SET status = '{new}' WHERE status = '{old}'")
    op.create_check_constraint(
        op.f("ck_imports_status_known"),
        "imports",
        f"status IN ('pending', '{new}', 'completed', 'failed')",
    )
