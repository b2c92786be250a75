"""Deadlines: bound the calls a thread makes, and learn the one a call was made with
(gRPC's deadline propagation, on binder's transactions).

A deadline is a point in time on CLOCK_MONOTONIC, which every process on the machine
shares, so it travels with a transaction as is (BC_DEADLINE, BR_DEADLINE, in ns).
A call's deadline is the earliest of: the innermost ``with deadline(...)`` block on
the calling thread, the deadline of the call this thread is serving (calls made
while serving inherit the time left), and the process's ``call_timeout``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

_local = threading.local()
_probe: list[Callable[[], bool] | None] = [None]  # see set_cancel_probe

#: The call a coroutine serves (a thread_state.AsyncCall: ``caller``, ``deadline_ns``,
#: ``cancelled``), in the context of the task that runs it; None elsewhere.
ASYNC_CALL: ContextVar[Any] = ContextVar("pybinder_async_call", default=None)

#: Nanoseconds in a second.
NS = 1_000_000_000


class _Use:
    """Whether any deadline was ever set in this process: until then a call skips
    looking for one (a thread-local lookup per call)."""

    active = False


use = _Use()


def _stack(name: str) -> list[int]:
    stack: list[int] | None = getattr(_local, name, None)
    if stack is None:
        stack = []
        setattr(_local, name, stack)
    return stack


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Bound every call this thread makes inside the block to ``seconds`` from now;
    nested blocks keep the earlier deadline. A call still unanswered then raises
    :class:`~pybinder.errors.DeadlineExceededError` and is cancelled in the broker.
    A oneway call inside the block waits for its copy into the target's region
    (not in the window) and is cancelled, never delivered, if it is still waiting
    for room there at the deadline.

    Raises:
        ValueError: ``seconds`` is NaN.
    """
    if seconds != seconds:
        raise ValueError("a deadline needs a number of seconds, not NaN")
    at = time.monotonic_ns() + int(min(seconds, 10.0**9) * NS)
    use.active = True
    stack = _stack("calls")
    stack.append(min(at, stack[-1]) if stack else at)
    try:
        yield
    finally:
        stack.pop()


def call_deadline_ns(default_timeout: float | None) -> int:
    """The deadline (CLOCK_MONOTONIC ns; 0: none) of a call made now on this thread,
    with ``default_timeout`` seconds as the process's default."""
    found = 0
    calls: list[int] | None = getattr(_local, "calls", None)
    if calls:
        found = calls[-1]
    serving: list[int] | None = getattr(_local, "serving", None)
    if serving and serving[-1] and (not found or serving[-1] < found):
        found = serving[-1]
    call = ASYNC_CALL.get()
    if call is not None and call.deadline_ns and (not found or call.deadline_ns < found):
        found = call.deadline_ns
    if default_timeout is not None:
        at = time.monotonic_ns() + int(default_timeout * NS)
        if not found or at < found:
            found = at
    return found


def oneway_deadline_ns() -> int:
    """The deadline (CLOCK_MONOTONIC ns; 0: none) for the copy of a oneway call made
    now on this thread: only a ``deadline`` block's. The deadline of the call being
    served and ``call_timeout`` bound two-way calls only, so oneway calls made under
    them keep the window."""
    calls: list[int] | None = getattr(_local, "calls", None)
    return calls[-1] if calls else 0


def push_serving(deadline_ns: int) -> None:
    """The thread starts serving a call with this deadline (0: none)."""
    use.active = True
    _stack("serving").append(deadline_ns)


def pop_serving() -> None:
    """The thread has answered the call it was serving."""
    _stack("serving").pop()


def get_deadline() -> float | None:
    """The deadline of the call this thread is serving, in ``time.monotonic()``
    seconds, or None (no deadline, or not serving a call)."""
    serving: list[int] | None = getattr(_local, "serving", None)
    if serving and serving[-1]:
        return serving[-1] / NS
    call = ASYNC_CALL.get()
    if call is not None and call.deadline_ns:
        return float(call.deadline_ns) / NS
    return None


def time_remaining() -> float | None:
    """Seconds left before the deadline of the call this thread is serving (negative
    once past), or None without one (gRPC's ``time_remaining``)."""
    at = get_deadline()
    return None if at is None else at - time.monotonic()


def set_cancel_probe(probe: Callable[[], bool]) -> None:
    """Set what tells whether the call the calling thread runs was cancelled by its
    caller (thread_state sets it: the ThreadState running the call asks its
    connection)."""
    _probe[0] = probe


def is_cancelled() -> bool:
    """Whether the caller of the call this thread (or this coroutine) is serving has
    given up on it: its deadline has passed (the caller's call raised
    DeadlineExceededError then), or the caller cancelled it (an interrupted wait, a
    cancelled asyncio task: the broker then tells the server, BR_CALL_CANCELLED, or
    BR_CANCELLED for a coroutine, whose task is cancelled too). Either way the
    broker drops the call's reply. Cheap enough to ask in a loop (one non-blocking
    ``recv``)."""
    call = ASYNC_CALL.get()
    if call is not None:
        if call.cancelled:
            return True
    else:
        probe = _probe[0]
        if probe is not None and probe():
            return True
    remaining = time_remaining()
    return remaining is not None and remaining <= 0
