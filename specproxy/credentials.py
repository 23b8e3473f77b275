"""Who a request is, and which credential goes upstream.

Pass-through (the default): the client's own key goes upstream untouched and the proxy stores none;
the tenant is the digest of that key. Injection mode (``upstream_api_key`` set, from the environment
only): clients present one of ``client_tokens`` (compared in constant time) and the proxy swaps in
the upstream key. Every client token then shares one upstream credential, hence one upstream cache,
so they are **one tenant** (the digest of the upstream key): a warm made through token A is read,
upstream, by token B's question, and the proxy says so (``hit``). Keys never leave this module in a
log line, a metric, a status page or an error message.

Per-credential bookkeeping (rate windows) lives in :class:`PerCredential`: bounded in count and age,
so a flood of garbage keys costs a bounded amount of memory and is forgotten.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Final, Generic, TypeVar

from cachetools import TTLCache
from multidict import CIMultiDict

from specproxy.errors import AuthenticationFailed
from specproxy.prefix import tenant_digest

V = TypeVar("V")

_CREDENTIAL_HEADERS: Final = ("x-api-key", "authorization")


def presented(headers: Mapping[str, str]) -> str | None:
    """The credential a request presents: ``x-api-key``, else the token of ``authorization: Bearer``.

    The same key sent either way (SDKs differ; ``ANTHROPIC_AUTH_TOKEN`` sends a bearer token) is one
    tenant, so the scheme is stripped before the key is digested.
    """
    key = headers.get("x-api-key")
    if key:
        return key
    auth = headers.get("authorization")
    if not auth:
        return None
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer":
        return token.strip() or None
    return auth


class PerCredential(Generic[V]):
    """State kept per tenant, bounded: at most ``max_entries`` tenants (the least recently touched is
    forgotten first), each forgotten ``ttl`` seconds after it was last touched."""

    def __init__(self, max_entries: int, ttl: float, factory: Callable[[], V],
                 timer: Callable[[], float] = time.monotonic) -> None:
        self._items: TTLCache[str, V] = TTLCache(maxsize=max_entries, ttl=ttl, timer=timer)
        self._factory = factory

    def touch(self, tenant: str) -> V:
        """The tenant's state (made if new), its age reset."""
        value = self._items.get(tenant)
        if value is None:
            value = self._factory()
        self._items[tenant] = value  # re-setting restarts its time to live
        return value

    def get(self, tenant: str) -> V | None:
        return self._items.get(tenant)

    def pop(self, tenant: str) -> None:
        self._items.pop(tenant, None)

    def __len__(self) -> int:
        self._items.expire()
        return len(self._items)

    def __iter__(self) -> Iterator[str]:
        self._items.expire()
        return iter(list(self._items))


class Credentials:
    """The credential policy of one proxy: pass-through, or injection with client tokens."""

    def __init__(self, upstream_api_key: str = "", client_tokens: tuple[str, ...] = ()) -> None:
        self._upstream_key = upstream_api_key
        self._tokens = tuple(t.encode() for t in client_tokens)
        # Injection mode: every client shares the upstream key's cache, so they are one tenant.
        self._shared_tenant = tenant_digest(upstream_api_key) if upstream_api_key else None

    def tenant(self, headers: Mapping[str, str]) -> str | None:
        """The tenant of a request: whose upstream cache its requests read and write.

        Pass-through: the digest of the presented credential (None without one). Injection mode: the
        one tenant of the shared upstream credential, whatever the client presented.
        """
        if self._shared_tenant is not None:
            return self._shared_tenant
        cred = presented(headers)
        return tenant_digest(cred) if cred is not None else None

    @property
    def injecting(self) -> bool:
        return bool(self._upstream_key)

    @property
    def gated(self) -> bool:
        """True when clients must present one of the configured tokens."""
        return bool(self._tokens)

    def check(self, headers: Mapping[str, str]) -> None:
        """Raise 401 unless the request may use this proxy (always allowed without client tokens)."""
        if not self._tokens:
            return
        given = (presented(headers) or "").encode()
        ok = False
        for token in self._tokens:  # no early exit: every token is compared
            ok |= hmac.compare_digest(given, token)
        if not ok:
            raise AuthenticationFailed("invalid x-api-key: this proxy needs one of its client tokens")

    def to_upstream(self, headers: CIMultiDict[str]) -> CIMultiDict[str]:
        """In injection mode, replace the client's credential with the upstream key (in place)."""
        if self._upstream_key:
            for name in _CREDENTIAL_HEADERS:
                headers.popall(name, None)
            headers["x-api-key"] = self._upstream_key
        return headers
