"""A long-running server in one call: :func:`serve` connects with reconnect, adds
the service, serves it on a thread pool and stops cleanly on SIGTERM or SIGINT
(what an Android service's ``main`` does with addService and joinThreadPool)."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from pybinder.runtime.binder import Binder
from pybinder.runtime.process_state import ProcessState, connect

#: The signals that stop :func:`serve` when it runs on the main thread.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _Stop(Exception):
    """Raised in the main thread by a stop signal's handler, to end :func:`serve`'s wait."""


def serve(
    name: str,
    stub: Binder,
    *,
    socket_path: str | os.PathLike[str] | None = None,
    max_threads: int = 4,
    ready: Callable[[ProcessState], Any] | None = None,
    stop: threading.Event | None = None,
    **options: Any,
) -> None:
    """Serve ``stub`` as the service ``name`` until SIGTERM or SIGINT (or ``stop``).

    Connects with ``reconnect=True`` (so after a broker restart the process comes
    back and adds ``name`` again), adds the service, starts a thread pool of up to
    ``max_threads`` loopers, calls ``ready(process_state)`` and waits. On SIGTERM or
    SIGINT (when called on the main thread; the previous handlers come back
    afterwards) or once ``stop`` is set, it closes the process state, which removes
    the service, and returns.

    Args:
        name: the service name (at most 255 characters).
        stub: the local object to serve (an ``I.Stub`` instance).
        socket_path: the broker's socket (None: see ``pybinder.paths``).
        max_threads: the most loopers serving at once, within [1, 256].
        ready: called once the service is added and the pool runs.
        stop: an event another thread sets to stop serving.
        options: more :func:`pybinder.connect` options (region_size, call_timeout...).

    Raises:
        BrokerUnavailableError: no broker answers when it starts.
        PermissionError: another uid registered ``name``.
        ValueError: a bad ``name`` or ``max_threads``.
    """
    stop = stop or threading.Event()
    with connect(socket_path, reconnect=True, **options) as process:
        process.add_service(name, stub)
        process.start_thread_pool(max_threads)
        if ready is not None:
            ready(process)
        _wait_until_stopped(stop)


def _wait_until_stopped(stop: threading.Event) -> None:
    """Wait for ``stop``, or on the main thread also for a stop signal."""
    if threading.current_thread() is not threading.main_thread():
        stop.wait()
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise _Stop()

    previous = {signum: signal.signal(signum, handle) for signum in STOP_SIGNALS}
    try:
        while not stop.wait(0.5):  # a signal's handler runs between the waits' slices
            pass
    except _Stop:
        pass
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
