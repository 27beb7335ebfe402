"""The operator's web view (`jobs-service web`, started with the Procfile's command) in headless
Chromium driven by Playwright, on live data: a real worker subprocess on Redis DB 8 (shared
with test_hostile_messages.py, which flushes it too; tests run one at a time) and the tests'
database. Screenshots of every page go under the test's tmp_path."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from app.db import session_scope
from app.models import JobBatch
from app.services import dead_letters
from app.settings import redis_client_url
from tests.integration.conftest import (
    ALL_QUEUES,
    HARNESS_WORKER,
    ROOT,
    Services,
    celery_process,
    flush_broker,
    isolated_broker,
    producer_for,
    worker_env,
)
from tests.integration.factories import wait_until
from tests.integration.harness_jobs import RUNS_KEY
from tests.integration.test_broker_and_database_faults import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DB = 8
PASSWORD = "s3cret-for-tests"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)"
)


@dataclass(frozen=True)
class Web:
    url: str
    broker: str
    client: redis.Redis
    browser: Any
    shots: Path


def _status(url: str, *, auth: bool, data: bytes | None = None) -> int:
    headers = {}
    if auth:
        token = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


@pytest.fixture(scope="module")
def web(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Web]:
    sync_api = pytest.importorskip("playwright.sync_api")
    tmp_path = tmp_path_factory.mktemp("web")
    broker = isolated_broker(services.broker_url, DB)
    flush_broker(broker)
    client = redis.Redis.from_url(redis_client_url(broker) or "")
    port = free_port()
    command = next(
        line.split(":", 1)[1]
        for line in (Path(ROOT) / "Procfile").read_text().splitlines()
        if line.startswith("web:")
    )
    env = worker_env(services, broker, WEB_PORT=str(port), WEB_PASSWORD=PASSWORD)
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    url = f"http://127.0.0.1:{port}"
    with (
        open(tmp_path / "web.log", "wb") as log,
        celery_process(
            [*HARNESS_WORKER, *ALL_QUEUES, "--concurrency", "2"], env, tmp_path / "worker.log"
        ),
    ):
        process = subprocess.Popen(
            ["sh", "-c", command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(lambda: _status(url + "/", auth=False) == 401, timeout=30)
            wait_until(lambda: " ready." in (tmp_path / "worker.log").read_text(), timeout=60)
            with sync_api.sync_playwright() as playwright:
                browser = playwright.chromium.launch(
                    executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"]
                )
                try:
                    yield Web(url, broker, client, browser, tmp_path)
                finally:
                    browser.close()
        finally:
            os.killpg(process.pid, 15)
            process.wait(timeout=30)


@pytest.fixture
def page(web: Web) -> Iterator[Any]:
    context = web.browser.new_context(
        http_credentials={"username": "admin", "password": PASSWORD},
        viewport={"width": 1400, "height": 900},
    )
    try:
        yield context.new_page()
    finally:
        context.close()


def ran(web: Web, token: str) -> bool:
    return any(json.loads(raw)["token"] == token for raw in web.client.lrange(RUNS_KEY, 0, -1))


def dead_letter(job_name: str, args: list[Any]) -> int:
    with session_scope() as session:
        return dead_letters.record(
            session,
            dead_letters.Failure(
                task_id=str(uuid.uuid4()),
                job_name=job_name,
                queue="default",
                args=args,
                kwargs={},
                headers={},
                reason="exhausted",
                error_type="tests.integration.harness_jobs.NotYet",
                error_message="<b>bold</b> error from the test",
                traceback='Traceback (most recent call last):\n  File "x.py", line 1\nNotYet: <i>',
                attempts=3,
                enqueued_at=None,
            ),
        )


def test_a_dead_job_retried_from_the_page_runs_and_leaves_the_dead_page(
    web: Web, page: Any
) -> None:
    token = f"dead-{uuid.uuid4().hex[:8]}"
    entry_id = dead_letter("jobs.test_record_run", [token])
    page.goto(f"{web.url}/dead")
    page.screenshot(path=str(web.shots / "dead.png"), full_page=True)
    row = page.locator(f"tr[data-id='{entry_id}']")
    assert row.count() == 1
    page.goto(f"{web.url}/dead/{entry_id}")
    assert "NotYet: <i>" in page.locator("pre.traceback").inner_text()
    page.screenshot(path=str(web.shots / "dead-entry.png"), full_page=True)
    page.goto(f"{web.url}/dead")
    row.locator("input[type=checkbox]").check()
    page.get_by_role("button", name="Retry selected").click()
    page.wait_for_load_state()
    assert "1 of 1 dead letter(s) retried" in page.locator(".notice").inner_text()
    wait_until(lambda: ran(web, token), timeout=30)
    page.goto(f"{web.url}/dead")
    assert page.locator(f"tr[data-id='{entry_id}']").count() == 0


def test_a_script_in_a_job_argument_renders_as_text(web: Web, page: Any) -> None:
    script = "<script>window.__injected = 1</script>"
    entry_id = dead_letter("jobs.test_record_run", [script])
    page.goto(f"{web.url}/dead")
    cell = page.locator(f"tr[data-id='{entry_id}'] td.mono")
    assert script in cell.inner_text()
    assert "<b>bold</b>" in page.locator(f"tr[data-id='{entry_id}'] td.error").inner_text()
    assert page.evaluate("window.__injected") is None
    assert page.locator("main script").count() == 0
    page.goto(f"{web.url}/dead/{entry_id}")
    assert page.evaluate("window.__injected") is None


def test_a_paused_queue_stops_being_consumed_and_resumes(web: Web, page: Any) -> None:
    token = f"paused-{uuid.uuid4().hex[:8]}"
    page.goto(f"{web.url}/queues")
    page.locator("tr[data-queue='low'] button", has_text="Pause").click()
    page.wait_for_load_state()
    assert page.locator("tr[data-queue='low'] td.state").inner_text() == "paused"
    producer_for(web.broker).send_task("jobs.test_record_run", [token], queue="low")
    wait_until(lambda: web.client.llen("low") == 1, timeout=10)
    time.sleep(2)  # an idle worker looks again within 0.1 s: it had every chance to take it
    assert not ran(web, token) and web.client.llen("low") == 1
    page.reload()
    assert token in page.locator("main").inner_text()  # the queue's next jobs
    page.screenshot(path=str(web.shots / "queues.png"), full_page=True)
    page.locator("tr[data-queue='low'] button", has_text="Resume").click()
    page.wait_for_load_state()
    assert page.locator("tr[data-queue='low'] td.state").inner_text() == "running"
    wait_until(lambda: ran(web, token), timeout=30)


def test_a_scheduled_job_run_now_runs(web: Web, page: Any) -> None:
    token = f"later-{uuid.uuid4().hex[:8]}"
    result = producer_for(web.broker).send_task(
        "jobs.test_record_run", [token], queue="default", countdown=3600
    )
    # The worker takes the message and parks it in the scheduled set until its time.
    wait_until(lambda: web.client.hexists("jobs_service:schedule:messages", result.id), timeout=30)
    page.goto(f"{web.url}/scheduled?job=jobs.test_record_run")
    row = page.locator(f"tr[data-task-id='{result.id}']")
    assert token in row.inner_text()
    page.screenshot(path=str(web.shots / "scheduled.png"), full_page=True)
    row.locator("input[type=checkbox]").check()
    page.get_by_role("button", name="Run selected now").click()
    page.wait_for_load_state()
    assert "1 of 1 job(s) due now" in page.locator(".notice").inner_text()
    wait_until(lambda: ran(web, token), timeout=30)


def test_unauthenticated_requests_and_forged_posts_are_refused(web: Web) -> None:
    for path in ("/", "/dead", "/queues", "/static/app.js"):
        assert _status(web.url + path, auth=False) == 401
    assert _status(web.url + "/queues/low/pause", auth=False, data=b"") == 401
    assert _status(web.url + "/queues/low/pause", auth=True, data=b"") == 403
    forged = b"csrf_token=" + b"0" * 64
    assert _status(web.url + "/queues/low/pause", auth=True, data=forged) == 403
    assert web.client.sismember("jobs_service:paused", "low") == 0
    assert _status(web.url + "/", auth=True) == 200


def test_every_page_renders(web: Web, page: Any) -> None:
    """Each page loads (screenshots for a look); the dashboard counts the runs above."""
    producer = producer_for(web.broker)
    producer.send_task("jobs.test_always_fails", ["dashboard"], queue="default")
    wait_until(lambda: web.client.zcard("jobs_service:schedule") > 0, timeout=30)
    # (its acknowledgement follows its retry's scheduling: until then its record is in flight)
    wait_until(lambda: web.client.hlen("jobs_service:inflight") == 0, timeout=30)
    slow = producer.send_task(
        "jobs.test_slow_record", [f"busy-{uuid.uuid4().hex[:8]}", 4], queue="default"
    )
    wait_until(lambda: web.client.hlen("jobs_service:inflight") > 0, timeout=30)
    page.goto(web.url + "/busy")
    assert slow.id in page.locator("main").inner_text()  # the job running now, on its worker
    assert "jobs.test_slow_record" in page.locator("main").inner_text()
    with session_scope() as session:
        batch = JobBatch(description="<em>nightly</em> import", callbacks={}, total=10, pending=4)
        session.add(batch)
        session.flush()
        batch_id = batch.id
    page.goto(web.url + "/batches")
    row = page.locator("tr", has_text=f"{batch_id}").filter(has_text="nightly")
    assert row.locator("progress").get_attribute("value") == "6"
    assert "<em>nightly</em> import" in row.inner_text()
    for name, path in [
        ("busy", "/busy"),
        ("dashboard", "/"),
        ("retries", "/retries"),
        ("batches", "/batches"),
        ("recurring", "/recurring"),
        ("flow", "/flow"),
    ]:
        response = page.goto(web.url + path)
        assert response.status == 200, path
        page.screenshot(path=str(web.shots / f"{name}.png"), full_page=True)
    page.goto(web.url + "/")
    assert "processed" in page.locator("main h2").first.inner_text()
    page.goto(web.url + "/busy")
    assert page.locator("main tbody tr").count() >= 1
    assert "no worker is registered" not in page.locator("main").inner_text()
