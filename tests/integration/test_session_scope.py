"""The one transactional scope: commit on success, roll back on error, fork-safe engine."""

from __future__ import annotations

import multiprocessing
from decimal import Decimal

import pytest
from sqlalchemy import func, select, text

from app.db import dispose_engine, get_engine, session_scope
from app.models import Product
from tests.integration.conftest import Services


def product_count() -> int:
    with session_scope() as session:
        return session.scalar(select(func.count()).select_from(Product)) or 0


def test_the_scope_commits_when_the_block_succeeds(services: Services) -> None:
    with session_scope() as session:
        session.add(Product(sku="A", name="A", price=Decimal(1)))
    assert product_count() == 1


def test_the_scope_rolls_back_when_the_block_raises(services: Services) -> None:
    with pytest.raises(ZeroDivisionError), session_scope() as session:
        session.add(Product(sku="A", name="A", price=Decimal(1)))
        session.flush()
        _ = 1 / 0
    assert product_count() == 0


def backend_pid_in_child(queue: multiprocessing.Queue[int]) -> None:
    with session_scope() as session:
        queue.put(int(session.scalar(text("SELECT pg_backend_pid()")) or 0))


def test_a_forked_child_opens_its_own_connection(services: Services) -> None:
    dispose_engine()  # a fresh pool holding exactly one idle connection
    with get_engine().connect() as conn:
        parent_pid = conn.scalar(text("SELECT pg_backend_pid()"))
    # Without the fork hook the child would check out that very idle connection.
    context = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[int] = context.Queue()
    child = context.Process(target=backend_pid_in_child, args=(queue,))
    child.start()
    child_pid = queue.get(timeout=30)
    child.join(timeout=30)

    assert child.exitcode == 0
    assert child_pid != parent_pid
    with get_engine().connect() as conn:  # the parent's connection is intact and still its own
        assert conn.scalar(text("SELECT pg_backend_pid()")) == parent_pid


def test_both_ends_of_a_connection_notice_a_vanished_peer_within_seconds(
    services: Services,
) -> None:
    """A worker host cut off inside a transaction must not keep its row locks for the
    server's default two hours (test_several_hosts.py shows the jobs that wait on them)."""
    dispose_engine()
    with session_scope() as session:
        if session.scalar(text("SELECT inet_server_addr()")) is None:
            pytest.skip(
                "the database is reached over a Unix socket, where TCP keepalives do not apply"
            )
        server = {
            name: session.scalar(text(f"SHOW {name}"))
            for name in ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")
        }
        session.execute(text("SELECT 1"))
        client = session.connection().connection.driver_connection.info.get_parameters()  # type: ignore[union-attr]
    assert server == {
        "tcp_keepalives_idle": "5",
        "tcp_keepalives_interval": "2",
        "tcp_keepalives_count": "3",
    }
    assert (client["keepalives_idle"], client["keepalives_count"]) == ("5", "3")
