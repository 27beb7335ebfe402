"""dead letters for messages

Messages that cannot become a job (malformed) and messages that kept killing the worker that
held them (poison) go to the dead-letter store too, with their raw bytes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 13:20:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("dead_letters", sa.Column("raw_message", sa.Text(), nullable=True))
    op.drop_constraint(op.f("ck_dead_letters_reason_known"), "dead_letters", type_="check")
    op.create_check_constraint(
        op.f("ck_dead_letters_reason_known"),
        "dead_letters",
        "reason IN ('exhausted', 'unhandled', 'time_limit', 'malformed', 'poison')",
    )


def downgrade() -> None:
    op.execute("DELETE FROM dead_letters WHERE reason IN ('malformed', 'poison')")
    op.drop_constraint(op.f("ck_dead_letters_reason_known"), "dead_letters", type_="check")
    op.create_check_constraint(
        op.f("ck_dead_letters_reason_known"),
        "dead_letters",
        "reason IN ('exhausted', 'unhandled', 'time_limit')",
    )
    op.drop_column("dead_letters", "raw_message")
