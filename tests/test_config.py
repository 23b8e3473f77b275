"""Settings: every invalid value is refused naming its key, from each source; precedence; redaction.

The invalid values are generated from the ``Settings`` fields themselves (type, bounds, metadata),
so a field added later is covered without touching this file; a field of a type the generator does
not know fails ``test_every_field_has_an_invalid_value_from_each_source``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from specproxy import cli
from specproxy.config import FIELDS, REDACTED, ConfigError, Settings, load_settings, render_toml

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "config" / "specproxy.toml"
HINTS = typing.get_type_hints(Settings)
SOURCES = ("env", "file", "flag")
REGENERATE = (
    'regenerate it: python -c "from specproxy.config import Settings, render_toml; '
    "print(render_toml(Settings()), end='')\" > config/specproxy.toml"
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No ./config/specproxy.toml and no SPECPROXY_* variables leak in from the developer's shell."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("SPECPROXY_"):
            monkeypatch.delenv(name)


# --- invalid values, generated from the fields ---------------------------------------------------
def _below_min(meta: typing.Mapping[str, Any], kind: type) -> list[Any]:
    out: list[Any] = []
    if "min" in meta:
        low = meta["min"]
        out.append(low - 1 if kind is int else (low - 1 if low >= 1 else (0.0 if low > 0 else -0.5)))
    if "max" in meta:
        out.append(meta["max"] + 1)
    return out


def invalid_values(name: str, source: str) -> list[Any]:
    """Values of setting ``name`` that ``source`` must refuse (empty when the source cannot express one)."""
    hint = HINTS[name]
    meta = FIELDS[name].metadata
    text = source == "env"  # env values are always strings
    if name == "upstream":
        return ["ftp://example.invalid", "not a url"] + ([] if text else [5])
    if get_origin(hint) is Literal:
        return ["nonsense"] + ([] if text else [3])
    if hint is bool:
        return ["maybe", "2"] + ([] if text else [1])
    if hint is int:
        bad = ["abc", "1.5"] + [str(v) for v in _below_min(meta, int)]
        return bad + ([] if text else [1.5, True, *_below_min(meta, int)])
    if hint is float:
        bad = ["abc", ""] + [str(v) for v in _below_min(meta, float)]
        return bad + ([] if text else [True, *_below_min(meta, float)])
    if hint is str:
        return [] if text else [5, ["a"]]
    if hint == tuple[str, ...]:
        return [] if text else [5, [1, 2], {"a": 1}]
    if hint == tuple[tuple[str, float, float], ...]:  # rows like ["model-prefix", 3.0, 15.0]
        rows = ['[["m", -1, 2]]', '[["m", 1]]', "[[1, 2, 3]]"]
        return ["not json", *rows] if text else [5, [["m", -1, 2]], [["m", 1]], [[1, 2, 3]], [["m", "1", 2]]]
    return []  # an unknown type: test_every_field_has_an_invalid_value_from_each_source names it


def _load(name: str, value: Any, source: str, tmp_path: Path) -> Settings:
    if source == "env":
        return load_settings(None, env={f"SPECPROXY_{name.upper()}": value})
    if source == "file":
        path = tmp_path / "bad.toml"
        path.write_text(_toml_line(name, value), encoding="utf-8")
        return load_settings(path, env={})
    return load_settings(None, env={}, overrides={name: value})


def _toml_line(name: str, value: Any) -> str:
    if isinstance(value, dict):
        return f"[{name}]\n" + "".join(f"{k} = {v!r}\n" for k, v in value.items())
    if isinstance(value, list):
        return f"{name} = {json.dumps(value)}\n"
    if isinstance(value, bool):
        return f"{name} = {'true' if value else 'false'}\n"
    if isinstance(value, str):
        return f'{name} = "{value}"\n'
    return f"{name} = {value!r}\n"


CASES = [
    pytest.param(name, source, value, id=f"{name}-{source}-{value!r}")
    for name in FIELDS
    for source in SOURCES
    if not (source == "file" and FIELDS[name].metadata.get("env_only"))
    for value in invalid_values(name, source)
]


@pytest.mark.parametrize(("name", "source", "value"), CASES)
def test_an_invalid_value_is_refused_naming_the_setting(name: str, source: str, value: Any, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(name, value, source, tmp_path)
    assert f"'{name}'" in str(caught.value)


def test_every_field_has_an_invalid_value_from_each_source() -> None:
    """A new field of a type this file cannot yet break shows up here by name."""
    missing = [
        f"{name} ({source})"
        for name in FIELDS
        for source in SOURCES
        if not invalid_values(name, source)
        and not (source == "file" and FIELDS[name].metadata.get("env_only"))
        and not (source == "env" and HINTS[name] in (str, tuple[str, ...]))  # any string is a valid one
    ]
    assert not missing, "teach invalid_values() about: " + ", ".join(missing)


@pytest.mark.parametrize("source", SOURCES)
def test_redis_url_is_checked_when_the_redis_registry_is_chosen(source: str, tmp_path: Path) -> None:
    bad = {"registry": "redis", "redis_url": "http://not-redis"}
    with pytest.raises(ConfigError, match="'redis_url'"):
        if source == "env":
            load_settings(None, env={f"SPECPROXY_{k.upper()}": v for k, v in bad.items()})
        elif source == "file":
            path = tmp_path / "r.toml"
            path.write_text("".join(_toml_line(k, v) for k, v in bad.items()), encoding="utf-8")
            load_settings(path, env={})
        else:
            load_settings(None, env={}, overrides=bad)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_non_finite_number_is_refused_naming_the_setting(value: str) -> None:
    accepted = []
    for name in (n for n in FIELDS if HINTS[n] is float):
        try:
            load_settings(None, env={f"SPECPROXY_{name.upper()}": value})
        except ConfigError as exc:
            assert f"'{name}'" in str(exc)
        else:
            accepted.append(name)
    assert not accepted, f"{value} accepted for: {', '.join(accepted)}"


def test_an_unknown_key_in_a_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("max_hodl = 3\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="'max_hodl'"):
        load_settings(path, env={})


def test_an_unknown_flag_setting_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="'max_hodl'"):
        load_settings(None, env={}, overrides={"max_hodl": 3})


def test_an_invalid_flag_on_the_command_line_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["config", "--port", "70000"]) == 2
    assert "'port'" in capsys.readouterr().err


# --- secrets ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n, f in FIELDS.items() if f.metadata.get("env_only")])
def test_an_env_only_secret_is_refused_in_a_file(name: str, tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    value: Any = ["tok"] if HINTS[name] == tuple[str, ...] else "sk-secret"
    path.write_text(_toml_line(name, value), encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_settings(path, env={})
    assert f"'{name}'" in str(caught.value)
    assert f"SPECPROXY_{name.upper()}" in str(caught.value)
    assert "sk-secret" not in str(caught.value)


def test_env_only_secrets_are_accepted_from_the_environment() -> None:
    s = load_settings(None, env={"SPECPROXY_UPSTREAM_API_KEY": "sk-x", "SPECPROXY_CLIENT_TOKENS": "a, b"})
    assert s.upstream_api_key == "sk-x" and s.client_tokens == ("a", "b")


def test_specproxy_config_prints_secrets_redacted(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secrets = {
        "SPECPROXY_ADMIN_TOKEN": "admin-s3cret",
        "SPECPROXY_UPSTREAM_API_KEY": "sk-ant-s3cret",
        "SPECPROXY_CLIENT_TOKENS": "client-s3cret-1,client-s3cret-2",
        "SPECPROXY_REGISTRY": "redis",
        "SPECPROXY_REDIS_URL": "redis://user:redis-s3cret@cache:6379/0",
    }
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert f'admin_token = "{REDACTED}"' in out
    assert f'upstream_api_key = "{REDACTED}"' in out
    assert "redis://user:***@cache:6379/0" in out
    tomllib.loads(out)  # still a valid config file


def test_specproxy_config_runs_as_a_command() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "specproxy.cli", "config", "--port", "9999"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert tomllib.loads(done.stdout)["port"] == 9999


# --- precedence ----------------------------------------------------------------------------------
def test_precedence_is_flag_then_env_then_file_then_default(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("port = 1111\nmax_hold = 1.0\n", encoding="utf-8")
    env = {"SPECPROXY_PORT": "2222"}
    assert load_settings(None, env={}).port == 8787
    assert load_settings(path, env={}).port == 1111
    assert load_settings(path, env=env).port == 2222
    assert load_settings(path, env=env, overrides={"port": 3333}).port == 3333
    # An override of None (a flag not given) leaves the lower layers alone.
    assert load_settings(path, env=env, overrides={"port": None}).port == 2222
    assert load_settings(path, env=env).max_hold == 1.0


def test_the_config_file_comes_from_specproxy_config_or_the_working_directory(tmp_path: Path) -> None:
    named = tmp_path / "named.toml"
    named.write_text("port = 4444\n", encoding="utf-8")
    assert load_settings(None, env={"SPECPROXY_CONFIG": str(named)}).port == 4444
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "specproxy.toml").write_text("port = 5555\n", encoding="utf-8")
    assert load_settings(None, env={}).port == 5555


def test_a_missing_named_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_settings(tmp_path / "absent.toml", env={})


# --- the committed config/specproxy.toml -----------------------------------------------------------
def test_committed_config_is_the_rendered_defaults() -> None:
    assert COMMITTED.read_text(encoding="utf-8") == render_toml(Settings()), REGENERATE


def test_committed_config_lists_every_setting_with_its_help_and_default() -> None:
    text = COMMITTED.read_text(encoding="utf-8")
    data = tomllib.loads(text)
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        assert f"# {f.metadata['help']}" in text, f.name
        default = getattr(defaults, f.name)
        if f.metadata.get("env_only"):
            assert f.name not in data
            assert f"# {f.name} = " in text and f"SPECPROXY_{f.name.upper()}" in text
        else:
            value = data[f.name]
            assert (tuple(value) if isinstance(value, list) else value) == default, f.name
    assert set(data) == {n for n, f in FIELDS.items() if not f.metadata.get("env_only")}


def test_committed_config_loads_to_the_defaults() -> None:
    assert load_settings(COMMITTED, env={}) == Settings()


def test_every_literal_choice_is_accepted() -> None:
    for name in FIELDS:
        if get_origin(HINTS[name]) is Literal:
            for choice in get_args(HINTS[name]):
                assert getattr(load_settings(None, env={}, overrides={name: choice}), name) == choice


def test_readme_configuration_table_lists_every_setting_with_its_env_var_and_default() -> None:
    readme = next((p for p in (ROOT / "README.md", ROOT / "docs" / "README-draft.md") if p.is_file()), None)
    if readme is None:
        pytest.skip("no README.md (nor docs/README-draft.md) yet")
    rows = {
        line.split("|")[1].strip().strip("`"): line
        for line in readme.read_text(encoding="utf-8").splitlines()
        if line.startswith("| `")
    }
    defaults = Settings()
    for name in FIELDS:
        assert name in rows, f"{readme.name}: no configuration row for {name}"
        value = getattr(defaults, name)
        shown = json.dumps(list(value) if isinstance(value, tuple) else value)
        assert f"SPECPROXY_{name.upper()}" in rows[name] and f"`{shown}`" in rows[name], rows[name]
