"""The Redis warm registry: warm state shared by proxy replicas, with the in-process registry as its fast path.

Each replica mirrors every live warm of the fleet in a local :class:`~specproxy.registry.shared.Mirror`
(a :class:`~specproxy.registry.memory.MemoryRegistry`) fed by one pub/sub channel, so the request
path never waits on Redis: ``match`` reads the mirror, and ``begin`` decides in the mirror (the
single-flight rule of :mod:`specproxy.registry.rules`) and returns at once, the shared claim
following in the background. Redis then arbitrates between replicas: one atomic script applies the
same rule to what Redis holds, claims the prefix and announces it. Two replicas that begin the same
prefix within one claim's round trip both send their warm (no request waits; single flight is
exact within a replica, best-effort across replicas) and the fleet converges on the one Redis
kept. Redis also serves ``get`` of a warm this replica never heard of, and the resync after a
blip. A settle is announced on the channel and releases holders on every replica at once.

When Redis is unreachable, or slower than ``op_timeout``, the replica serves from its mirror and
says so (``degraded``), reconnects in the background with capped backoff, and on reconnect pushes
its own warms (settled, or begun, meanwhile) and pulls the states of the warms it is waiting on.

Keys (``{t}``: the first 16 hex of the tenant digest, as a Redis Cluster hash tag, so one tenant's
keys share a slot and the multi-key scripts stay legal there)::

    specproxy:w:{t}:<chain hex>     one breakpoint of a warm: its record; PX = the entry's expiry
    specproxy:id:{t}:<16-hex id>    the warm by its public id (``get``); PX = its longest entry's
    specproxy:events                the channel: records (begin, settle, restore), touches, refreshes
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from specproxy.config import redact_url
from specproxy.prefix import Prefix
from specproxy.registry.model import Kind, Match, State, Warm
from specproxy.registry.rules import MAY_TAKE_LUA
from specproxy.registry.shared import Mirror, SharedWarm, announcement, note, to_record

if TYPE_CHECKING:
    from specproxy.config import Settings

log = logging.getLogger("specproxy.registry_redis")  # the name docs/observability.md gives

_ERRORS: Final = (RedisError, OSError, TimeoutError)  # what Redis may raise at us, translated here only
_RECORD_ERRORS: Final = (KeyError, TypeError, ValueError, IndexError, AttributeError)  # malformed records
_RESYNC_TIMEOUT: Final = 30.0
_BATCH: Final = 500
_OUTBOX_MAX: Final = 10_000

# Claim a warm: the single-flight rule of specproxy.registry.rules (``may_take``, MAY_TAKE_LUA) applied
# to what Redis holds. KEYS: its breakpoint keys (longest last), then its id key. ARGV: 1 entry PX ms
# (warm_timeout + failed_ttl), 2 rewarm_margin ms, 3 failed_ttl ms, 4 record, 5 channel,
# 6 announcement, 7 replace ("1": may take over from a non-streaming leader in flight).
# The longest key decides: if the rule lets the warm take it, every key the rule lets it take is
# set, the id key too, and the begin is announced with ``c``, one flag per key taken; the script
# returns {1}. Otherwise nothing changes and it returns {0, record, pttl} of the warm holding it.
CLAIM_SCRIPT: Final = MAY_TAKE_LUA + """
local n = #KEYS - 1
local px, margin, failed = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local replace = ARGV[7] == '1'
local current = redis.call('GET', KEYS[n])
local left = redis.call('PTTL', KEYS[n])
if not may_take(current, left, margin, failed, replace) then
  return {0, current, left}
end
local taken = {}
for i = 1, n do
  if i == n or may_take(redis.call('GET', KEYS[i]), redis.call('PTTL', KEYS[i]), margin, failed, replace) then
    redis.call('SET', KEYS[i], ARGV[4], 'PX', px)
    taken[i] = 1
  else
    taken[i] = 0
  end
end
redis.call('SET', KEYS[n + 1], ARGV[4], 'PX', px)
redis.call('PUBLISH', ARGV[5], string.sub(ARGV[6], 1, -2) .. ',"c":[' .. table.concat(taken, ',') .. ']}')
return {1}
"""

# Write a warm's record where each key is free or already this warm's (never moving a settled record
# back to warming), then announce it. ARGV: uid, state, record, channel, announcement, one PX per key.
_UPSERT: Final = """
for i = 1, #KEYS do
  local value = redis.call('GET', KEYS[i])
  local old = value and cjson.decode(value)
  if not old or (old['u'] == ARGV[1] and not (old['s'] ~= 'warming' and ARGV[2] == 'warming')) then
    redis.call('SET', KEYS[i], ARGV[3], 'PX', ARGV[5 + i])
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _honour_cancel() -> None:
    """Re-raise a cancellation redis-py swallowed: a pipeline cancelled at the wrong instant returns
    normally (seen with redis 8.1), which would leave a background loop running after close()."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisRegistry:
    """The warm registry shared by replicas through Redis; a request never fails or stalls because of it."""

    def __init__(
        self,
        url: str,
        *,
        max_entries: int,
        warm_timeout: float,
        failed_ttl: float,
        rewarm_margin: float,
        op_timeout: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        ttl_scale: float = 1.0,
        namespace: str = "specproxy",
        connect_timeout: float = 1.0,
        reconnect_max: float = 2.0,
        max_entries_per_tenant: int | None = None,
    ) -> None:
        self._scripts_loaded = False
        self._url = url
        self._clock = clock
        self._warm_timeout = warm_timeout
        self._failed_ttl = failed_ttl
        self._rewarm_margin = rewarm_margin
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_max = reconnect_max
        self._ns = namespace
        self._channel = f"{namespace}:events"
        self.replica_id = secrets.token_hex(6)
        self._mirror = Mirror(replica=self.replica_id, max_entries=max_entries, warm_timeout=warm_timeout,
                              failed_ttl=failed_ttl, rewarm_margin=rewarm_margin, ttl_scale=ttl_scale, clock=clock,
                              max_entries_per_tenant=max_entries_per_tenant)
        # Claims of this replica's own warms still on their way to Redis, by uid (a settle waits for its claim).
        self._claims: dict[str, asyncio.Task[SharedWarm | None]] = {}
        self._barriers: dict[str, asyncio.Future[None]] = {}
        self._outbox_empty = asyncio.Event()
        self._outbox_empty.set()
        # Touches (a key) and refreshes (None) to write in the background; the oldest drop first.
        self._outbox: deque[tuple[SharedWarm, bytes | None]] = deque(maxlen=_OUTBOX_MAX)
        self._outbox_ready = asyncio.Event()
        self._trouble = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._healthy = False
        self._down_logged = False
        self._backoff = 0.05
        # Own warms whose begin or settle could not be written (degraded): pushed once Redis answers.
        self._unsynced: set[str] = set()
        self._redis: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisRegistry:
        """The registry ``settings`` describe (``registry = "redis"``); :meth:`start` it before serving."""
        return cls(settings.redis_url, max_entries=settings.registry_max_entries,
                   warm_timeout=settings.warm_timeout, failed_ttl=settings.failed_ttl,
                   rewarm_margin=settings.rewarm_margin, ttl_scale=settings.cache_ttl_scale,
                   max_entries_per_tenant=settings.max_entries_per_tenant)

    @property
    def degraded(self) -> bool:
        """True while Redis is not shared: this replica serves from its own mirror alone."""
        return not self._healthy

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, subscribe and resync. Never raises: with Redis down it starts degraded and retries."""
        if self._redis is not None:
            return
        # No client-side retries: a failure must surface at once (we fall back), not after backoffs.
        self._redis = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=self._connect_timeout, socket_keepalive=True,
            retry=Retry(NoBackoff(), 0), client_name=f"specproxy-{self.replica_id}",
        )
        self._claim_script = self._redis.register_script(CLAIM_SCRIPT)
        self._upsert_script = self._redis.register_script(_UPSERT)
        self._scripts_loaded = False
        self._spawn(self._supervise())
        self._spawn(self._write_outbox())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout * 2 + _RESYNC_TIMEOUT):
                await self._first_attempt.wait()

    async def close(self) -> None:
        """Stop the background tasks, close Redis, and wake whoever still waits (as MemoryRegistry does)."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5.0)
        self._healthy = False
        if self._redis is not None:
            with contextlib.suppress(*_ERRORS):
                await self._redis.aclose()
        await self._mirror.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, what: str, exc: BaseException) -> None:
        """Redis failed an operation: go degraded (logged once per outage) and have the supervisor reconnect."""
        if not self._down_logged:
            self._down_logged = True
            log.warning("redis registry degraded (%s at %s: %s); serving from the local registry",
                        what, redact_url(self._url), type(exc).__name__)
        self._healthy = False
        self._trouble.set()

    # -- the Registry protocol ---------------------------------------------------------------------
    async def match(self, prefix: Prefix) -> Match | None:
        return await self._mirror.match(prefix)

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return self._mirror.snapshot(tenant)

    def __len__(self) -> int:
        return len(self._mirror)

    def __bool__(self) -> bool:
        return True  # an empty registry is still a registry (``registry or default`` must keep it)

    async def peek(self, prefix: Prefix, *, replace: bool = False) -> Warm | None:
        return await self._mirror.peek(prefix, replace=replace)

    async def begin(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        """Single flight, decided at once in the mirror; then shared through Redis.

        A leader (a client's request that is about to be forwarded) never waits for Redis: its
        claim follows in the background. If another replica claimed the prefix first, both requests
        are on their way upstream already; this mirror adopts the winner, and the leader still
        releases the requests holding on it here when it settles.

        A background warm (``/prewarm``, a coalescing or next-turn warm) waits for its claim (at most
        ``op_timeout``) before it is sent, so that a ``/prewarm`` answered on one replica is known to
        the fleet: if another replica's warm won, nothing is sent and the caller gets that warm (a
        local warm others joined meanwhile settles with the winner's outcome).
        """
        warm, started = self._mirror.begin_now(tenant, prefix, kind=kind, replace=replace)
        if not started or not isinstance(warm, SharedWarm):
            return warm, started
        if not self._healthy or self._redis is None:
            self._unsynced.add(warm.uid)  # decided alone: pushed once Redis answers
            return warm, True
        claim = asyncio.get_running_loop().create_task(self._claim(warm, replace))
        self._claims[warm.uid] = claim
        self._tasks.add(claim)
        claim.add_done_callback(self._tasks.discard)
        claim.add_done_callback(functools.partial(self._claimed, warm.uid))
        if kind in (Kind.LEADER, Kind.LEADER_JSON):
            return warm, True
        try:
            winner = await asyncio.shield(claim)
        except asyncio.CancelledError:
            # The caller left before it could send the warm: fail it, so that nobody holds on it.
            claim.add_done_callback(lambda done: self._abandon(warm, done))
            raise
        if winner is None:
            return warm, True
        self._spawn(self._follow(warm, winner))
        return winner, False

    def _claimed(self, uid: str, _claim: asyncio.Task[SharedWarm | None]) -> None:
        self._claims.pop(uid, None)

    async def _claim(self, warm: SharedWarm, replace: bool) -> SharedWarm | None:
        """Share a warm this replica began: one atomic script claims the prefix in Redis and announces
        it. Returns None when claimed (or when Redis could not be asked), else the warm that holds it."""
        assert self._redis is not None
        n = len(warm.spec)
        rec = orjson.dumps(to_record(warm, now=self._clock()))
        px = _ms(self._warm_timeout + self._failed_ttl)
        keys = [self._wkey(warm.tenant, k) for k, _, _ in warm.spec] + [self._idkey(warm.tenant, warm.prefix)]
        args: list[bytes | str | int] = [px, _ms(self._rewarm_margin), _ms(self._failed_ttl), rec, self._channel,
                                         announcement(rec, [px] * n), int(replace)]
        try:
            async with asyncio.timeout(self._op_timeout):
                res = await self._claim_script(keys=keys, args=args)
            _honour_cancel()
        except _ERRORS as exc:
            self._unsynced.add(warm.uid)  # decided alone: pushed once Redis answers
            self._fail("begin", exc)
            return None
        if int(res[0]) == 1:
            return None
        # Another warm holds the prefix in Redis: the fleet follows that one, and so does this mirror.
        try:
            winner = await self._mirror.adopt(orjson.loads(res[1]), [float(res[2])] * n, claim=True)
        except _RECORD_ERRORS:
            return None  # not a record of ours under our key: decide alone
        return None if winner is warm else winner

    def _abandon(self, warm: SharedWarm, claim: asyncio.Task[SharedWarm | None]) -> None:
        """The caller of :meth:`begin` left while its claim was on its way: nothing will send ``warm``."""
        winner = None if claim.cancelled() or claim.exception() is not None else claim.result()
        if winner is None:
            self._spawn(self.settle(warm, State.FAILED, error="abandoned"))
        else:
            self._spawn(self._follow(warm, winner))

    async def _follow(self, warm: SharedWarm, winner: Warm) -> None:
        """``warm`` lost its claim and is not sent: whoever joined it here settles with ``winner``."""
        await winner._settled.wait()
        await self._mirror.settle(warm, winner.state if winner.settled else State.FAILED, error=winner.error)

    async def settle(self, warm: Warm, state: State, *, error: str | None = None) -> None:
        if warm.settled:
            return
        await self._mirror.settle(warm, state, error=error)  # this replica's holders go first
        if not isinstance(warm, SharedWarm) or warm.origin != self.replica_id:
            return
        self._unsynced.add(warm.uid)  # until Redis has it; remote holders end at max_hold meanwhile
        if self._healthy:
            try:
                async with asyncio.timeout(self._op_timeout):
                    claim = self._claims.get(warm.uid)
                    if claim is not None:
                        await asyncio.shield(claim)  # the begin reaches Redis before its settle
                    await self._push([warm])
            except _ERRORS as exc:
                self._fail("settle", exc)

    async def touch(self, match: Match) -> None:
        await self._mirror.touch(match)
        warm = match.warm
        if warm.state is State.WARM and isinstance(warm, SharedWarm) and self._healthy:
            self._outbox.append((warm, match.key))  # written off the request path
            self._outbox_empty.clear()
            self._outbox_ready.set()

    async def refreshed(self, warm: Warm) -> None:
        await self._mirror.refreshed(warm)
        if isinstance(warm, SharedWarm) and self._healthy:
            self._outbox.append((warm, None))
            self._outbox_empty.clear()
            self._outbox_ready.set()

    async def get(self, tenant: str, prefix: str) -> tuple[Warm, float | None] | None:
        found = await self._mirror.get(tenant, prefix)
        if found is not None or not self._healthy or self._redis is None:
            return found
        if len(prefix) != 16 or any(c not in "0123456789abcdef" for c in prefix):
            return None
        key = self._idkey(tenant, prefix)
        try:
            async with asyncio.timeout(self._op_timeout), self._redis.pipeline(transaction=False) as pipe:
                pipe.get(key)
                pipe.pttl(key)
                raw, pttl = await pipe.execute()
            _honour_cancel()
        except _ERRORS as exc:
            self._fail("get", exc)
            return None
        try:
            rec = orjson.loads(raw) if raw is not None else None
            if rec is None or rec["t"] != tenant or pttl <= 0:
                return None
            warm = await self._mirror.adopt(rec, [float(pttl)] * len(rec["k"]))
        except _RECORD_ERRORS:
            return None
        return self._mirror.current(warm), self._clock() + pttl / 1000

    async def sync(self) -> None:
        """Return once this replica's changes are in Redis (claims, settles, touches) and every
        announcement published before now has been applied here. A no-op while degraded.

        After ``await a.sync()`` then ``await b.sync()``, replica ``b`` has seen all ``a`` did: the
        point where a test (or an orderly hand-over) can read ``b`` and expect ``a``'s changes.
        """
        if not self._healthy or self._redis is None:
            return
        try:
            async with asyncio.timeout(max(self._op_timeout, 1.0) * 5):
                while self._claims:
                    await asyncio.gather(*list(self._claims.values()), return_exceptions=True)
                await self._outbox_empty.wait()
                token = secrets.token_hex(8)
                heard = self._barriers[token] = asyncio.get_running_loop().create_future()
                try:
                    barrier = orjson.dumps({"op": "b", "r": self.replica_id, "n": token})
                    await self._redis.publish(self._channel, barrier)
                    await heard  # our own subscription delivers it after everything published before
                finally:
                    self._barriers.pop(token, None)
            _honour_cancel()
        except _ERRORS as exc:
            self._fail("sync", exc)

    # -- writing to Redis ----------------------------------------------------------------------------
    def _wkey(self, tenant: str, chain: bytes) -> str:
        return f"{self._ns}:w:{{{tenant[:16]}}}:{chain.hex()}"

    def _idkey(self, tenant: str, prefix: str) -> str:
        return f"{self._ns}:id:{{{tenant[:16]}}}:{prefix}"

    async def _push(self, warms: Sequence[SharedWarm]) -> None:
        """Write this replica's own warms to Redis (keys free or already theirs) and announce them."""
        assert self._redis is not None
        now = self._clock()
        script = self._upsert_script
        if script.sha is None or not self._scripts_loaded:
            # Load once (and after a Redis restart): a pipeline carrying a Script object would ask
            # SCRIPT EXISTS first, a round trip during which this replica's released holders run
            # and the settle reaches the other replicas tens of milliseconds late.
            await self._redis.script_load(_UPSERT)
            self._scripts_loaded = True
        async with self._redis.pipeline(transaction=False) as pipe:
            for warm in warms:
                rec = orjson.dumps(to_record(warm, now=now))
                left = [self._mirror.remaining(warm, key, ttl, now) for key, _, ttl in warm.spec]
                keys = [self._wkey(warm.tenant, k) for (k, _, _), r in zip(warm.spec, left, strict=True) if r > 0]
                pxs = [_ms(r) for r in left if r > 0]
                if left[-1] > 0:
                    keys.append(self._idkey(warm.tenant, warm.prefix))
                    pxs.append(_ms(left[-1]))
                announce = announcement(rec, [_ms(r) if r > 0 else 0 for r in left])
                args: list[bytes | str | int] = [warm.uid, str(warm.state), rec, self._channel, announce, *pxs]
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                await pipe.execute()
            except redis.exceptions.NoScriptError:
                self._scripts_loaded = False  # Redis restarted empty: load and write again
                raise
        self._unsynced.difference_update(w.uid for w in warms)
        _honour_cancel()

    async def _write_outbox(self) -> None:
        """Write queued touches and refreshes (TTLs, and a note to the fleet) in pipelined batches."""
        while True:
            _honour_cancel()
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch = list(self._outbox)
            self._outbox.clear()
            if not batch or not self._healthy or self._redis is None:
                self._outbox_empty.set()
                continue
            try:
                async with asyncio.timeout(max(self._op_timeout, 1.0)), \
                        self._redis.pipeline(transaction=False) as pipe:
                    for warm, key in batch:
                        for chain, _, ttl in warm.spec:
                            if key is None or chain == key:
                                pipe.pexpire(self._wkey(warm.tenant, chain), _ms(ttl))
                        if key is None or key == warm.spec[-1][0]:
                            pipe.pexpire(self._idkey(warm.tenant, warm.prefix), _ms(warm.spec[-1][2]))
                        pipe.publish(self._channel, note(self.replica_id, warm, key))
                    await pipe.execute()
            except _ERRORS as exc:
                self._fail("touch", exc)
            finally:
                if not self._outbox:
                    self._outbox_empty.set()

    # -- reading from Redis --------------------------------------------------------------------------
    async def _on_message(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            if isinstance(msg, dict) and msg.get("op") == "b" and msg.get("r") == self.replica_id:
                heard = self._barriers.get(str(msg.get("n")))
                if heard is not None and not heard.done():
                    heard.set_result(None)
                return
            await self._mirror.apply(msg)
        except _RECORD_ERRORS as exc:
            log.debug("ignored a malformed message on %s: %s", self._channel, type(exc).__name__)

    async def _resync(self) -> None:
        """After (re)connecting: push this replica's own live warms, then pull the fleet's."""
        assert self._redis is not None
        known = self._mirror.known()
        own = [w for w in known if w.origin == self.replica_id]
        self._unsynced.intersection_update(w.uid for w in own)  # all pushed below; forget expired ones
        for i in range(0, len(own), _BATCH):
            await self._push(own[i : i + _BATCH])
        # First the warms someone here may be waiting on, then everything else this replica missed.
        waiting = [self._idkey(w.tenant, w.prefix) for w in known if w.origin != self.replica_id and not w.settled]
        for i in range(0, len(waiting), _BATCH):
            await self._pull(waiting[i : i + _BATCH])
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=f"{self._ns}:id:*", count=_BATCH):
            batch.append(key.decode() if isinstance(key, bytes) else key)
            if len(batch) >= _BATCH:
                await self._pull(batch)
                batch = []
        if batch:
            await self._pull(batch)

    async def _pull(self, keys: Sequence[str]) -> None:
        assert self._redis is not None
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            values = await pipe.execute()
        _honour_cancel()
        for raw, pttl in zip(values[::2], values[1::2], strict=True):
            if raw is None or pttl <= 0:
                continue
            try:
                rec = orjson.loads(raw)
                await self._mirror.adopt(rec, [float(pttl)] * len(rec["k"]))
            except _RECORD_ERRORS as exc:
                log.debug("ignored a malformed record: %s", type(exc).__name__)

    # -- connection supervision ----------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Run connected sessions one after another; between them, degraded, back off (capped, jittered)."""
        while True:
            try:
                await self._session()
            except _ERRORS as exc:
                self._fail("connection", exc)
            except Exception:  # a bug must not end the supervision: log it and start over
                log.exception("redis registry: unexpected error; reconnecting")
            self._healthy = False
            self._first_attempt.set()
            _honour_cancel()
            await asyncio.sleep(self._backoff * random.uniform(0.5, 1.0))
            self._backoff = min(self._backoff * 2, self._reconnect_max)

    async def _session(self) -> None:
        """One subscription's life: subscribe, share again, resync, then listen until it drops.

        An operation that fails while the subscription lives (a slow answer, say) only pauses the
        sharing: once Redis answers a PING again, the warms this replica decided alone meanwhile are
        pushed and sharing resumes; no announcement was missed, so nothing needs pulling.
        """
        assert self._redis is not None
        self._trouble.clear()
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        listener: asyncio.Task[None] | None = None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await pubsub.subscribe(self._channel)
            listener = loop.create_task(self._listen(pubsub))
            self._healthy = True  # announcements reach us from now on; the resync fills the gap before
            async with asyncio.timeout(_RESYNC_TIMEOUT):
                await self._resync()
            self._recovered()
            while True:
                trouble = loop.create_task(self._trouble.wait())
                try:
                    await asyncio.wait({listener, trouble}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    trouble.cancel()
                if listener.done():
                    exc = None if listener.cancelled() else listener.exception()
                    raise exc or ConnectionError("the subscription ended")
                self._trouble.clear()
                async with asyncio.timeout(self._connect_timeout):
                    await self._redis.ping()
                    self._healthy = True
                    unsynced = self._mirror.own(self._unsynced)
                    self._unsynced.intersection_update(w.uid for w in unsynced)  # forget expired ones
                    await self._push(unsynced)
                self._recovered()
        finally:
            self._healthy = False
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            with contextlib.suppress(*_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _recovered(self) -> None:
        if self._down_logged:
            log.info("redis registry: %s answers again; sharing resumed", redact_url(self._url))
        self._down_logged = False
        self._backoff = 0.05
        self._first_attempt.set()

    async def _listen(self, pubsub: PubSub) -> None:
        """Block on the subscription (a push: no polling) and apply each announcement as it comes."""
        async for message in pubsub.listen():
            if message.get("type") == "message":
                await self._on_message(message["data"])
