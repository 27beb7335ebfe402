"""The `sentinel` benchmark: jobs lost per failover, by replication setting.

A primary, two replicas and three sentinels on loopback (ports 6570-6572, 26570-26572; the
sentinels declare the primary down after 2 s). A producer process publishes through the
service's app on the sentinel:// URL at up to PRODUCE_RATE jobs a second; the primary is
SIGKILLed PRODUCE_BEFORE_KILL seconds in, and the producer keeps going through the failover.
Lost = jobs whose publish returned (acknowledged) but that are not in the new primary's queue.
No worker consumes: what is measured is the broker's loss window, not the jobs.

Modes, each with its own fresh servers:
- async (the baseline: Redis's default, asynchronous replication);
- BROKER_WAIT_REPLICAS=1 (each publish then WAIT 1, NotReplicated if not confirmed in 1 s):
  one of the two replicas holds each acknowledged job, not necessarily the one promoted;
- BROKER_WAIT_REPLICAS=2 (every replica): after the failover the new primary has one replica
  left, so every later publish raises NotReplicated (counted as failed, never as lost);
- min-replicas-to-write 1 on the servers (max lag 10 s), nothing else.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kombu.utils.json import loads

from app.devservers.sentinel import SentinelCluster, redis_server

ROOT = Path(__file__).resolve().parent.parent
MASTER = "bench"
REDIS_PORTS = (6570, 6571, 6572)
SENTINEL_PORTS = (26570, 26571, 26572)
PRODUCE_RATE = 1000
PRODUCE_BEFORE_KILL = 2.0
PRODUCE_SECONDS = 6.0

PRODUCER = """
import sys, time
from app import celery
seconds, rate = float(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
for i in range(int(seconds * rate)):
    began = time.monotonic()
    if began > end:  # (a publish that waits for replicas can take a second)
        break
    try:
        celery.send_task("jobs.bench_sentinel_probe", args=[i], task_id=f"probe-{i}",
                         queue="default")
    except Exception as exc:
        print(f"fail probe-{i} {time.time():.6f} {type(exc).__name__}", flush=True)
    else:
        print(f"ok probe-{i} {time.time():.6f}", flush=True)
    time.sleep(max(0.0, 1 / rate - (time.monotonic() - began)))
"""


def one_failover(mode: str) -> dict[str, Any]:
    """Publish, kill the primary, count what the new primary lacks; one fresh cluster."""
    with tempfile.TemporaryDirectory(prefix="bench-sentinel-") as workdir:
        cluster = SentinelCluster(
            Path(workdir),
            REDIS_PORTS,
            SENTINEL_PORTS,
            MASTER,
            down_after_ms=2000,
            min_replicas_to_write=1 if mode == "min_replicas" else 0,
        )
        try:
            cluster.start()
            env = {
                **os.environ,
                "BROKER_URL": cluster.url,
                "BROKER_SENTINEL_MASTER": MASTER,
                "RESULT_BACKEND": "",
                "BROKER_WAIT_REPLICAS": {"wait": "1", "wait_all": "2"}.get(mode, "0"),
            }
            producer = subprocess.Popen(
                [sys.executable, "-c", PRODUCER, str(PRODUCE_SECONDS), str(PRODUCE_RATE)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(PRODUCE_BEFORE_KILL)
            killed_at = time.time()
            old = cluster.kill_primary()
            first = cluster.wait_failover(old)
            failed_over_in = time.time() - killed_at
            out, _ = producer.communicate(timeout=180)
            final = cluster.primary_port()
            switches = [
                line.split("+switch-master", 1)[1].strip()
                for line in (Path(workdir) / f"redis-{SENTINEL_PORTS[0]}.log")
                .read_text()
                .splitlines()
                if "+switch-master" in line
            ]
            acked: dict[str, float] = {}
            failed = 0
            for line in out.splitlines():
                parts = line.split()
                if parts and parts[0] == "ok":
                    acked[parts[1]] = float(parts[2])
                elif parts and parts[0] == "fail":
                    failed += 1
            queued = {
                loads(raw)["headers"]["id"] for raw in cluster.client().lrange("default", 0, -1)
            }
            lost = [sku for sku in acked if sku not in queued]
            before = [t for t in acked.values() if t <= killed_at]
            span = (max(before) - min(before)) if len(before) > 1 else 0.0
            return {
                "acknowledged": len(acked),
                "failed_publishes": failed,
                "lost": len(lost),
                "lost_acked_ms_before_kill": sorted(
                    round((killed_at - acked[s]) * 1000, 1) for s in lost
                ),
                "failed_over_s": round(failed_over_in, 2),
                "publish_rate_before_kill": round(len(before) / span, 1) if span else 0.0,
                "primaries": [old, first, final],
                "switches": switches,
            }
        finally:
            cluster.stop()


def bench_sentinel(failovers: int) -> dict[str, Any]:
    """Jobs lost per failover: async replication (baseline) vs WAIT vs min-replicas-to-write."""
    if redis_server() is None:
        return {
            "name": "sentinel failover loss window",
            "baseline": "n/a",
            "measured": "not run: redis-server is not installed",
            "ratio": "n/a",
            "target": "0 lost with BROKER_WAIT_REPLICAS = every replica",
            "met": False,
        }
    runs: dict[str, list[dict[str, Any]]] = {
        "async": [],
        "wait": [],
        "wait_all": [],
        "min_replicas": [],
    }
    for _ in range(failovers):
        for mode in runs:
            runs[mode].append(one_failover(mode))

    def lost(mode: str) -> list[int]:
        return [int(r["lost"]) for r in runs[mode]]

    def rates(mode: str) -> str:
        return "/".join(f"{r['publish_rate_before_kill']:.0f}" for r in runs[mode])

    def window(run: dict[str, Any]) -> str:
        ago = run["lost_acked_ms_before_kill"]
        return f"{min(ago)}..{max(ago)}" if ago else "none"

    def failed(mode: str) -> str:
        return "/".join(str(r["failed_publishes"]) for r in runs[mode])

    return {
        "name": "sentinel failover loss window",
        "baseline": (
            f"async replication (Redis's default): lost per failover {lost('async')}, "
            f"publishing at {rates('async')} jobs/s"
        ),
        "measured": (
            f"BROKER_WAIT_REPLICAS=1 (of 2 replicas): lost {lost('wait')}, at {rates('wait')} "
            f"jobs/s; =2 (all): lost {lost('wait_all')}, at {rates('wait_all')} jobs/s; "
            f"min-replicas-to-write 1: lost {lost('min_replicas')}, at "
            f"{rates('min_replicas')} jobs/s"
        ),
        "ratio": round(sum(lost("wait_all")) / max(1, sum(lost("async"))), 3),
        "target": "0 lost with BROKER_WAIT_REPLICAS = every replica (ratio: lost with it / "
        "lost async, 0 when async lost none)",
        "met": sum(lost("wait_all")) == 0,
        "runs": runs,
        "note": (
            f"{failovers} failover(s) per mode, each on fresh servers (a primary, two replicas, "
            "three sentinels on loopback, down-after-milliseconds 2000); a producer process "
            f"publishing through the service's app at up to {PRODUCE_RATE} jobs/s for "
            f"{PRODUCE_SECONDS:g} s, the primary SIGKILLed {PRODUCE_BEFORE_KILL:g} s after the "
            "producer started. "
            "Lost: publish returned to the producer, job absent from the new primary. The lost "
            "jobs had been acknowledged this many ms before the kill (negative: after it): "
            + "; ".join(f"{mode} {'/'.join(map(window, rs))}" for mode, rs in runs.items())
            + ". Primaries (killed, first promoted, at the end): "
            + "; ".join(
                f"{mode} {'/'.join('>'.join(map(str, r['primaries'])) for r in rs)}"
                for mode, rs in runs.items()
            )
            + ". Failover took "
            + "; ".join(
                f"{mode} {'/'.join(str(r['failed_over_s']) for r in rs)} s"
                for mode, rs in runs.items()
            )
            + "; publishes that raised (not acknowledged, the producer's to retry): "
            + "; ".join(f"{mode} {failed(mode)}" for mode in runs)
            + ". min-replicas-to-write only refuses writes while no replica is connected; "
            "it does not wait for one, so it leaves the async window as it is."
        ),
    }
