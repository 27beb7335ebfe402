"""Users: the customers orders, payments and emails belong to."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import Index, String
from sqlalchemy.orm import Mapped, mapped_column

from app.models.base import Base, created_at, primary_key


class User(Base):
    """A customer; premium customers' orders go to the `urgent` queue."""

    __tablename__ = "users"
    __table_args__ = (Index(None, "created_at"),)  # the daily report counts new users by day

    id: Mapped[int] = primary_key()
    email: Mapped[str] = mapped_column(String(320), unique=True)
    premium: Mapped[bool] = mapped_column(default=False, server_default="false")
    created_at: Mapped[dt.datetime] = created_at()
