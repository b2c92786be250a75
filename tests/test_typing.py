"""pybinder is a typed package (PEP 561): the examples pass ``mypy --strict``, and
``get_service(name, ICalc)`` is an ICalc to a type checker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 50.0  # under pytest's 60 s


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m mypy --strict ARGS`` from the checkout (its pyproject.toml config),
    writing no cache there."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", os.devnull, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def test_examples_pass_mypy_strict() -> None:
    result = mypy("examples/")
    assert result.returncode == 0, result.stdout + result.stderr


USER_CODE = '''
from __future__ import annotations

import pybinder


class ICalc(pybinder.Interface):
    DESCRIPTOR = "typing.ICalc"

    @pybinder.method
    def add(self, a: int, b: int) -> int:
        """a + b."""


class Calc(ICalc.Stub):
    def add(self, a: int, b: int) -> int:
        return a + b


class Strict(ICalc.Stub, ICalc):  # checked against ICalc
    def add(self, a: str, b: int) -> int:  # LINE_OVERRIDE
        return b


def use(calc: ICalc) -> None: ...


use(Calc())
with pybinder.connect() as proc:
    reveal_type(proc)
    proc.add_service("calc", Calc())
    reveal_type(proc.get_service("calc", ICalc))
    reveal_type(proc.get_service("calc", ICalc, 1.0).add(1, 2))
    reveal_type(proc.check_service("calc", ICalc))
    reveal_type(proc.get_service("calc"))
    reveal_type(proc.check_service("calc"))
    proc.get_service("calc", ICalc).add("one", 2)  # LINE_ARG
'''


def test_user_code_types(tmp_path: Path) -> None:
    source = tmp_path / "user.py"
    source.write_text(textwrap.dedent(USER_CODE))
    result = mypy(str(source))
    lines = result.stdout.splitlines()
    revealed = [line.split("Revealed type is ", 1)[1] for line in lines if "Revealed" in line]
    assert revealed == [
        '"pybinder.runtime.process_state.ProcessState"',
        '"user.ICalc"',
        '"int"',
        '"user.ICalc | None"',
        '"Any"',
        '"Any"',
    ], result.stdout
    errors = [line for line in lines if ": error:" in line]
    numbers = {
        marker: number
        for number, text in enumerate(source.read_text().splitlines(), 1)
        for marker in ("LINE_OVERRIDE", "LINE_ARG")
        if marker in text
    }
    assert len(errors) == 2, result.stdout
    assert f"user.py:{numbers['LINE_OVERRIDE']}: error:" in errors[0], errors
    assert "[override]" in errors[0], errors
    assert f"user.py:{numbers['LINE_ARG']}: error:" in errors[1], errors
    assert "[arg-type]" in errors[1], errors


def test_py_typed_is_package_data() -> None:
    assert (ROOT / "pybinder" / "py.typed").is_file()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in project["tool"]["setuptools"]["package-data"]["pybinder"]
    assert any(
        req.startswith("mypy") for req in project["project"]["optional-dependencies"]["test"]
    )
