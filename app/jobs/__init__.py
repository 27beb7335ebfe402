"""The jobs: one module per job, each a Celery task registered as `jobs.<snake_case>`.

Importing this package registers them all (celeryconfig's `imports` does it in the worker).
"""

from app.jobs.batch_process import batch_process, process_batch_range, process_item
from app.jobs.daily_report import daily_report
from app.jobs.import_data import import_data
from app.jobs.large_data_process import large_data_process
from app.jobs.process_order import process_order
from app.jobs.process_payment import process_payment
from app.jobs.record_queue_depths import record_queue_depths
from app.jobs.send_email import send_email
from app.jobs.update_inventory import update_inventory

__all__ = [
    "batch_process",
    "daily_report",
    "import_data",
    "large_data_process",
    "process_batch_range",
    "process_item",
    "process_order",
    "process_payment",
    "record_queue_depths",
    "send_email",
    "update_inventory",
]
