"""``GET /status`` (a self-refreshing HTML page, no external assets) and ``GET /status.json``.

Both show uptime, outcome counts, tokens and dollars, and the live registry by prefix id, state,
age, uses and time to expiry: never content, never a credential or its digest. Who sees which
registry rows (the ``view``):

- ``admin``: the admin token (``Authorization: Bearer …`` or ``?token=…``) sees every row;
- ``tenant``: a request carrying a credential (``x-api-key``; or ``Authorization: Bearer`` when no
  admin token is set) sees its own tenant's rows only;
- ``aggregate``: anyone else sees the counts only, no rows.

With an admin token set, anything but the admin token or an ``x-api-key`` is refused (401). Bound to
a non-loopback address without an admin token, the proxy serves the ``aggregate`` view to everyone:
nobody reachable from the network can list prefix ids.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, Final

from aiohttp import web

from specproxy.errors import AuthenticationFailed

MAX_ROWS: Final = 500


class View(enum.StrEnum):
    ADMIN = "admin"
    TENANT = "tenant"
    AGGREGATE = "aggregate"


def is_loopback(host: str) -> bool:
    """Whether a listen address is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def decide_view(
    request: web.Request, *, admin_token: str, host: str, tenant_of: Callable[[Mapping[str, str]], str | None]
) -> tuple[View, str | None]:
    """Which view a status request gets, and the tenant whose rows it shows (raises 401 when refused)."""
    auth = request.headers.get("authorization", "")
    bearer = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
    if admin_token:
        given = bearer or request.query.get("token", "")
        if given and hmac.compare_digest(given.encode(), admin_token.encode()):
            return View.ADMIN, None
        key = request.headers.get("x-api-key")
        if key and not given:
            tenant = tenant_of({"x-api-key": key})
            if tenant is not None:
                return View.TENANT, tenant
        raise AuthenticationFailed("The status page needs the admin token (Authorization: Bearer <token>).")
    if not is_loopback(host):
        return View.AGGREGATE, None
    tenant = tenant_of(request.headers) if (request.headers.get("x-api-key") or bearer) else None
    if tenant is not None:
        return View.TENANT, tenant
    return View.AGGREGATE, None


def check_admin(request: web.Request, token: str) -> None:
    """Raise 401 unless the request carries the admin token (constant-time comparison)."""
    if not token:
        return
    given = request.query.get("token", "")
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise AuthenticationFailed("The status page needs the admin token (Authorization: Bearer <token>).")


def payload(*, uptime: float, summary: dict[str, Any], registry: list[dict[str, Any]], held: int,
            warms_in_flight: int, extra: dict[str, Any] | None = None, view: View = View.ADMIN,
            registry_size: int | None = None) -> dict[str, Any]:
    """The data both the page and ``/status.json`` show; ``registry`` is what ``view`` may see."""
    rows = registry if view is not View.AGGREGATE else []
    out = {
        "uptime_s": round(uptime, 1),
        "held": held,
        "warms_in_flight": warms_in_flight,
        **summary,
        "view": str(view),
        "registry_size": len(registry) if registry_size is None else registry_size,
        "registry": rows[:MAX_ROWS],
    }
    if extra:
        out.update(extra)
    return out


PAGE: Final = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>specproxy status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d1d1f;background:#fafafa}
h1{font-size:1.3rem;margin:0 0 .2rem}small{color:#666}
.cards{display:flex;flex-wrap:wrap;gap:.8rem;margin:1rem 0}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.6rem .9rem;min-width:9rem}
.card b{display:block;font-size:1.25rem}
table{border-collapse:collapse;background:#fff;width:100%}
th,td{border-bottom:1px solid #eee;padding:.3rem .6rem;text-align:left;font-variant-numeric:tabular-nums}
th{background:#f0f0f0}.warm{color:#0a7d32}.warming{color:#b26b00}.failed{color:#b00020}.uncacheable{color:#666}
code{font-family:ui-monospace,monospace}
</style></head><body>
<h1>specproxy</h1><small id="updated">loading…</small>
<p id="upstream"></p>
<div class="cards" id="cards"></div>
<h2>Outcomes</h2><div class="cards" id="outcomes"></div>
<h2>Warm registry</h2><small id="hidden"></small>
<table><thead><tr><th>prefix</th><th>state</th><th>age (s)</th><th>uses</th><th>expires in (s)</th></tr></thead>
<tbody id="rows"></tbody></table>
<script>
"use strict";
const q = new URLSearchParams(location.search);
const url = "status.json" + (q.get("token") ? "?token=" + encodeURIComponent(q.get("token")) : "");
let refreshes = 0;
function card(label, value){const d=document.createElement("div");d.className="card";
  const b=document.createElement("b");b.textContent=value;d.append(b,label);return d;}
async function refresh(){
  try{
    const r = await fetch(url, {cache:"no-store"});
    if(!r.ok){document.getElementById("updated").textContent="status.json answered "+r.status;return;}
    const s = await r.json(); refreshes++;
    const t = s.tokens||{};
    document.getElementById("cards").replaceChildren(
      card("uptime (s)", s.uptime_s), card("held now", s.held), card("warms in flight", s.warms_in_flight),
      card("cache-read tokens", t.cache_read||0),
      card("cache-write tokens", (t.cache_write_5m||0)+(t.cache_write_1h||0)),
      card("$ spent", (s.dollars_spent||0).toFixed(4)), card("$ saved", (s.dollars_saved||0).toFixed(4)),
      card("warms wasted", s.warms_wasted||0), card("mismatches", s.warm_mismatches||0));
    document.getElementById("outcomes").replaceChildren(
      ...Object.entries(s.outcomes||{}).map(([k,v])=>card(k,v)));
    const hidden = s.view === "aggregate" && s.registry_size > 0;
    document.getElementById("hidden").textContent = hidden
      ? s.registry_size + " entries; rows are shown to the admin token (?token=) only" : "";
    document.getElementById("rows").replaceChildren(...(s.registry||[]).map(e=>{
      const tr=document.createElement("tr");
      for(const [v,c] of [[e.prefix,"code"],[e.state,e.state],[e.age_s,""],[e.uses,""],[e.expires_in_s??"",""]]){
        const td=document.createElement("td");
        if(c==="code"){const k=document.createElement("code");k.textContent=v;td.append(k);}
        else{td.textContent=v; if(c) td.className=c;}
        tr.append(td);}
      return tr;}));
    const up = s.upstream, ue = document.getElementById("upstream");
    const shared = " · one engine cache for every credential: a tenant's request reads what another warmed";
    ue.textContent = up ? "upstream: " + up.title + " (" + up.profile
      + (up.slots ? ", " + up.slots + " slots" : "") + ")" + (up.shared_cache ? shared : "") : "";
    const u = document.getElementById("updated");
    u.textContent = "updated " + new Date().toLocaleTimeString() + " · refresh #" + refreshes;
    u.dataset.refreshes = String(refreshes);
  }catch(e){document.getElementById("updated").textContent="unreachable: "+e;}
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
