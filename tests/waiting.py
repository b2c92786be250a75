"""Waiting in tests for what another process does in its own time."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(condition: Callable[[], object], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` becomes true within ``timeout`` seconds, checked every
    10 ms (at least once)."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            return False
        time.sleep(0.01)
    return True


def loopers(entry: dict) -> int:
    """How many loopers a process's ``status`` entry counts (busy and idle)."""
    return int(entry["loopers"]["busy"] + entry["loopers"]["idle"])


def fill_thread_pool(service: object, calls: int, seconds: float = 0.3) -> None:
    """Make ``calls`` concurrent ``service.sleep(seconds)`` calls, so that the server's
    broker asks it for loopers (BR_SPAWN_LOOPER) up to its max_threads."""
    import threading

    threads = [
        threading.Thread(target=service.sleep, args=(seconds,))  # type: ignore[attr-defined]
        for _ in range(calls)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)


def grow_thread_pool(
    service: object, count: Callable[[], int], wanted: int, timeout: float = 10.0
) -> bool:
    """Make rounds of concurrent calls until ``count()`` (the server's loopers) is
    ``wanted``: the broker asks for one looper at a time, only while calls queue."""
    give_up = time.monotonic() + timeout
    while count() < wanted:
        if time.monotonic() > give_up:
            return False
        fill_thread_pool(service, wanted + 2, 0.3)
    return count() == wanted
