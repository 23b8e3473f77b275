"""The proxy's own read-only endpoints: ``/healthz``, ``/metrics``, ``/status``, ``/status.json``, ``/openapi.json``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from specproxy import __version__, status
from specproxy.keys import COALESCER, CREDENTIALS, METRICS, REGISTRY, SETTINGS, STARTED, WARMER
from specproxy.serving import SERVER_STATS
from specproxy.upstream_profile import UPSTREAM

OPENAPI_PATH = Path(__file__).with_name("openapi.json")


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data), content_type="application/json")


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI document of the proxy's own endpoints."""
    return web.Response(body=OPENAPI_PATH.read_bytes(), content_type="application/json")


async def metrics_endpoint(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    app = request.app
    app[METRICS].registry_entries.set(len(app[REGISTRY]))
    app[METRICS].degraded.set(1 if getattr(app[REGISTRY], "degraded", False) else 0)
    return web.Response(body=app[METRICS].render(), content_type="text/plain", charset="utf-8",
                        headers={"X-Content-Type-Options": "nosniff"})


def _view(request: web.Request) -> tuple[status.View, str | None]:
    settings = request.app[SETTINGS]
    return status.decide_view(request, admin_token=settings.admin_token, host=settings.host,
                              tenant_of=request.app[CREDENTIALS].tenant)


def _status_data(app: web.Application, view: status.View = status.View.ADMIN, tenant: str | None = None
                 ) -> dict[str, Any]:
    rows = app[REGISTRY].snapshot(tenant if view is status.View.TENANT else None)
    return status.payload(
        uptime=time.monotonic() - app[STARTED],
        summary=app[METRICS].summary(),
        registry=rows,
        held=app[COALESCER].held,
        warms_in_flight=app[WARMER].in_flight,
        view=view,
        extra={"upstream": app[UPSTREAM].public()} if UPSTREAM in app else None,  # upstream_profile
    )


async def status_json(request: web.Request) -> web.Response:
    """``GET /status.json``: what the status page shows, as JSON (rows by view: see specproxy.status)."""
    return json_response(_status_data(request.app, *_view(request)))


async def status_page(request: web.Request) -> web.Response:
    """``GET /status``: a self-refreshing HTML page; no external assets."""
    _view(request)
    return web.Response(text=status.PAGE, content_type="text/html",
                        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: liveness and a little state, never secrets."""
    app = request.app
    return json_response(
        {
            "status": "ok",
            "version": __version__,
            "registry": app[SETTINGS].registry,
            "registry_degraded": bool(getattr(app[REGISTRY], "degraded", False)),
            "held": app[COALESCER].held,
            "warms_in_flight": app[WARMER].in_flight,
            "uptime_s": round(time.monotonic() - app[STARTED], 3),
            "connections": app[SERVER_STATS].as_json() if SERVER_STATS in app else None,
        }
    )


