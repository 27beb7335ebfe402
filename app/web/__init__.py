"""`jobs-service web`: the operator's web view (issue #18).

Server-rendered Flask pages (Jinja, autoescaped) served by waitress, reading the same Redis and
PostgreSQL through the same functions as the command line (app.operations, app.queues,
app.delivery.*, app.services.dead_letters, app.jobs.batches). Every request needs HTTP basic
auth (compared in constant time); every action is a POST carrying a CSRF token (an HMAC of the
user name under a key made when the process starts) that is checked before anything happens.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flask import Flask, Response, abort, redirect, render_template, request, url_for

from app.settings import ConfigError, _host, _port

#: Rows per page on the long lists (dead letters, scheduled jobs, retries).
PAGE = 50
#: Scheduled entries a filtered page reads at most (the pager goes on from where it stopped).
SCAN_PER_PAGE = 2000
#: Ids of rows (dead letters) are PostgreSQL bigints.
MAX_ID = 2**63 - 1
#: Jobs shown at the head of each queue.
NEXT_JOBS = 5


@dataclass(frozen=True)
class WebSettings:
    host: str
    port: int
    username: str
    password: str


def web_settings(env: Mapping[str, str] | None = None) -> WebSettings:
    """WEB_HOST (127.0.0.1), WEB_PORT (5556), WEB_USERNAME (admin) and WEB_PASSWORD (required)."""
    env = os.environ if env is None else env
    password = env.get("WEB_PASSWORD", "")
    if not password:
        raise ConfigError("WEB_PASSWORD", "a password for the web view (it never runs without one)")
    username = env.get("WEB_USERNAME", "").strip() or "admin"
    if ":" in username:
        raise ConfigError("WEB_USERNAME", "a user name without ':'", username)
    return WebSettings(
        host=_host(env, "WEB_HOST", "127.0.0.1"),
        port=_port(env, "WEB_PORT", 5556),
        username=username,
        password=password,
    )


def create_app(settings: WebSettings, secret: bytes | None = None) -> Flask:
    """The web view's Flask application."""
    web = Flask(__name__)
    web.jinja_env.autoescape = True  # every template, whatever its file name
    key = secret or os.urandom(32)
    csrf_token = hmac.new(key, b"csrf:" + settings.username.encode(), hashlib.sha256).hexdigest()

    def authorized() -> bool:
        auth = request.authorization
        if auth is None or auth.type != "basic":
            return False
        user_ok = hmac.compare_digest((auth.username or "").encode(), settings.username.encode())
        password_ok = hmac.compare_digest(
            (auth.password or "").encode(), settings.password.encode()
        )
        return user_ok and password_ok

    @web.before_request
    def guard() -> Response | None:
        if not authorized():
            return Response(
                "authentication required\n",
                401,
                {"WWW-Authenticate": 'Basic realm="jobs-service", charset="UTF-8"'},
                mimetype="text/plain",
            )
        if request.method == "POST":
            sent = request.form.get("csrf_token", "")
            if not hmac.compare_digest(sent.encode(), csrf_token.encode()):
                return Response("missing or wrong CSRF token\n", 403, mimetype="text/plain")
        return None

    @web.after_request
    def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; form-action 'self'"
        )
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Cache-Control"] = "no-store"
        return response

    @web.errorhandler(Exception)
    def unavailable(exc: Exception) -> Any:
        """A store that cannot be reached is one line on a 503 page, not a stack trace."""
        from kombu.exceptions import OperationalError as BrokerUnavailable
        from redis import RedisError
        from sqlalchemy.exc import DBAPIError
        from werkzeug.exceptions import HTTPException

        from app.operations import NotRedis

        if isinstance(exc, HTTPException):
            return exc
        if isinstance(exc, RedisError | BrokerUnavailable | NotRedis):
            message = f"cannot reach the broker: {type(exc).__name__}: {exc}"
        elif isinstance(exc, DBAPIError):
            first = (str(exc.orig).strip().splitlines() or [""])[0]
            message = f"database error: {type(exc.orig).__name__}: {first}"
        else:
            raise exc
        return Response(message + "\n", 503, mimetype="text/plain")

    @web.context_processor
    def common() -> dict[str, Any]:
        return {
            "csrf_token": csrf_token,
            "notice": request.args.get("notice"),
            "pretty": _pretty,
            "age": _age,
        }

    _routes(web)
    return web


def _pretty(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _back(endpoint: str, notice: str, **values: Any) -> Any:
    return redirect(url_for(endpoint, notice=notice, **values), code=303)


def _redis() -> tuple[Any, str]:
    from app.operations import broker_redis

    return broker_redis()


def _chart(minutes: list[tuple[int, int, int]]) -> dict[str, Any]:
    """An SVG bar chart of processed and failed per minute (drawn on the server: no JS)."""
    width, height, bar = 600, 160, 10
    peak = max([1, *(p for _, p, _ in minutes)])
    bars = []
    for i, (start, processed, failed) in enumerate(minutes):
        x = i * bar
        p_height = round(processed / peak * (height - 20), 1)
        f_height = round(failed / peak * (height - 20), 1)
        label = dt.datetime.fromtimestamp(start, dt.UTC).strftime("%H:%M")
        bars.append(
            {
                "x": x,
                "processed_y": height - p_height,
                "processed_h": p_height,
                "failed_y": height - f_height,
                "failed_h": f_height,
                "title": f"{label} UTC: {processed} processed, {failed} failed",
            }
        )
    ticks = [
        {
            "x": i * bar,
            "label": dt.datetime.fromtimestamp(minutes[i][0], dt.UTC).strftime("%H:%M"),
        }
        for i in range(0, len(minutes), 10)
    ]
    return {"width": width, "height": height, "bars": bars, "peak": peak, "ticks": ticks}


def _message_view(raw: Any) -> dict[str, Any]:
    """A kombu message (JSON) as a row: task id, job, redacted arguments."""
    from app.delivery.envelope import Malformed, decoded_body
    from app.operations import redacted_arguments

    try:
        message = json.loads(raw)
    except (TypeError, ValueError):
        return {"task_id": None, "job": None, "arguments": "(unreadable)"}
    if isinstance(message, list):  # kombu's unacked record: [message, exchange, routing key]
        message = message[0] if message else {}
    if not isinstance(message, dict):
        return {"task_id": None, "job": None, "arguments": "(unreadable)"}
    headers = message.get("headers") or {}
    job_name = headers.get("task")
    try:
        body = decoded_body(message)
    except Malformed:
        body = None
    args: Any = []
    kwargs: Any = {}
    if isinstance(body, list) and len(body) == 3:
        args, kwargs = body[0], body[1]
    elif isinstance(body, dict):
        job_name = job_name or body.get("task")
        args, kwargs = body.get("args", []), body.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        args, kwargs = [], {}
    return {
        "task_id": headers.get("id") or (body.get("id") if isinstance(body, dict) else None),
        "job": job_name,
        "arguments": redacted_arguments(job_name, args, kwargs),
        "enqueued_at": headers.get("job_enqueued_at"),
    }


def _routes(web: Flask) -> None:
    from app.settings import QUEUES

    @web.get("/")
    def dashboard() -> str:
        from app.delivery import throughput
        from app.queues import queue_states

        client, prefix = _redis()
        minutes = throughput.last_hour(client, prefix)
        return render_template(
            "dashboard.html",
            page="dashboard",
            chart=_chart(minutes),
            processed=sum(p for _, p, _ in minutes),
            failed=sum(f for _, _, f in minutes),
            queues=queue_states(),
        )

    @web.get("/queues")
    def queues() -> str:
        from app.queues import queue_states
        from app.settings import get_settings

        client, prefix = _redis()
        states = queue_states()
        pausable = (*QUEUES, "celery")
        heads: dict[str, list[dict[str, Any]]] = {}
        shown = [s for s in states if s.queue in pausable]
        with client.pipeline(transaction=False) as pipe:
            for state in shown:
                pipe.lrange(prefix + state.queue, -NEXT_JOBS, -1)
            for state, raws in zip(shown, pipe.execute(), strict=True):
                heads[state.queue] = [_message_view(raw) for raw in reversed(raws)]
        return render_template(
            "queues.html",
            page="queues",
            queues=states,
            weights=get_settings().queue_weights,
            order=get_settings().queue_order,
            heads=heads,
            pausable=pausable,
        )

    @web.post("/queues/<queue>/<action>")
    def queue_action(queue: str, action: str) -> Any:
        from app.delivery import records

        if queue not in (*QUEUES, "celery") or action not in ("pause", "resume"):
            abort(404)
        client, prefix = _redis()
        if action == "pause":
            changed = records.pause(client, queue, prefix)
            notice = f"{queue}: paused" + ("" if changed else " (it already was)")
        else:
            changed = records.resume(client, queue, prefix)
            notice = f"{queue}: resumed" + ("" if changed else " (it was not paused)")
        return _back("queues", notice)

    @web.get("/busy")
    def busy() -> str:
        from app.delivery import records
        from app.settings import get_settings

        client, prefix = _redis()
        keys = records.Keys(prefix)
        found = records.workers(client, prefix)
        inflight: Any = client.hgetall(keys.inflight)
        tags = list(inflight)
        raws: Any = client.hmget(prefix + "unacked", tags) if tags else []
        running: dict[str, list[dict[str, Any]]] = {}
        for tag, holder, raw in zip(tags, [inflight[t] for t in tags], raws, strict=True):
            try:
                worker = json.loads(holder)[0]
            except (ValueError, IndexError, TypeError):
                continue
            view: dict[str, Any] = (
                _message_view(raw) if raw is not None else {"job": None, "task_id": None}
            )
            view["tag"] = bytes(tag).decode(errors="replace")
            running.setdefault(str(worker), []).append(view)
        return render_template(
            "busy.html",
            page="busy",
            workers=found,
            running=running,
            lapse=get_settings().heartbeat_timeout,
        )

    def scheduled_page(retries_only: bool) -> str:
        from app.delivery import scheduled
        from app.operations import scheduled_dict

        client, prefix = _redis()
        job_name = request.args.get("job") or None
        offset = request.args.get("offset", type=int) or 0
        found, next_offset = scheduled.page(
            client,
            prefix,
            offset=offset,
            limit=PAGE,
            job_name=job_name,
            retries_only=retries_only,
            max_scanned=SCAN_PER_PAGE,
        )
        return render_template(
            "scheduled.html",
            page="retries" if retries_only else "scheduled",
            entries=[scheduled_dict(e, full=False) for e in found],
            stats=scheduled.stats(client, prefix),
            job=job_name or "",
            offset=offset,
            next_offset=next_offset,
            filtered=bool(job_name) or retries_only,
        )

    @web.get("/scheduled")
    def scheduled_list() -> str:
        return scheduled_page(retries_only=False)

    @web.get("/retries")
    def retries_list() -> str:
        return scheduled_page(retries_only=True)

    @web.post("/scheduled/<action>")
    def scheduled_action(action: str) -> Any:
        from app.delivery import scheduled

        if action not in ("run-now", "delete"):
            abort(404)
        client, prefix = _redis()
        act = scheduled.run_now if action == "run-now" else scheduled.delete
        task_ids = request.form.getlist("task_id")
        done = sum(1 for task_id in task_ids if act(client, task_id, prefix))
        what = "due now" if action == "run-now" else "deleted"
        back = request.form.get("back") if request.form.get("back") == "retries" else "scheduled"
        return _back(
            f"{back}_list", f"{done} of {len(task_ids)} job(s) {what}", job=request.form.get("job")
        )

    @web.get("/dead")
    def dead() -> str:
        from app.db import session_scope
        from app.operations import dead_letter_dict
        from app.services import dead_letters

        job_name = request.args.get("job") or None
        before = request.args.get("before", type=int)
        before = None if before is None else max(0, min(before, MAX_ID))
        with session_scope() as session:
            found = dead_letters.entries(session, limit=PAGE + 1, job_name=job_name, before=before)
            rows = [dead_letter_dict(e, full=False) for e in found[:PAGE]]
            total = dead_letters.count(session)
        next_before = rows[-1]["id"] if len(found) > PAGE else None
        return render_template(
            "dead.html",
            page="dead",
            entries=rows,
            total=total,
            job=job_name or "",
            before=before,
            next_before=next_before,
        )

    @web.get("/dead/<int:entry_id>")
    def dead_entry(entry_id: int) -> str:
        from app.db import session_scope
        from app.operations import dead_letter_dict
        from app.services import dead_letters

        with session_scope() as session:
            try:
                shown = dead_letter_dict(dead_letters.get(session, entry_id), full=True)
            except dead_letters.DeadLetterNotFound:
                abort(404)
        return render_template("dead_entry.html", page="dead", entry=shown)

    @web.post("/dead/<action>")
    def dead_action(action: str) -> Any:
        from app.operations import discard_dead_letter, retry_dead_letter
        from app.services import dead_letters

        if action not in ("retry", "discard"):
            abort(404)
        ids = [int(i) for i in request.form.getlist("id") if i.isdigit() and int(i) < MAX_ID]
        done = 0
        for entry_id in ids:
            try:
                if action == "retry":
                    retry_dead_letter(entry_id)
                else:
                    discard_dead_letter(entry_id)
                done += 1
            except dead_letters.DeadLetterNotFound:
                continue
        verb = "retried" if action == "retry" else "discarded"
        return _back("dead", f"{done} of {len(ids)} dead letter(s) {verb}")

    @web.get("/batches")
    def batches_page() -> str:
        from app.jobs import batches
        from app.operations import batch_dict

        return render_template(
            "batches.html", page="batches", batches=[batch_dict(p) for p in batches.recent(PAGE)]
        )

    @web.get("/recurring")
    def recurring() -> str:
        from app.operations import schedule_rows

        return render_template("recurring.html", page="recurring", entries=schedule_rows())

    @web.post("/recurring/enqueue")
    def recurring_enqueue() -> Any:
        from app.operations import enqueue_beat_entry

        name = request.form.get("entry", "")
        try:
            task_id = enqueue_beat_entry(name)
        except KeyError:
            abort(404)
        return _back("recurring", f"{name}: enqueued as task {task_id}")

    @web.get("/flow")
    def flow_page() -> str:
        from app.delivery import flow

        client, prefix = _redis()
        return render_template(
            "flow.html", page="flow", state=flow.holdings(client, prefix), now=time.time()
        )


def serve(settings: WebSettings) -> None:
    """Serve the web view until the process is stopped."""
    from waitress import serve as waitress_serve

    waitress_serve(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        threads=4,
        ident="jobs-service",
    )
