"""A camera-frame pipeline with numpy: a camera process sends float32 frames to a
detector process, which reads each in place and answers with a few numbers.

    python examples/camera_pipeline.py

Starts a broker, a detector and a camera, each a real process. A (480, 640, 3)
float32 frame (3.5 MiB) arrives in the detector as a read-only ndarray with its
dtype and shape, backed by the detector's region: the broker's copy is the only
one. (This file plays all three roles: ``camera_pipeline.py detector SOCKET`` and
``camera_pipeline.py camera SOCKET`` are what it starts.)
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

import pybinder

TIMEOUT = 60.0
FRAMES = 30
SHAPE = (480, 640, 3)


class IDetector(pybinder.Interface):
    DESCRIPTOR = "example.IDetector"

    @pybinder.method
    def process(self, frame: Any) -> dict[str, Any]:
        """Brightness statistics of a frame, and how it arrived."""


class Detector(IDetector.Stub):
    def process(self, frame: Any) -> dict[str, Any]:
        return {
            "shape": list(frame.shape),
            "dtype": str(frame.dtype),
            "read_only": not frame.flags.writeable,
            "mean": float(frame.mean()),
            "brightest": [int(i) for i in np.unravel_index(frame[..., 0].argmax(), SHAPE[:2])],
        }


def detect(socket_path: str) -> None:
    with pybinder.connect(socket_path, region_size=32 << 20) as proc:
        proc.add_service("detector", Detector())
        print("ready", flush=True)
        proc.join_thread_pool()


def film(socket_path: str) -> None:
    with pybinder.connect(socket_path) as proc:
        detector = proc.get_service("detector", IDetector)
        before = proc.status()["broker"]["buffer_bytes_copied"]
        frame = np.zeros(SHAPE, np.float32)
        started = time.monotonic()
        for i in range(FRAMES):
            frame[:] = 0.25
            frame[i * 10, i * 20, 0] = 1.0  # a bright spot that moves
            seen = detector.process(frame)
        took = time.monotonic() - started
        copied = proc.status()["broker"]["buffer_bytes_copied"] - before
        print(f"last frame: shape {seen['shape']}, {seen['dtype']}, read-only {seen['read_only']}")
        print(f"brightest pixel of the last frame at {seen['brightest']}")
        print(f"{FRAMES} frames of {frame.nbytes} bytes in {took:.2f} s")
        print(f"broker copied {copied // frame.nbytes} frames' bytes: one copy per frame")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pybinder-camera-") as tmp:
        socket_path = str(Path(tmp) / "broker.sock")
        python = sys.executable
        broker = subprocess.Popen(
            [python, "-m", "pybinder", "broker", "--socket", socket_path],
            stdout=subprocess.PIPE,
            text=True,
        )
        detector = None
        try:
            assert broker.stdout is not None and "listening" in broker.stdout.readline()
            detector = subprocess.Popen(
                [python, __file__, "detector", socket_path], stdout=subprocess.PIPE, text=True
            )
            assert detector.stdout is not None and detector.stdout.readline().strip() == "ready"
            camera = subprocess.run(
                [python, __file__, "camera", socket_path],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            print(camera.stdout, end="")
            if camera.returncode != 0:
                print(camera.stderr, file=sys.stderr)
                return 1
        finally:
            for proc in (detector, broker):
                if proc is not None:
                    proc.terminate()
                    proc.communicate(timeout=TIMEOUT)
    print("done")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "detector":
        detect(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "camera":
        film(sys.argv[2])
    else:
        sys.exit(main())
