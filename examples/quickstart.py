"""Start a broker, a calculator server and a client, and show what they did.

    python examples/quickstart.py

Three real processes talk through a broker on real shared memory; everything is
stopped, and nothing is left in /dev/shm, when it ends.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from launch import TIMEOUT, Demo

HERE = Path(__file__).resolve().parent
CALCULATOR = HERE / "calculator"


def main() -> int:
    python = sys.executable
    with Demo("quickstart", cwd=CALCULATOR) as demo:
        demo.start("server", [python, "server.py", "--socket", demo.socket], "registered")
        if demo.run("client", [python, "client.py", "--socket", demo.socket]) != 0:
            return 1
        status = subprocess.run(
            [python, "-m", "pybinder", "--socket", demo.socket, "status", "--json"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        counters = json.loads(status.stdout)["broker"]
        print(
            f"{'broker':>8}: {counters['transactions']} transactions,"
            f" {counters['bytes_copied']} bytes copied, each exactly once"
            f" ({counters['buffer_bytes_copied']} of them out-of-band payload)"
        )
    print("done: broker, server and client have exited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
