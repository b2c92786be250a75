"""The README's main job: the quickstart starts a broker, a server and a client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_quickstart_shows_a_client_and_a_server_talking_through_a_broker():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "broker: pybinder broker listening on" in out
    assert "client: calc.add(2, 40) = 42" in out
    assert "matches the local sha256" in out
    assert "checksum of 8388608 bytes (memoryview, read-only=True)" in out
    assert "raised TypeError remotely" in out
    assert "bytes copied, each exactly once (8388608 of them out-of-band payload)" in out
    assert out.rstrip().endswith("done: broker, server and client have exited")
