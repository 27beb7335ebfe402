"""The service's SQLAlchemy models, one module per aggregate; importing this registers them all."""

from app.models.base import Base
from app.models.batch import Batch, BatchItem
from app.models.continuation import JobContinuation
from app.models.data_import import Import
from app.models.dataset import Dataset, Record
from app.models.dead_letter import DeadLetter
from app.models.email_delivery import EmailDelivery
from app.models.job_batch import JobBatch, JobBatchJob
from app.models.order import Order, OrderItem
from app.models.outbox import OutboxMessage
from app.models.payment import Payment
from app.models.product import InventoryAudit, Product
from app.models.report import Report
from app.models.user import User

__all__ = [
    "Base",
    "Batch",
    "BatchItem",
    "Dataset",
    "DeadLetter",
    "EmailDelivery",
    "Import",
    "InventoryAudit",
    "JobBatch",
    "JobBatchJob",
    "JobContinuation",
    "Order",
    "OrderItem",
    "OutboxMessage",
    "Payment",
    "Product",
    "Record",
    "Report",
    "User",
]
