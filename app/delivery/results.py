"""The result backend: Celery's Redis (and Sentinel) backend, a result stored in one round trip.

Celery's key-value backend stores a job's state in three steps: it reads the key to see whether
a success is already recorded there (a success is never overwritten: a redelivered copy of a
job that already succeeded must not replace its result with, say, a later failure), then
writes the new state and publishes it to the key's channel in a MULTI/EXEC pipeline. That is
two round trips and five commands per state stored, and the check and the write are not
atomic: two copies of a job finishing at once can both find no success and the later write
wins whatever it holds.

`STORE` does the same in one script: the check, the write with its expiry and the publish
(the message `AsyncResult.get` waits for), atomically. Everything else, the meta-data stored,
its encoding, the retry policy (`result_backend_always_retry`), chords and groups, is Celery's.

The classes are named in the result backend URL, Celery's own way to choose a backend class
(`app.delivery.results:RedisResults+redis://host/0`); `app.celeryconfig` does that for every
Redis and Sentinel URL, so `RESULT_BACKEND` keeps its ordinary form.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any

from celery import states
from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

#: KEYS[1] the task's meta key; ARGV[1] the encoded meta, ARGV[2] its expiry in seconds (0:
#: none). Returns 0 when a success was already stored there (nothing written), 1 otherwise.
STORE = """
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local expires = tonumber(ARGV[2])
if expires > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', expires)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class _StoreInOneRoundTrip:
    """`_store_result` of Celery's key-value backend as one script call; mixed into the
    Redis and Sentinel backends."""

    def _store_result(
        self: Any,
        task_id: str,
        result: Any,
        state: str,
        traceback: str | None = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        # As Celery's `_set_with_state`: a failure's own expiry where one is set.
        expires = self.failure_expires if state == states.FAILURE else None
        if expires is None:
            expires = self.expires
        key = self.get_key_for_task(task_id)
        self.ensure(self._store_script, (key, value, _seconds(expires)))
        return result

    def _store_script(self: Any, key: bytes | str, value: str | bytes, expires: int) -> Any:
        return self._store(keys=[key], args=[value, expires])

    @cached_property
    def _store(self: Any) -> Any:
        return self.client.register_script(STORE)


def _seconds(expires: Any) -> int:
    """Celery's expiry (seconds as a number, a timedelta, or None for none) as whole seconds
    for SET EX, 0 meaning none; a fraction rounds up so that a short expiry is not dropped."""
    if expires is None:
        return 0
    seconds = expires.total_seconds() if hasattr(expires, "total_seconds") else float(expires)
    return max(0, math.ceil(seconds))


class RedisResults(_StoreInOneRoundTrip, RedisBackend):  # type: ignore[misc]
    """Celery's Redis result backend (`redis://`, `rediss://`, `socket://`, and kombu's
    `redis+socket://`), its store in one round trip."""


class SentinelResults(_StoreInOneRoundTrip, SentinelBackend):  # type: ignore[misc]
    """Celery's Sentinel result backend (`sentinel://`), its store in one round trip on the
    master."""


def backend_url(url: str | None) -> str | None:
    """`url` with this module's class named in front of it where it is a Redis or Sentinel
    URL; any other URL (rpc://, db+postgresql://, a class already named) as it is."""
    if url is None or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme == "redis+socket":  # kombu's form of Celery's socket:// (the embedded Redis)
        return f"{__name__}:RedisResults+socket://{rest}"
    if scheme in ("redis", "rediss", "socket"):
        return f"{__name__}:RedisResults+{url}"
    if scheme == "sentinel":
        return f"{__name__}:SentinelResults+{url}"
    return url
