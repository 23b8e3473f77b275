"""The Redis warm registry: warm state shared by proxy replicas, the in-process registry its fast path.

Each replica mirrors every live warm of the fleet in a local :class:`~specproxy.registry_shared.Mirror`
fed by one pub/sub channel, so ``match`` (the request path) never waits on Redis. Redis decides what
one replica cannot: single flight (one atomic script claims a prefix and announces it), ``get`` of a
warm this replica never heard of, and the resync after a blip. A settle is announced on the channel
and releases holders on every replica at once.

When Redis is unreachable, or slower than ``op_timeout``, the replica serves from its mirror and
says so (``degraded``), reconnects in the background with backoff, and on reconnect pushes its own
warms (settled or begun meanwhile) and pulls the states of the warms it is waiting on.

Keys (``{t}`` is the first 16 hex of the tenant digest, a Redis Cluster hash tag: one tenant's keys
share a slot, so the multi-key scripts stay legal there)::

    specproxy:w:{t}:<chain hex>     one breakpoint of a warm: its record; PX = the entry's expiry
    specproxy:id:{t}:<16-hex id>    the warm by its public id (``get``): its record, PX = its longest entry
    specproxy:events                the channel: records (begin, settle, restore) and touches
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
import redis.asyncio as aioredis
from cachetools import TTLCache
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from specproxy.config import redact_url
from specproxy.prefix import TTL_SECONDS, Prefix
from specproxy.registry import Kind, Match, State, Warm
from specproxy.registry_shared import Mirror, SharedWarm, apply_outcome, from_record, new_warm, to_record

if TYPE_CHECKING:
    from specproxy.config import Settings

log = logging.getLogger("specproxy.registry_redis")

_ERRORS: Final = (RedisError, OSError, TimeoutError)
_LOST_GRACE: Final = 5.0  # seconds past warm_timeout before an unannounced remote warm is given up
_RESYNC_TIMEOUT: Final = 30.0
_BATCH: Final = 500
_OUTBOX_MAX: Final = 10_000

# Claim a warm. KEYS: its breakpoint keys (longest last), then its id key.
# ARGV: warm_timeout ms, rewarm_margin ms, record, channel, announcement, replace ("1": may take over
# from a non-streaming leader in flight). Returns {1} when claimed, else {0, record, pttl} of the
# live warm already covering the prefix.
_BEGIN: Final = """
local n = #KEYS - 1
local timeout, margin = ARGV[1], tonumber(ARGV[2])
local current = redis.call('GET', KEYS[n])
if current then
  local old = cjson.decode(current)
  local expiring = old['s'] == 'warm' and redis.call('PTTL', KEYS[n]) <= margin
  local leader = ARGV[6] == '1' and old['kd'] == 'leader-json' and old['s'] == 'warming'
  if not (expiring or leader) then
    return {0, current, redis.call('PTTL', KEYS[n])}
  end
  redis.call('SET', KEYS[n], ARGV[3], 'XX', 'PX', timeout)  -- re-warm, or take over from the leader
else
  redis.call('SET', KEYS[n], ARGV[3], 'NX', 'PX', timeout)  -- the claim: set-if-absent
end
for i = 1, n - 1 do
  local value = redis.call('GET', KEYS[i])
  if not (value and cjson.decode(value)['s'] == 'warm' and redis.call('PTTL', KEYS[i]) > margin) then
    redis.call('SET', KEYS[i], ARGV[3], 'PX', timeout)
  end
end
redis.call('SET', KEYS[n + 1], ARGV[3], 'PX', timeout)
redis.call('PUBLISH', ARGV[4], ARGV[5])
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


class RedisRegistry:
    """The warm registry shared by replicas through Redis; never fails or stalls a request because of it."""

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
        namespace: str = "specproxy",
        connect_timeout: float = 1.0,
        reconnect_max: float = 2.0,
    ) -> None:
        self._url = url
        self._clock = clock
        self._warm_timeout = warm_timeout
        self._rewarm_margin = rewarm_margin
        self._failed_ttl = failed_ttl
        self._op_timeout = op_timeout
        self._connect_timeout = connect_timeout
        self._reconnect_max = reconnect_max
        self._ns = namespace
        self._channel = f"{namespace}:events"
        self.replica_id = secrets.token_hex(6)
        self._mirror = Mirror(
            max_entries=max_entries, warm_timeout=warm_timeout, failed_ttl=failed_ttl,
            rewarm_margin=rewarm_margin, clock=clock,
        )
        # uid → warm, for every warm this replica knows (its own and adopted ones).
        self._by_uid: TTLCache[str, SharedWarm] = TTLCache(
            maxsize=max_entries, ttl=TTL_SECONDS["1h"] + warm_timeout, timer=clock
        )
        self._claims: dict[bytes, asyncio.Future[tuple[Warm, bool]]] = {}
        self._lost: dict[str, asyncio.TimerHandle] = {}
        # Touches (a key) and refreshes (None) to write to Redis in the background; the oldest drop first.
        self._outbox: deque[tuple[SharedWarm, bytes | None]] = deque(maxlen=_OUTBOX_MAX)
        self._outbox_ready = asyncio.Event()
        self._trouble = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._healthy = False
        self._down_logged = False
        self._redis: aioredis.Redis | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisRegistry:
        """The registry ``settings`` describe (``registry = "redis"``); call :meth:`start` before serving."""
        return cls(
            settings.redis_url,
            max_entries=settings.registry_max_entries,
            warm_timeout=settings.warm_timeout,
            failed_ttl=settings.failed_ttl,
            rewarm_margin=settings.rewarm_margin,
        )

    @property
    def degraded(self) -> bool:
        """True while Redis is not shared: this replica serves from its own mirror alone."""
        return not self._healthy

    # -- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect, subscribe and resync; never raises: with Redis down it starts degraded and retries."""
        if self._redis is not None:
            return
        self._redis = aioredis.Redis.from_url(
            self._url, socket_connect_timeout=self._connect_timeout, socket_keepalive=True,
            retry=Retry(NoBackoff(), 0), client_name=f"specproxy-{self.replica_id}",
        )
        self._begin_script = self._redis.register_script(_BEGIN)
        self._upsert_script = self._redis.register_script(_UPSERT)
        self._spawn(self._supervise())
        self._spawn(self._write_touches())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._connect_timeout * 2 + _RESYNC_TIMEOUT):
                await self._first_attempt.wait()

    async def close(self) -> None:
        """Stop the background tasks, close Redis, and release anyone still holding on a remote warm."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for handle in self._lost.values():
            handle.cancel()
        self._lost.clear()
        self._healthy = False
        if self._redis is not None:
            with contextlib.suppress(*_ERRORS):
                await self._redis.aclose()
        self._mirror.waiters_released(self._known())  # as MemoryRegistry.close: wake, do not settle
        await self._mirror.close()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, what: str, exc: BaseException) -> None:
        """Redis failed an operation: go degraded (logged once per outage) and let the supervisor reconnect."""
        if not self._down_logged:
            self._down_logged = True
            log.warning("redis registry degraded (%s at %s: %s); serving from the local registry",
                        what, redact_url(self._url), type(exc).__name__)
        self._healthy = False
        self._trouble.set()

    def _known(self) -> list[SharedWarm]:
        """Every warm this replica knows, read at one instant (entries cannot expire mid-read)."""
        with self._by_uid.timer:
            self._by_uid.expire()
            return list(self._by_uid.values())

    # -- the Registry protocol ---------------------------------------------------------------------
    async def match(self, prefix: Prefix) -> Match | None:
        return await self._mirror.match(prefix)

    def snapshot(self, tenant: str | None = None) -> list[dict[str, Any]]:
        return self._mirror.snapshot(tenant)

    def __len__(self) -> int:
        return len(self._mirror)

    async def begin(
        self, tenant: str, prefix: Prefix, *, kind: Kind = Kind.PREWARM, replace: bool = False
    ) -> tuple[Warm, bool]:
        last = prefix.last_breakpoint
        if last is None:
            raise ValueError("a warm needs at least one breakpoint")
        key = prefix.key(last.position)
        existing = self._mirror.entry(key)
        if existing is not None and not self._mirror.worth_rewarming(existing, self._clock()):
            held = existing.warm
            if not (replace and held.kind is Kind.LEADER_JSON and held.state is State.WARMING):
                return held, False
        claim = self._claims.get(key)
        if claim is not None:  # the same prefix is being claimed on this replica: share its outcome
            warm, _ = await asyncio.shield(claim)
            return warm, False
        claim = asyncio.ensure_future(self._claim(tenant, prefix, kind, replace))
        self._claims[key] = claim

        def claimed(done: asyncio.Future[tuple[Warm, bool]]) -> None:
            if self._claims.get(key) is done:
                del self._claims[key]

        claim.add_done_callback(claimed)
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            claim.add_done_callback(self._abandon)
            raise

    async def _claim(self, tenant: str, prefix: Prefix, kind: Kind, replace: bool) -> tuple[Warm, bool]:
        """Single flight across replicas: one atomic script claims the prefix in Redis and announces it."""
        warm = new_warm(tenant, prefix, origin=self.replica_id, now=self._clock(), kind=kind)
        n = len(warm.spec)
        if self._healthy and self._redis is not None:
            rec = orjson.dumps(to_record(warm, now=self._clock()))
            timeout_ms = _ms(self._warm_timeout)
            announce = self._announcement(rec, [timeout_ms] * n, claim=True)
            keys = [self._wkey(tenant, k) for k, _, _ in warm.spec] + [self._idkey(tenant, warm.prefix)]
            args: list[bytes | str | int] = [
                timeout_ms, _ms(self._rewarm_margin), rec, self._channel, announce, "1" if replace else "0"
            ]
            try:
                async with asyncio.timeout(self._op_timeout):
                    res = await self._begin_script(keys=keys, args=args)
            except _ERRORS as exc:
                self._fail("begin", exc)  # send it anyway: the reconnect pushes it
            else:
                if int(res[0]) == 0:
                    return await self._adopt(orjson.loads(res[1]), [float(res[2])] * n, claim=True), False
        self._by_uid[warm.uid] = warm
        self._mirror.install(warm, [warm.started_at + self._warm_timeout] * n, claim_last=True)
        return warm, True

    def _abandon(self, claim: asyncio.Future[tuple[Warm, bool]]) -> None:
        """The caller left before it could send the warm it claimed: fail it, so nobody holds on it."""
        if not claim.cancelled() and claim.exception() is None:
            warm, started = claim.result()
            if started:
                self._spawn(self.settle(warm, State.FAILED, error="abandoned"))

    async def settle(self, warm: Warm, state: State, *, error: str | None = None) -> None:
        if warm.settled:
            return
        await self._mirror.settle(warm, state, error=error)  # this replica's holders go first
        if isinstance(warm, SharedWarm):
            self._forget_lost(warm.uid)
            if warm.origin == self.replica_id and self._healthy:
                try:
                    async with asyncio.timeout(self._op_timeout):
                        await self._push([warm])
                except _ERRORS as exc:
                    self._fail("settle", exc)  # the reconnect pushes it; remote holders end at max_hold

    async def touch(self, match: Match) -> None:
        await self._mirror.touch(match)
        warm = match.warm
        if warm.state is State.WARM and isinstance(warm, SharedWarm) and self._healthy:
            self._outbox.append((warm, match.key))  # written off the request path
            self._outbox_ready.set()

    async def refreshed(self, warm: Warm) -> None:
        await self._mirror.refreshed(warm)
        if isinstance(warm, SharedWarm) and self._healthy:
            self._outbox.append((warm, None))
            self._outbox_ready.set()

    async def get(self, tenant: str, prefix: str) -> tuple[Warm, float | None] | None:
        found = await self._mirror.get(tenant, prefix)
        if found is not None or not self._healthy or self._redis is None:
            return found
        if len(prefix) != 16 or any(c not in "0123456789abcdef" for c in prefix):
            return None
        try:
            async with asyncio.timeout(self._op_timeout), self._redis.pipeline(transaction=False) as pipe:
                key = self._idkey(tenant, prefix)
                pipe.get(key)
                pipe.pttl(key)
                raw, pttl = await pipe.execute()
        except _ERRORS as exc:
            self._fail("get", exc)
            return None
        if raw is None:
            return None
        rec = orjson.loads(raw)
        if rec.get("t") != tenant:
            return None
        warm = await self._adopt(rec, [float(pttl)] * len(rec["k"]))
        return warm, (self._clock() + pttl / 1000 if pttl > 0 else None)

    # -- records and keys --------------------------------------------------------------------------
    def _wkey(self, tenant: str, chain: bytes) -> str:
        return f"{self._ns}:w:{{{tenant[:16]}}}:{chain.hex()}"

    def _idkey(self, tenant: str, prefix: str) -> str:
        return f"{self._ns}:id:{{{tenant[:16]}}}:{prefix}"

    @staticmethod
    def _announcement(rec: bytes, remaining_ms: Sequence[int], *, claim: bool = False) -> bytes:
        """The record plus ``x`` (each key's ms left, for first-time receivers) and ``c`` (Redis just gave
        the prefix to this warm: receivers let it take the longest key)."""
        return rec[:-1] + b',"x":' + orjson.dumps(list(remaining_ms)) + (b',"c":1}' if claim else b"}")

    def _remaining(self, warm: SharedWarm, key: bytes, ttl: float, now: float) -> float:
        """Seconds ``warm``'s entry at ``key`` has left: the mirror's view, else what its state implies."""
        expires_at = self._mirror.expires_at(warm, key)
        if expires_at is None:
            if warm.state is State.WARMING:
                expires_at = warm.started_at + self._warm_timeout
            elif warm.state is State.FAILED:
                expires_at = (warm.settled_at or now) + self._failed_ttl
            else:
                expires_at = max(warm.started_at, warm.last_used or 0.0) + ttl
        return expires_at - now

    async def _push(self, warms: Sequence[SharedWarm]) -> None:
        """Write this replica's own warms to Redis (free keys or their own only) and announce them."""
        assert self._redis is not None
        now = self._clock()
        async with self._redis.pipeline(transaction=False) as pipe:
            for warm in warms:
                rec = orjson.dumps(to_record(warm, now=now))
                left = [self._remaining(warm, key, ttl, now) for key, _, ttl in warm.spec]
                keys = [self._wkey(warm.tenant, key) for (key, _, _), r in zip(warm.spec, left, strict=True) if r > 0]
                pxs = [_ms(r) for r in left if r > 0]
                if left[-1] > 0:
                    keys.append(self._idkey(warm.tenant, warm.prefix))
                    pxs.append(_ms(left[-1]))
                announce = self._announcement(rec, [_ms(r) if r > 0 else 0 for r in left])
                await self._upsert_script(
                    keys=keys, args=[warm.uid, str(warm.state), rec, self._channel, announce, *pxs], client=pipe
                )
            await pipe.execute()

    async def _adopt(self, rec: dict[str, Any], remaining_ms: Sequence[float], *, claim: bool = False) -> SharedWarm:
        """Make a record known here: a new warm is installed in the mirror; a known one only moves forward."""
        now = self._clock()
        warm = self._by_uid.get(rec["u"])
        if warm is None:
            warm = from_record(rec, now=now)
            self._by_uid[warm.uid] = warm
            self._mirror.install(warm, [now + r / 1000 for r in remaining_ms], claim_last=claim)
            if not warm.settled:
                loop = asyncio.get_running_loop()
                self._lost[warm.uid] = loop.call_later(self._warm_timeout + _LOST_GRACE, self._give_up, warm)
            return warm
        state = State(rec["s"])
        if state is not State.WARMING and not warm.settled:
            apply_outcome(warm, rec)
            self._forget_lost(warm.uid)
            await self._mirror.settle(warm, state, error=rec.get("e"))
        return warm

    def _give_up(self, warm: SharedWarm) -> None:
        """A remote warm never announced its outcome (its replica died): fail it here."""
        self._lost.pop(warm.uid, None)
        if not warm.settled:
            self._spawn(self._mirror.settle(warm, State.FAILED, error="lost"))

    def _forget_lost(self, uid: str) -> None:
        handle = self._lost.pop(uid, None)
        if handle is not None:
            handle.cancel()

    # -- messages ----------------------------------------------------------------------------------
    async def _on_message(self, data: bytes) -> None:
        try:
            msg = orjson.loads(data)
            if msg.get("r") == self.replica_id:
                return
            op = msg.get("op")
            if op == "t":
                self._on_touch(msg)
            elif op == "f":
                warm = self._by_uid.get(msg["u"])
                if warm is not None:
                    await self._mirror.refreshed(warm)
            else:
                await self._adopt(msg, [float(x) for x in msg["x"]], claim=bool(msg.get("c")))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.debug("ignored a malformed message on %s: %s", self._channel, exc)

    def _on_touch(self, msg: dict[str, Any]) -> None:
        warm = self._by_uid.get(msg["u"])
        key = bytes.fromhex(msg["k"])
        entry = self._mirror.entry(key)
        if warm is not None and entry is not None and entry.warm is warm:
            self._spawn(self._mirror.touch(Match(entry=entry, position=entry.position, key=key)))

    async def _write_touches(self) -> None:
        """Write queued touches and refreshes (TTLs + a note to the fleet) in pipelined batches."""
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            batch = list(self._outbox)
            self._outbox.clear()
            if not batch or not self._healthy or self._redis is None:
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
                        note = {"op": "t" if key else "f", "r": self.replica_id, "u": warm.uid}
                        if key is not None:
                            note["k"] = key.hex()
                        pipe.publish(self._channel, orjson.dumps(note))
                    await pipe.execute()
            except _ERRORS as exc:
                self._fail("touch", exc)

    # -- connection supervision ----------------------------------------------------------------------
    async def _supervise(self) -> None:
        """Subscribe, resync, listen; on any failure go degraded and retry with capped backoff."""
        delay = 0.05
        while True:
            try:
                await self._connected_session()
            except _ERRORS as exc:
                self._fail("connection", exc)
            except Exception:  # a bug must not end the supervision: log it and start over
                log.exception("redis registry: unexpected error; reconnecting")
            else:
                delay = 0.05  # a session that ended without error (trouble reported by an operation)
            self._healthy = False
            self._first_attempt.set()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._reconnect_max)

    async def _connected_session(self) -> None:
        """One connection's life: subscribe, mark healthy, resync, then listen until trouble."""
        assert self._redis is not None
        self._trouble.clear()
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        listener: asyncio.Task[None] | None = None
        try:
            async with asyncio.timeout(self._connect_timeout):
                await pubsub.subscribe(self._channel)
            loop = asyncio.get_running_loop()
            listener = loop.create_task(self._listen(pubsub))
            reconnect = self._first_attempt.is_set()
            self._healthy = True  # subscribed: new announcements reach us; the resync fills the gap
            async with asyncio.timeout(_RESYNC_TIMEOUT):
                await self._resync()
            self._down_logged = False
            if reconnect:
                log.info("redis registry reconnected to %s; sharing resumed", redact_url(self._url))
            self._first_attempt.set()
            trouble = loop.create_task(self._trouble.wait())
            try:
                await asyncio.wait({listener, trouble}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                trouble.cancel()
            if listener.done() and not listener.cancelled():
                exc = listener.exception()
                if exc is not None:
                    raise exc
        finally:
            self._healthy = False
            if listener is not None:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)
            with contextlib.suppress(*_ERRORS):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _listen(self, pubsub: PubSub) -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                await self._on_message(message["data"])

    async def _resync(self) -> None:
        """After (re)connecting: push this replica's own live warms, then pull the fleet's."""
        assert self._redis is not None
        known = self._known()
        own = [w for w in known if w.origin == self.replica_id]
        for i in range(0, len(own), _BATCH):
            await self._push(own[i : i + _BATCH])
        # First the warms someone here is waiting on, then everything else this replica missed.
        waiting = [w for w in known if w.origin != self.replica_id and not w.settled]
        for i in range(0, len(waiting), _BATCH):
            await self._pull([self._idkey(w.tenant, w.prefix) for w in waiting[i : i + _BATCH]])
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
        for raw, pttl in zip(values[::2], values[1::2], strict=True):
            if raw is None or pttl <= 0:
                continue
            try:
                rec = orjson.loads(raw)
                await self._adopt(rec, [float(pttl)] * len(rec["k"]))
            except (KeyError, TypeError, ValueError, IndexError) as exc:
                log.debug("ignored a malformed record: %s", exc)
