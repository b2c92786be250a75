"""Servers whose methods are coroutines: ``python tests/aio_peers.py ROLE SOCKET``.

``threads``: a plain ``connect()`` with a thread pool (the runtime's own event
loop runs the coroutines); ``aio``: ``pybinder.aio`` and ``await proc.serve()``;
``sync``: the same interface served by plain methods on a thread pool, whose
wait polls ``is_cancelled()``.
Each registers "slow" and prints "ready" once it can be called.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

import pybinder
import pybinder.aio


class ISlow(pybinder.Interface):
    DESCRIPTOR = "tests.ISlow"

    @pybinder.method
    def slow(self, value: Any, seconds: float) -> Any:
        """``value`` after sleeping ``seconds`` (an asyncio sleep: no thread held)."""

    @pybinder.method
    def wait_to_be_cancelled(self, seconds: float) -> None:
        """Sleep; if the caller cancels, note is_cancelled() then."""

    @pybinder.method
    def cancellations(self) -> list[Any]:
        """What each cancelled wait saw: [is_cancelled(), calling pid]."""

    @pybinder.method
    def deadline_left(self) -> Any:
        """The seconds the caller's deadline leaves, or None."""


class Slow(ISlow.Stub):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    async def slow(self, value: Any, seconds: float) -> Any:
        await asyncio.sleep(seconds)
        return value

    async def wait_to_be_cancelled(self, seconds: float) -> None:
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.seen.append([pybinder.is_cancelled(), pybinder.get_calling_pid()])
            raise

    def cancellations(self) -> list[Any]:
        return self.seen

    async def deadline_left(self) -> Any:
        return pybinder.time_remaining()


class SyncSlow(ISlow.Stub):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def slow(self, value: Any, seconds: float) -> Any:
        time.sleep(seconds)
        return value

    def wait_to_be_cancelled(self, seconds: float) -> None:
        give_up = time.monotonic() + seconds
        while time.monotonic() < give_up:
            if pybinder.is_cancelled():
                self.seen.append([True, pybinder.get_calling_pid()])
                return
            time.sleep(0.01)
        self.seen.append([False, pybinder.get_calling_pid()])

    def cancellations(self) -> list[Any]:
        return self.seen

    def deadline_left(self) -> Any:
        return pybinder.time_remaining()


def with_threads(socket_path: str, stub: pybinder.Binder) -> None:
    with pybinder.connect(socket_path) as proc:
        proc.add_service("slow", stub)
        proc.start_thread_pool(2)
        print("ready", flush=True)
        proc.join_thread_pool()


async def with_aio(socket_path: str) -> None:
    async with pybinder.aio.connect(socket_path) as proc:
        await proc.add_service("slow", Slow())
        print("ready", flush=True)
        await proc.serve(max_threads=2)


if __name__ == "__main__":
    role, socket_path = sys.argv[1:3]
    if role == "threads":
        with_threads(socket_path, Slow())
    elif role == "sync":
        with_threads(socket_path, SyncSlow())
    else:
        asyncio.run(with_aio(socket_path))
