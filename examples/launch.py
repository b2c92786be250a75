"""The examples' launcher: a broker of the demo's own on a private socket, and the
demo's processes, each real, whose output is echoed line by line behind its name.

    with Demo("quickstart") as demo:
        demo.start("server", [sys.executable, "server.py", "--socket", demo.socket], "ready")
        code = demo.run("client", [sys.executable, "client.py", "--socket", demo.socket])

Leaving the block stops every process still running with SIGTERM, the broker last,
and removes the socket's directory; nothing is left in /dev/shm.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType

#: Seconds a process may take to get ready, to finish, or to stop.
TIMEOUT = 60.0


class Demo:
    """A demo's broker and processes (see the module's docstring).

    Args:
        name: names the socket's temporary directory.
        cwd: where the processes start (None: here).

    Attributes:
        socket: the broker's socket path, for the processes' command lines.
    """

    def __init__(self, name: str, cwd: Path | None = None) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix=f"pybinder-{name}-")
        self.socket = str(Path(self._directory.name) / "broker.sock")
        self.cwd = cwd
        self._started: list[tuple[subprocess.Popen[str], threading.Thread]] = []

    def __enter__(self) -> Demo:
        broker = [sys.executable, "-m", "pybinder", "broker", "--socket", self.socket]
        try:
            self.start("broker", broker, "listening")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def start(self, name: str, argv: list[str], wait_for: str) -> subprocess.Popen[str]:
        """Start ``argv``, echo its output as ``name: line``, and return once it
        printed a line containing ``wait_for`` (or exited).

        Raises:
            SystemExit: it did neither within TIMEOUT seconds.
        """
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=self.cwd
        )
        ready = threading.Event()

        def relay() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                print(f"{name:>8}: {line.rstrip()}", flush=True)
                if wait_for in line:
                    ready.set()
            ready.set()

        relay_thread = threading.Thread(target=relay, daemon=True)
        relay_thread.start()
        self._started.append((proc, relay_thread))
        if not ready.wait(TIMEOUT):
            raise SystemExit(f"{name} did not start in {TIMEOUT} s")
        return proc

    def run(self, name: str, argv: list[str]) -> int:
        """Run ``argv`` to its end, echoing its output as :meth:`start` does; its exit code."""
        proc = self.start(name, argv, "\0")  # never printed: ready when it exits
        code = proc.wait(TIMEOUT)
        self._started[-1][1].join(TIMEOUT)
        return code

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for proc, relay in reversed(self._started):  # the broker last
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            relay.join(TIMEOUT)
        self._directory.cleanup()
