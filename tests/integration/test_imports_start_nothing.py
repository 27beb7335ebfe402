"""Importing starts nothing: embedded servers start only when a command asks for them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app import embedded
from tests.integration.conftest import ROOT, Services, drop_database, recreate_database

#: Imports every module of the `app` package, then reads a setting of an unrelated Celery app
#: (Celery's default loader then looks for a module called `celeryconfig`).
IMPORT_EVERYTHING = """
import importlib, pkgutil, app
names = ["app"] + [m.name for m in pkgutil.walk_packages(app.__path__, "app.")]
for name in names:
    importlib.import_module(name)
from celery import Celery
other = Celery("unrelated", loader="default")  # reads a module called celeryconfig
print(len(names), other.conf.task_default_queue, other.conf.broker_url)
"""


def _env_without_urls(state_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "BROKER_URL")}
    return {**env, "APP_STATE_DIR": str(state_dir), **extra}


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    """A state folder of the test's own; whatever a failing test started there is stopped."""
    state_dir = tmp_path / "state"
    yield state_dir
    if state_dir.exists():
        embedded.stop(state_dir)


def test_importing_every_module_starts_no_embedded_server(tmp_path: Path, state: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERYTHING],
        cwd=tmp_path,  # not the source tree: what an installed package sees
        env=_env_without_urls(state),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    count, queue, broker = result.stdout.split()
    assert int(count) > 40  # every module, not just the package
    # The unrelated app found no `celeryconfig` of ours: Celery's own defaults.
    assert (queue, broker) == ("celery", "None")
    assert not state.exists(), sorted(p.name for p in state.iterdir())


def test_reading_the_configuration_starts_the_embedded_redis_only(
    tmp_path: Path, state: Path
) -> None:
    script = "from app import celery; print(celery.conf.broker_url)"

    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=_env_without_urls(state),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert "redis.sock" in result.stdout  # the embedded Redis, on its unix socket
    assert (state / "redis" / "redis.pid").exists()
    assert not (state / "postgres").exists()  # the broker alone needs no database


def test_alembic_with_only_a_database_url_starts_no_redis(services: Services, state: Path) -> None:
    name = "jobs_alembic_only_pytest"
    url = recreate_database(services.server_url, name)
    try:
        result = subprocess.run(
            [str(Path(sys.executable).parent / "alembic"), "upgrade", "head"],
            cwd=ROOT,
            env=_env_without_urls(state, DATABASE_URL=url),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        drop_database(services.server_url, name)

    assert result.returncode == 0, result.stderr
    assert "Running upgrade" in result.stderr
    assert not state.exists()


def test_the_package_ships_app_alone_and_no_top_level_celeryconfig(tmp_path: Path) -> None:
    # setuptools' build_py copies exactly the modules a wheel of the project holds.
    built = tmp_path / "lib"
    build = ["build_py", "--build-lib", str(built)]
    result = subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", *build],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in built.iterdir()) == ["app"]
    assert (built / "app" / "celeryconfig.py").exists()
