"""Session set-up. Unit tests need nothing running; a run that includes integration tests gets
the real PostgreSQL and Redis (configured or embedded) before any test module is imported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ["app.jobs.testing"]

UNIT_DIR = Path(__file__).parent / "unit"


def _only_unit_tests(config: pytest.Config) -> bool:
    paths = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == UNIT_DIR or UNIT_DIR in p.parents for p in paths)


#: Unit tests never connect; these URLs make sure nothing starts or answers if one tried.
UNIT_URLS = {
    "DATABASE_URL": "postgresql://unit-tests@127.0.0.1:9/unit_tests_use_no_database",
    "BROKER_URL": "redis://127.0.0.1:9/0",
}


def pytest_configure(config: pytest.Config) -> None:
    if _only_unit_tests(config) or config.option.collectonly:
        for name, value in UNIT_URLS.items():
            os.environ.setdefault(name, value)
        return
    from tests.integration.conftest import start_services

    services, stop = start_services()
    config._services = services  # type: ignore[attr-defined]
    config._stop_services = stop  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    stop = getattr(config, "_stop_services", None)
    if stop is not None:
        stop()
