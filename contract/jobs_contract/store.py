"""The job record in Redis: one hash per job, written by both apps.

Every status change is one Lua script, so each is atomic and one round trip,
and a final status (succeeded, failed) is never overwritten: a redelivered or
duplicate message can run again but cannot change the outcome already recorded.
"""

import functools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import orjson
import redis
from redis.commands.core import Script
from redis.exceptions import NoScriptError

STATUSES = ("queued", "running", "retrying", "succeeded", "failed")
FINAL_STATUSES = frozenset({"succeeded", "failed"})

_FIELDS = ("id", "client", "type", "status", "attempts", "result", "error", "created_at", "started_at", "finished_at")

# New jobs, any number at once. For job i: KEYS[2i-1] its record, KEYS[2i] its idempotency key
# (or its record's key again when it has none); ARGV: job ttl, idempotency ttl, then per job
# its idempotency value ('' for none), id, client, type, created_at.
# (Positional values, field names here: each argument costs the client ~2 us to encode.)
# Returns, per job, 0 when created, or the idempotency value already stored (nothing created).
_CREATE = """
local created = {}
for i = 1, #KEYS / 2 do
  local a = 2 + (i - 1) * 5
  local idempotency = ARGV[a + 1]
  local existing = false
  if idempotency ~= '' then
    existing = redis.call('GET', KEYS[2 * i])
    if not existing then redis.call('SET', KEYS[2 * i], idempotency, 'EX', ARGV[2]) end
  end
  if existing then
    created[i] = existing
  else
    redis.call('HSET', KEYS[2 * i - 1], 'id', ARGV[a + 2], 'client', ARGV[a + 3], 'type', ARGV[a + 4],
               'status', 'queued', 'attempts', 0, 'created_at', ARGV[a + 5])
    redis.call('EXPIRE', KEYS[2 * i - 1], ARGV[1])
    created[i] = 0
  end
end
return created
"""

# Undo a create whose publish failed. KEYS[1] job key, KEYS[2] idempotency key or absent.
# ARGV: job id, then '1' to keep the key (its job may be queued after all: the key stays
# pending, stale at once) or '' to delete it. The record goes only while queued: a worker
# that took the message keeps it; the key is touched only while it still names this job.
_DISCARD = """
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('DEL', KEYS[1]) end
if KEYS[2] then
  local existing = redis.call('GET', KEYS[2])
  if existing and string.sub(existing, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
    local job_and_hash = string.match(existing, '^(%S+ %S+) pending')
    if ARGV[2] == '' then redis.call('DEL', KEYS[2])
    elseif job_and_hash then redis.call('SET', KEYS[2], job_and_hash .. ' pending 0', 'KEEPTTL') end
  end
end
return 1
"""

# Undo a create whose message is never published (its request gave up while it was being
# written), compare-and-set. KEYS[1] job key, KEYS[2] idempotency key or absent. ARGV[1] the
# exact value create wrote under the key. A key that changed since (claimed by a retry, which
# publishes the job again, or confirmed) is that retry's: key and record stay. Otherwise the
# key goes, and the record while it is queued.
_WITHDRAW = """
if KEYS[2] then
  if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
  redis.call('DEL', KEYS[2])
end
if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('DEL', KEYS[1]) end
return 1
"""

# Mark an idempotency key confirmed, compare-and-set: only while it names this job.
# KEYS[1] idempotency key; ARGV: job id, confirmed value. Returns 1 if set.
_CONFIRM = """
local existing = redis.call('GET', KEYS[1])
if existing and string.sub(existing, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. ' ' then
  redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  return 1
end
return 0
"""

# Take over a stale pending key (its request is over, unconfirmed) to publish its job again.
# KEYS[1] idempotency key, KEYS[2] that job's key. ARGV: the stale value (compare-and-set),
# the new pending value, the confirmed value, job ttl, then id, client, type, created_at to
# recreate a discarded record. Returns 'changed' (someone else got there first), 'started'
# (a worker has the job: it was published; the key is now confirmed) or the record's
# created_at (claimed: publish the job again).
_CLAIM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 'changed' end
local status = redis.call('HGET', KEYS[2], 'status')
if status and status ~= 'queued' then
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
  return 'started'
end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
if not status then
  redis.call('HSET', KEYS[2], 'id', ARGV[5], 'client', ARGV[6], 'type', ARGV[7], 'status', 'queued',
             'attempts', 0, 'created_at', ARGV[8])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return redis.call('HGET', KEYS[2], 'created_at')
"""

# Start an attempt. KEYS[1] job key. ARGV: now, job ttl, then id, client, type and
# created_at to recreate the record with if it is gone (expired, or lost with a Redis
# restart), then '1' if this delivery is a first one, then the start's id (unique to this
# start, the same when the call is sent again). Returns the status before the call
# ('missing' when recreated), or 'duplicate': a first delivery of a job that is running is
# a second copy of its message (the running copy is unacked, so the broker redelivers that
# one if its worker dies); only a redelivery may run it again. A start sent again after its
# answer was lost (a timeout, a dropped connection) finds its own id: 'running', run it.
# (A function of the key and the arguments from position o + 1, so that one script can
# also record another job's outcome first: _FINISH_BEGIN.)
_BEGIN_FUNCTION = """
local function begin(key, A, o)
  local status = redis.call('HGET', key, 'status')
  if status == 'succeeded' or status == 'failed' then return status end
  if status == 'running' then
    if redis.call('HGET', key, 'start_id') == A[o + 8] then return 'running' end
    if A[o + 7] == '1' then return 'duplicate' end
  end
  if not status then
    redis.call('HSET', key, 'id', A[o + 3], 'client', A[o + 4], 'type', A[o + 5], 'status', 'queued',
               'attempts', 0, 'created_at', A[o + 6])
    redis.call('EXPIRE', key, A[o + 2])
    status = 'missing'
  end
  redis.call('HSET', key, 'status', 'running', 'started_at', A[o + 1], 'start_id', A[o + 8])
  redis.call('HINCRBY', key, 'attempts', 1)
  return status
end
"""
_BEGIN = _BEGIN_FUNCTION + "return begin(KEYS[1], ARGV, 0)"
_BEGIN_ARGS = 8

# Record an outcome unless one is final already. KEYS[1] job key.
# ARGV: status, job ttl, k (0 or 5), then k identity values (id, client, type,
# created_at, attempts: to rebuild a record that vanished, e.g. in a Redis failover),
# then field/value pairs (up to position `last`). Returns the status now stored, or
# 'missing' (record gone, k = 0).
_FINISH_FUNCTION = """
local function finish(key, A, last)
  local status = redis.call('HGET', key, 'status')
  if status == 'succeeded' or status == 'failed' then return status end
  local k = tonumber(A[3])
  if not status then
    if k == 0 then return 'missing' end
    redis.call('HSET', key, 'id', A[4], 'client', A[5], 'type', A[6], 'created_at', A[7], 'attempts', A[8])
  end
  redis.call('HSET', key, 'status', A[1], unpack(A, 4 + k, last))
  redis.call('EXPIRE', key, A[2])
  return A[1]
end
"""
_FINISH = _FINISH_FUNCTION + "return finish(KEYS[1], ARGV, #ARGV)"

# One job's outcome, then the start of the next job a worker thread runs: one round trip
# instead of two, as atomic as each alone. KEYS[1] the finished job's key, KEYS[2] the next
# one's. ARGV: the arguments of _FINISH, then the 8 of _BEGIN (an outcome's arguments come
# first in both scripts: tests/chaos watches for them). Returns {finish's answer, begin's
# answer}. The outcome goes first: a second copy of the same job sees it.
_FINISH_BEGIN = (_BEGIN_FUNCTION + _FINISH_FUNCTION
                 + f"local o = #ARGV - {_BEGIN_ARGS}\n"
                 + "return {finish(KEYS[1], ARGV, o), begin(KEYS[2], ARGV, o)}")

_second: tuple[int, str] = (0, "")  # the last whole second utcnow() formatted, and its text


def new_start_id() -> str:
    """An id for one start of a job's attempt (JobStore.begin)."""
    return os.urandom(8).hex()


def utcnow() -> str:
    """Now, UTC, to the millisecond (truncated, as isoformat does): 2026-01-01T00:00:00.000Z. The
    date and time of day are formatted once a second (every job writes one or two timestamps)."""
    global _second
    now = time.time()
    whole = int(now)
    second, text = _second
    if whole != second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))
        _second = (whole, text)
    return f"{text}.{int((now - whole) * 1000):03d}Z"


@dataclass(frozen=True)
class IdempotencyRecord:
    """What an Idempotency-Key holds: its job, the request body's hash, and whether the job is
    known to be accepted. A pending key names the time its request is surely over by (epoch
    seconds): after that, nobody will confirm it any more and it is stale."""

    job_id: str
    body_hash: str
    confirmed: bool
    pending_until: float = float("inf")
    raw: str = field(default="", compare=False, repr=False)  # as stored: what compare-and-set compares

    def encode(self) -> str:
        if self.confirmed:
            return f"{self.job_id} {self.body_hash} confirmed"
        return f"{self.job_id} {self.body_hash} pending {self.pending_until:.3f}"

    @classmethod
    def decode(cls, raw: bytes | str) -> "IdempotencyRecord":
        text = raw.decode() if isinstance(raw, bytes) else raw
        job_id, body_hash, state, *until = text.split(" ")
        return cls(job_id, body_hash, state == "confirmed", float(until[0]) if until else float("inf"), raw=text)

    def stale(self) -> bool:
        return not self.confirmed and time.time() > self.pending_until


class NewJob(NamedTuple):
    """What JobStore.create records for a job main-app accepts."""

    job_id: str
    client: str
    job_type: str
    created_at: str
    idempotency: tuple[str, str] | None = None  # (key, body hash)
    pending_ttl_seconds: int = 30
    # When its key stops being pending (epoch seconds); None: pending_ttl_seconds after the
    # write. Fixed in advance, the key's value is known exactly, so withdraw() can compare it.
    pending_until: float | None = None

    def pending_key_value(self) -> str:
        """The value create_many writes under this job's idempotency key."""
        if self.idempotency is None:
            return ""
        until = self.pending_until if self.pending_until is not None else time.time() + self.pending_ttl_seconds
        return IdempotencyRecord(self.job_id, self.idempotency[1], confirmed=False, pending_until=until).encode()


class HeldConnectionScripts:
    """Runs Lua scripts on a connection that each thread keeps from the client's pool.

    A call through redis-py's Script takes a connection from the pool and returns it each
    time (locks, a pid check, observability counters, option handling): with redis-py 8.1,
    ~80 us of client CPU for one of the store's scripts against ~28 us for the same EVALSHA
    on a connection already held (docs/performance.md). Otherwise it behaves as Script: the
    pool's check that an idle connection is still good, the connection's retry policy and
    health checks, the connection dropped on anything raised mid-command (redis-py's
    Connection does that), and a script loaded again after NOSCRIPT (a restarted Redis). A
    connection is never used by two threads, nor across a fork."""

    def __init__(self, client: redis.Redis):
        self._client = client
        self._held = threading.local()

    def register(self, source: str) -> Callable[..., Any]:
        """The script, to call as script(keys=..., args=...)."""
        return functools.partial(self.run, self._client.register_script(source))

    def run(self, script: Script, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        connection = self._connection()
        try:
            return self._evalsha(connection, script.sha, keys, args)
        except NoScriptError:
            script.sha = self._client.script_load(script.script)
            return self._evalsha(connection, script.sha, keys, args)

    @staticmethod
    def _evalsha(connection: Any, sha: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        def call() -> Any:
            connection.send_command("EVALSHA", sha, len(keys), *keys, *args)
            return connection.read_response()

        return connection.retry.call_with_retry(call, lambda _error: connection.disconnect())

    def _connection(self) -> Any:
        held = getattr(self._held, "connection", None)
        if held is None or held[0] != os.getpid():
            held = (os.getpid(), self._client.connection_pool.get_connection())
            self._held.connection = held
        connection = held[1]
        # As the pool checks a connection it hands out: one with something to read while idle was
        # closed by the server (a restart, a timeout) or is out of step: reconnect before sending.
        try:
            if connection.can_read():
                raise redis.ConnectionError("data on an idle connection")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            connection.disconnect()
        return connection


class JobStore:
    def __init__(self, client: redis.Redis, job_ttl_seconds: int = 7 * 86400, idempotency_ttl_seconds: int = 86400):
        self.redis = client
        self.job_ttl = job_ttl_seconds
        self.idempotency_ttl = idempotency_ttl_seconds
        scripts = HeldConnectionScripts(client)
        self._create = scripts.register(_CREATE)
        self._discard = scripts.register(_DISCARD)
        self._withdraw = scripts.register(_WITHDRAW)
        self._confirm = scripts.register(_CONFIRM)
        self._claim = scripts.register(_CLAIM)
        self._begin = scripts.register(_BEGIN)
        self._finish = scripts.register(_FINISH)
        self._finish_begin = scripts.register(_FINISH_BEGIN)

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
        The key is written with the job, for the full idempotency TTL, as pending for
        pending_ttl_seconds (long enough to publish); confirm_idempotency() marks it
        accepted, and a key left pending past that is resolved by claim_stale()."""
        return self.create_many([NewJob(job_id, client, job_type, created_at, idempotency, pending_ttl_seconds)])[0]

    def create_many(self, jobs: "list[NewJob]") -> "list[IdempotencyRecord | None]":
        """create() for each job, in order, in one round trip (one script; a job later in the batch
        sees the idempotency keys of those before it)."""
        keys: list[str] = []
        args: list[Any] = [self.job_ttl, self.idempotency_ttl]
        for job in jobs:
            job_key = self.job_key(job.job_id)
            idem_key, idem_value = job_key, job.pending_key_value()
            if job.idempotency is not None:
                idem_key = self.idempotency_key(job.client, job.idempotency[0])
            keys += (job_key, idem_key)
            args += (idem_value, job.job_id, job.client, job.job_type, job.created_at)
        return [IdempotencyRecord.decode(reply) if reply else None for reply in self._create(keys=keys, args=args)]

    def confirm_idempotency(self, client: str, key: str, job_id: str, body_hash: str) -> bool:
        """Mark the key accepted, unless it names another job by now."""
        record = IdempotencyRecord(job_id, body_hash, confirmed=True)
        return bool(self._confirm(keys=[self.idempotency_key(client, key)], args=[job_id, record.encode()]))

    def claim_stale(self, client: str, key: str, stale: IdempotencyRecord, job_type: str, created_at: str,
                    pending_ttl_seconds: int) -> str:
        """Take over a stale pending key to publish its job again (same id), recreating a record
        that was discarded. Returns the job's created_at when claimed, 'started' when a worker
        has the job (the key is confirmed), or 'changed' when the key is no longer `stale`."""
        claimed = replace(stale, pending_until=time.time() + pending_ttl_seconds)
        confirmed = replace(stale, confirmed=True)
        outcome = self._claim(keys=[self.idempotency_key(client, key), self.job_key(stale.job_id)],
                              args=[stale.raw or stale.encode(), claimed.encode(), confirmed.encode(), self.job_ttl,
                                    stale.job_id, client, job_type, created_at])
        return outcome.decode()

    def discard(self, job_id: str, client: str, idempotency_key: str | None = None, keep_key: bool = False) -> None:
        """Undo a create whose publish failed: remove the record while it is queued, and the key
        while it names this job. keep_key: the message may be queued after all (the failure
        was ambiguous), so the key stays, stale at once: a retry claims it and publishes the
        same job again instead of creating a second one."""
        keys = [self.job_key(job_id)]
        if idempotency_key is not None:
            keys.append(self.idempotency_key(client, idempotency_key))
        self._discard(keys=keys, args=[job_id, "1" if keep_key else ""])

    def withdraw(self, job: "NewJob") -> bool:
        """Undo create_many(job) for a job that will never be published, unless a retry has taken
        its idempotency key over since (then it owns the key and the record). True if undone.
        A job with a key must have been created with pending_until set."""
        keys = [self.job_key(job.job_id)]
        if job.idempotency is not None:
            if job.pending_until is None:
                raise ValueError("withdraw() needs the pending_until the job was created with")
            keys.append(self.idempotency_key(job.client, job.idempotency[0]))
        return bool(self._withdraw(keys=keys, args=[job.pending_key_value()]))

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

    def begin(self, job_id: str, client: str, job_type: str, created_at: str, redelivered: bool = True,
              start_id: str | None = None) -> str:
        """Mark an attempt running; return the previous status (a final one, or 'duplicate' for a
        first delivery of a running job, means: do not run). A caller that sends the call again
        after an error must pass the same start_id both times: its start may have been recorded
        (only its answer lost), and a first delivery would then find its own job 'running' and
        take itself for a second copy. With the same start_id the call answers 'running': run it."""
        status = self._begin(keys=[self.job_key(job_id)],
                             args=self._begin_args(job_id, client, job_type, created_at, redelivered, start_id))
        return status.decode()

    def _begin_args(self, job_id: str, client: str, job_type: str, created_at: str, redelivered: bool,
                    start_id: str | None = None) -> list:
        return [utcnow(), self.job_ttl, job_id, client, job_type, created_at, "0" if redelivered else "1",
                start_id or new_start_id()]

    @staticmethod
    def identity(job_id: str, client: str, job_type: str, created_at: str, attempts: int = 1) -> dict[str, Any]:
        """What an outcome needs to rebuild a record that is gone."""
        return {"id": job_id, "client": client, "type": job_type, "created_at": created_at, "attempts": attempts}

    def succeed(self, job_id: str, result_json: bytes, identity: dict[str, Any] | None = None) -> str:
        """Record success with the job's result, already JSON-encoded (the worker encodes it once)."""
        return self._finish_with("succeeded", job_id, identity, result=result_json, error="", finished_at=utcnow())

    def fail(self, job_id: str, error: str, identity: dict[str, Any] | None = None) -> str:
        return self._finish_with("failed", job_id, identity, error=error, finished_at=utcnow())

    def retrying(self, job_id: str, error: str, identity: dict[str, Any] | None = None) -> str:
        return self._finish_with("retrying", job_id, identity, error=error)

    def succeed_and_begin(self, job_id: str, result_json: bytes, identity: dict[str, Any] | None,
                          next_job: tuple[Any, ...]) -> tuple[str, str]:
        """succeed(job_id, ...) then begin(*next_job), in one round trip (one script): returns what
        each would. next_job: (id, client, type, created_at, redelivered[, start_id]) as begin()
        takes them (the same start_id when sent again)."""
        stored, previous = self._finish_begin(
            keys=[self.job_key(job_id), self.job_key(next_job[0])],
            args=[*self._finish_args("succeeded", identity, result=result_json, error="", finished_at=utcnow()),
                  *self._begin_args(*next_job)])
        return stored.decode(), previous.decode()

    def _finish_with(self, status: str, job_id: str, identity: dict[str, Any] | None, **fields: Any) -> str:
        stored = self._finish(keys=[self.job_key(job_id)], args=self._finish_args(status, identity, **fields))
        return stored.decode()

    def _finish_args(self, status: str, identity: dict[str, Any] | None, **fields: Any) -> list:
        rebuild = [identity[name] for name in _IDENTITY] if identity else []
        return [status, self.job_ttl, len(rebuild), *rebuild, *_flatten(fields)]


_IDENTITY = ("id", "client", "type", "created_at", "attempts")  # the order _FINISH expects


def _flatten(fields: dict[str, Any]) -> list[Any]:
    return [item for pair in fields.items() for item in pair]
