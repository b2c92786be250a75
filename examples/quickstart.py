"""Start a broker, a calculator server and a client, and show what they did.

    python examples/quickstart.py

Three real processes talk through a broker on real shared memory; everything is
stopped, and nothing is left in /dev/shm, when it ends.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
CALCULATOR = HERE / "calculator"
TIMEOUT = 60.0


def start(
    name: str, argv: list[str], wait_for: str
) -> tuple[subprocess.Popen[str], threading.Thread]:
    """Start a process whose output is echoed with a ``name:`` prefix, and wait until
    it prints a line containing ``wait_for`` (or exits). Returns it and its relay."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=CALCULATOR
    )
    ready = threading.Event()

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"{name:>7}: {line.rstrip()}", flush=True)
            if wait_for in line:
                ready.set()
        ready.set()

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    if not ready.wait(TIMEOUT):
        raise SystemExit(f"{name} did not start in {TIMEOUT} s")
    return proc, relay_thread


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pybinder-quickstart-") as tmp:
        socket_path = str(Path(tmp) / "broker.sock")
        python = sys.executable
        broker, _ = start(
            "broker", [python, "-m", "pybinder", "broker", "--socket", socket_path], "listening"
        )
        server = None
        try:
            server, _ = start(
                "server", [python, "server.py", "--socket", socket_path], "registered"
            )
            client, client_output = start(
                "client", [python, "client.py", "--socket", socket_path], "\0"
            )
            client_output.join(TIMEOUT)
            if client.wait(TIMEOUT) != 0:
                return 1
            status = subprocess.run(
                [python, "-m", "pybinder", "--socket", socket_path, "status", "--json"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            counters = json.loads(status.stdout)["broker"]
            print(
                f"{'broker':>7}: {counters['transactions']} transactions,"
                f" {counters['bytes_copied']} bytes copied, each exactly once"
                f" ({counters['buffer_bytes_copied']} of them out-of-band payload)"
            )
        finally:
            for proc in (server, broker):
                if proc is not None:
                    proc.send_signal(signal.SIGTERM)
                    proc.wait(TIMEOUT)
    print("done: broker, server and client have exited")
    return 0


if __name__ == "__main__":
    sys.exit(main())
