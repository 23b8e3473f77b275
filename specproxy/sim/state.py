"""The simulator's state: profile, clock, cache, gates, counters and the request log.

One :class:`SimState` per app, reachable in-process (``SimHandle.state`` in tests) and over HTTP
(``/_sim/stats``, ``/_sim/requests``). Tenants are known only by a digest of their credential
(first 16 hex characters of its SHA-256); neither credentials nor prompt text are ever stored.
Cache entries belong to a workspace (``workspace_for``); the engine dialects keep one engine-wide
cache instead (``engine``).
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from specproxy.sim.cache import CachePlan, Clock, PromptCache
from specproxy.sim.engine_cache import EngineCache, new_engine_cache
from specproxy.sim.gates import Gates
from specproxy.sim.profile import ModelSpec, SimProfile


def tenant_digest(credential: str) -> str:
    """The tenant id of a credential: the first 16 hex characters of its SHA-256."""
    return hashlib.sha256(credential.encode()).hexdigest()[:16]


def own_workspace(tenant: str) -> str:
    """The workspace of a credential the profile does not assign: its own (``wrkspc_<digest>``)."""
    return f"wrkspc_{tenant}"


@dataclass(slots=True)
class Counters:
    """Cache counters, in total and per tenant."""

    requests: int = 0
    cache_writes: int = 0
    cache_reads: int = 0
    tokens_written: int = 0
    tokens_read: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "cache_writes": self.cache_writes,
            "cache_reads": self.cache_reads,
            "tokens_written": self.tokens_written,
            "tokens_read": self.tokens_read,
        }


class SimState:
    """Everything the simulator remembers between requests."""

    def __init__(self, profile: SimProfile, *, clock: Clock = time.monotonic) -> None:
        self.profile = profile
        self.clock = clock
        self.models: dict[str, ModelSpec] = profile.model_index()
        self.cache = PromptCache(
            clock=clock,
            max_entries=profile.max_cache_entries,
            lookback=profile.lookback,
            ttl_5m_s=profile.ttl_5m_s * profile.ttl_scale,
            ttl_1h_s=profile.ttl_1h_s * profile.ttl_scale,
        )
        self.engine: EngineCache | None = new_engine_cache(profile, clock)
        self.gates = Gates()
        self.totals = Counters()
        self.by_tenant: dict[str, Counters] = {}
        self.by_workspace: dict[str, Counters] = {}
        self.by_path: Counter[str] = Counter()
        self.log: deque[dict[str, Any]] = deque(maxlen=profile.max_logged_requests)

    def reset(self) -> None:
        """Forget the cache, the counters, the request log and the gates."""
        self.cache.clear()
        if self.engine is not None:
            self.engine.clear()
        self.totals = Counters()
        self.by_tenant = {}
        self.by_workspace = {}
        self.by_path = Counter()
        self.log.clear()
        self.gates.reset()

    def _tenant(self, tenant: str) -> Counters:
        counters = self.by_tenant.get(tenant)
        if counters is None:
            counters = self.by_tenant[tenant] = Counters()
        return counters

    def _workspace(self, workspace: str) -> Counters:
        counters = self.by_workspace.get(workspace)
        if counters is None:
            counters = self.by_workspace[workspace] = Counters()
        return counters

    def workspace_for(self, tenant: str, requested: str | None) -> str:
        """The workspace whose cache a request uses: the profile's assignment of the credential,
        else the ``anthropic-workspace-id`` header, else the credential's own workspace."""
        return self.profile.workspace_of(tenant) or requested or own_workspace(tenant)

    def count_request(self, tenant: str, workspace: str | None = None) -> None:
        """A Messages request arrived (whatever its outcome)."""
        self.totals.requests += 1
        self._tenant(tenant).requests += 1
        if workspace:
            self._workspace(workspace).requests += 1

    def commit(self, plan: CachePlan) -> None:
        """The response of ``plan``'s request begins: its writes become readable and are counted."""
        if plan.committed:
            return
        written = self.cache.commit(plan)
        usage = plan.usage
        self.count_cache(plan.tenant, plan.workspace, written, usage.cache_creation_input_tokens,
                         usage.cache_read_input_tokens)

    def count_cache(self, tenant: str, workspace: str, writes: int, tokens_written: int, tokens_read: int) -> None:
        """Count a response's cache writes and read in total, for its tenant and its workspace."""
        groups = [self.totals, self._tenant(tenant)]
        if workspace:
            groups.append(self._workspace(workspace))
        for counters in groups:
            counters.cache_writes += writes
            counters.tokens_written += tokens_written
            if tokens_read > 0:
                counters.cache_reads += 1
                counters.tokens_read += tokens_read

    def new_log_entry(self, method: str, path: str, query: str) -> dict[str, Any]:
        """Start the log record of a request (filled in as the request proceeds)."""
        self.by_path[path] += 1
        entry: dict[str, Any] = {
            "method": method,
            "path": path,
            "query": query,
            "sha256": None,
            "size": None,
            "received_at": time.monotonic(),
            "response_started_at": None,
            "status": None,
            "request_id": None,
            "tenant": None,
            "workspace": None,
            "fault": None,
            "gate": None,
            "model": None,
            "max_tokens": None,
            "stream": None,
            "usage": None,
        }
        self.log.append(entry)
        return entry

    def stats(self) -> dict[str, Any]:
        """The ``/_sim/stats`` document."""
        return {
            **self.totals.as_dict(),
            "cache_entries": len(self.engine) if self.engine is not None else len(self.cache),
            "by_tenant": {tenant: c.as_dict() for tenant, c in self.by_tenant.items()},
            "by_workspace": {ws: c.as_dict() for ws, c in self.by_workspace.items()},
            "by_path": dict(self.by_path),
        }
