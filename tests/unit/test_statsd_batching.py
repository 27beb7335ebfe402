"""The StatsD client's batching (app.jobs.instrumentation.BufferedStatsClient), read back from a
UDP socket: every line arrives, packed into datagrams no larger than the limit."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator

import pytest
from statsd import StatsClient

from app.jobs import instrumentation
from app.jobs.instrumentation import BufferedStatsClient
from app.settings import load_settings


@pytest.fixture
def sink() -> Iterator[socket.socket]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(2)
    yield server
    server.close()


def received(sink: socket.socket, timeout: float = 0.5) -> list[bytes]:
    datagrams = []
    sink.settimeout(timeout)
    while True:
        try:
            datagrams.append(sink.recv(65536))
        except TimeoutError:
            return datagrams


def lines_of(datagrams: list[bytes]) -> list[str]:
    return [line for datagram in datagrams for line in datagram.decode().split("\n")]


def test_every_line_from_every_thread_arrives_in_datagrams_within_the_limit(
    sink: socket.socket,
) -> None:
    client = BufferedStatsClient("127.0.0.1", sink.getsockname()[1], "svc", interval=60)

    def record(thread: int) -> None:
        for i in range(200):
            client.incr(f"t{thread}.n{i}")
            client.timing(f"t{thread}.d{i}", 1.5)

    threads = [threading.Thread(target=record, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.flush()
    datagrams = received(sink)
    client.close()

    lines = lines_of(datagrams)
    expected = {f"svc.t{t}.n{i}:1|c" for t in range(8) for i in range(200)}
    expected |= {f"svc.t{t}.d{i}:1.500000|ms" for t in range(8) for i in range(200)}
    assert sorted(lines) == sorted(expected)  # each exactly once
    assert all(len(datagram) <= client._maxudpsize for datagram in datagrams)
    # Batched: a datagram holds many lines (one per line would be 3,200 datagrams).
    assert len(datagrams) <= len(lines) / 10


def test_held_lines_leave_at_the_next_interval_without_another_metric(
    sink: socket.socket,
) -> None:
    client = BufferedStatsClient("127.0.0.1", sink.getsockname()[1], None, interval=0.05)
    client.incr("lonely")
    try:
        assert sink.recv(65536) == b"lonely:1|c"  # (the sink waits up to 2 s)
    finally:
        client.close()


def test_a_full_batch_leaves_at_once_and_a_long_line_goes_alone(sink: socket.socket) -> None:
    client = BufferedStatsClient(
        "127.0.0.1", sink.getsockname()[1], None, interval=60, maxudpsize=100, batch=5
    )
    for i in range(4):
        client.incr(f"m{i}")
    assert received(sink, 0.2) == []  # held: fewer than a batch, the interval far off
    client.incr("m4")  # the fifth line: the batch leaves now
    assert lines_of(received(sink)) == [f"m{i}:1|c" for i in range(5)]

    long_name = "x" * 150
    client.incr("short")
    client.incr(long_name)
    client.flush()
    datagrams = received(sink)
    client.close()
    assert datagrams == [b"short:1|c", f"{long_name}:1|c".encode()]


def test_flush_metrics_sends_what_the_process_holds(
    sink: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = BufferedStatsClient("127.0.0.1", sink.getsockname()[1], "svc", interval=60)
    monkeypatch.setattr(instrumentation, "_client", client)
    client.incr("jobs.x.success")
    client.timing("jobs.x.duration", 2.0)
    instrumentation.flush_metrics()  # (worker_shutdown, worker_process_shutdown, atexit)
    try:
        assert lines_of(received(sink)) == [
            "svc.jobs.x.success:1|c",
            "svc.jobs.x.duration:2.000000|ms",
        ]
    finally:
        client.close()


def test_the_process_client_batches_unless_the_interval_is_zero(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(instrumentation, "_client", None)
    monkeypatch.setattr(instrumentation, "get_settings", lambda: load_settings({}))
    batched = instrumentation.metrics()
    assert isinstance(batched, BufferedStatsClient) and batched.interval == 1.0

    monkeypatch.setattr(instrumentation, "_client", None)
    monkeypatch.setattr(
        instrumentation, "get_settings", lambda: load_settings({"STATSD_FLUSH_INTERVAL": "0"})
    )
    plain = instrumentation.metrics()
    assert type(plain) is StatsClient


def test_a_forked_child_makes_its_own_client(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(instrumentation, "get_settings", lambda: load_settings({}))
    monkeypatch.setattr(instrumentation, "_client", None)
    parent = instrumentation.metrics()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its client is not the parent's (whose flusher it lacks)
        os.close(read)
        os.write(write, b"new" if instrumentation._client is None else b"shared")
        os._exit(0)
    os.close(write)
    answer = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    assert answer == b"new"
    assert instrumentation.metrics() is parent


def test_a_line_that_is_not_ascii_is_dropped_with_a_warning_not_raised(
    sink: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    client = BufferedStatsClient("127.0.0.1", sink.getsockname()[1], None, interval=60)
    client.incr("before")
    client.incr("caf\u00e9")  # (it would fail the datagram, in a job's thread or the flusher)
    client.incr("after")
    client.flush()
    datagrams = received(sink)
    client.close()
    assert datagrams == [b"before:1|c\nafter:1|c"]
    assert "not ASCII" in caplog.text
