"""`make serve` runs what the jobs need on a development machine: worker, beat, the SMTP
server and the payment gateway, and an email job is delivered without starting anything else."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from sqlalchemy import select

from app.models import EmailDelivery
from tests.integration.conftest import ROOT, Services, flush_broker, isolated_broker, producer_for
from tests.integration.factories import make_user, scalar, wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def smtp_answers(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as client:
            return client.noop()[0] == 250
    except OSError:
        return False


def http_answers(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
    except urllib.error.HTTPError:
        return True  # an answer, if not to this path
    except OSError:
        return False
    return True


def delivery_status(key: str) -> str | None:
    found = scalar(select(EmailDelivery.status).where(EmailDelivery.idempotency_key == key))
    return None if found is None else str(found)


def test_make_serve_runs_the_smtp_server_and_payment_gateway_with_the_worker(
    services: Services, tmp_path: Path
) -> None:
    broker = isolated_broker(services.broker_url, 14)
    flush_broker(broker)
    smtp_port, gateway_port = free_port(), free_port()
    venv = Path(sys.executable).parent.parent
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("SMTP_HOST", "SMTP_PORT", "PAYMENT_GATEWAY_URL", "MAKEFLAGS", "MFLAGS")
    }
    env.update(
        DATABASE_URL=services.database_url,
        BROKER_URL=broker,
        SMTP_PORT=str(smtp_port),
        GATEWAY_PORT=str(gateway_port),
        WORKER_CONCURRENCY="1",
    )
    user = make_user(email="serve@example.com")
    log = tmp_path / "serve.log"

    with open(log, "wb") as out:
        # -o setup: the virtual environment is the one running these tests.
        serve = subprocess.Popen(
            ["make", "-o", "setup", "serve", f"VENV={venv}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: smtp_answers(smtp_port), timeout=90)
            wait_until(lambda: http_answers(gateway_port), timeout=30)
            producer_for(broker).send_task(
                "jobs.send_email",
                args=[user, "order_confirmation", "from-make-serve"],
                kwargs={"context": {"order_id": 5, "total": "9.99"}},
                queue="default",
            )
            wait_until(lambda: delivery_status("from-make-serve") == "sent", timeout=90)
        finally:
            os.killpg(serve.pid, signal.SIGTERM)
            serve.wait(timeout=60)

    text = log.read_text()
    assert "smtp.1" in text and "gateway.1" in text, text
