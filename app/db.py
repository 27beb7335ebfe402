"""The database engine (one per process, fork-safe) and the one transactional scope jobs use."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_endpoints

_engine: Engine | None = None
_session_factory: sessionmaker[Session] | None = None


def get_engine() -> Engine:
    """This process's engine, created on first use from the configured database URL."""
    global _engine, _session_factory
    if _engine is None:
        _engine = create_engine(
            get_endpoints().database_url,
            # A connection killed by a database restart or pg_terminate_backend is
            # replaced on checkout instead of failing the next job.
            pool_pre_ping=True,
            pool_size=5,
            max_overflow=5,
        )
        _session_factory = sessionmaker(bind=_engine, expire_on_commit=False)
    return _engine


def _forget_parent_connections() -> None:
    # A forked child (a prefork pool worker) must never use the sockets its parent opened:
    # drop the inherited pool without closing the parent's connections (SQLAlchemy's
    # documented recipe), so the child opens its own on first use.
    if _engine is not None:
        _engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_parent_connections)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One transaction: commit if the block succeeds, roll back on any error, always close."""
    get_engine()
    assert _session_factory is not None
    session = _session_factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engine() -> None:
    """Close every pooled connection of this process (tests and shutdown)."""
    global _engine, _session_factory
    if _engine is not None:
        _engine.dispose()
    _engine = None
    _session_factory = None
