"""Alembic's migrations build exactly the models' schema, and tear it down again."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import CheckConstraint, Column, MetaData, String, create_engine, inspect

from app.models import Base
from tests.integration.conftest import Services, alembic_config, drop_database, recreate_database

COMPARE_OPTIONS = {"compare_type": True, "compare_server_default": True}


@pytest.fixture
def empty_database(services: Services) -> Iterator[str]:
    name = "jobs_migrations_pytest"
    url = recreate_database(services.server_url, name)
    yield url
    drop_database(services.server_url, name)


def schema_differences(url: str, metadata: MetaData = Base.metadata) -> list[Any]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts=COMPARE_OPTIONS)
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def table_names(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_head_on_an_empty_database_yields_exactly_the_models(empty_database: str) -> None:
    command.upgrade(alembic_config(empty_database), "head")

    assert schema_differences(empty_database) == []
    assert table_names(empty_database) == set(Base.metadata.tables) | {"alembic_version"}


def test_the_migrated_check_constraints_are_the_models(empty_database: str) -> None:
    # Autogenerate does not compare CHECK constraints; their names and texts are compared here.
    command.upgrade(alembic_config(empty_database), "head")
    engine = create_engine(empty_database)
    try:
        inspector = inspect(engine)
        migrated = {
            (table, c["name"], _normalised(c["sqltext"]))
            for table in Base.metadata.tables
            for c in inspector.get_check_constraints(table)
        }
    finally:
        engine.dispose()
    declared = {
        (table.name, str(c.name), _normalised(str(c.sqltext)))
        for table in Base.metadata.tables.values()
        for c in table.constraints
        if isinstance(c, CheckConstraint)
    }
    assert migrated == declared


def _normalised(sql: str) -> str:
    """PostgreSQL's rendering of a CHECK, reduced to what the model's text says."""
    sql = re.sub(r"::[a-z ]+(\[\])?", "", sql)  # casts PostgreSQL adds
    sql = re.sub(r"IN \(('[^',]*')\)", r"= \1", sql)  # a one-value IN is stored as =
    sql = re.sub(r"= ANY \(ARRAY\[(.*?)\]\)", r"IN (\1)", sql)  # IN (...) as it stores it
    return re.sub(r"[\s()]", "", sql).lower()


def test_downgrade_base_removes_every_table_and_upgrade_works_again(empty_database: str) -> None:
    config = alembic_config(empty_database)
    command.upgrade(config, "head")

    command.downgrade(config, "base")
    assert table_names(empty_database) == {"alembic_version"}

    command.upgrade(config, "head")
    assert schema_differences(empty_database) == []


def test_a_model_change_without_a_migration_is_reported(empty_database: str) -> None:
    command.upgrade(alembic_config(empty_database), "head")
    changed = MetaData(naming_convention=Base.metadata.naming_convention)
    for table in Base.metadata.tables.values():
        table.to_metadata(changed)
    changed.tables["users"].append_column(Column("nickname", String(40), nullable=True))

    differences = schema_differences(empty_database, changed)

    assert [(d[0], d[2], d[3].name) for d in differences] == [("add_column", "users", "nickname")]
