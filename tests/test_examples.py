"""The README's main job: the quickstart starts a broker, a server and a client."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, timeout: float) -> str:
    """Run ``examples/name`` as a user would; its output, once it exited 0."""
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=timeout
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_quickstart_shows_a_client_and_a_server_talking_through_a_broker():
    out = run_example("quickstart.py", timeout=120)
    assert "broker: pybinder broker listening on" in out
    assert "client: calc.add(2, 40) = 42" in out
    assert "matches the local sha256" in out
    assert "checksum of 8388608 bytes (memoryview, read-only=True)" in out
    assert "raised TypeError remotely" in out
    assert "bytes copied, each exactly once (8388608 of them out-of-band payload)" in out
    assert "server: stopped cleanly" in out  # pybinder.serve() on SIGTERM
    assert out.rstrip().endswith("done: broker, server and client have exited")


def test_listeners_shows_callbacks_and_a_death_recipient_firing():
    out = run_example("listeners.py", timeout=60)
    assert "broker: pybinder broker listening on" in out
    assert "server: add_listener got an IListener.Proxy from pid" in out
    for tick in (1, 2, 3):
        assert f"client: listener got 'tick {tick}' from pid" in out
    assert "client: hub alive: True" in out
    assert "server: published 3 ticks; exiting" in out
    assert "client: death recipient: the hub in pid" in out
    assert "client: hub alive: False" in out
    assert out.rstrip().endswith("done: the client saw the hub's events and its death")


def test_async_calc_gathers_slow_calls_and_cancels_one():
    out = run_example("async_calc.py", timeout=60)
    assert "add(2, 40) = 42" in out
    assert "100 calls of 0.2 s each: sum 9900 in" in out
    assert "TimeoutError, cancelled" in out
    assert "server: add(1, 1) cancelled: is_cancelled() = True" in out
    assert out.rstrip().endswith("done")


def test_camera_pipeline_sends_numpy_frames_copied_once():
    out = run_example("camera_pipeline.py", timeout=90)
    assert "last frame: shape [480, 640, 3], float32, read-only True" in out
    assert "brightest pixel of the last frame at [290, 580]" in out
    assert "broker copied 30 frames' bytes: one copy per frame" in out
    assert out.rstrip().endswith("done")
