"""A broker with a password, and one behind TLS, through BROKER_URL; no password in any log."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import func, select

from app.models import InventoryAudit
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    Services,
    celery_process,
    worker_env,
)
from tests.integration.factories import make_product, scalar, wait_until
from tests.integration.test_broker_and_database_faults import OwnRedis

# Needs a Redis broker (the transport's records, scripts or Redis itself): a pass on
# RabbitMQ would leave it out (`-m "not redis_only"`).
pytestmark = pytest.mark.redis_only

PASSWORD = "s3cr3t-broker-pw"


def run_one_job(services: Services, broker: str, tmp_path: Path) -> str:
    """A worker on `broker` runs one job; return the worker's log."""
    product = make_product(inventory=0)
    producer = Celery("producer", broker=broker)
    producer.conf.update(broker_connection_retry_on_startup=True)
    producer.send_task("jobs.update_inventory", args=[product, 3, "secure"], queue="default")
    log = tmp_path / "worker.log"
    with celery_process(
        [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "1"], worker_env(services, broker), log
    ):
        wait_until(
            lambda: scalar(select(func.count()).select_from(InventoryAudit)) == 1, timeout=60
        )
    return log.read_text()


def test_a_broker_password_works_and_is_never_logged(services: Services, tmp_path: Path) -> None:
    redis_server = OwnRedis(tmp_path, password=PASSWORD)
    redis_server.start()
    try:
        log = run_one_job(services, redis_server.url, tmp_path)
    finally:
        redis_server.stop()
    # (Celery names the transport by the class celeryconfig's broker_transport gives.)
    assert "Connected to app.delivery.transport:Transport://:**@127.0.0.1" in log
    assert PASSWORD not in log


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.crt", "server.key", "server.csr", "server.crt")
    )

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(ca_key),
        "-out",
        str(ca),
        "-days",
        "1",
        "-subj",
        "/CN=jobs-service test CA",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(key),
        "-out",
        str(csr),
        "-subj",
        "/CN=127.0.0.1",
    )
    extensions = directory / "san.cnf"
    extensions.write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        str(csr),
        "-CA",
        str(ca),
        "-CAkey",
        str(ca_key),
        "-CAcreateserial",
        "-out",
        str(cert),
        "-days",
        "1",
        "-extfile",
        str(extensions),
    )
    return ca, cert, key


def redis_binaries() -> list[str]:
    """redis-server builds on this machine: the system's first (Debian's is built with TLS)."""
    found = [
        "/usr/bin/redis-server",
        "/usr/local/bin/redis-server",
        shutil.which("redis-server"),
        OwnRedis(Path("/")).binary,
    ]
    return list(dict.fromkeys(b for b in found if b and Path(b).exists()))


def test_a_tls_broker_through_rediss(services: Services, tmp_path: Path) -> None:
    certificates = make_certificates(tmp_path)
    for binary in redis_binaries():
        redis_server = OwnRedis(tmp_path, password=PASSWORD, tls=certificates)
        redis_server.binary = binary
        try:
            redis_server.start()
        except AssertionError:  # this build has no TLS
            continue
        break
    else:
        pytest.skip(f"no redis-server built with TLS among {redis_binaries()}")
    try:
        log = run_one_job(services, redis_server.url, tmp_path)
    finally:
        redis_server.stop()
    assert "Connected to app.delivery.transport:Transport://:**@127.0.0.1" in log
    assert PASSWORD not in log
