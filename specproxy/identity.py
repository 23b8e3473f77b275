"""Stage one of the request path: who a ``/v1/messages`` request is and what prefix it carries.

Parsed once and hashed once. Whatever cannot be identified (no credential, not JSON, a shape the
prefix chain cannot read) is ``None``: the request is forwarded untouched as ``bypass``, and the
upstream gives its own answer to a body it refuses. Nothing here raises on client input.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from specproxy.credentials import Credentials, presented
from specproxy.prefix import Prefix, PrefixError, compute, has_breakpoint_marker, tenant_digest


@dataclass(frozen=True, slots=True)
class Identity:
    """One identified request: its tenant, parsed body and prefix identity, and the bytes to send."""

    tenant: str
    body: dict[str, Any]
    prefix: Prefix
    raw: bytes  # what goes upstream: the client's bytes, unless injection added a breakpoint
    injected: bool = False

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True

    @property
    def cacheable(self) -> bool:
        """Whether the request has a breakpoint (explicit, automatic, or injected)."""
        return bool(self.prefix.breakpoints)


def identify(
    headers: Mapping[str, str],
    raw: bytes,
    *,
    volatile: Sequence[str] = (),
    need_marker: bool = True,
    credentials: Credentials | None = None,
) -> Identity | None:
    """Parse and hash ``raw``; None when the request cannot be identified (it is then ``bypass``).

    With ``need_marker`` a body without the bytes ``cache_control`` is not even parsed: it cannot
    carry a breakpoint (breakpoint injection turns this off, since it adds one). A body with a
    ``Content-Encoding`` is not identified either: it is relayed as it came. ``credentials``
    decides the tenant (:meth:`Credentials.tenant`: in injection mode every client is one tenant);
    without it the tenant is the digest of the presented credential.
    """
    if need_marker and not has_breakpoint_marker(raw):
        return None
    encoding = headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        return None  # a compressed body goes upstream as sent, unread (and no warm copies its headers)
    if credentials is not None:
        tenant = credentials.tenant(headers)
    else:
        cred = presented(headers)
        tenant = tenant_digest(cred) if cred is not None else None
    if tenant is None:
        return None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(body, dict):
        return None
    try:
        prefix = compute(body, tenant, volatile)
    except (PrefixError, TypeError, ValueError, RecursionError):
        return None  # the upstream answers it with its own error
    return Identity(tenant, body, prefix, raw)
