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

import sys
import time
from typing import Any

import numpy as np
from launch import Demo

import pybinder

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
    python = sys.executable
    with Demo("camera") as demo:
        demo.start("detector", [python, __file__, "detector", demo.socket], "ready")
        if demo.run("camera", [python, __file__, "camera", demo.socket]) != 0:
            return 1
    print("done")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "detector":
        detect(sys.argv[2])
    elif len(sys.argv) == 3 and sys.argv[1] == "camera":
        film(sys.argv[2])
    else:
        sys.exit(main())
