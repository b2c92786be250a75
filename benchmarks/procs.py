"""Process management: spawned servers and client processes, CPU placement.

All children are started with the ``spawn`` method (never ``fork``), ask the
kernel to SIGTERM them if the driver dies, and are always stopped, joined
and if need be killed by the driver.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from . import registry
from .common import BenchError, child_setup, close_quietly, deadline
from .transports import RunEnv
from .workloads import timed_calls

CTX = multiprocessing.get_context("spawn")
READY_TIMEOUT_S = 30.0  # s a server or client process may take to come up
JOIN_TIMEOUT_S = 5.0  # s to wait for a graceful exit before SIGTERM / SIGKILL
IDLE_TIMEOUT_S = 900.0  # s a client process waits for its next command


@dataclass(frozen=True)
class Placement:
    """CPU sets for the client(s), the server and helper processes (None = any)."""

    mode: str
    client: frozenset[int] | None
    server: frozenset[int] | None
    aux: frozenset[int] | None
    note: str


def placement(mode: str) -> Placement:
    """Translate ``--pin`` into CPU sets.

    * ``none``: every process may run on every CPU the driver may use;
    * ``same``: client(s), server and broker all share the first CPU;
    * ``cross``: client(s) on the first CPU, server on the second, the
      broker (pybinder only) unpinned.
    """
    cpus = sorted(os.sched_getaffinity(0))
    every = frozenset(cpus)
    first = frozenset(cpus[:1])
    if mode == "same":
        return Placement(mode, first, first, first, f"all processes on CPU {cpus[0]}")
    if mode == "cross":
        if len(cpus) < 2:
            return Placement("same", first, first, first, "one CPU only: fell back to same")
        second = frozenset(cpus[1:2])
        note = f"clients on CPU {cpus[0]}, server on CPU {cpus[1]}, broker unpinned"
        return Placement(mode, first, second, every, note)
    return Placement("none", every, every, every, f"scheduler's choice on CPUs {cpus}")


# --------------------------------------------------------------------------
# code that runs inside the children


def _watch_for_stop(ctl: Connection, stop: threading.Event) -> None:
    """Set ``stop`` when the driver says so or goes away."""
    try:
        while not stop.is_set():
            if ctl.poll(1.0) and ctl.recv() == "stop":
                break
    except (EOFError, OSError):
        pass
    stop.set()


def server_main(
    name: str, args: Any, env: RunEnv, ctl: Connection, cpus: frozenset[int] | None
) -> None:
    """Entry point of a server process."""
    child_setup(cpus)
    stop = threading.Event()
    threading.Thread(target=_watch_for_stop, args=(ctl, stop), daemon=True).start()
    try:
        registry.get(name).serve(args, env, lambda: ctl.send(("ready", os.getpid())), stop)
    except Exception as exc:
        with contextlib.suppress(OSError):
            ctl.send(("error", f"{exc.__class__.__name__}: {exc}"))
        raise


def client_main(
    name: str, args: Any, env: RunEnv, ctl: Connection, cpus: frozenset[int] | None
) -> None:
    """Entry point of an aggregate-workload client process.

    Commands: ``("run", size, start_at, stop_at)`` answered with
    ``("done", calls, t_start, t_end)``; ``"quit"`` ends the process.
    """
    child_setup(cpus)
    try:
        with deadline(READY_TIMEOUT_S):
            client = registry.get(name).connect(args, env)
    except Exception as exc:
        ctl.send(("error", f"connect: {exc.__class__.__name__}: {exc}"))
        return
    try:
        ctl.send(("ready", os.getpid()))
        while ctl.poll(IDLE_TIMEOUT_S):
            msg = ctl.recv()
            if msg == "quit":
                break
            _, size, start_at, stop_at = msg
            try:
                ctl.send(("done", *timed_calls(client, size, start_at, stop_at)))
            except Exception as exc:
                ctl.send(("error", f"{exc.__class__.__name__}: {exc}"))
                break
    except (EOFError, OSError):
        pass
    finally:
        client.close()


# --------------------------------------------------------------------------
# driver-side handles


def _expect_ready(ctl: Connection, proc: Any, what: str, timeout: float) -> None:
    """Wait for ``("ready", pid)`` from a child; raise with its reason if not."""
    if not ctl.poll(timeout):
        raise TimeoutError(f"{what} not ready within {timeout:.0f} s")
    try:
        msg = ctl.recv()
    except EOFError:
        proc.join(1.0)
        raise BenchError(f"{what} exited with code {proc.exitcode} before it was ready") from None
    if msg[0] != "ready":
        raise BenchError(f"{what} failed: {msg[1]}")


def stop_child(
    proc: Any, ctl: Connection, goodbye: str | None, timeout: float = JOIN_TIMEOUT_S
) -> None:
    """Ask politely (send ``goodbye``, if any), then SIGTERM, then SIGKILL, waiting up
    to ``timeout`` seconds for each; always join and close ``ctl``."""
    if goodbye is not None:
        with contextlib.suppress(OSError, ValueError):
            ctl.send(goodbye)
    proc.join(timeout)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join(timeout)
    close_quietly(ctl)


class ServerHandle:
    """A transport server running in its own spawned process."""

    def __init__(self, name: str, args: Any, env: RunEnv, cpus: frozenset[int] | None) -> None:
        self._ctl, child_end = CTX.Pipe()
        self.proc = CTX.Process(
            target=server_main,
            args=(name, args, env, child_end, cpus),
            name=f"bench-server-{name}",
        )
        try:
            self.proc.start()
        finally:
            child_end.close()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until the server listens."""
        _expect_ready(self._ctl, self.proc, "server", timeout)

    def stop(self) -> None:
        """Stop and reap the server."""
        stop_child(self.proc, self._ctl, "stop")


def aggregate(clients: int, size: int, reports: list[tuple[int, float, float]]) -> dict[str, Any]:
    """Sum calls over the window that spans every client's timed loop (calls/s)."""
    window = max(end for _, _, end in reports) - min(start for _, start, _ in reports)
    calls = sum(n for n, _, _ in reports)
    return {
        "clients": clients,
        "size": size,
        "calls": calls,
        "seconds": window,
        "calls_per_s": calls / window if window > 0 else 0.0,
        "per_client_calls": [n for n, _, _ in reports],
    }


class ClientPool:
    """Client processes for the aggregate workload, driven by commands."""

    def __init__(
        self, name: str, endpoints: list[Any], env: RunEnv, cpus: frozenset[int] | None
    ) -> None:
        self._children: list[tuple[Any, Connection]] = []
        for i, args in enumerate(endpoints):
            ctl, child_end = CTX.Pipe()
            proc = CTX.Process(
                target=client_main,
                args=(name, args, env, child_end, cpus),
                name=f"bench-client-{name}-{i}",
            )
            self._children.append((proc, ctl))
            try:
                proc.start()
            finally:
                child_end.close()
                close_quietly(args)  # the child has its own copy now

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Block until every client is connected."""
        for i, (proc, ctl) in enumerate(self._children):
            _expect_ready(ctl, proc, f"client {i}", timeout)

    def run(self, clients: int, size: int, warm_s: float, seconds: float) -> dict[str, Any]:
        """Run ``clients`` clients concurrently; return aggregate calls per second."""
        active = self._children[:clients]
        start_at = time.monotonic() + warm_s
        stop_at = start_at + seconds
        for _, ctl in active:
            ctl.send(("run", size, start_at, stop_at))
        reports = []
        for i, (_, ctl) in enumerate(active):
            if not ctl.poll(seconds + warm_s + 60.0):
                raise TimeoutError(f"client {i} did not report")
            msg = ctl.recv()
            if msg[0] != "done":
                raise BenchError(f"client {i}: {msg[1]}")
            reports.append(msg[1:])
        return aggregate(clients, size, reports)

    def close(self) -> None:
        """Stop and reap every client process."""
        for proc, ctl in self._children:
            stop_child(proc, ctl, "quit")
