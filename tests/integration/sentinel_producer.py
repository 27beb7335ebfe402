"""A producer process for the Sentinel tests: publishes through the service's own app.

python -m tests.integration.sentinel_producer PREFIX COUNT RATE [COUNTDOWN]
    publish COUNT `jobs.test_record_once` jobs (skus PREFIX-0 ...) at about RATE a second
    (with COUNTDOWN seconds of delay when given), printing "ok SKU TIME" for each publish the
    broker acknowledged and "fail SKU TIME ERROR" for each that raised; BROKER_URL and
    BROKER_SENTINEL_MASTER (and BROKER_WAIT_REPLICAS) come from the environment.
"""

from __future__ import annotations

import sys
import time

from tests.integration.harness_jobs import record_once


def main(prefix: str, count: str, rate: str, countdown: str = "") -> None:
    pause = 1.0 / float(rate)
    for i in range(int(count)):
        began = time.monotonic()
        sku = f"{prefix}-{i}"
        try:
            if countdown:
                record_once.apply_async((sku,), countdown=float(countdown))
            else:
                record_once.delay(sku)
        except Exception as exc:
            print(f"fail {sku} {time.time():.6f} {type(exc).__name__}: {exc}", flush=True)
        else:
            print(f"ok {sku} {time.time():.6f}", flush=True)
        time.sleep(max(0.0, pause - (time.monotonic() - began)))


if __name__ == "__main__":
    main(*sys.argv[1:])
