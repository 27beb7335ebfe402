"""Errors the job layer itself raises or understands."""

from __future__ import annotations


class DeserializationError(Exception):
    """The job's arguments cannot be used: wrong count or types, or a row that cannot exist.

    Retrying cannot help, so every job discards it by default (as ActiveJob does), with a log
    line naming the job, the task id and the reason.
    """


class JobDeclarationError(TypeError):
    """A job is declared with options the job layer cannot honour."""
