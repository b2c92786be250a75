"""asyncio for pybinder: awaitable proxies, and Stubs whose methods are ``async def``.

::

    async with pybinder.aio.connect() as proc:
        calc = await proc.get_service("calc", ICalc)
        print(await calc.add(2, 40))                      # an awaitable per method
        print(await asyncio.gather(*(calc.add(i, i) for i in range(100))))

    async with pybinder.aio.connect() as proc:            # a server of async methods
        await proc.add_service("calc", AsyncCalc())
        await proc.serve()                                # until proc.close()

A call runs on one of a pool of worker threads (each with its own connection, as a
thread has one call outstanding at a time), so gathered calls run at once.
Cancelling the awaiting task (``task.cancel()``, ``asyncio.timeout``) cancels the
transaction in the broker (BC_CANCEL_TRANSACTION), as a deadline does; a server
running the call as a coroutine gets its task cancelled and ``is_cancelled()``.

A Stub's ``async def`` methods run on an event loop, never a thread each: under
:meth:`AsyncProcessState.serve` on the serving loop, and under a plain
``pybinder.connect()`` with a thread pool on a loop of the runtime's own. The sync
and the async proxy come from the same interface declaration.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from pybinder.runtime.interface import Interface
from pybinder.runtime.process_state import ProcessState
from pybinder.runtime.thread_state import CallCancelledError, ThreadState

I = TypeVar("I", bound=Interface)  # noqa: E741

#: Worker threads for calls in flight at once (each holds a broker connection).
DEFAULT_WORKERS = 64


class AsyncProxy:
    """An awaitable view of a proxy: each method returns a coroutine that makes the
    call on a worker thread (``await calc.add(2, 40)``). Other attributes are the
    proxy's own.

    Args:
        proxy: an interface proxy (``ICalc.Proxy``) or a BinderProxy.
        process: the :class:`AsyncProcessState` it came from.
    """

    def __init__(self, proxy: Any, process: AsyncProcessState) -> None:
        self._proxy = proxy
        self._process = process

    @property
    def proxy(self) -> Any:
        """The synchronous proxy behind this view."""
        return self._proxy

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._proxy, name)
        if not callable(found):
            return found
        run = self._process.run

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await run(found, *args, **kwargs)

        call.__name__ = name
        return call

    def __repr__(self) -> str:
        return f"<async {self._proxy!r}>"


class AsyncProcessState:
    """A :class:`~pybinder.ProcessState` used from asyncio; make one with
    :func:`connect`.

    Args:
        process: the process state.
        workers: worker threads for calls in flight at once.
    """

    def __init__(self, process: ProcessState, workers: int = DEFAULT_WORKERS) -> None:
        self.process = process
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="pybinder-aio")
        self._closed: asyncio.Event | None = None

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a blocking pybinder call on a worker thread and await it; cancelling
        the awaiting task cancels the transaction in the broker.

        Raises:
            Whatever the call raises; asyncio.CancelledError when cancelled.
        """
        loop = asyncio.get_running_loop()
        process = self.process
        running: list[ThreadState] = []

        def in_worker() -> Any:
            running.append(process.thread_state())
            return function(*args, **kwargs)

        context = contextvars.copy_context()  # a coroutine's call inherits its deadline
        future = loop.run_in_executor(self._executor, context.run, in_worker)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if running:
                running[0].cancel_call()
            future.add_done_callback(_ignore_outcome)
            raise

    async def get_service(
        self, name: str, interface: type[I] | None = None, timeout: float | None = 5.0
    ) -> Any:
        """:meth:`ProcessState.get_service`, awaited; returns an :class:`AsyncProxy`
        (or the local object, if this process registered it).

        Raises:
            ServiceNotFoundError: no such service within ``timeout`` seconds.
            InterfaceMismatchError: its method table does not agree with ``interface``.
        """
        found = await self.run(self.process.get_service, name, interface, timeout)
        return self.wrap(found)

    async def check_service(self, name: str, interface: type[I] | None = None) -> Any:
        """:meth:`ProcessState.check_service`, awaited; None if absent."""
        found = await self.run(self.process.check_service, name, interface)
        return None if found is None else self.wrap(found)

    async def add_service(self, name: str, binder: Any) -> None:
        """:meth:`ProcessState.add_service`, awaited."""
        await self.run(self.process.add_service, name, binder)

    async def list_services(self) -> list[str]:
        """:meth:`ProcessState.list_services`, awaited."""
        names: list[str] = await self.run(self.process.list_services)
        return names

    def on_reconnect(self, callback: Callable[[ProcessState], Any]) -> None:
        """:meth:`ProcessState.on_reconnect` (with ``aio.connect(reconnect=True)``); the
        callback runs on a runtime thread, not on the event loop: hand work to the
        loop with ``loop.call_soon_threadsafe``."""
        self.process.on_reconnect(callback)

    def wrap(self, proxy: Any) -> Any:
        """An :class:`AsyncProxy` for a proxy; a local object is returned as is."""
        from pybinder.runtime.binder import Binder

        return proxy if isinstance(proxy, Binder) else AsyncProxy(proxy, self)

    async def serve(self, max_threads: int = 4) -> None:
        """Serve this process's objects until :meth:`close`: loopers take calls, and
        the coroutines of ``async def`` methods run on the running event loop.

        Raises:
            ValueError: ``max_threads`` is not within [1, 256].
        """
        self.process.async_loop = asyncio.get_running_loop()
        self.process.start_thread_pool(max_threads)
        self._closed = self._closed or asyncio.Event()
        await self._closed.wait()

    async def close(self) -> None:
        """Leave the broker (see :meth:`ProcessState.close`); :meth:`serve` returns."""
        if self._closed is not None:
            self._closed.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.process.close)
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def __aenter__(self) -> AsyncProcessState:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def connect(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    workers: int = DEFAULT_WORKERS,
    **options: Any,
) -> AsyncProcessState:
    """Join the broker for use from asyncio (``async with pybinder.aio.connect() as
    proc``); ``options`` are :func:`pybinder.connect`'s.

    Raises:
        BrokerUnavailableError: as :func:`pybinder.connect`.
    """
    return AsyncProcessState(ProcessState(socket_path, **options), workers)


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    """Retrieve a given-up call's outcome (its CallCancelledError, usually), so
    asyncio does not log it as never retrieved."""
    if not future.cancelled():
        exc = future.exception()
        if exc is not None and not isinstance(exc, CallCancelledError):
            pass  # the call ended some other way after its caller gave up
