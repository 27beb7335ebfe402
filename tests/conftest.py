"""Session set-up. Unit tests need nothing running; a run that includes integration tests gets
the real PostgreSQL and Redis (configured or embedded) before any test module is imported."""

from __future__ import annotations

from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).parent / "unit"


def _only_unit_tests(config: pytest.Config) -> bool:
    paths = [Path(str(arg).split("::")[0]).resolve() for arg in config.args]
    return bool(paths) and all(p == UNIT_DIR or UNIT_DIR in p.parents for p in paths)


def pytest_configure(config: pytest.Config) -> None:
    if _only_unit_tests(config) or config.option.collectonly:
        return
    from tests.integration.conftest import start_services

    services, stop = start_services()
    config._services = services  # type: ignore[attr-defined]
    config._stop_services = stop  # type: ignore[attr-defined]


def pytest_unconfigure(config: pytest.Config) -> None:
    stop = getattr(config, "_stop_services", None)
    if stop is not None:
        stop()
