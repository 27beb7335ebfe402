"""Hosts of their own on one machine: network namespaces behind veth pairs on one bridge.

`Network` makes a bridge in the root namespace (the test process reaches every host through
it, at the bridge's own address) and, for each host, a namespace holding one end of a veth
pair and an address in 10.231.<run>.0/24; the other end is a port of the bridge. `Host.cut()`
sets that port down: the host's packets go nowhere and nothing tells its peers, as when a
cable is pulled or a switch port dies. `Host.restore()` sets it up again; TCP connections
that lived through the cut carry on.

Needs root and iproute2 (`ip`). `require_namespaces()` skips the calling test, saying why,
where they cannot be made. Every name starts with `jh`; `Network.close()` deletes all it made.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from app.scratch import libpq_conninfo

#: Every namespace, bridge and veth this module makes starts with this.
PREFIX = "jh"
#: The /16 every address this module hands out lies in.
SUBNET = "10.231"
#: The ports of the Redis and PostgreSQL servers started on a host.
REDIS_PORT, PG_PORT = 6500, 5500


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def postgres_bin() -> str | None:
    """The directory of PostgreSQL's server binaries (initdb, pg_ctl), newest version first."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if found:
        return os.path.dirname(found[0])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def require_namespaces(postgres: bool = True, redis: bool = True) -> None:
    """Skip the calling test, with the reason, where hosts of this module cannot be built."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's `ip`, not found on PATH")
    if postgres and postgres_bin() is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin")
    if postgres and (shutil.which("setpriv") is None or not _has_user("postgres")):
        pytest.skip("PostgreSQL's server runs as user postgres (via setpriv): no such user or tool")
    if redis and shutil.which("redis-server") is None:
        pytest.skip("no redis-server on PATH")
    probe = f"{PREFIX}probe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", probe)
    except RuntimeError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    _ip("netns", "delete", probe)


@dataclass
class Host:
    """One host: a namespace with one address, behind one port of the bridge."""

    name: str
    namespace: str
    address: str
    port: str  # the bridge side of its veth pair

    def command(self, args: Sequence[str]) -> list[str]:
        """`args` run inside this host (as a prefix for subprocess)."""
        return ["ip", "netns", "exec", self.namespace, *args]

    def cut(self) -> None:
        """Cut the host off: its bridge port goes down, nothing is told."""
        _ip("link", "set", self.port, "down")

    def restore(self) -> None:
        """Plug the host back in."""
        _ip("link", "set", self.port, "up")


@dataclass
class Network:
    """A bridge and the hosts on it, all deleted by `close()` (use it as a context manager)."""

    run: int = field(default_factory=lambda: os.getpid() % 250 + 1)
    hosts: dict[str, Host] = field(default_factory=dict)
    bridge: str = ""
    gateway: str = ""  # the root namespace's address on the bridge

    def __post_init__(self) -> None:
        self.bridge = f"{PREFIX}br{self.run}"
        self.gateway = f"{SUBNET}.{self.run}.1"
        self.close()  # what a killed earlier run with this number left
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    def add(self, name: str) -> Host:
        """A new host, up, with the next address."""
        index = len(self.hosts) + 2
        host = Host(
            name,
            f"{PREFIX}{self.run}{name}",
            f"{SUBNET}.{self.run}.{index}",
            f"{PREFIX}v{self.run}p{index}",
        )
        inner = f"{PREFIX}v{self.run}i{index}"
        self.hosts[name] = host
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.port, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.namespace)
        _ip("link", "set", host.port, "master", self.bridge)
        _ip("link", "set", host.port, "up")
        inside = ["ip", "-n", host.namespace]
        for args in (
            ["addr", "add", f"{host.address}/24", "dev", inner],
            ["link", "set", inner, "up"],
            ["link", "set", "lo", "up"],
        ):
            subprocess.run([*inside, *args], check=True, capture_output=True, timeout=30)
        return host

    def close(self) -> None:
        """Delete every namespace and link of this run (deleting a namespace deletes its veth)."""
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
        mine = f"{PREFIX}{self.run}"
        for host in self.hosts.values():  # (a namespace's own deletion may lag behind)
            subprocess.run(["ip", "link", "delete", host.port], capture_output=True)
        for line in listed.stdout.splitlines():
            namespace = line.split(" ", 1)[0]
            if namespace.startswith(mine) and not namespace[len(mine)].isdigit():
                subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", self.bridge], capture_output=True)
        self.hosts.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def server(args: list[str], log: Path, stop: signal.Signals) -> Iterator[subprocess.Popen[bytes]]:
    """A server process (in a namespace), stopped with `stop` and then, if need be, SIGKILL."""
    with open(log, "ab") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(stop)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def postgres_on(host: Host, log: Path) -> tuple[list[str], str]:
    """Make a cluster in a fresh directory (as user postgres); return how to run it, its dir."""
    bin_dir = postgres_bin()
    assert bin_dir is not None
    data = tempfile.mkdtemp(prefix="jh-pg-")
    shutil.chown(data, "postgres", "postgres")
    as_postgres = ["setpriv", "--reuid=postgres", "--regid=postgres", "--clear-groups"]
    with open(log, "ab") as out:
        subprocess.run(
            [*as_postgres, f"{bin_dir}/initdb", "-D", data, "-U", "root", "--auth=trust"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
            timeout=120,
        )
    with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
        hba.write("host all all 10.231.0.0/16 trust\n")
    run = host.command(
        [
            *as_postgres,
            f"{bin_dir}/postgres",
            "-D",
            data,
            "-p",
            str(PG_PORT),
            "-c",
            f"listen_addresses={host.address}",
            "-c",
            f"unix_socket_directories={data}",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ]
    )
    return run, data


def accepts(url: str) -> bool:
    try:
        with psycopg.connect(libpq_conninfo(url), connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
