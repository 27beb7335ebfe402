"""A producer process for the outbox tests: enqueues jobs inside one transaction.

python -m tests.integration.outbox_producer wait TOKEN COUNT
    enqueue COUNT `jobs.test_record_run` jobs (perform_all_later when COUNT > 1), print
    "staged", wait for a line on stdin, commit, print "committed"
python -m tests.integration.outbox_producer die TOKEN
    enqueue one job and die (SIGKILL) right after the commit, before its publish
python -m tests.integration.outbox_producer unique TOKEN
    enqueue `jobs.test_unique(TOKEN, 0)` (unique per TOKEN), print its task id, wait for a
    line on stdin (the test SIGKILLs it first: the transaction never commits), commit
python -m tests.integration.outbox_producer inventory PRODUCTS COUNT
    enqueue COUNT `jobs.update_inventory` (+1, a key each) over PRODUCTS (comma-separated
    ids) in one perform_all_later, commit, print "committed"
"""

from __future__ import annotations

import os
import signal
import sys

from app.db import after_commit, session_scope
from app.jobs.base import perform_all_later
from app.jobs.update_inventory import update_inventory
from tests.integration.harness_jobs import record_run, unique


def main(mode: str, *args: str) -> None:
    if mode == "wait":
        token, count = args[0], int(args[1])
        with session_scope():
            if count == 1:
                record_run.delay(token)
            else:
                perform_all_later([record_run.s(f"{token}-{i}") for i in range(count)])
            print("staged", flush=True)
            sys.stdin.readline()
        print("committed", flush=True)
    elif mode == "die":
        with session_scope():
            # Runs first of the after-commit callbacks: the commit is done, the publish not.
            after_commit(lambda: os.kill(os.getpid(), signal.SIGKILL))
            record_run.delay(args[0])
    elif mode == "unique":
        with session_scope():
            print(unique.delay(args[0], 0).id, flush=True)
            sys.stdin.readline()
    elif mode == "inventory":
        products, count = [int(p) for p in args[0].split(",")], int(args[1])
        with session_scope():
            perform_all_later(
                [
                    update_inventory.s(products[i % len(products)], 1, idempotency_key=f"k-{i}")
                    for i in range(count)
                ]
            )
        print("committed", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
