"""sspry as users install it: a wheel built from a copy of the source (so the checkout gets no build/ or
*.egg-info), installed (not editable) with its dependencies into a fresh virtual environment, and run from
a directory outside the checkout — the local commands, then a server with the remote commands. The
editable install the rest of the suite runs on finds every module in the checkout, so only this test
sees a package missing from the wheel."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# never copied into the build: at the top, version control, environments, build output, work directories;
# anywhere, caches
TOP_JUNK = {".git", ".venv", "venv", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis"}
TOP_JUNK |= {"demo-work", "bench-work"}
CACHES = ("__pycache__", ".pyc", ".nbi", ".nbc")


def junk(directory: str, names: list[str]) -> set[str]:
    top = Path(directory) == REPO
    return {n for n in names if n.endswith(CACHES) or (top and (n in TOP_JUNK or n.endswith(".egg-info")))}


NOT_SHIPPED = {"tests"}  # top-level packages that stay in the checkout
TOKEN = "sspry-wheel-token-5f0c7e1d9a"
INSTALL_TIMEOUT = 900
COMMAND_TIMEOUT = 300


def source_files(source: Path) -> set[str]:
    """Every file the wheel must hold, as its path in the wheel: everything under sspry/ and under each
    other top-level package (server/ -> sspry/server/, ...) but caches. Data files count too: one left out
    of the wheel fails the test like a module would."""
    roots = {"sspry": source / "sspry"}
    for child in sorted(source.iterdir()):
        if child.is_dir() and child.name not in NOT_SHIPPED | {"sspry"} and (child / "__init__.py").exists():
            roots[f"sspry/{child.name}"] = child
    expected = set()
    for prefix, root in roots.items():
        for directory, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if not d.endswith(CACHES)]
            relative = Path(directory).relative_to(root)
            expected.update(
                f"{prefix}/{(relative / name).as_posix()}" for name in files if not name.endswith(CACHES)
            )
    return expected


def run(
    env: dict[str, str], cwd: Path, *command: str | Path, timeout: float = COMMAND_TIMEOUT
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (command, result.stdout, result.stderr)
    return result


def candidate_ids(output: str) -> list[str]:
    (rule,) = json.loads(output)["rules"]
    assert rule["candidate_count"] == len(rule["candidates"]), rule
    return [candidate["source_id"] for candidate in rule["candidates"]]


def start_server(env: dict[str, str], cwd: Path, sspry: Path, root: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [str(sspry), "serve", "--root", str(root), "--addr", "127.0.0.1:0"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], COMMAND_TIMEOUT)
    line = process.stdout.readline() if ready else ""
    match = re.search(r"sspry server listening on (\S+)", line)
    if not match:
        process.kill()
        raise AssertionError(f"server did not start: {line!r} {process.communicate(timeout=60)}")
    return process, match.group(1)


def test_wheel_installs_and_runs(tmp_path: Path) -> None:
    started = time.monotonic()
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=junk)
    venv = tmp_path / "venv"
    python, sspry = venv / "bin" / "python", venv / "bin" / "sspry"
    work = tmp_path / "work"  # every command runs here, outside the checkout
    work.mkdir()
    assert not work.resolve().is_relative_to(REPO)
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"

    run(env, work, sys.executable, "-m", "venv", venv)
    pip = (python, "-m", "pip", "--quiet")
    dist = tmp_path / "dist"
    run(env, work, *pip, "wheel", "--no-deps", "-w", dist, source, timeout=INSTALL_TIMEOUT)
    (wheel,) = dist.glob("sspry-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        missing = source_files(source) - set(archive.namelist())
    assert not missing, f"files of the source tree's packages not in the wheel: {sorted(missing)}"

    # not editable, with its dependencies; the modules then come from the venv, not from the checkout
    run(env, work, *pip, "install", wheel, timeout=INSTALL_TIMEOUT)
    imports = "import sspry, sspry.v1, sspry.server, sspry.client; print(sspry.__file__)"
    where = run(env, work, python, "-c", imports).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    data = work / "data"
    data.mkdir()
    hit, miss = data / "hit.txt", data / "miss.bin"
    hit.write_bytes(f"a file that carries {TOKEN} in the middle\n".encode() * 4)
    miss.write_bytes(random.Random(7).randbytes(8192))
    expected = [hashlib.sha256(hit.read_bytes()).hexdigest()]
    rule = work / "r.yar"
    rule.write_text(f'rule wheel_token {{ strings: $a = "{TOKEN}" condition: $a }}\n')

    run(env, work, sspry, "rule-check", "--rule", rule)
    run(env, work, python, "-m", "sspry", "init", "--root", "db", "--store-path")
    run(env, work, sspry, "local", "index", "--root", "db", hit, miss)
    found = run(env, work, sspry, "local", "search", "--root", "db", "--rule", rule, "--json")
    assert candidate_ids(found.stdout) == expected
    run(env, work, sspry, "local", "info", "--root", "db")

    run(env, work, sspry, "init", "--root", "db2", "--store-path")
    server, addr = start_server(env, work, sspry, work / "db2")
    try:
        run(env, work, sspry, "index", "--addr", addr, hit, miss)
        found = run(env, work, sspry, "search", "--addr", addr, "--rule", rule, "--json")
        assert candidate_ids(found.stdout) == expected
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=COMMAND_TIMEOUT) == 0, server.communicate()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    print(f"wheel build, install and run: {time.monotonic() - started:.1f} s")


def test_source_files_cover_every_package() -> None:
    """The wheel check covers subpackages and the top-level packages too (a new web/ left out of the wheel
    fails it), and nothing that stays in the checkout."""
    packages = {Path(name).parent.as_posix() for name in source_files(REPO)}
    assert {"sspry", "sspry/v1", "sspry/server", "sspry/client", "sspry/query"} <= packages
    stays = ("tests", "sspry/tests", "scripts", "sspry/scripts", "proto")
    assert not any(p.startswith(stays) for p in packages)
