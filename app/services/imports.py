"""Importing products from a CSV file: upsert by sku, bad rows counted with their lines.

An import runs in chunks of CHUNK_ROWS rows, each committed with the import's counters: rows
are visible as each chunk commits, and a resumed run goes on after the last committed chunk.
"""

from __future__ import annotations

import csv
import datetime as dt
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from app.models import Import, Product
from app.services.errors import DomainError, NotFound

COLUMNS = ("sku", "name", "price", "inventory")
#: Rows upserted per statement.
UPSERT_BATCH = 500
#: Rows per transaction (one checkpoint of jobs.import_data).
CHUNK_ROWS = 2000
#: Row errors kept on the import; the count of rejected rows is always exact.
MAX_ERRORS_KEPT = 1000


class ImportNotFound(NotFound):
    """The import does not exist."""

    def __init__(self, import_id: int) -> None:
        super().__init__("import", import_id)


class ImportInProgress(DomainError):
    """Another run holds the import; this one should try again later."""


@dataclass(frozen=True)
class ImportOutcome:
    """Where the import stands after `complete_import`."""

    import_id: int
    status: str
    rows_seen: int
    rows_imported: int
    rows_rejected: int
    changed: bool  # False: it had completed or failed before


@dataclass(frozen=True)
class Chunk:
    """What one `import_chunk` did: `rows_seen` is where the next chunk starts."""

    import_id: int
    rows_seen: int
    last: bool  # no rows left (or the import had ended: completed or failed)


class Source:
    """The import's CSV, read on from where the import's committed counters say it got to.

    Kept open across the chunks of one run; reopened (skipping the rows already seen) only
    when the import's `rows_seen` is not where this reader is (a resumed run, or another run
    took chunks in between).
    """

    def __init__(self) -> None:
        self._handle: TextIO | None = None
        self._rows: Iterator[tuple[int, dict[str, Any]]] | None = None
        self.position = 0  # data rows taken so far

    def take(self, source: str, seen: int, count: int) -> list[tuple[int, dict[str, Any]]]:
        """Up to `count` (line, row) pairs of `source` after its first `seen` data rows."""
        if self._rows is None or self.position != seen:
            self._open(source)
            assert self._rows is not None
            for _ in itertools.islice(self._rows, seen):
                self.position += 1
        assert self._rows is not None
        rows = list(itertools.islice(self._rows, count))
        self.position += len(rows)
        return rows

    def close(self) -> None:
        """Close the file."""
        if self._handle is not None:
            self._handle.close()
        self._handle = self._rows = None

    def _open(self, source: str) -> None:
        self.close()
        self._handle = _local_path(source).open(newline="", encoding="utf-8")
        reader = csv.DictReader(self._handle)
        header = [h.strip().lower() for h in reader.fieldnames or []]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise _BadSource(f"missing columns: {', '.join(missing)} (have: {', '.join(header)})")
        reader.fieldnames = header
        self._rows, self.position = _numbered(reader), 0


def import_chunk(
    session: Session, import_id: int, source: Source | None = None, rows: int = CHUNK_ROWS
) -> Chunk:
    """Import the next `rows` rows of the CSV, with the import's counters, in this transaction.

    The import row is locked NOWAIT: a concurrent run gets ImportInProgress at once instead of
    waiting. Its counters commit with the rows they count, and `rows_seen` is where the next
    chunk starts, so a run stopped or crashed between chunks resumes after the last committed
    one, counting every row once. A source that cannot be read fails the import.
    """
    record = _locked(session, import_id)
    if record.status in ("completed", "failed"):
        return Chunk(import_id, record.rows_seen, last=True)
    record.status = "processing"
    source = source or Source()
    try:
        taken = source.take(record.source, record.rows_seen, rows)
    except (OSError, UnicodeDecodeError, csv.Error, _BadSource) as exc:
        source.close()
        record.status = "failed"
        record.errors = [*record.errors, {"line": None, "error": f"cannot read source: {exc}"}]
        record.completed_at = dt.datetime.now(dt.UTC)
        session.flush()
        return Chunk(import_id, record.rows_seen, last=True)
    _import_rows(session, record, taken)
    session.flush()
    return Chunk(import_id, record.rows_seen, last=len(taken) < rows)


def complete_import(session: Session, import_id: int) -> ImportOutcome:
    """Mark an import whose every row is in completed; an ended import is left as it is."""
    record = _locked(session, import_id)
    if record.status in ("completed", "failed"):
        return _outcome(record, changed=False)
    record.status, record.completed_at = "completed", dt.datetime.now(dt.UTC)
    session.flush()
    return _outcome(record, changed=True)


def _locked(session: Session, import_id: int) -> Import:
    try:
        record = session.scalar(
            select(Import).where(Import.id == import_id).with_for_update(nowait=True)
        )
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) == "55P03":  # lock_not_available
            raise ImportInProgress(f"import {import_id} is being run by another job") from None
        raise
    if record is None:
        raise ImportNotFound(import_id)
    return record


class _BadSource(ValueError):
    pass


def _local_path(source: str) -> Path:
    parts = urlsplit(source)
    if parts.scheme in ("", "file"):
        return Path(parts.path if parts.scheme else source)
    raise _BadSource(f"unsupported source {source!r}; use a file path or file:// URL")


def _import_rows(
    session: Session, record: Import, rows: Iterable[tuple[int, dict[str, Any]]]
) -> None:
    errors: list[dict[str, Any]] = []
    pending: dict[str, dict[str, Any]] = {}
    for line, row in rows:
        record.rows_seen += 1
        problem, values = _parse(row)
        if problem is not None:
            record.rows_rejected += 1
            errors.append({"line": line, "error": problem})
            continue
        record.rows_imported += 1
        pending[values["sku"]] = values  # a sku repeated in one batch: the last row wins
        if len(pending) >= UPSERT_BATCH:
            _upsert(session, pending.values())
            pending.clear()
    if pending:
        _upsert(session, pending.values())
    room = MAX_ERRORS_KEPT - len(record.errors)
    if errors and room > 0:
        record.errors = [*record.errors, *errors[:room]]


def _numbered(reader: csv.DictReader[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    for row in reader:
        yield reader.line_num, row


def _parse(row: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The row as a product, or every problem of the row, joined with "; "."""
    if None in row or any(row.get(c) is None for c in COLUMNS):
        return "wrong number of fields", {}
    problems: list[str] = []
    sku, name = row["sku"].strip(), row["name"].strip()
    if not sku or len(sku) > 64:
        problems.append("sku must be 1 to 64 characters")
    if not name or len(name) > 200:
        problems.append("name must be 1 to 200 characters")
    price_problem = _price_problem(row["price"])
    if price_problem is not None:
        problems.append(price_problem)
    raw_inventory = row["inventory"].strip()
    if not raw_inventory.isdigit() or int(raw_inventory) > 2**31:
        problems.append(f"inventory {row['inventory']!r} must be a whole number >= 0")
    if problems:
        return "; ".join(problems), {}
    price = Decimal(row["price"].strip())
    return None, {"sku": sku, "name": name, "price": price, "inventory": int(raw_inventory)}


def _price_problem(raw: str) -> str | None:
    try:
        price = Decimal(raw.strip())
    except InvalidOperation:
        return f"price {raw!r} is not a number"
    if not price.is_finite() or price < 0 or price != price.quantize(Decimal("0.01")):
        return f"price {raw!r} must be >= 0 with at most 2 decimals"
    if price >= Decimal("1e10"):
        return f"price {raw!r} is too large"
    return None


def _upsert(session: Session, rows: Iterable[dict[str, Any]]) -> None:
    statement = insert(Product).values(list(rows))
    session.execute(
        statement.on_conflict_do_update(
            index_elements=["sku"],
            set_={
                "name": statement.excluded.name,
                "price": statement.excluded.price,
                "inventory": statement.excluded.inventory,
            },
        )
    )


def _outcome(record: Import, *, changed: bool) -> ImportOutcome:
    return ImportOutcome(
        record.id,
        record.status,
        record.rows_seen,
        record.rows_imported,
        record.rows_rejected,
        changed,
    )


def import_status(session: Session, import_id: int) -> str:
    """The import's status."""
    status = session.scalar(select(Import.status).where(Import.id == import_id))
    if status is None:
        raise ImportNotFound(import_id)
    return status
