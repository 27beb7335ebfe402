"""The database engine (one per process, fork-safe) and the one transactional scope jobs use."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_database_url

logger = logging.getLogger(__name__)

#: TCP keepalives of this process's side of each connection (libpq parameters): a database
#: host that vanished (a cut link, a dead machine) is noticed within about 11 s, not hours.
CLIENT_KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    # (sent but unacknowledged data: keepalives do not cover it)
    "tcp_user_timeout": 10000,
}
#: The same for the server's side, set per session: a worker host that vanished inside a
#: transaction would otherwise keep its row locks until the server's keepalive (2 h by
#: default) ends its session, and the jobs taken over from it would wait behind them.
SERVER_KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
    "tcp_user_timeout": "10000",
}

_engine: Engine | None = None
_session_factory: sessionmaker[Session] | None = None
#: Connections the engine keeps, and how many more it may open under load: enough for one
#: job at a time (a prefork pool process) and the threads it starts. A threads-pool worker
#: sizes it to its concurrency (`size_pool`).
_pool_size = 5
_max_overflow = 5
#: Threads of one process (the threads pool) must not each make an engine of their own.
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """This process's engine, created on first use from the configured database URL."""
    global _engine, _session_factory
    engine = _engine
    if engine is not None:
        return engine
    with _engine_lock:
        if _engine is None:
            _engine = create_engine(
                get_database_url(),
                # A connection killed by a database restart or pg_terminate_backend is
                # replaced on checkout instead of failing the next job.
                pool_pre_ping=True,
                pool_size=_pool_size,
                max_overflow=_max_overflow,
                connect_args=dict(CLIENT_KEEPALIVES),
            )
            event.listen(_engine, "connect", _set_server_keepalives)
            _session_factory = sessionmaker(bind=_engine, expire_on_commit=False)
        return _engine


def size_pool(connections: int) -> None:
    """Keep `connections` database connections (a threads-pool worker: one per thread and a
    couple for the worker's own threads), before any job runs; an engine already made with
    another size is disposed of and made again on next use."""
    global _engine, _pool_size
    with _engine_lock:
        _pool_size = connections
        if _engine is not None and _engine.pool.size() != connections:  # type: ignore[attr-defined]
            _engine.dispose()
            _engine = None


def _set_server_keepalives(connection: Any, _record: Any) -> None:
    # (a SET per session, not a startup `options`: poolers such as PgBouncer refuse those)
    cursor = connection.cursor()
    try:
        settings = ", ".join(
            f"set_config('{k}', '{v}', false)" for k, v in SERVER_KEEPALIVES.items()
        )
        cursor.execute(f"SELECT {settings}")
    finally:
        cursor.close()
    connection.commit()


def _forget_parent_connections() -> None:
    # A forked child (a prefork pool worker) must never use the sockets its parent opened:
    # drop the inherited pool without closing the parent's connections (SQLAlchemy's
    # documented recipe), so the child opens its own on first use.
    # A lock another thread of the parent held at the fork stays held in the child: make a
    # new one.
    global _engine_lock
    _engine_lock = threading.Lock()
    if _engine is not None:
        _engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


#: Callbacks waiting for the innermost open scope of this thread/task to commit.
_after_commit: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "after_commit", default=None
)
#: Callbacks to run if the innermost open scope rolls back (undoing what is not in it).
_after_rollback: ContextVar[list[Callable[[], None]] | None] = ContextVar(
    "after_rollback", default=None
)
#: The session of the innermost open scope (what the outbox writes in).
_open_session: ContextVar[Session | None] = ContextVar("open_session", default=None)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit if the block succeeds, roll back on any error, always close.

    Callbacks registered with `after_commit` inside the block run once the commit has
    succeeded, and never if it rolls back.
    """
    get_engine()
    assert _session_factory is not None
    factory = _session_factory
    callbacks: list[Callable[[], None]] = []
    undo: list[Callable[[], None]] = []
    token = _after_commit.set(callbacks)
    undo_token = _after_rollback.set(undo)
    session = factory()
    session_token = _open_session.set(session)
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        _run_after_rollback(undo)
        raise
    finally:
        _open_session.reset(session_token)
        session.close()
        _after_commit.reset(token)
        _after_rollback.reset(undo_token)
    _run_after_commit(callbacks)


def open_session() -> Session | None:
    """The session of the innermost open `session_scope` of this thread or task, if any."""
    return _open_session.get()


def after_commit(callback: Callable[[], None]) -> bool:
    """Run `callback` after the open scope commits; False (and nothing kept) if none is open."""
    callbacks = _after_commit.get()
    if callbacks is None:
        return False
    callbacks.append(callback)
    return True


def after_rollback(callback: Callable[[], None]) -> bool:
    """Run `callback` if the open scope rolls back (or its commit fails); False if none is open."""
    callbacks = _after_rollback.get()
    if callbacks is None:
        return False
    callbacks.append(callback)
    return True


def _run_after_rollback(callbacks: list[Callable[[], None]]) -> None:
    # The caller gets the scope's own error; a failing undo is logged, never raised over it.
    for callback in callbacks:
        try:
            callback()
        except Exception:
            logger.exception("after-rollback callback %r failed", callback)


def _run_after_commit(callbacks: list[Callable[[], None]]) -> None:
    # The commit has happened: run every callback even if one fails, then report the first
    # failure to the caller, who would otherwise believe all of them ran.
    first_error: BaseException | None = None
    for callback in callbacks:
        try:
            callback()
        except Exception as exc:
            logger.exception("after-commit callback %r failed", callback)
            first_error = first_error or exc
    if first_error is not None:
        raise first_error


def dispose_engine() -> None:
    """Close every pooled connection of this process (tests and shutdown)."""
    global _engine, _session_factory
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _session_factory = None
