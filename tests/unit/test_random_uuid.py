"""Task ids and the bulk path's delivery tags (app.ids)."""

from __future__ import annotations

import uuid

import pytest

from app.ids import random_uuid, random_uuids


@pytest.mark.parametrize("make", ["one at a time", "many at a time"])
def test_random_uuids_are_version_4_uuids_as_uuid4_writes_them(make: str) -> None:
    made = [random_uuid() for _ in range(2000)] if make == "one at a time" else random_uuids(2000)

    for text in made:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # lower case, hyphens where str(uuid4()) puts them
    assert len(set(made)) == len(made)


def test_many_at_a_time_gives_as_many_as_asked() -> None:
    assert random_uuids(0) == []
    assert len(random_uuids(1)) == 1
    assert len(random_uuids(1001)) == 1001
