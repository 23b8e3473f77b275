"""Who a request is, and which credential goes upstream.

Pass-through (the default): the client's own key goes upstream untouched and the proxy stores none;
the tenant is the digest of that key. Injection mode (``upstream_api_key`` set, from the environment
only): clients present one of ``client_tokens`` (compared in constant time), the proxy swaps in the
upstream key, and the tenant is the digest of the client's token. Keys never leave this module in a
log line, a metric, a status page or an error message.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Final

from multidict import CIMultiDict

from specproxy.errors import AuthenticationFailed

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


class Credentials:
    """The credential policy of one proxy: pass-through, or injection with client tokens."""

    def __init__(self, upstream_api_key: str = "", client_tokens: tuple[str, ...] = ()) -> None:
        self._upstream_key = upstream_api_key
        self._tokens = tuple(t.encode() for t in client_tokens)

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
