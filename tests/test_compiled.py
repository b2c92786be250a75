"""The broker's hot path compiled with mypyc, and the same source run as plain Python."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Cluster
from peers import ITest
from test_cli import run_cli

import pybinder
from pybinder import compiled


def broker_status(socket_path: str) -> dict:
    status = run_cli(socket_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    return json.loads(status.stdout)["broker"]


def test_the_installed_broker_runs_compiled(cluster):
    if compiled.pure_requested():
        pytest.skip(f"{compiled.PURE_ENV} asks for pure Python")
    assert broker_status(cluster.socket)["compiled"], (
        "the broker runs pure Python: `pip install -e .` found no C compiler or mypyc"
        " failed (see its output), or a module changed after the build; install gcc"
        f" and reinstall, or set {compiled.PURE_ENV}=1 to test pure Python"
    )
    assert compiled.running_compiled()


def test_a_pure_broker_and_server_serve_a_compiled_client(socket_dir):
    cluster = Cluster(str(socket_dir / "broker.sock"), {**os.environ, compiled.PURE_ENV: "1"})
    try:
        cluster.broker()
        cluster.server(threads=2)
        assert broker_status(cluster.socket)["compiled"] is False
        with pybinder.connect(cluster.socket) as proc:
            service = proc.get_service("test", ITest, timeout=10)
            assert service.echo([b"x" * 100, 7]) == [b"x" * 100, 7]
            assert service.add(2, 3) == 5
    finally:
        cluster.close()


def copy_of_the_package(destination: Path) -> Path:
    """A copy of the installed package with its compiled extensions, importable from
    ``destination``; the sources keep their times."""
    shutil.copytree(
        Path(pybinder.__file__).parent,
        destination / "pybinder",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    for name, module in list(sys.modules.items()):
        if name.endswith("__mypyc") and module.__file__:
            shutil.copy2(module.__file__, destination)
    return destination / "pybinder"


def loaded_compiled(path: Path) -> subprocess.CompletedProcess[str]:
    """Import pybinder from ``path`` in a fresh interpreter, which prints whether each
    compiled module came compiled."""
    code = (
        "import pybinder.broker, pybinder.compiled as c, importlib;"
        "print([c.is_compiled(importlib.import_module(m)) for m in c.COMPILED_MODULES])"
    )
    env = {**os.environ, "PYTHONPATH": str(path)}
    env.pop(compiled.PURE_ENV, None)
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        cwd=path,  # `python -c` puts the working directory first on sys.path
        timeout=60,
    )


def test_a_module_changed_after_the_build_runs_every_module_from_source(tmp_path):
    if not compiled.running_compiled():
        pytest.skip("this installation has no compiled modules")
    package = copy_of_the_package(tmp_path)
    fresh = loaded_compiled(tmp_path)
    assert fresh.stdout.strip() == str([True] * len(compiled.COMPILED_MODULES)), fresh.stderr
    assert "RuntimeWarning" not in fresh.stderr

    edited = package / "broker" / "router.py"
    built = next(edited.parent.glob("router.*.so")).stat().st_mtime
    os.utime(edited, (built + 60, built + 60))  # saved a minute after the build
    stale = loaded_compiled(tmp_path)
    assert stale.stdout.strip() == str([False] * len(compiled.COMPILED_MODULES)), stale.stderr
    assert "pybinder.broker.router changed after it was compiled" in stale.stderr
