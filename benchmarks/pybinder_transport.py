"""The pluggable pybinder slot.

Written against the pybinder API::

    proc = pybinder.connect(PATH, region_size=BYTES)      # context manager
    proc.add_service("echo", EchoImpl()); proc.start_thread_pool(n)
    echo = proc.get_service("echo", IEcho, timeout=10.0)
    proc.status()["broker"]["buffer_bytes_copied"]

and the broker CLI ``python -m pybinder broker --socket PATH
--max-region-size BYTES`` (prints a line containing "listening" when ready,
stops on SIGTERM).  If ``import pybinder`` fails the transport is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from .common import REPLY, BenchError, MiB, round_up, set_affinity
from .transports import Client, Endpoints, Ready, RunEnv, Transport

SERVICE = "echo"
CLIENT_REGION = 1 * MiB  # bytes; clients only receive 8-byte answers
SERVER_THREADS = 4  # binder threads in the server pool (>= max clients)
BROKER_READY_S = 20.0  # s to wait for the broker's "listening" line
CONNECT_TIMEOUT_S = 10.0  # s get_service waits for the service

try:
    import pybinder

    class IEcho(pybinder.Interface):
        """The benchmark's service interface."""

        DESCRIPTOR = "bench.IEcho"

        @pybinder.method
        def echo(self, payload) -> bytes:  # type: ignore[no-untyped-def]
            """Receive ``payload`` (memoryview into the region when >= 4 KiB); answer 8 bytes."""
            ...

        @pybinder.oneway
        def push(self, payload) -> None:  # type: ignore[no-untyped-def]
            """One-way delivery of ``payload``."""
            ...

        @pybinder.method
        def count(self) -> int:
            """How many push() calls arrived."""
            ...

    class EchoImpl(getattr(IEcho, "Stub", IEcho)):  # type: ignore[misc]
        """Server implementation (an ``IEcho.Stub``): answers the length, counts pushes."""

        def __init__(self) -> None:
            super().__init__()
            self._lock = threading.Lock()
            self._pushes = 0

        def echo(self, payload) -> bytes:  # type: ignore[no-untyped-def]
            return REPLY.pack(len(payload))

        def push(self, payload) -> None:  # type: ignore[no-untyped-def]
            with self._lock:
                self._pushes += 1

        def count(self) -> int:
            return self._pushes

    IMPORT_ERROR: str | None = None
except Exception as exc:
    IMPORT_ERROR = f"pybinder unavailable: {exc.__class__.__name__}: {exc}"


def server_region(max_payload: int) -> int:
    """Server region size in bytes: 3x the largest payload, whole MiB."""
    return round_up(3 * max_payload, MiB)


class PybinderClient:
    """Client process handle plus the IEcho proxy.

    With ``loan`` the payload is produced once in the thread's loan area
    (``proc.loan``) and that buffer is sent, so the broker's copy is the only one.
    """

    def __init__(self, path: str, region: int, loan: bool = False) -> None:
        self._stack = ExitStack()
        self._loan = loan
        self._loaned: tuple[int, memoryview] | None = None  # (id of payload, its loan)
        try:
            self._proc = self._stack.enter_context(pybinder.connect(path, region_size=region))
            self._svc = self._proc.get_service(SERVICE, IEcho, timeout=CONNECT_TIMEOUT_S)
        except BaseException:
            self._stack.close()
            raise

    def _argument(self, payload: bytes) -> Any:
        """The payload, or its copy in the loan area (made once per payload object)."""
        if not self._loan:
            return payload
        if self._loaned is None or self._loaned[0] != id(payload):
            buffer = self._proc.loan(len(payload))
            buffer[:] = payload
            self._loaned = (id(payload), buffer)
        return self._loaned[1]

    def echo(self, payload: bytes) -> None:
        """Synchronous call with ``payload`` bytes; checks the 8-byte answer."""
        if REPLY.unpack(self._svc.echo(self._argument(payload)))[0] != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Oneway call with ``payload`` bytes."""
        self._svc.push(self._argument(payload))

    def count(self) -> int:
        """Return the server's push count."""
        return int(self._svc.count())

    def counters(self) -> dict[str, int] | None:
        """Broker counters: transactions, bytes_copied, buffer_bytes_copied."""
        broker = self._proc.status().get("broker", {})
        keys = ("transactions", "bytes_copied", "buffer_bytes_copied")
        return {k: int(broker[k]) for k in keys if k in broker}

    def close(self) -> None:
        """Leave the pybinder context."""
        self._stack.close()


def _pin_all_threads(pid: int, cpus: frozenset[int] | None) -> None:
    """Apply ``cpus`` to every thread of ``pid`` (affinity is per thread)."""
    if not cpus:
        return
    try:
        tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tids = [pid]
    for tid in tids:
        set_affinity(tid, cpus)


def _wait_for_line(proc: subprocess.Popen[bytes], log: Path, needle: str, timeout: float) -> None:
    """Poll ``log`` until it contains ``needle``; fail if ``proc`` exits first."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        text = log.read_text(errors="replace") if log.exists() else ""
        if needle in text:
            return
        if proc.poll() is not None:
            raise BenchError(f"broker exited with {proc.returncode}: {text[-500:]!r}")
        time.sleep(0.02)
    raise TimeoutError(f"broker did not print {needle!r} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM ``proc``, then SIGKILL after ``timeout`` seconds; always reap it."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class PybinderTransport(Transport):
    """pybinder: broker copies each payload once into the target's region."""

    name = "pybinder"
    received = (
        "the service method was called with the payload as a read-only "
        "memoryview into the server's shared-memory region (bytes below 4 KiB)"
    )
    copies_kind = "measured"
    copies_note = "broker buffer_bytes_copied delta / payload bytes sent (sizes >= 4 KiB)"
    distributions = ("pybinder",)

    def unavailable(self) -> str | None:
        """Skip when pybinder or its broker CLI is missing."""
        if IMPORT_ERROR:
            return IMPORT_ERROR
        if importlib.util.find_spec("pybinder.__main__") is None:
            return "pybinder has no __main__ (broker CLI)"
        return None

    def socket_path(self, env: RunEnv) -> str:
        """Broker socket path inside the run's temp dir."""
        return str(env.workdir / "broker.sock")

    def start_aux(self, env: RunEnv, cpus: frozenset[int] | None) -> list[subprocess.Popen[bytes]]:
        """Start the broker and wait for its "listening" line."""
        log = env.workdir / "broker.log"
        cmd = [
            sys.executable,
            "-m",
            "pybinder",
            "broker",
            "--socket",
            self.socket_path(env),
            "--max-region-size",
            str(server_region(env.max_payload)),
        ]
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env.env or None)
        try:
            _wait_for_line(proc, log, "listening", BROKER_READY_S)
            _pin_all_threads(proc.pid, cpus)
        except BaseException:
            stop_process(proc)
            raise
        return [proc]

    def prepare(self, env: RunEnv) -> Endpoints:
        """Server gets a big region, every client a small one."""
        path = self.socket_path(env)
        return Endpoints(
            (path, server_region(env.max_payload)),
            [(path, CLIENT_REGION)] * env.n_endpoints,
        )

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """Publish the echo service and serve from a binder thread pool."""
        path, region = args
        with pybinder.connect(path, region_size=region) as proc:
            proc.add_service(SERVICE, EchoImpl())
            if hasattr(proc, "start_thread_pool"):
                proc.start_thread_pool(SERVER_THREADS)
            else:
                threading.Thread(target=proc.join_thread_pool, daemon=True).start()
            ready()
            stop.wait()

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Connect a client process and look up the service."""
        path, region = args
        return PybinderClient(path, region)


class PybinderLoanTransport(PybinderTransport):
    """pybinder with the payload produced in a loan: the broker's copy is the only one."""

    name = "pybinder-loan"
    received = (
        "as pybinder, but the client produced the payload once in its loan area "
        "(proc.loan) and sends that buffer, so nothing copies it on the client side"
    )
    copies_note = (
        "broker buffer_bytes_copied delta / payload bytes sent (sizes >= 4 KiB); "
        "the sender makes no copy"
    )

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Connect a client process whose calls send loaned buffers."""
        path, region = args
        return PybinderClient(path, region, loan=True)
