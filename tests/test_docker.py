"""The Dockerfile and the compose sidecar, checked without a Docker engine.

The Dockerfile is parsed and held to its contract (slim base, non-root user, port, health check on
``/healthz`` without curl, entry point). Its install step is then replayed: the files it copies are
built into a fresh virtual environment, and the entry point and the health check command run
against each other. That needs pip to fetch the build backend (setuptools) once; it skips when
that is impossible. ``hadolint`` lints the file when it is on PATH.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker" / "compose.sidecar.yaml"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str

    def exec_form(self) -> list[str] | None:
        """The JSON-array (exec) form of CMD/ENTRYPOINT/HEALTHCHECK CMD, or None for shell form."""
        text = self.args
        if self.keyword == "HEALTHCHECK":
            text = text[text.index("CMD") + 3 :].strip() if "CMD" in text else ""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, list) and all(isinstance(v, str) for v in value) else None


def parse_dockerfile(text: str) -> list[list[Instruction]]:
    """Instructions grouped by stage (each list starts with its FROM); continuations joined."""
    logical: list[str] = []
    buffer = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        logical.append(buffer + line)
        buffer = ""
    stages: list[list[Instruction]] = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        ins = Instruction(keyword.upper(), args.strip())
        if ins.keyword == "FROM":
            stages.append([ins])
        else:
            assert stages, f"{ins.keyword} before FROM"
            stages[-1].append(ins)
    return stages


STAGES = parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))
FINAL = STAGES[-1]


def _all(stage: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in stage if i.keyword == keyword]


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = _all(stage, keyword)
    assert found, f"no {keyword} in the final stage"
    return found[-1]  # the last one wins in Docker


# --- the contract ----------------------------------------------------------------------------------
def test_every_stage_builds_on_a_slim_python_image() -> None:
    for stage in STAGES:
        image = stage[0].args.split()[0]
        assert re.fullmatch(r"python:3\.1[1-9](\.\d+)?-slim(-\w+)?(@sha256:[0-9a-f]{64})?", image), image


def test_final_stage_runs_as_a_non_root_user_created_in_the_image() -> None:
    user = _one(FINAL, "USER").args.split(":")[0]
    assert user not in ("root", "0")
    assert any(user in i.args and ("useradd" in i.args or "adduser" in i.args) for i in _all(FINAL, "RUN"))
    # The USER comes after every RUN: nothing later runs as root.
    last_run = max(n for n, i in enumerate(FINAL) if i.keyword == "RUN")
    assert last_run < FINAL.index(_one(FINAL, "USER"))


def test_final_stage_exposes_the_default_port() -> None:
    assert "8787" in _one(FINAL, "EXPOSE").args.split()


def test_healthcheck_asks_healthz_with_python_not_curl() -> None:
    check = _one(FINAL, "HEALTHCHECK")
    argv = check.exec_form()
    assert argv is not None and argv[0] == "python" and argv[1] == "-c", check.args
    assert "/healthz" in argv[2] and "urllib" in argv[2]
    assert "curl" not in check.args and "wget" not in check.args


def test_entry_point_serves_on_all_interfaces() -> None:
    entry = _one(FINAL, "ENTRYPOINT").exec_form()
    cmd = _all(FINAL, "CMD")
    argv = (entry or []) + (cmd[-1].exec_form() or [] if cmd else [])
    assert argv[:4] == ["specproxy", "serve", "--host", "0.0.0.0"], argv


def test_final_stage_installs_only_runtime_dependencies() -> None:
    installs = " ".join(i.args for i in _all(FINAL, "RUN") if "pip install" in i.args)
    assert installs, "the final stage installs nothing"
    assert "[demo]" not in installs and "[test]" not in installs and "requirements-dev" not in installs
    for stage in STAGES:
        for i in _all(stage, "RUN"):
            assert "apt-get install" not in i.args, "a build toolchain in the image: wheels exist for every dependency"


def _dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(rel: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def _copied_sources() -> list[str]:
    sources: list[str] = []
    for stage in STAGES:
        for ins in _all(stage, "COPY"):
            if "--from=" in ins.args:
                continue
            words = [w for w in shlex.split(ins.args) if not w.startswith("--")]
            sources += words[:-1]
    return sources


def test_every_copied_path_exists_and_is_not_dockerignored() -> None:
    patterns = _dockerignore()
    for src in _copied_sources():
        if any(c in src for c in "*?["):
            continue  # optional by design (README.md* matches nothing until the README exists)
        assert (ROOT / src).exists(), f"COPY {src}: no such path"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"


def test_dockerignore_keeps_history_caches_and_node_modules_out() -> None:
    patterns = _dockerignore()
    for rel in (".git", ".venv", "specproxy/__pycache__", "examples/typescript/node_modules", "tests"):
        assert _ignored(rel, patterns), rel
    assert not _ignored("specproxy/openapi.json", patterns)


def test_compose_sidecar_points_the_app_sdk_at_specproxy() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
    doc = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services = doc["services"]
    proxy, app = services["specproxy"], services["app"]
    assert (COMPOSE.parent / proxy["build"]["context"] / proxy["build"]["dockerfile"]).resolve() == DOCKERFILE
    assert app["environment"]["ANTHROPIC_BASE_URL"] in ("http://specproxy:8787", "http://127.0.0.1:8787")
    assert app["depends_on"]["specproxy"]["condition"] == "service_healthy"
    for volume in app.get("volumes", []):
        host = volume.split(":")[0]
        assert (COMPOSE.parent / host).exists(), volume


def test_hadolint_finds_nothing_to_fix() -> None:
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not on PATH")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the install step, replayed -------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(120)
def test_image_install_step_yields_a_working_entry_point_and_health_check(tmp_path: Path) -> None:
    """Build what the Dockerfile copies into a fresh venv; serve; the HEALTHCHECK command passes.

    Dependencies come from this interpreter (its site-packages, venv or not) to stay fast and offline;
    set ``SPECPROXY_TEST_DOCKER_INSTALL=1`` to install them from the index into an isolated venv.
    """
    context = tmp_path / "context"
    context.mkdir()
    for src in _copied_sources():
        for path in ROOT.glob(src) if any(c in src for c in "*?[") else [ROOT / src]:
            if path.is_dir():
                shutil.copytree(path, context / path.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif path.exists():
                shutil.copy(path, context / path.name)
    full = os.environ.get("SPECPROXY_TEST_DOCKER_INSTALL") == "1"
    venv = tmp_path / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", *([] if full else ["--system-site-packages"]), str(venv)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    if not full:
        # ``--system-site-packages`` exposes the *base* interpreter's packages; when the suite itself runs in a
        # virtualenv its dependencies live elsewhere, so point the fresh venv at this interpreter's paths too.
        fresh_site = next(venv.glob("lib/python*/site-packages"), venv / "Lib" / "site-packages")
        ours = [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]
        (fresh_site / "_specproxy_test_deps.pth").write_text("\n".join(ours) + "\n")
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    pip = [str(bindir / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    done = subprocess.run(
        [*pip, *([] if full else ["--no-deps"]), str(context)], capture_output=True, text=True, timeout=100, check=False
    )
    if done.returncode != 0:
        if "Could not find a version" in done.stderr or "connection" in done.stderr.lower():
            pytest.skip(f"pip could not fetch the build backend: {done.stderr.strip()[-200:]}")
        raise AssertionError(done.stderr)

    python = str(bindir / "python")
    located = subprocess.run(
        [python, "-c", "import specproxy, importlib.resources as r; print(specproxy.__file__); "
         "print(r.files('specproxy').joinpath('openapi.json').is_file())"],
        capture_output=True, text=True, timeout=30, check=True, cwd=tmp_path,
    ).stdout.split()  # fmt: skip
    assert located[0].startswith(str(venv)), "the import did not come from the fresh install"
    assert located[1] == "True", "openapi.json is missing from the installed package"
    assert subprocess.run([str(bindir / "specproxy"), "--help"], capture_output=True, timeout=30).returncode == 0

    port = _free_port()
    entry = _one(FINAL, "ENTRYPOINT").exec_form() or []
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECPROXY_")}
    env.update(SPECPROXY_PORT=str(port), PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}")
    server = subprocess.Popen(
        [str(bindir / entry[0]), *entry[1:], "--upstream", "http://127.0.0.1:9"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        check = _one(FINAL, "HEALTHCHECK").exec_form() or []
        healthy = False
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and server.poll() is None:
            probe = subprocess.run([python, *check[1:]], env=env, capture_output=True, timeout=10, check=False)
            if probe.returncode == 0:
                healthy = True
                break
            time.sleep(0.2)
        assert healthy, f"the HEALTHCHECK never passed; server said: {server.stdout.read() if server.poll() else ''}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        if server.stdout is not None:
            server.stdout.close()
