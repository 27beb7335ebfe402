"""The schema as the models declare it: Rails table names, and the invariants as constraints."""

from __future__ import annotations

from sqlalchemy import CheckConstraint, Table

from app.models import Base

RAILS_TABLES = {
    "users",
    "dead_letters",
    "outbox_messages",
    "job_continuations",
    "job_batches",
    "job_batch_jobs",
    "orders",
    "order_items",
    "products",
    "inventory_audits",
    "payments",
    "email_deliveries",
    "batches",
    "batch_items",
    "reports",
    "imports",
    "datasets",
    "records",
}


def check_texts(table: Table) -> list[str]:
    return [str(c.sqltext) for c in table.constraints if isinstance(c, CheckConstraint)]


def test_the_tables_are_named_as_rails_names_them() -> None:
    assert set(Base.metadata.tables) == RAILS_TABLES


def test_every_status_column_is_limited_to_its_known_values() -> None:
    status_tables = [t for t in Base.metadata.tables.values() if "status" in t.c]
    assert len(status_tables) == 9
    for table in status_tables:
        assert any(text.startswith("status IN (") for text in check_texts(table)), table.name


def test_idempotency_keys_are_unique() -> None:
    for table in Base.metadata.tables.values():
        if "idempotency_key" in table.c:
            assert table.c.idempotency_key.unique, table.name


def test_the_columns_the_jobs_query_are_indexed() -> None:
    indexed = {
        (table.name, tuple(c.name for c in index.columns))
        for table in Base.metadata.tables.values()
        for index in table.indexes
    }
    assert {
        ("orders", ("created_at",)),
        ("users", ("created_at",)),
        ("batch_items", ("batch_id", "id")),
        ("records", ("dataset_id", "id")),
    } <= indexed
