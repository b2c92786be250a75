"""asyncio across real processes: awaitable proxies, gathered calls to coroutine
methods served without a thread each, cancellation and timeouts."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest
from aio_peers import ISlow

import pybinder
import pybinder.aio

AIO_PEERS = Path(__file__).with_name("aio_peers.py")


@pytest.fixture(params=["threads", "aio"])
def slow_server(request, cluster):
    peer = cluster.spawn([sys.executable, str(AIO_PEERS), request.param, cluster.socket])
    peer.wait_ready()
    return peer


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_a_hundred_gathered_calls_to_a_coroutine_method_run_at_once(slow_server, cluster):
    async def main() -> tuple[list[int], float]:
        async with pybinder.aio.connect(cluster.socket) as proc:
            slow = await proc.get_service("slow", ISlow, timeout=10)
            assert await slow.slow("warm", 0) == "warm"
            started = time.monotonic()
            results = await asyncio.gather(*(slow.slow(i, 0.2) for i in range(100)))
            return results, time.monotonic() - started

    results, took = run(main())
    assert results == list(range(100))
    assert took < 2.0, f"100 calls of 0.2 s took {took:.2f} s"


@pytest.fixture(params=["threads", "aio", "sync"])
def any_slow_server(request, cluster):
    """A "slow" server with coroutine methods (two ways) or plain ones (``sync``)."""
    peer = cluster.spawn([sys.executable, str(AIO_PEERS), request.param, cluster.socket])
    peer.wait_ready()
    return peer


def test_cancelling_the_awaiting_task_cancels_the_call_in_the_server(any_slow_server, cluster):
    async def main() -> list[list[object]]:
        async with pybinder.aio.connect(cluster.socket) as proc:
            slow = await proc.get_service("slow", ISlow, timeout=10)
            task = asyncio.create_task(slow.wait_to_be_cancelled(10))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await slow.wait_to_be_cancelled(10)
            for _ in range(100):
                seen = await slow.cancellations()
                if len(seen) == 2:
                    return seen
                await asyncio.sleep(0.05)
            return await slow.cancellations()

    assert run(main()) == [[True, os.getpid()], [True, os.getpid()]]


def test_a_coroutine_method_reads_its_callers_deadline(slow_server, cluster, proc):
    slow = proc.get_service("slow", ISlow, timeout=10)
    with pybinder.deadline(5):
        left = slow.deadline_left()
    assert left is not None and 3.0 < left <= 5.0
    assert slow.deadline_left() is None
    assert slow.slow([1, 2], 0) == [1, 2]  # a sync client calls it as any method
