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


def test_listeners_shows_callbacks_and_a_death_recipient_firing():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "listeners.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
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
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "async_calc.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "add(2, 40) = 42" in out
    assert "100 calls of 0.2 s each: sum 9900 in" in out
    assert "TimeoutError, cancelled" in out
    assert "server: add(1, 1) cancelled: is_cancelled() = True" in out
    assert out.rstrip().endswith("done")


def test_camera_pipeline_sends_numpy_frames_copied_once():
    run = subprocess.run(
        [sys.executable, str(EXAMPLES / "camera_pipeline.py")],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "last frame: shape [480, 640, 3], float32, read-only True" in out
    assert "brightest pixel of the last frame at [290, 580]" in out
    assert "broker copied 30 frames' bytes: one copy per frame" in out
    assert out.rstrip().endswith("done")
