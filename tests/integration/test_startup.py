"""`celery -A app worker` as an operator starts it: it answers pings, and bad config is one line."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT, Services

CELERY = [sys.executable, "-m", "celery", "-A", "app"]


def run_celery(
    args: list[str], env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CELERY, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def service_env(services: Services) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": services.database_url, "BROKER_URL": services.broker_url}


@pytest.fixture
def worker_process(
    service_env: dict[str, str], tmp_path: Path
) -> Iterator[subprocess.Popen[bytes]]:
    args = ["worker", "--hostname", "startup-test@%h", "--concurrency", "1"]
    args += ["--without-mingle", "--without-gossip", "--loglevel", "INFO"]
    with open(tmp_path / "worker.log", "w+") as log:
        process = subprocess.Popen(
            [*CELERY, *args], cwd=ROOT, env=service_env, stdout=log, stderr=subprocess.STDOUT
        )
        yield process
        process.terminate()
        process.wait(timeout=60)


def test_the_worker_starts_and_answers_inspect_ping(
    worker_process: subprocess.Popen[bytes], service_env: dict[str, str]
) -> None:
    deadline = time.monotonic() + 60
    answer = ""
    while time.monotonic() < deadline:
        result = run_celery(
            ["inspect", "ping", "--destination", _node_name(), "--timeout", "2"], service_env
        )
        answer = result.stdout
        if result.returncode == 0 and "pong" in answer:
            break
        assert worker_process.poll() is None, "the worker exited"
        time.sleep(1)
    assert "pong" in answer


def _node_name() -> str:
    import socket

    return f"startup-test@{socket.gethostname()}"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DATABASE_URL", "mysql://app:s3cr3t-pw@db.example/app"),
        ("DATABASE_URL", "postgresql://app:s3cr3t-pw@db:not-a-port/app"),
        ("BROKER_URL", "http://app:s3cr3t-pw@broker/0"),
        ("STATSD_PORT", "99999"),
        ("APP_TIMEZONE", "Mars/Olympus_Mons"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_stops_the_worker_with_one_line_naming_the_variable(
    variable: str, value: str
) -> None:
    env = {**os.environ, variable: value}

    result = run_celery(["worker"], env)

    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"configuration error: {variable}: expected ")
    assert "Traceback" not in result.stderr
    assert "s3cr3t-pw" not in result.stderr + result.stdout
