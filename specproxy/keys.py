"""Typed keys of the proxy application's state, shared by its handler modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from specproxy.coalesce import Coalescer
from specproxy.config import Settings
from specproxy.credentials import Credentials
from specproxy.forward import Forwarder
from specproxy.metrics import Metrics
from specproxy.registry import Registry
from specproxy.speculate import Speculator
from specproxy.warmer import Warmer

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", Registry)
COALESCER = web.AppKey("coalescer", Coalescer)
FORWARDER = web.AppKey("forwarder", Forwarder)
WARMER = web.AppKey("warmer", Warmer)
STARTED = web.AppKey("started", float)
METRICS = web.AppKey("metrics", Metrics)
CREDENTIALS = web.AppKey("credentials", Credentials)
SPECULATOR = web.AppKey("speculator", Speculator)
LOG = web.RequestKey("log", dict)  # the fields of this request's log line

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
