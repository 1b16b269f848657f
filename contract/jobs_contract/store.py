"""The job record in Redis: one hash per job, written by both apps.

Every status change is one Lua script, so each is atomic and one round trip,
and a final status (succeeded, failed) is never overwritten: a redelivered or
duplicate message can run again but cannot change the outcome already recorded.
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
import redis

STATUSES = ("queued", "running", "retrying", "succeeded", "failed")
FINAL_STATUSES = frozenset({"succeeded", "failed"})

_FIELDS = ("id", "client", "type", "status", "attempts", "result", "error", "created_at", "started_at", "finished_at")

# KEYS[1] job key, KEYS[2] idempotency key or absent.
# ARGV: job ttl, pending idempotency ttl, idempotency value, id, client, type, created_at.
# (Positional values, field names here: each argument costs the client ~2 us to encode.)
# Returns nil when created, or the idempotency value already stored.
_CREATE = """
if KEYS[2] then
  local existing = redis.call('GET', KEYS[2])
  if existing then return existing end
  redis.call('SET', KEYS[2], ARGV[3], 'EX', ARGV[2])
end
redis.call('HSET', KEYS[1], 'id', ARGV[4], 'client', ARGV[5], 'type', ARGV[6], 'status', 'queued',
           'attempts', 0, 'created_at', ARGV[7])
redis.call('EXPIRE', KEYS[1], ARGV[1])
return false
"""

# Undo a create whose publish failed. KEYS[1] job key, KEYS[2] idempotency key or absent; ARGV[1] job id.
_DISCARD = """
redis.call('DEL', KEYS[1])
if KEYS[2] then
  local existing = redis.call('GET', KEYS[2])
  if existing and string.sub(existing, 1, string.len(ARGV[1])) == ARGV[1] then redis.call('DEL', KEYS[2]) end
end
return 1
"""

# Start an attempt. KEYS[1] job key. ARGV: now, job ttl, then id, client, type and
# created_at to recreate the record with if it is gone (expired, or lost with a Redis
# restart). Returns the status before the call ('missing' when recreated).
_BEGIN = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then return status end
if not status then
  redis.call('HSET', KEYS[1], 'id', ARGV[3], 'client', ARGV[4], 'type', ARGV[5], 'status', 'queued',
             'attempts', 0, 'created_at', ARGV[6])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  status = 'missing'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return status
"""

# Record an outcome unless one is final already. KEYS[1] job key.
# ARGV: status, job ttl, k (0 or 5), then k identity values (id, client, type,
# created_at, attempts: to rebuild a record that vanished, e.g. in a Redis failover),
# then field/value pairs. Returns the status now stored, or 'missing' (record gone, k = 0).
_FINISH = """
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'succeeded' or status == 'failed' then return status end
local k = tonumber(ARGV[3])
if not status then
  if k == 0 then return 'missing' end
  redis.call('HSET', KEYS[1], 'id', ARGV[4], 'client', ARGV[5], 'type', ARGV[6], 'created_at', ARGV[7],
             'attempts', ARGV[8])
end
redis.call('HSET', KEYS[1], 'status', ARGV[1], unpack(ARGV, 4 + k))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return ARGV[1]
"""


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class IdempotencyRecord:
    job_id: str
    body_hash: str
    confirmed: bool

    def encode(self) -> str:
        return f"{self.job_id} {self.body_hash} {'confirmed' if self.confirmed else 'pending'}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "IdempotencyRecord":
        text = raw.decode() if isinstance(raw, bytes) else raw
        job_id, body_hash, state = text.split(" ")
        return cls(job_id, body_hash, state == "confirmed")


class JobStore:
    def __init__(self, client: redis.Redis, job_ttl_seconds: int = 7 * 86400, idempotency_ttl_seconds: int = 86400):
        self.redis = client
        self.job_ttl = job_ttl_seconds
        self.idempotency_ttl = idempotency_ttl_seconds
        self._create = client.register_script(_CREATE)
        self._discard = client.register_script(_DISCARD)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> "JobStore":
        client = redis.Redis.from_url(
            url, socket_timeout=2, socket_connect_timeout=2, health_check_interval=10, retry_on_timeout=False
        )
        return cls(client, **kwargs)

    @staticmethod
    def job_key(job_id: str) -> str:
        return f"job:{job_id}"

    @staticmethod
    def idempotency_key(client: str, key: str) -> str:
        return f"idem:{client}:{key}"

    def ping(self) -> bool:
        return bool(self.redis.ping())

    # main-app

    def create(
        self, job_id: str, client: str, job_type: str, created_at: str, idempotency: tuple[str, str] | None = None,
        pending_ttl_seconds: int = 30,
    ) -> IdempotencyRecord | None:
        """Record a new queued job. With idempotency=(key, body_hash), return the
        record already stored under that key instead of creating a job, if any.
        The key is held as pending for pending_ttl_seconds, long enough to publish;
        confirm_idempotency() then keeps it for the full idempotency TTL."""
        keys = [self.job_key(job_id)]
        idem_value = ""
        if idempotency is not None:
            keys.append(self.idempotency_key(client, idempotency[0]))
            idem_value = IdempotencyRecord(job_id, idempotency[1], confirmed=False).encode()
        existing = self._create(keys=keys, args=[self.job_ttl, pending_ttl_seconds, idem_value, job_id, client,
                                                 job_type, created_at])
        return IdempotencyRecord.decode(existing) if existing else None

    def confirm_idempotency(self, client: str, key: str, job_id: str, body_hash: str) -> None:
        record = IdempotencyRecord(job_id, body_hash, confirmed=True)
        self.redis.set(self.idempotency_key(client, key), record.encode(), ex=self.idempotency_ttl)

    def discard(self, job_id: str, client: str, idempotency_key: str | None = None) -> None:
        keys = [self.job_key(job_id)]
        if idempotency_key is not None:
            keys.append(self.idempotency_key(client, idempotency_key))
        self._discard(keys=keys, args=[job_id])

    def get(self, job_id: str) -> dict[str, Any] | None:
        raw = self.redis.hgetall(self.job_key(job_id))
        if not raw:
            return None
        record = {k.decode(): v.decode() for k, v in raw.items()}
        job = {name: record.get(name) or None for name in _FIELDS}
        job["attempts"] = int(record.get("attempts", 0))
        job["result"] = orjson.loads(record["result"]) if record.get("result") else None
        return job

    # service-app

    def begin(self, job_id: str, client: str, job_type: str, created_at: str) -> str:
        """Mark an attempt running; return the previous status (a final one means: do not run)."""
        status = self._begin(keys=[self.job_key(job_id)],
                             args=[utcnow(), self.job_ttl, job_id, client, job_type, created_at])
        return status.decode()

    @staticmethod
    def identity(job_id: str, client: str, job_type: str, created_at: str, attempts: int = 1) -> dict[str, Any]:
        """What an outcome needs to rebuild a record that is gone."""
        return {"id": job_id, "client": client, "type": job_type, "created_at": created_at, "attempts": attempts}

    def succeed(self, job_id: str, result: Any, identity: dict[str, Any] | None = None,
                encoded_result: bytes | None = None) -> str:
        """Record success; pass encoded_result when the caller has serialised the result already."""
        encoded = encoded_result if encoded_result is not None else orjson.dumps(result)
        return self._finish_with("succeeded", job_id, identity, result=encoded, error="", finished_at=utcnow())

    def fail(self, job_id: str, error: str, identity: dict[str, Any] | None = None) -> str:
        return self._finish_with("failed", job_id, identity, error=error, finished_at=utcnow())

    def retrying(self, job_id: str, error: str, identity: dict[str, Any] | None = None) -> str:
        return self._finish_with("retrying", job_id, identity, error=error)

    def _finish_with(self, status: str, job_id: str, identity: dict[str, Any] | None, **fields: Any) -> str:
        rebuild = [identity[name] for name in _IDENTITY] if identity else []
        stored = self._finish(keys=[self.job_key(job_id)],
                              args=[status, self.job_ttl, len(rebuild), *rebuild, *_flatten(fields)])
        return stored.decode()


_IDENTITY = ("id", "client", "type", "created_at", "attempts")  # the order _FINISH expects


def _flatten(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]
