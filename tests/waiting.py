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
