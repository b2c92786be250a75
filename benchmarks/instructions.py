"""Instructions per call in the broker, the server and the client, counted by callgrind.

Times on a shared VM move by 2x between runs; instruction counts do not. This runs
a broker, an echo server and a client under ``valgrind --tool=callgrind`` (spinning
off, so the count does not depend on timing), makes two batches of calls, and
reports the difference per call. Use it to compare two versions of the hot path:

    python benchmarks/instructions.py [--size BYTES] [--oneway]

``--oneway`` counts oneway calls (``push``, the streaming workload's call) instead
of echo calls; one echo call at the end makes sure the server has run them all.

Needs valgrind (Debian package ``valgrind``). Takes about 20 s.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pybinder

VALGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
SMALL_BATCH, LARGE_BATCH = 100, 600  # calls; the difference is what is counted
TIMEOUT_S = 300.0


class IEcho(pybinder.Interface):
    DESCRIPTOR = "bench.IEchoCount"

    @pybinder.method
    def echo(self, payload: bytes) -> bytes:
        """Answer 8 bytes."""

    @pybinder.oneway
    def push(self, payload: bytes) -> None:
        """Take the payload; answer nothing."""


class Echo(IEcho.Stub):
    def __init__(self) -> None:
        super().__init__()
        self.pushes = 0

    def echo(self, payload: bytes) -> bytes:
        return b"12345678"

    def push(self, payload: bytes) -> None:
        self.pushes += 1


def serve(socket_path: str) -> None:
    """The server role, run under valgrind by :func:`count`."""
    with pybinder.connect(socket_path, spin_us=0) as proc:
        proc.add_service("echo", Echo())
        print("ready", flush=True)
        proc.join_thread_pool()


def count(calls: int, size: int, method: str = "echo") -> tuple[int, int, int]:
    """Instructions the broker, the server and the client executed for ``calls``
    calls of ``method`` ("echo" or "push")."""
    env = {**os.environ, "PYBINDER_SPIN_US": "0"}
    with tempfile.TemporaryDirectory(prefix="pybinder-ir-") as tmp:
        sock = str(Path(tmp) / "broker.sock")
        broker_cmd = [sys.executable, "-m", "pybinder", "broker", "--socket", sock]
        broker = subprocess.Popen(
            [*VALGRIND, *broker_cmd, "--spin-us", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        server = None
        try:
            broker.stdout.readline()  # type: ignore[union-attr]
            server = subprocess.Popen(
                [*VALGRIND, sys.executable, __file__, "serve", sock],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            server.stdout.readline()  # type: ignore[union-attr]
            client = subprocess.run(
                [*VALGRIND, sys.executable, __file__, method, sock, str(calls), str(size)],
                capture_output=True,
                text=True,
                env=env,
                timeout=TIMEOUT_S,
            )
        finally:
            for child in (server, broker):
                if child is not None:
                    child.terminate()
        return _collected(broker), _collected(server), _count_in(client.stderr)


def call(socket_path: str, calls: int, size: int, method: str = "echo") -> None:
    """The client role, run under valgrind by :func:`count`: ``calls`` calls of
    ``method``, then one echo call (so the server has run every oneway call)."""
    with pybinder.connect(socket_path, spin_us=0) as proc:
        echo = proc.get_service("echo", IEcho, timeout=TIMEOUT_S)
        payload = bytes(size)
        send = getattr(echo, method)
        for _ in range(calls):
            send(payload)
        echo.echo(payload)


def _collected(child: subprocess.Popen[str] | None) -> int:
    assert child is not None
    _, err = child.communicate(timeout=TIMEOUT_S)
    return _count_in(err)


def _count_in(err: str) -> int:
    match = re.search(r"Collected : (\d+)", err)
    if match is None:
        raise RuntimeError(f"callgrind printed no count: {err[-500:]}")
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["serve"]:
        serve(args[1])
        return 0
    if args[:1] in (["echo"], ["push"], ["call"]):
        method = "echo" if args[0] == "call" else args[0]
        call(args[1], int(args[2]), int(args[3]), method)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64, help="payload bytes (default 64)")
    parser.add_argument("--oneway", action="store_true", help="count oneway push calls")
    options = parser.parse_args(args)
    size, method = options.size, "push" if options.oneway else "echo"
    small = count(SMALL_BATCH, size, method)
    large = count(LARGE_BATCH, size, method)
    calls = LARGE_BATCH - SMALL_BATCH
    broker, server, client = ((b - a) // calls for a, b in zip(small, large, strict=True))
    print(
        f"{size}-byte {method}, instructions per call: broker {broker:,}, server {server:,},"
        f" client {client:,}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
