"""Settings: one frozen object built once from defaults, a TOML file, ``SPECPROXY_*`` env vars and flags.

Precedence, highest first: command-line flags > ``SPECPROXY_*`` environment > config file > defaults.
Every field's metadata carries its one-line help (shown by ``specproxy config`` and in
``config/specproxy.toml``), its bounds, and whether it is a secret (redacted when printed) or may
only come from the environment (never from a file that could be committed).
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args, get_origin

ENV_PREFIX: Final = "SPECPROXY_"
DEFAULT_CONFIG_PATH: Final = Path("config/specproxy.toml")
REDACTED: Final = "***"


class ConfigError(ValueError):
    """A setting has an invalid value; the message names the key and what is accepted."""


def _f(default: Any, help: str, **meta: Any) -> Any:
    meta["help"] = help
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class Settings:
    """The proxy's effective configuration. Build with :func:`load_settings`."""

    # --- server ---
    host: str = _f("127.0.0.1", "address to listen on (0.0.0.0 inside a container)")
    port: int = _f(8787, "port to listen on", min=0, max=65535)
    upstream: str = _f("https://api.anthropic.com", "the Messages API base URL requests are forwarded to")
    upstream_profile: Literal["anthropic", "auto", "vllm", "sglang", "llamacpp"] = _f("anthropic", "what serves the upstream (how warms are sent, usage read, prefixes matched); auto asks it at start-up")  # noqa: E501  (engines: specproxy/upstream_profile.py)
    log_level: Literal["debug", "info", "warning", "error"] = _f("info", "log level")
    log_format: Literal["text", "json"] = _f("text", "log line format: text for a terminal, json for machines")
    # --- holding and warming ---
    max_hold: float = _f(30.0, "seconds a request may wait for an in-flight warm before it goes anyway", min=0)
    warm_timeout: float = _f(300.0, "seconds a warm may take upstream before it is marked failed", min=0.001)
    failed_ttl: float = _f(10.0, "seconds a failed warm is remembered (a retry storm is not re-sent)", min=0)
    rewarm_margin: float = _f(
        30.0, "a warm entry this close (seconds) to expiry may be warmed again by /prewarm", min=0
    )
    cache_ttl_scale: float = _f(
        1.0, "multiplies the upstream's 5m/1h cache TTLs (match a time-scaled simulator; 1 for the real API)",
        min=0.000001,
    )
    volatile_system_prefixes: tuple[str, ...] = _f(
        ("x-anthropic-billing-header:",),
        "system text blocks starting with these strings change per request and are left out of prefix identity",
    )
    # --- limits ---
    max_body_bytes: int = _f(32 * 1024 * 1024, "largest request body accepted, in bytes (413 above)", min=1)
    registry_max_entries: int = _f(100_000, "warm registry entries kept; the oldest is evicted first", min=1)
    # per credential: no tenant can evict another's warms by filling the registry (at least one warm's 4 breakpoints)
    max_entries_per_tenant: int = _f(
        25_000, "warm registry entries one credential may hold; above it, its own oldest is evicted first", min=4
    )
    max_held_total: int = _f(10_000, "requests held at once in total; more go upstream unheld", min=0)
    max_held_per_tenant: int = _f(2_000, "requests held at once per credential; more go upstream unheld", min=0)
    max_held_bytes: int = _f(
        256 * 1024 * 1024, "request body bytes held at once in total; a request over it goes upstream unheld", min=0
    )
    max_warms_in_flight_per_tenant: int = _f(
        32, "warms in flight at once per credential; /prewarm answers 429 above", min=1
    )
    warms_per_minute_per_tenant: int = _f(600, "warms started per minute per credential; 429 above", min=1)
    upstream_connect_timeout: float = _f(10.0, "seconds to connect to the upstream", min=0.001)
    upstream_read_timeout: float = _f(600.0, "seconds of upstream silence before a request fails", min=0.001)
    drain_timeout: float = _f(30.0, "on SIGTERM, seconds open streams may take to finish", min=0)
    # --- client connections and the upstream pool (defaults a sidecar can live with) ---
    client_header_timeout: float = _f(
        10.0, "seconds a client may take to send a request's headers (408 and closed after)", min=0.001
    )
    client_body_timeout: float = _f(
        30.0, "seconds a request body may go without a byte while the proxy reads it (408 after)", min=0.001
    )
    client_idle_timeout: float = _f(75.0, "seconds an idle keep-alive client connection is kept open", min=0.001)
    client_max_connections: int = _f(
        0, "client connections at most; past it the oldest one still sending headers is closed "
        "(0: fit the open-files limit)", min=0,
    )
    upstream_max_connections: int = _f(
        1024, "pooled upstream connections at most, lowered to fit the open-files limit (0: as many as fit)", min=0
    )
    upstream_idle_timeout: float = _f(15.0, "seconds an idle pooled upstream connection is kept", min=0.001)
    upstream_pool_timeout: float = _f(
        30.0, "seconds a request waits for a free upstream connection when all are busy, then 529 "
        "(plus upstream_connect_timeout for the connect itself)", min=0
    )
    credential_state_max: int = _f(
        10_000, "credentials whose per-credential limits are tracked at once (least recent forgotten first)", min=1
    )
    # --- registry backend ---
    registry: Literal["memory", "redis"] = _f("memory", "where warm state lives: memory, or redis to share it")
    redis_url: str = _f("redis://127.0.0.1:6379/0", "Redis URL when registry = redis", secret_url=True)
    # --- observability ---
    metrics_tenant_label: bool = _f(False, "label metrics with the credential digest (never the credential)")
    admin_token: str = _f("", "token required by /status and /status.json when set", secret=True)
    pricing: tuple[tuple[str, float, float], ...] = _f(
        (), 'price overrides, $ per million tokens: [["model-prefix", input, output], ...] (built-ins otherwise)'
    )
    # --- credentials ---
    upstream_api_key: str = _f(
        "", "injection mode: the key the proxy sends upstream (env SPECPROXY_UPSTREAM_API_KEY only)",
        secret=True, env_only=True,
    )
    client_tokens: tuple[str, ...] = _f(
        (), "injection mode: tokens clients present as x-api-key (env only)", secret=True, env_only=True
    )
    # --- speculation without being asked ---
    coalesce: bool = _f(True, "hold cold requests behind an in-flight request with the same prefix")
    next_turn: bool = _f(False, "after each response, warm the conversation extended with the reply")
    keep_warm: bool = _f(False, "re-warm recently used prefixes before their TTL runs out")
    keep_warm_idle: float = _f(900.0, "keep-warm stops after a prefix is unused this many seconds", min=0)
    keep_warm_margin: float = _f(30.0, "keep-warm re-warms this many seconds before the TTL runs out", min=0.001)
    keep_warm_max_per_tenant: int = _f(20, "prefixes kept warm at once per credential", min=0)
    speculation_body_bytes: int = _f(
        64 * 1024 * 1024, "bytes of request bodies kept for keep-warm and next-turn re-sends (oldest dropped)", min=0
    )
    inject_breakpoints: bool = _f(False, "add cache_control to requests without one that match a warm")
    # --- OpenTelemetry traces (specproxy.tracing; needs the otel extra). The OpenTelemetry SDK's own
    # OTEL_* variables apply too: OTEL_EXPORTER_OTLP_HEADERS, OTEL_TRACES_SAMPLER, OTEL_RESOURCE_ATTRIBUTES...
    otel_enabled: bool = _f(False, "export OpenTelemetry traces over OTLP/HTTP (pip install 'specproxy[otel]')")
    otel_endpoint: str = _f(
        "", "OTLP/HTTP endpoint, e.g. http://collector:4318 (empty: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, "
        "else http://localhost:4318)", secret_url=True,
    )
    otel_service_name: str = _f("", "service.name of the traces (empty: OTEL_SERVICE_NAME, else specproxy)")

    def public_dict(self) -> dict[str, Any]:
        """The settings as a dict with secrets redacted: safe to print, log or serve."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("secret"):
                value = REDACTED if value else value
            elif f.metadata.get("secret_url"):
                value = redact_url(value)
            out[f.name] = [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
        return out


def redact_url(url: str) -> str:
    """``redis://user:pw@host`` → ``redis://user:***@host``."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:{REDACTED}@{host}"


FIELDS: Final = {f.name: f for f in dataclasses.fields(Settings)}
_HINTS: Final = typing.get_type_hints(Settings)


def _describe(name: str) -> str:
    hint = _HINTS[name]
    if get_origin(hint) is Literal:
        return "one of: " + ", ".join(str(a) for a in get_args(hint))
    meta = FIELDS[name].metadata
    bounds = ""
    if "min" in meta:
        bounds += f" >= {meta['min']}"
    if "max" in meta:
        bounds += f" <= {meta['max']}"
    kind = {bool: "true or false", int: "a whole number", float: "a number", str: "a string"}.get(hint)
    if name == "pricing":
        kind = 'a list of ["model-prefix", input $/MTok, output $/MTok] rows (JSON in env vars)'
    elif kind is None:
        kind = "a list of strings (comma-separated in env vars)"
    return kind + bounds


def _convert(name: str, raw: Any, source: str) -> Any:
    """Convert ``raw`` (a TOML value or an env string) to the field's type, or raise ConfigError."""
    hint = _HINTS[name]
    meta = FIELDS[name].metadata

    def bad() -> ConfigError:
        return ConfigError(
            f"invalid value for setting '{name}' (from {source}): {raw!r}; accepted: {_describe(name)}"
        )

    value: Any
    if get_origin(hint) is Literal:
        value = str(raw).lower() if isinstance(raw, str) else raw
        if value not in get_args(hint):
            raise bad()
        return value
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        raise bad()
    if hint is int or hint is float:
        if isinstance(raw, bool):
            raise bad()
        try:
            value = hint(raw) if not (hint is int and isinstance(raw, float)) else None
        except (TypeError, ValueError):
            raise bad() from None
        if value is None or value != value or value in (float("inf"), float("-inf")):  # NaN, infinities
            raise bad()
        if "min" in meta and value < meta["min"]:
            raise bad()
        if "max" in meta and value > meta["max"]:
            raise bad()
        return value
    if hint is str:
        if not isinstance(raw, str):
            raise bad()
        return raw
    if name == "pricing":
        return _convert_pricing(raw, bad)
    # tuple[str, ...]
    if isinstance(raw, str):
        return tuple(s.strip() for s in raw.split(",") if s.strip())
    if isinstance(raw, (list, tuple)) and all(isinstance(s, str) for s in raw):
        return tuple(raw)
    raise bad()


def _convert_pricing(raw: Any, bad: Any) -> tuple[tuple[str, float, float], ...]:
    if isinstance(raw, str):
        import json

        try:
            raw = json.loads(raw)
        except ValueError:
            raise bad() from None
    if not isinstance(raw, (list, tuple)):
        raise bad()
    out: list[tuple[str, float, float]] = []
    for row in raw:
        ok = isinstance(row, (list, tuple)) and len(row) == 3 and isinstance(row[0], str)
        if not ok or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in row[1:]):
            raise bad()
        out.append((row[0], float(row[1]), float(row[2])))
    return tuple(out)


def default_config_path(env: Mapping[str, str]) -> Path | None:
    """The config file to read when none is named: ``SPECPROXY_CONFIG``, else ./config/specproxy.toml."""
    named = env.get(ENV_PREFIX + "CONFIG")
    if named:
        return Path(named)
    return DEFAULT_CONFIG_PATH if DEFAULT_CONFIG_PATH.is_file() else None


def load_settings(
    config_file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    read_default_file: bool = True,
) -> Settings:
    """Build the settings: defaults < file < ``SPECPROXY_*`` env < ``overrides`` (flags).

    Raises :class:`ConfigError` naming the first bad key.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}

    path = Path(config_file) if config_file else (default_config_path(env) if read_default_file else None)
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        for key, raw in data.items():
            if key not in FIELDS:
                raise ConfigError(f"unknown setting '{key}' in {path}; known: {', '.join(FIELDS)}")
            if FIELDS[key].metadata.get("env_only"):
                raise ConfigError(
                    f"setting '{key}' is a secret and may only come from the environment "
                    f"({ENV_PREFIX}{key.upper()}), never from a config file"
                )
            values[key] = _convert(key, raw, str(path))

    for key in FIELDS:
        env_name = ENV_PREFIX + key.upper()
        if env_name in env:
            values[key] = _convert(key, env[env_name], env_name)

    for key, raw in (overrides or {}).items():
        if raw is None:
            continue
        if key not in FIELDS:
            raise ConfigError(f"unknown setting '{key}'")
        values[key] = _convert(key, raw, f"--{key.replace('_', '-')}")

    settings = Settings(**values)
    _check(settings)
    return settings


def _check(s: Settings) -> None:
    """Cross-field rules that no single value can break."""
    if not s.upstream.startswith(("http://", "https://")):
        raise ConfigError(f"invalid value for setting 'upstream': {s.upstream!r}; accepted: an http(s) URL")
    if s.registry == "redis" and not s.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("invalid value for setting 'redis_url'; accepted: a redis://, rediss:// or unix:// URL")
    if s.otel_endpoint and not s.otel_endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"invalid value for setting 'otel_endpoint': {s.otel_endpoint!r}; accepted: an http(s) URL")
    if s.upstream_api_key and not s.client_tokens and s.host not in ("127.0.0.1", "localhost", "::1"):
        raise ConfigError(
            "setting 'upstream_api_key' (injection mode) on a non-loopback host needs 'client_tokens': "
            "otherwise anyone who reaches the proxy spends your key"
        )


def render_toml(settings: Settings) -> str:
    """The settings as a commented TOML document (secrets redacted)."""
    lines: list[str] = []
    public = settings.public_dict()
    for name, f in FIELDS.items():
        lines.append(f"# {f.metadata['help']}")
        value = public[name]
        text = _toml_value(value)
        if f.metadata.get("env_only"):
            lines.append(f"# {name} = {text}   (environment only: {ENV_PREFIX}{name.upper()})")
        else:
            lines.append(f"{name} = {text}")
        lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
