"""A throwaway Redis primary, its replicas and their sentinels on loopback, for the failover
tests and the `sentinel` benchmark: each server is a child process of the caller's, on ports
the caller chooses, with no persistence, so that the primary can be SIGKILLed mid-run.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

HOST = "127.0.0.1"


class ClusterError(RuntimeError):
    """The servers did not come up, or did not fail over, in time."""


def redis_server() -> str | None:
    """The redis-server binary, or None where it is not installed."""
    return shutil.which("redis-server")


class SentinelCluster:
    """A primary (the first of `redis_ports`), replicas of it, and sentinels monitoring it as
    `master`. `down_after_ms` is the sentinels' `down-after-milliseconds`; a
    `min_replicas_to_write` > 0 makes every server refuse writes without that many replicas."""

    def __init__(
        self,
        workdir: Path,
        redis_ports: Sequence[int],
        sentinel_ports: Sequence[int],
        master: str = "jobs",
        down_after_ms: int = 1000,
        min_replicas_to_write: int = 0,
    ) -> None:
        binary = redis_server()
        if binary is None:
            raise ClusterError("redis-server is not installed")
        self.binary = binary
        self.workdir = workdir
        self.redis_ports = list(redis_ports)
        self.sentinel_ports = list(sentinel_ports)
        self.master = master
        self.down_after_ms = down_after_ms
        self.min_replicas_to_write = min_replicas_to_write
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.args: dict[int, list[str]] = {}  # each Redis server's arguments, but replicaof

    @property
    def url(self) -> str:
        """The BROKER_URL naming every sentinel."""
        return ";".join(f"sentinel://{HOST}:{port}/0" for port in self.sentinel_ports)

    def _spawn(self, port: int, args: list[str]) -> None:
        log = open(self.workdir / f"redis-{port}.log", "ab")  # noqa: SIM115  (the child keeps it)
        self.servers[port] = subprocess.Popen(
            [self.binary, *args], stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir
        )
        log.close()

    def start(self, timeout: float = 30.0) -> None:
        """Start every server; return once the sentinels agree on the primary and its replicas."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        primary = self.redis_ports[0]
        for port in self.redis_ports:
            args = ["--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
            args += ["--dir", str(self.workdir), "--dbfilename", f"dump-{port}.rdb"]
            if self.min_replicas_to_write:
                args += ["--min-replicas-to-write", str(self.min_replicas_to_write)]
                args += ["--min-replicas-max-lag", "10"]
            self.args[port] = list(args)
            if port != primary:
                args += ["--replicaof", HOST, str(primary)]
            self._spawn(port, args)
        deadline = time.monotonic() + timeout
        replicas = len(self.redis_ports) - 1
        self._until(deadline, lambda: self._replicas_of(primary) >= replicas, "replication")
        for port in self.sentinel_ports:
            config = self.workdir / f"sentinel-{port}.conf"
            quorum = len(self.sentinel_ports) // 2 + 1
            config.write_text(
                f"port {port}\nbind {HOST}\ndir {self.workdir}\n"
                f"sentinel monitor {self.master} {HOST} {primary} {quorum}\n"
                f"sentinel down-after-milliseconds {self.master} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.master} 10000\n"
                f"sentinel parallel-syncs {self.master} 1\n"
            )
            self._spawn(port, [str(config), "--sentinel"])
        others = len(self.sentinel_ports) - 1
        self._until(deadline, lambda: self._sentinels_ready(replicas, others), "the sentinels")

    def _until(self, deadline: float, ready: object, what: str) -> None:
        assert callable(ready)
        while True:
            try:
                if ready():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{what} not ready in time (logs in {self.workdir})")
            time.sleep(0.1)

    def _replicas_of(self, port: int) -> int:
        info = redis.Redis(host=HOST, port=port, socket_timeout=1).info("replication")
        return sum(
            1 for k, v in info.items() if k.startswith("slave") and v.get("state") == "online"
        )

    def _sentinels_ready(self, replicas: int, others: int) -> bool:
        for port in self.sentinel_ports:
            client = redis.Redis(host=HOST, port=port, socket_timeout=1, decode_responses=True)
            fields: Any = client.sentinel_master(self.master)
            if int(fields["num-slaves"]) < replicas or int(fields["num-other-sentinels"]) < others:
                return False
        return True

    def sentinel(self) -> Sentinel:
        """A redis-py Sentinel on every sentinel of the cluster."""
        return Sentinel([(HOST, p) for p in self.sentinel_ports], socket_timeout=1)

    def primary_port(self) -> int | None:
        """The port of the server the sentinels call the master now (None: no answer)."""
        try:
            return int(self.sentinel().discover_master(self.master)[1])
        except (MasterNotFoundError, redis.RedisError):
            return None

    def kill_primary(self) -> int:
        """SIGKILL the current primary; return its port."""
        port = self.primary_port()
        if port is None:
            raise ClusterError("no primary to kill")
        process = self.servers[port]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        return port

    def wait_failover(self, old: int, timeout: float = 30.0) -> int:
        """Wait until the sentinels name a master other than `old`, and it accepts writes."""
        deadline = time.monotonic() + timeout
        while True:
            port = self.primary_port()
            if port is not None and port != old:
                try:
                    client = redis.Redis(host=HOST, port=port, socket_timeout=1)
                    if client.info("replication").get("role") == "master":
                        return port
                except redis.RedisError:
                    pass
            if time.monotonic() > deadline:
                raise ClusterError(f"no failover from {old} within {timeout} s")
            time.sleep(0.1)

    def rejoin(self, port: int, primary: int) -> None:
        """Start the server of `port` again (after a kill) as a replica of `primary`."""
        self._spawn(port, [*self.args[port], "--replicaof", HOST, str(primary)])

    def client(self) -> redis.Redis:
        """A client of the current master, following failovers."""
        master: redis.Redis = self.sentinel().master_for(self.master, socket_timeout=2)
        return master

    def stop(self) -> None:
        """Kill every server this cluster started, and wait for them."""
        for process in self.servers.values():
            if process.poll() is None:
                process.kill()
        for process in self.servers.values():
            process.wait(timeout=10)
        self.servers.clear()
