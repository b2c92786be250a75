"""asyncio on both sides: a server whose methods are ``async def`` and a client that
awaits its proxy, gathers 100 slow calls and cancels one.

    python examples/async_calc.py

Starts a broker, an async server and an async client, each a real process. The
server serves on its event loop (no thread per call): 100 calls that each sleep
0.2 s finish together. (This file plays all three roles: ``async_calc.py server
SOCKET`` and ``async_calc.py client SOCKET`` are what it starts.)
"""

from __future__ import annotations

import asyncio
import sys
import time

from launch import Demo

import pybinder
import pybinder.aio


class ISlowCalc(pybinder.Interface):
    DESCRIPTOR = "example.ISlowCalc"

    @pybinder.method
    def add(self, a: int, b: int, seconds: float) -> int:
        """``a + b``, after ``seconds``."""


class SlowCalc(ISlowCalc.Stub):
    async def add(self, a: int, b: int, seconds: float) -> int:
        try:
            await asyncio.sleep(seconds)  # waits without holding a thread
        except asyncio.CancelledError:
            cancelled = pybinder.is_cancelled()
            print(f"add({a}, {b}) cancelled: is_cancelled() = {cancelled}", flush=True)
            raise
        return a + b


async def serve(socket_path: str) -> None:
    async with pybinder.aio.connect(socket_path) as proc:
        await proc.add_service("calc", SlowCalc())
        print("ready", flush=True)
        await proc.serve(max_threads=2)


async def use(socket_path: str) -> None:
    async with pybinder.aio.connect(socket_path) as proc:
        calc = await proc.get_service("calc", ISlowCalc)
        print("add(2, 40) =", await calc.add(2, 40, 0))
        started = time.monotonic()
        sums = await asyncio.gather(*(calc.add(i, i, 0.2) for i in range(100)))
        took = time.monotonic() - started
        print(f"100 calls of 0.2 s each: sum {sum(sums)} in {took:.2f} s")
        try:
            async with asyncio.timeout(0.3):
                await calc.add(1, 1, 10)
        except TimeoutError:
            print("a 10 s call under asyncio.timeout(0.3): TimeoutError, cancelled")
        await asyncio.sleep(0.2)  # let the server print its side


def main() -> int:
    python = sys.executable
    with Demo("async") as demo:
        demo.start("server", [python, __file__, "server", demo.socket], "ready")
        if demo.run("client", [python, __file__, "client", demo.socket]) != 0:
            return 1
    print("done")
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "server":
        asyncio.run(serve(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "client":
        asyncio.run(use(sys.argv[2]))
    else:
        sys.exit(main())
