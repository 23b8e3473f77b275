"""``GET /status`` (a self-refreshing HTML page, no external assets) and ``GET /status.json``.

Both show uptime, outcome counts, tokens and dollars, and the live registry by prefix id, state,
age, uses and time to expiry: never content, never a credential or its digest. When an admin
token is configured both require it (``Authorization: Bearer …`` or ``?token=…``).
"""

from __future__ import annotations

import hmac
from typing import Any, Final

from aiohttp import web

from specproxy.errors import AuthenticationFailed

MAX_ROWS: Final = 500


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
            warms_in_flight: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The data both the page and ``/status.json`` show."""
    out = {
        "uptime_s": round(uptime, 1),
        "held": held,
        "warms_in_flight": warms_in_flight,
        **summary,
        "registry_size": len(registry),
        "registry": registry[:MAX_ROWS],
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
<h2>Warm registry</h2>
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
