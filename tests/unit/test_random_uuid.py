"""The bulk path's task ids and delivery tags (app.delivery.bulk.random_uuid)."""

from __future__ import annotations

import uuid

from app.delivery.bulk import random_uuid


def test_random_uuids_are_version_4_uuids_as_uuid4_writes_them() -> None:
    made = [random_uuid() for _ in range(2000)]

    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # lower case, hyphens where str(uuid4()) puts them
    assert len(set(made)) == len(made)
