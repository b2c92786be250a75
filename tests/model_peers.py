"""Peer processes for tests/test_object_model.py.

``python tests/model_peers.py ROLE SOCKET [ARGS...]``

The interfaces are defined here, so that the test process (``from model_peers import
...``) and every peer know the same descriptors. Roles:

* ``hub NAME MAX_THREADS``: serve a :class:`Hub` as NAME with
  ``start_thread_pool(MAX_THREADS)`` (and no join_thread_pool: the pool's looper
  is the only one), print ``ready PID``, then wait to be killed.
* ``echo NAME``: serve an :class:`Echo` as NAME the same way.
* ``serve NAME``: ``pybinder.serve(NAME, Echo(NAME))``, which reconnects; once
  ready it also adds an Echo as ``NAME.b`` and prints ``ready PID``; prints
  ``reconnected N`` after each reconnect and ``stopped`` when serve() returns.
* ``join NAME``: ``connect(reconnect=True)``, add an Echo as NAME and serve it with
  ``join_thread_pool()`` on the main thread only (no pool); prints ``ready PID``.
* ``listener-client HUB``: a single-threaded client (it never starts a thread pool)
  that passes a :class:`RecordingListener` to the hub, then serves the hub's later
  call with join_thread_pool() on its main thread; prints what it saw.
* ``death-client HUB``: links a death recipient to the hub and keeps a sleep(30)
  call pending in another thread; prints when each ends.

Output lines are ``WORD JSON`` (see :func:`say`).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from typing import Any

import pybinder
from pybinder.runtime.file_descriptor import ParcelFileDescriptor


class IListener(pybinder.Interface):
    DESCRIPTOR = "tests.model.IListener"

    @pybinder.method
    def on_event(self, event: str) -> str:
        """Handle ``event``; say who did."""


class IEcho(pybinder.Interface):
    DESCRIPTOR = "tests.model.IEcho"

    @pybinder.method
    def echo(self, value: Any) -> list[Any]:
        """[this echo's name, its pid, value]."""


class IHub(pybinder.Interface):
    DESCRIPTOR = "tests.model.IHub"

    @pybinder.method
    def add_listener(self, listener: IListener, later: float) -> dict[str, Any]:
        """Call ``listener.on_event("during")`` now, and ``on_event("later")`` from
        another thread of this process ``later`` seconds after; report what the
        listener arrived as and its first answer (the second goes to events())."""

    @pybinder.method
    def events(self) -> list[Any]:
        """What the later calls of add_listener() gave: [["later", answer], ...]."""

    @pybinder.method
    def ask(self, other: IEcho, value: Any) -> dict[str, Any]:
        """Call ``other.echo(value)``; its answer and what ``other`` arrived as."""

    @pybinder.method
    def echo(self, value: Any) -> Any: ...

    @pybinder.method
    def make_echo(self, name: str) -> IEcho:
        """A new Echo object of this process, held by nobody here."""

    @pybinder.method
    def sleep(self, seconds: float) -> int:
        """Sleep, counting how many sleep() calls run at once; return this pid."""

    @pybinder.method
    def peak(self) -> int:
        """The most sleep() calls that ran at once since the last peak()."""

    @pybinder.method
    def write_to(self, fd: Any, data: bytes) -> str:
        """Write ``data`` to the received descriptor, close it; its type name."""

    @pybinder.method
    def count_fds(self, fds: list[Any]) -> int:
        """Close every received descriptor; how many ParcelFileDescriptors came."""

    @pybinder.method
    def pid(self) -> int: ...


class Echo(IEcho.Stub):
    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, value: Any) -> list[Any]:
        return [self.name, os.getpid(), value]


class Hub(IHub.Stub):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Any] = []
        self._running = 0
        self._peak = 0

    def add_listener(self, listener: IListener, later: float) -> dict[str, Any]:
        answer = listener.on_event("during")
        report = {
            "type": type(listener).__qualname__,
            "typed": isinstance(listener, IListener.Proxy),
            "raw": isinstance(listener, pybinder.BinderProxy),
            "owner_pid": listener.binder.owner_pid if hasattr(listener, "binder") else None,
            "caller": pybinder.get_calling_pid(),
            "answer": answer,
        }
        timer = threading.Timer(later, self._call_later, (listener,))
        timer.daemon = True
        timer.start()
        return report

    def _call_later(self, listener: IListener) -> None:
        try:
            entry = ["later", listener.on_event("later")]
        except Exception as exc:
            entry = ["later-error", f"{type(exc).__name__}: {exc}"]
        with self._lock:
            self._events.append(entry)

    def events(self) -> list[Any]:
        with self._lock:
            return list(self._events)

    def ask(self, other: IEcho, value: Any) -> dict[str, Any]:
        return {
            "answer": other.echo(value),
            "type": type(other).__qualname__,
            "owner_pid": other.binder.owner_pid,
        }

    def echo(self, value: Any) -> Any:
        return value

    def make_echo(self, name: str) -> IEcho:
        return Echo(name)

    def sleep(self, seconds: float) -> int:
        with self._lock:
            self._running += 1
            self._peak = max(self._peak, self._running)
        try:
            time.sleep(seconds)
        finally:
            with self._lock:
                self._running -= 1
        return os.getpid()

    def peak(self) -> int:
        with self._lock:
            peak, self._peak = self._peak, self._running
            return peak

    def write_to(self, fd: Any, data: bytes) -> str:
        kind = type(fd).__name__
        try:
            os.write(fd.fileno(), data)
        finally:
            fd.close()
        return kind

    def count_fds(self, fds: list[Any]) -> int:
        for fd in fds:
            fd.close()
        return sum(isinstance(fd, ParcelFileDescriptor) for fd in fds)

    def pid(self) -> int:
        return os.getpid()


_print_lock = threading.Lock()


def say(word: str, value: Any = None) -> None:
    """Print one line ``WORD JSON`` (whole, whichever thread prints)."""
    with _print_lock:
        print(f"{word} {json.dumps(value)}", flush=True)


def serve(socket_path: str, name: str, stub: pybinder.Binder, threads: int) -> None:
    with pybinder.connect(socket_path) as proc:
        proc.add_service(name, stub)
        proc.start_thread_pool(threads)
        print(f"ready {os.getpid()}", flush=True)
        while True:  # the pool serves; this thread waits to be killed
            time.sleep(3600)


class RecordingListener(IListener.Stub):
    """Records (event, thread id) of each call; the "later" call closes ``proc``
    from another thread, which ends join_thread_pool() on the main thread."""

    def __init__(self, proc: pybinder.ProcessState) -> None:
        self.proc = proc
        self.calls: list[tuple[str, int]] = []

    def on_event(self, event: str) -> str:
        self.calls.append((event, threading.get_ident()))
        if event == "later":
            closer = threading.Timer(0.05, self.proc.close)
            closer.daemon = True
            closer.start()
        return f"{event} handled by {os.getpid()}"


def listener_client(socket_path: str, hub_name: str) -> None:
    main = threading.get_ident()
    with pybinder.connect(socket_path) as proc:
        hub = proc.get_service(hub_name, IHub, timeout=10)
        me = next(p for p in proc.status()["processes"] if p["pid"] == os.getpid())
        say("loopers", me["loopers"]["busy"] + me["loopers"]["idle"])
        listener = RecordingListener(proc)
        say("report", hub.add_listener(listener, 0.2))

        def threads() -> list[list[str]]:
            return [
                [event, "main" if ident == main else "other"] for event, ident in listener.calls
            ]

        say("calls", threads())
        proc.join_thread_pool()  # until the "later" call closes proc
        say("calls", threads())
    say("done")


def death_client(socket_path: str, hub_name: str) -> None:
    with pybinder.connect(socket_path) as proc:
        hub = proc.get_service(hub_name, IHub, timeout=10)
        fired = threading.Event()
        returned = threading.Event()

        def recipient(who: Any) -> None:
            say("died", [time.monotonic(), type(who).__qualname__, who is hub])
            fired.set()

        def pending() -> None:
            try:
                value = hub.sleep(30)
            except Exception as exc:
                say("pending", [time.monotonic(), type(exc).__name__, str(exc)])
            else:
                say("pending", [time.monotonic(), "returned", value])
            returned.set()

        assert hub.ping_binder() and hub.is_binder_alive()
        hub.link_to_death(recipient)
        threading.Thread(target=pending, daemon=True).start()
        say("ready", os.getpid())
        fired.wait(20)
        returned.wait(20)
        say("after", {"alive": hub.is_binder_alive(), "ping": hub.ping_binder()})


def long_running(socket_path: str, name: str) -> None:
    def ready(proc: pybinder.ProcessState) -> None:
        proc.add_service(f"{name}.b", Echo(f"{name}.b"))
        proc.on_reconnect(lambda proc: say("reconnected", proc.reconnects))
        say("ready", os.getpid())

    pybinder.serve(name, Echo(name), socket_path=socket_path, ready=ready)
    say("stopped")


def joined(socket_path: str, name: str) -> None:
    with pybinder.connect(socket_path, reconnect=True) as proc:
        proc.add_service(name, Echo(name))
        say("ready", os.getpid())
        proc.join_thread_pool()  # serves again once the broker is back


def main(argv: list[str]) -> None:
    role, socket_path, *rest = argv
    if role == "hub":
        serve(socket_path, rest[0], Hub(), int(rest[1]))
    elif role == "echo":
        serve(socket_path, rest[0], Echo(rest[0]), 2)
    elif role == "serve":
        long_running(socket_path, rest[0])
    elif role == "join":
        joined(socket_path, rest[0])
    elif role == "listener-client":
        listener_client(socket_path, rest[0])
    elif role == "death-client":
        death_client(socket_path, rest[0])
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])
