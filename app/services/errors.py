"""Errors the services raise; each says what is wrong in the domain's words."""

from __future__ import annotations


class DomainError(Exception):
    """A rule of the domain refuses the operation."""


class NotFound(DomainError, LookupError):
    """A row the operation needs does not exist (or is not visible yet)."""

    def __init__(self, kind: str, row_id: object) -> None:
        self.kind, self.row_id = kind, row_id
        super().__init__(f"{kind} {row_id} not found")
