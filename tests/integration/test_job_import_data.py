"""jobs.import_data: upsert by sku, bad rows counted with their lines, locked against overlap."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from celery.worker import WorkController
from sqlalchemy import func, select

from app import shutdown
from app.db import session_scope
from app.jobs import import_data
from app.jobs.testing import EnqueuedJobs
from app.models import Import, Product
from app.services import imports
from tests.integration.factories import make_product, reload

CSV = """sku,name,price,inventory
A-1,Anvil,10.00,5
B-2,Bucket,2.5,7
,Nameless,1.00,1
C-3,Crate,abc,1
D-4,Drum,3.00,-2
A-1,Anvil Mk II,12.00,6
"""


def new_import(source: str) -> int:
    with session_scope() as session:
        record = Import(source=source)
        session.add(record)
        session.flush()
        return record.id


def test_good_rows_are_upserted_and_bad_ones_reported_with_their_lines(
    worker: WorkController, tmp_path: Path
) -> None:
    make_product(sku="B-2", inventory=1, price="9.99")
    path = tmp_path / "products.csv"
    path.write_text(CSV)
    import_id = new_import(str(path))

    assert import_data.delay(import_id).get(timeout=30) == "completed"

    record = reload(Import, import_id)
    assert (record.rows_seen, record.rows_imported, record.rows_rejected) == (6, 3, 3)
    assert [e["line"] for e in record.errors] == [4, 5, 6]
    with session_scope() as session:
        products = {p.sku: (p.name, p.price, p.inventory) for p in session.scalars(select(Product))}
    assert products == {
        "A-1": ("Anvil Mk II", Decimal("12.00"), 6),
        "B-2": ("Bucket", Decimal("2.50"), 7),
    }


def test_a_completed_import_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("sku,name,price,inventory\nA-1,Anvil,1.00,1\n")
    import_id = new_import(f"file://{path}")
    import_data.perform_now(import_id)
    path.write_text("sku,name,price,inventory\nA-1,Changed,1.00,1\n")

    assert import_data.perform_now(import_id) == "completed"
    assert reload(Import, import_id).rows_imported == 1
    with session_scope() as session:
        assert session.scalar(select(Product.name)) == "Anvil"


def test_an_import_held_by_another_run_is_retried_later(
    tmp_path: Path, enqueued_jobs: EnqueuedJobs
) -> None:
    path = tmp_path / "p.csv"
    path.write_text("sku,name,price,inventory\nA-1,Anvil,1.00,1\n")
    import_id = new_import(str(path))

    with session_scope() as other_run:
        other_run.scalar(select(Import).where(Import.id == import_id).with_for_update())
        assert import_data.perform_now(import_id) is None

    [retry] = enqueued_jobs.jobs
    assert 30 <= retry.options["countdown"] < 35
    enqueued_jobs.perform_enqueued_jobs()
    assert reload(Import, import_id).status == "completed"


def test_a_missing_file_fails_the_import_with_its_reason() -> None:
    import_id = new_import("/nonexistent/products.csv")
    assert import_data.perform_now(import_id) == "failed"
    record = reload(Import, import_id)
    assert "cannot read source" in record.errors[0]["error"]


def test_a_file_without_the_columns_fails_the_import(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("code,title\nA,B\n")
    import_id = new_import(str(path))
    assert import_data.perform_now(import_id) == "failed"
    assert (
        "missing columns: sku, name, price, inventory"
        in reload(Import, import_id).errors[0]["error"]
    )


def test_every_bad_field_of_a_row_is_reported_not_only_the_first(tmp_path: Path) -> None:
    path = tmp_path / "products.csv"
    path.write_text("sku,name,price,inventory\n,,abc,-2\n")
    import_id = new_import(str(path))

    import_data.perform_now(import_id)

    record = reload(Import, import_id)
    assert record.errors == [
        {
            "line": 2,
            "error": "sku must be 1 to 64 characters; name must be 1 to 200 characters; "
            "price 'abc' is not a number; inventory '-2' must be a whole number >= 0",
        }
    ]


def test_a_stopped_import_keeps_its_committed_chunks_and_resumes_after_them(
    tmp_path: Path, enqueued_jobs: EnqueuedJobs
) -> None:
    lines = ["sku,name,price,inventory"]
    lines += [f"S-{i},Item {i},1.00,{i}" if i % 1000 else f"S-{i},Item,bad,1" for i in range(5000)]
    path = tmp_path / "big.csv"
    path.write_text("\n".join(lines) + "\n")
    import_id = new_import(str(path))

    shutdown.announce()  # the worker is stopping: the job ends after its first chunk
    try:
        import_data.perform_now(import_id)
    finally:
        shutdown.reset()

    record = reload(Import, import_id)
    assert (record.status, record.rows_seen, record.rows_imported, record.rows_rejected) == (
        "processing",
        imports.CHUNK_ROWS,
        imports.CHUNK_ROWS - 2,
        2,
    )
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(Product)) == imports.CHUNK_ROWS - 2
    [again] = enqueued_jobs.jobs
    assert list(again.args) == [import_id]

    enqueued_jobs.perform_enqueued_jobs()

    record = reload(Import, import_id)
    assert (record.status, record.rows_seen, record.rows_imported, record.rows_rejected) == (
        "completed",
        5000,
        4995,
        5,
    )
    assert [e["line"] for e in record.errors] == [2, 1002, 2002, 3002, 4002]
