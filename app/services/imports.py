"""Importing products from a CSV file: upsert by sku, bad rows counted with their lines."""

from __future__ import annotations

import csv
import datetime as dt
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
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
    """Where the import stands after `run_import`."""

    import_id: int
    status: str
    rows_seen: int
    rows_imported: int
    rows_rejected: int
    changed: bool  # False: it had completed or failed before


def run_import(session: Session, import_id: int) -> ImportOutcome:
    """Import the CSV named by the import's source, in this one transaction.

    The import row is locked NOWAIT: a concurrent run gets ImportInProgress at once instead
    of waiting, and since all rows and counters commit together, a crashed run leaves the
    import pending for a clean re-run (upserts by sku make a re-run harmless anyway).
    """
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
    if record.status in ("completed", "failed"):
        return _outcome(record, changed=False)
    record.status = "processing"
    try:
        path = _local_path(record.source)
        with path.open(newline="", encoding="utf-8") as handle:
            _import_rows(session, record, handle)
    except (OSError, UnicodeDecodeError, csv.Error, _BadSource) as exc:
        record.status = "failed"
        record.errors = [*record.errors, {"line": None, "error": f"cannot read source: {exc}"}]
    else:
        record.status = "completed"
    record.completed_at = dt.datetime.now(dt.UTC)
    session.flush()
    return _outcome(record, changed=True)


class _BadSource(ValueError):
    pass


def _local_path(source: str) -> Path:
    parts = urlsplit(source)
    if parts.scheme in ("", "file"):
        return Path(parts.path if parts.scheme else source)
    raise _BadSource(f"unsupported source {source!r}; use a file path or file:// URL")


def _import_rows(session: Session, record: Import, handle: Iterable[str]) -> None:
    reader = csv.DictReader(handle)
    header = [h.strip().lower() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise _BadSource(f"missing columns: {', '.join(missing)} (have: {', '.join(header)})")
    reader.fieldnames = header
    seen = imported = rejected = 0
    errors: list[dict[str, Any]] = []
    pending: dict[str, dict[str, Any]] = {}
    for line, row in _numbered(reader):
        seen += 1
        problem, values = _parse(row)
        if problem is not None:
            rejected += 1
            if len(errors) < MAX_ERRORS_KEPT:
                errors.append({"line": line, "error": problem})
            continue
        imported += 1
        pending[values["sku"]] = values  # a sku repeated in one batch: the last row wins
        if len(pending) >= UPSERT_BATCH:
            _upsert(session, pending.values())
            pending.clear()
    if pending:
        _upsert(session, pending.values())
    record.rows_seen, record.rows_imported, record.rows_rejected = seen, imported, rejected
    record.errors = errors


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
