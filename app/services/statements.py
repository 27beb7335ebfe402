"""Statements the services build once and run with parameters.

Building a SQLAlchemy statement (its clauses, its columns, its cache key) costs a job more of
the worker's CPU than the round trip that runs it; one built once is run with its values as
bound parameters, named as the columns they go to.
"""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import BindParameter, Table, Update, bindparam, update


def value(table: Table, name: str) -> BindParameter[Any]:
    """A parameter named `name`, of the type of `table`'s column `name`."""
    return bindparam(name, type_=table.c[name].type)


@functools.cache
def settling(table: Table, key: str, columns: frozenset[str]) -> Update:
    """`UPDATE table SET <column> = :<column>, ... WHERE id = :<key>`, built once per set of
    columns written."""
    return (
        update(table)
        .where(table.c.id == bindparam(key))
        .values({name: value(table, name) for name in sorted(columns)})
    )
