"""One process's connection to the broker (libbinder's ProcessState): its read-only
receive region, its thread states and thread pool, its local nodes and its handles."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, overload

from pybinder import protocol
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    BrokerUnavailableError,
    DeadlineExceededError,
    DeadObjectError,
    ProtocolError,
    ProxyClosedError,
    QuotaExceededError,
    ServiceNotFoundError,
    quota_error,
)
from pybinder.parcel import OBJ_FD, OBJ_HANDLE, OBJ_NODE
from pybinder.paths import resolve_socket_path
from pybinder.protocol import (
    BC_CLEAR_DEATH_NOTIFICATION,
    BC_HELLO_PROCESS,
    BC_RELEASE,
    BC_REQUEST_DEATH_NOTIFICATION,
    BC_SET_MAX_THREADS,
    BR_CANCELLED,
    BR_DEAD_BINDER,
    BR_ERROR,
    BR_HELLO_PROCESS,
    BR_RELEASE_NODE,
    BR_SPAWN_LOOPER,
    MAX_MESSAGE,
    MAX_THREADS_LIMIT,
    PROTOCOL_VERSION,
    REPLY_OK,
    RING_IS_ORDERED,
    SERVICE_CALLBACK_DESCRIPTOR,
    SERVICE_MANAGER_HANDLE,
)
from pybinder.region import map_region_readonly
from pybinder.runtime import deadline as deadlines
from pybinder.runtime import interface as interfaces
from pybinder.runtime.binder import (
    Binder,
    BinderProxy,
    ProxyBase,
    binder_error_reply,
    exception_reply,
)
from pybinder.runtime.deadline import ASYNC_CALL
from pybinder.runtime.file_descriptor import ParcelFileDescriptor
from pybinder.runtime.interface import Interface
from pybinder.runtime.service_manager import IServiceManager
from pybinder.runtime.thread_state import AsyncCall, ThreadState

I = TypeVar("I", bound=Interface)  # noqa: E741

#: Seconds to wait for the broker's answer to a hello before giving up.
HELLO_TIMEOUT = 10.0

#: Seconds close() waits for loopers to stop and for the broker to let go.
CLOSE_TIMEOUT = 5.0

#: Seconds between the first two tries to reach a broker that went away
#: (``connect(reconnect=True)``); the pause doubles after each failed try ...
RECONNECT_FIRST_DELAY = 0.05

#: ... up to this many seconds.
RECONNECT_MAX_DELAY = 1.0

#: Seconds a proxy found by name waits for its service to be added again after a
#: reconnect, when no deadline is in force (get_service's default timeout).
REBIND_TIMEOUT = 5.0

#: The longest a thread waiting for a reply polls before it sleeps, in µs
#: (``$PYBINDER_SPIN_US``); within it, twice the thread's recent typical wait.
DEFAULT_SPIN_US = 200.0

#: The most oneway calls a thread has sent and not yet seen copied by the broker
#: (``$PYBINDER_ONEWAY_WINDOW``); 1: each oneway call waits for its copy, as Binder's.
DEFAULT_ONEWAY_WINDOW = 16

#: The largest oneway window a process may ask for: fewer calls than the broker holds
#: behind one that waits for room (protocol.MAX_BACKLOG).
MAX_ONEWAY_WINDOW = 48

log = logging.getLogger("pybinder")

_live_states: weakref.WeakSet[ProcessState] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for state in list(_live_states):
        state._forked = True


os.register_at_fork(after_in_child=_forget_after_fork)


class ProcessState:
    """A process's membership in a broker; create with :func:`pybinder.connect`.

    Args:
        socket_path: the broker's socket (None: see :func:`pybinder.paths.resolve_socket_path`).
        region_size: bytes of receive region to ask for (None: the broker's default,
            1 MiB - 8 KiB); the broker caps it at its ``--max-region-size``.
        spin_us: the longest a thread waiting for a reply polls, yielding the CPU,
            before it sleeps, in µs (None: ``$PYBINDER_SPIN_US`` or 200; 0 never spins).
            Within it a thread polls for twice its recent typical wait, and only
            50 µs while that exceeds four times ``spin_us`` (a slow method); it
            stops at once when its CPU turns out to be shared with another busy
            thread. A reply that comes while it polls costs no wake-up. A looper
            that has just answered a two-way call polls up to ``spin_us`` for the
            next call (one looper per process at a time).
        oneway_window: how many oneway calls a thread may have in flight, sent and
            not yet copied by the broker (None: ``$PYBINDER_ONEWAY_WINDOW`` or 16; at
            most 48). A oneway call of up to 256 KiB without a loan then returns as
            soon as it is written and sent, and this thread writes the next while the
            broker copies the last, which hands the calls queued for a receiver to it
            in batches; a failure (dead target, no room, malformed) is raised by the
            thread's next call or by :meth:`flush_oneway`, naming the failure. With 1,
            a oneway call returns once the broker has copied it into the target's
            region (or queued it for room there), as Binder's, and raises its own
            failure. Calls keep their order either way.
        broker_uid: a uid besides root's and this process's own whose broker this
            process trusts. Before sending anything, every connection checks who
            listens (SO_PEERCRED, from the kernel): anyone else who got to the socket
            path first could pose as the broker.
        call_timeout: seconds a two-way call may take unless a ``pybinder.deadline``
            block or the call being served sets an earlier deadline (None: no
            limit). A call past it raises DeadlineExceededError and is cancelled.
        reconnect: when the broker goes away, try to reach one on the same socket
            again, every 0.05 s at first and at most every 1 s, until :meth:`close`.
            Death recipients fire when it goes, as without ``reconnect``. Once back,
            the process has a new region, adds again the services it had added,
            registers again for its notifications, restarts its loopers and calls
            the :meth:`on_reconnect` callbacks. Calls made meanwhile raise
            BrokerUnavailableError, or wait for the broker while a deadline is in
            force (and raise DeadlineExceededError when it passes). A proxy found by
            name (:meth:`get_service`) finds its service again on its next use,
            waiting up to 5 s (or the deadline) for it to be added again; any other
            proxy of the old broker raises DeadObjectError, and one closed with
            ``close()`` stays closed.

    Attributes:
        region_size: the receive region's size in bytes, as granted.
        max_parcel: the largest parcel the broker accepts, in bytes.
        max_threads: the most loopers the broker may have this process start
            (:meth:`start_thread_pool`); 0 before a pool is started.

    A runtime thread ("pybinder-runtime") reads the process connection for what
    concerns the whole process: nodes no longer held (BR_RELEASE_NODE), deaths
    (BR_DEAD_BINDER; death recipients run on it) and requests for one more looper
    (BR_SPAWN_LOOPER).

    Raises:
        BrokerUnavailableError: no broker answers on the socket, the one that does
            runs as a uid this process does not trust, or it refused this process
            (the message says why: a quota, or /dev/shm full).

    Not usable after ``fork()`` in the child (as libbinder): connect again there.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        region_size: int | None = None,
        spin_us: float | None = None,
        oneway_window: int | None = None,
        broker_uid: int | None = None,
        call_timeout: float | None = None,
        reconnect: bool = False,
    ) -> None:
        self.socket_path: Path = resolve_socket_path(socket_path)
        self.reconnect = reconnect
        self.broker_uid = broker_uid
        if call_timeout is not None and not call_timeout > 0:
            raise ValueError(f"call_timeout is a positive number of seconds, not {call_timeout}")
        self.call_timeout = call_timeout
        if spin_us is None:
            spin_us = float(os.environ.get("PYBINDER_SPIN_US", DEFAULT_SPIN_US))
        self.spin_seconds = max(0.0, spin_us) / 1e6
        if oneway_window is None:
            oneway_window = int(os.environ.get("PYBINDER_ONEWAY_WINDOW", DEFAULT_ONEWAY_WINDOW))
        self.oneway_window = min(max(1, oneway_window), MAX_ONEWAY_WINDOW)
        if not RING_IS_ORDERED:
            self.oneway_window = 1  # the settle words need x86-64's store order
        self.closed = False
        self._forked = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._thread_slots: weakref.WeakSet[_ThreadSlot] = weakref.WeakSet()
        self._loopers: list[threading.Thread] = []
        self._nodes: dict[int, list[Any]] = {}  # node id -> [binder, times sent]
        self._node_ids: dict[int, int] = {}  # id(binder) -> node id
        self._next_node = itertools.count(1)
        self._proxies: weakref.WeakValueDictionary[int, BinderProxy] = weakref.WeakValueDictionary()
        self._releases_of: dict[int, Any] = {}  # handle -> the finalizer releasing it
        self._registrations: dict[tuple[str, Any], Binder] = {}  # (name, callback) -> stub
        self._services: dict[str, Binder] = {}  # what add_service added, to add again
        self._reconnect_callbacks: list[Callable[[ProcessState], Any]] = []
        #: Which broker connection this is: it grows when the broker goes (with
        #: ``reconnect``) and again when it is back. Proxies and thread states of an
        #: earlier one are stale.
        self.generation = 0
        #: How many times this process reconnected to a broker.
        self.reconnects = 0
        self._broker_changed = threading.Condition()
        self._connected = True
        #: The event loop coroutine methods run on (``pybinder.aio`` sets the running
        #: one; else the runtime starts its own, on the thread "pybinder-asyncio").
        self.async_loop: asyncio.AbstractEventLoop | None = None
        self._own_loop: threading.Thread | None = None
        self._async_calls: dict[int, tuple[AsyncCall, Any]] = {}  # detached id -> (call, future)
        self.max_threads = 0
        self.releases: collections.deque[bytes] = collections.deque()
        #: Whether one of this process's loopers is polling for its next transaction;
        #: at most one does (see ThreadState.join_looper).
        self.looper_polling = False
        self._asked_region_size = region_size or 0
        self._sock, self.key, self.region_size, self.max_parcel, fd = self._join()
        self.region_fd = fd
        self._region = map_region_readonly(fd, self.region_size)
        self.region_view = memoryview(self._region)
        self.service_manager: Any = IServiceManager.Proxy(
            BinderProxy(self, SERVICE_MANAGER_HANDLE, IServiceManager.DESCRIPTOR)
        )
        _live_states.add(self)
        self._runtime_thread = threading.Thread(
            target=self._serve_process_connection, name="pybinder-runtime", daemon=True
        )
        self._runtime_thread.start()

    # -- connecting ----------------------------------------------------------------------

    def open_connection(self) -> socket.socket:
        """A new connected socket to the broker.

        Raises:
            BrokerUnavailableError: nobody listens on the socket path.
        """
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(str(self.socket_path))
        except OSError as exc:
            sock.close()
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            hint = " (start one with `pybinder broker`)" if exc.errno in _NOBODY else ""
            raise BrokerUnavailableError(
                f"no broker at {self.socket_path}: {reason}{hint}"
            ) from None
        try:
            self._check_broker_identity(sock)
        except BaseException:
            sock.close()
            raise
        return sock

    def _check_broker_identity(self, sock: socket.socket) -> None:
        """Refuse a listener that runs as a uid other than root, this process's own
        or ``broker_uid`` (the kernel's SO_PEERCRED; it cannot be forged).

        Raises:
            BrokerUnavailableError: naming the uid found.
        """
        pid, uid, _ = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid in (0, os.getuid(), self.broker_uid):
            return
        raise BrokerUnavailableError(
            f"the process listening on {self.socket_path} (pid {pid}) runs as uid {uid},"
            f" not as root or this user: not trusted as the broker"
            f" (connect(broker_uid={uid}) trusts it)"
        )

    def _join(self) -> tuple[socket.socket, int, int, int, int]:
        """Connect and say hello as a process: (connection, key, region size, largest
        parcel, region fd).

        Raises:
            BrokerUnavailableError: as :class:`ProcessState`.
        """
        sock = self.open_connection()
        try:
            return (sock, *self._hello(sock, self._asked_region_size))
        except BaseException:
            sock.close()
            raise

    def _hello(self, sock: socket.socket, region_size: int) -> tuple[int, int, int, int]:
        sock.settimeout(HELLO_TIMEOUT)
        try:
            sock.send(protocol.encode(BC_HELLO_PROCESS, PROTOCOL_VERSION, region_size))
            message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 1)
        except TimeoutError:
            raise BrokerUnavailableError(
                f"the broker did not answer in {HELLO_TIMEOUT} s"
            ) from None
        except OSError as exc:
            raise BrokerUnavailableError(f"lost the broker during hello: {exc}") from None
        sock.settimeout(None)
        commands = list(protocol.decode(message)) if message else []
        if len(commands) != 1 or commands[0][0] != BR_HELLO_PROCESS or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise BrokerUnavailableError(f"the broker refused this process: {_refusal(commands)}")
        _, key, size, max_parcel = commands[0]
        return key, size, max_parcel, fds[0]

    def thread_state(self) -> ThreadState:
        """This thread's :class:`ThreadState`, connecting it on first use.

        Raises:
            BinderError: the process state is closed, or this is a forked child.
        """
        slot: _ThreadSlot | None = getattr(self._local, "slot", None)
        if slot is None or slot.generation != self.generation or self.closed or self._forked:
            slot = self._new_thread_slot(slot)
        return slot.state

    def _new_thread_slot(self, stale: _ThreadSlot | None) -> _ThreadSlot:
        """Connect this thread (again, after a reconnect: ``stale`` was connected to
        the broker that went away)."""
        self._check_usable()
        if stale is not None:
            with contextlib.suppress(BinderError):
                stale.state.close()
            self._thread_slots.discard(stale)
        if not self._connected:
            self._wait_for_broker()
        generation = self.generation  # before connecting: a reconnect meanwhile makes it stale
        slot = _ThreadSlot(ThreadState(self), generation)
        self._local.slot = slot
        self._thread_slots.add(slot)
        return slot

    def _check_usable(self) -> None:
        if self._forked or os.getpid() != self._pid:
            raise BinderError("a process state cannot be used after fork(); connect again")
        if self.closed:
            raise BinderError("this process state is closed")

    # -- service manager -------------------------------------------------------------------

    def add_service(self, name: str, binder: Binder) -> None:
        """Register a local object under ``name`` (servicemanager addService); with
        ``reconnect``, it is added again after each reconnect.

        Raises:
            PermissionError: another uid registered ``name``.
            ValueError: ``name`` is empty or longer than 255 characters.
        """
        self.service_manager.add_service(name, binder)
        self._services[name] = binder

    @overload
    def get_service(
        self, name: str, interface: None = None, timeout: float | None = 5.0
    ) -> Any: ...
    @overload
    def get_service(self, name: str, interface: type[I], timeout: float | None = 5.0) -> I: ...
    def get_service(
        self, name: str, interface: type[I] | None = None, timeout: float | None = 5.0
    ) -> Any:
        """The service ``name``, waiting up to ``timeout`` seconds for it to appear.

        Returns ``interface.Proxy`` (or the local object itself, if this process
        registered it) when ``interface`` is given, else a :class:`BinderProxy`.

        Raises:
            ServiceNotFoundError: no such service within ``timeout`` (None: wait forever).
        """
        binder = self.service_manager.wait_for_service(name, timeout)
        return self._as_service(name, binder, interface)

    @overload
    def check_service(self, name: str, interface: None = None) -> Any: ...
    @overload
    def check_service(self, name: str, interface: type[I]) -> I | None: ...
    def check_service(self, name: str, interface: type[I] | None = None) -> Any:
        """The service ``name`` if registered now, else None (never waits)."""
        binder = self.service_manager.check_service(name)
        if binder is None:
            return None
        return self._as_service(name, binder, interface)

    def rebind(self, proxy: BinderProxy, wait: bool = True) -> BinderProxy:
        """The proxy to call in place of ``proxy``, which belongs to an earlier broker
        connection: itself for the service manager; for a proxy found by name, the
        service of that name now (found once, waiting up to the deadline in force or
        :data:`REBIND_TIMEOUT` when ``wait``).

        Raises:
            BrokerUnavailableError: the broker is gone (and no deadline lets this wait).
            DeadlineExceededError: the deadline passed while waiting for the broker or
                for the service.
            DeadObjectError: ``proxy`` was not found by name, or its service did not
                come back within REBIND_TIMEOUT.
            InterfaceMismatchError: the service came back with an interface that no
                longer agrees with one ``proxy`` was checked against (get_service(name, I)).
        """
        if not self._connected:
            self._wait_for_broker()
        if proxy.handle == SERVICE_MANAGER_HANDLE:
            proxy.generation, proxy.dead = self.generation, False
            return proxy
        successor = proxy.successor
        if successor is not None and successor.generation == self.generation:
            return successor
        name = proxy.service_name
        if name is None:
            raise DeadObjectError(f"{proxy.describe()} was a node of a broker that went away")
        deadline_ns = deadlines.call_deadline_ns(self.call_timeout)
        timeout = REBIND_TIMEOUT
        if deadline_ns:
            timeout = min(timeout, max(0.0, (deadline_ns - time.monotonic_ns()) / 1e9))
        try:
            found = (
                self.service_manager.wait_for_service(name, timeout)
                if wait
                else self.service_manager.check_service(name)
            )
        except ServiceNotFoundError:
            found = None
        except DeadlineExceededError:
            raise DeadlineExceededError(
                f"{proxy.describe()}: the broker restarted, and the service has not come"
                f" back within the deadline"
            ) from None
        remote = found.binder if isinstance(found, ProxyBase) else found
        if not isinstance(remote, BinderProxy):
            where = "is now served by this process" if found else "has not come back"
            raise DeadObjectError(
                f"{proxy.describe()}: the broker restarted, and the service {where}"
            )
        remote.service_name = name
        interfaces.check_successor(proxy, remote)
        proxy.successor = remote
        return remote

    def _as_service(self, name: str, binder: Any, interface: type[I] | None) -> Any:
        """Name the proxy after its service; view it as ``interface``, checking once
        that the node's method table agrees (see Interface.from_service)."""
        remote = binder.binder if isinstance(binder, ProxyBase) else binder
        if isinstance(remote, BinderProxy):
            remote.service_name = name
        if interface is None:
            return binder
        return interface.from_service(binder)

    # -- notifications -------------------------------------------------------------------

    def register_for_notifications(self, name: str, callback: Any) -> None:
        """Call ``callback(name, proxy)`` when a service ``name`` is added: at once if
        it exists, then on every add (as after its owner died and a new one came)
        (servicemanager's registerForNotifications). The broker calls this process,
        so it needs a looper: this starts the thread pool if none runs.

        Raises:
            SecurityError: the policy does not let this process find ``name``.
            QuotaExceededError: waiters_per_process (registrations count as waits).
            ValueError: ``name`` is empty or longer than 255 characters.
        """
        key = (name, callback)
        if key in self._registrations:
            return
        stub = _ServiceCallback(callback)
        if not self._loopers:
            self.start_thread_pool()
        self.service_manager.register_for_notifications(name, stub)
        self._registrations[key] = stub

    def unregister_for_notifications(self, name: str, callback: Any) -> bool:
        """Stop calling ``callback`` for ``name``; False if it was not registered."""
        stub = self._registrations.pop((name, callback), None)
        if stub is None:
            return False
        self.service_manager.unregister_for_notifications(name, stub)
        return True

    def list_services(self) -> list[str]:
        """The names of every registered service this process may find, sorted
        (fetched a page at a time, so any number of names fits)."""
        names: list[str] = []
        while page := self.service_manager.list_services(len(names)):
            names.extend(page)
        return names

    def status(self) -> dict[str, Any]:
        """The broker's status: ``{"broker": {...}, "processes": [...], "services": {...}}``.

        Byte counts include ``bytes_copied`` (every parcel byte the broker copied) and
        ``buffer_bytes_copied`` (the out-of-band payload bytes among them);
        ``oneway_batched`` counts oneway calls handed to a looper in one message
        behind an earlier one; ``parcels_streamed`` the parcels the broker copied
        with streaming stores, those of ``stream_min`` bytes or more (0: none; see
        ``pybinder.broker.one_copy``).
        """
        return dict(self.service_manager.status())

    # -- loans ----------------------------------------------------------------------

    def loan(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes that calls from this thread send without
        a copy on this side (iceoryx-style loan; see :meth:`ThreadState.loan`).

        Fill it in place (``buf[:] = ...``, ``numpy.frombuffer(buf)``, ``readinto``)
        and pass it, or a slice of it, as an argument or a return value: the broker
        copies it straight into the receiver's region, which makes it the only copy.
        The buffer belongs to the calling thread and stays valid until that thread
        asks for a larger loan.

        Raises:
            TransactionTooLargeError: ``size`` exceeds the broker's largest parcel.
        """
        return self.thread_state().loan(size)

    # -- thread pool ---------------------------------------------------------------------------

    def start_thread_pool(self, max_threads: int = 4) -> None:
        """Start one background looper, and let the broker ask for more up to
        ``max_threads`` (binder's startThreadPool and BINDER_SET_MAX_THREADS).

        Each looper takes one transaction at a time. When every looper is busy and
        work waits, the broker asks for one more (BR_SPAWN_LOOPER), so up to
        ``max_threads`` calls run at once, and an idle process keeps one thread.
        Calling again with a larger number raises the limit.

        Raises:
            ValueError: ``max_threads`` is not within [1, 256].
        """
        if not 1 <= max_threads <= MAX_THREADS_LIMIT:
            raise ValueError(f"max_threads must be within [1, {MAX_THREADS_LIMIT}]")
        self._check_usable()
        with self._lock:
            raised = max_threads > self.max_threads
            self.max_threads = max(self.max_threads, max_threads)
            if self._loopers:
                if raised:
                    self.thread_state().send_command(
                        protocol.encode(BC_SET_MAX_THREADS, self.max_threads)
                    )
                return
            self._add_looper()

    def _add_looper(self) -> None:
        """Start one more looper thread (the caller holds ``_lock``)."""
        looper = threading.Thread(
            target=self._run_looper,
            name=f"pybinder-looper-{len(self._loopers) + 1}",
            daemon=True,
        )
        self._loopers.append(looper)
        looper.start()

    # -- coroutine methods ---------------------------------------------------------------

    def run_async(self, call: AsyncCall) -> None:
        """Run a coroutine a method returned on the event loop (:attr:`async_loop`,
        or one of the runtime's own): many such calls run at once without a thread
        each. Its answer goes back from the loop's thread (BC_REPLY_TO)."""
        loop = self._event_loop()
        future = asyncio.run_coroutine_threadsafe(self._serve_async(call), loop)
        if call.txn_id:
            self._async_calls[call.txn_id] = (call, future)

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self.async_loop is None or self.async_loop.is_closed():
                loop = asyncio.new_event_loop()
                self._own_loop = threading.Thread(
                    target=loop.run_forever, name="pybinder-asyncio", daemon=True
                )
                self._own_loop.start()
                self.async_loop = loop
            return self.async_loop

    async def _serve_async(self, call: AsyncCall) -> None:
        """Await ``call``'s coroutine in a task whose context names the call (for
        get_calling_pid, get_deadline, is_cancelled), then answer it."""
        ASYNC_CALL.set(call)
        try:
            body = [REPLY_OK, await call.coroutine]
        except asyncio.CancelledError:
            body = binder_error_reply(DeadlineExceededError("the caller cancelled the call"))
        except BinderError as exc:
            body = binder_error_reply(exc)
        except Exception as exc:
            body = exception_reply(exc, traceback.format_exc())
        self._async_calls.pop(call.txn_id, None)
        if not call.txn_id and body[0] != REPLY_OK:
            log.error("oneway coroutine call raised: %s", body[1:4])
        try:
            if not self.closed:
                self.thread_state().reply_detached(call, body)
        except BinderError as exc:
            log.warning("could not answer a coroutine call: %s", exc)
        finally:
            call.release_views()

    def _stop_own_loop(self, current: threading.Thread) -> None:
        """Stop the event loop the runtime started for coroutine methods, if any."""
        thread, loop = self._own_loop, self.async_loop
        if thread is None or loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not current:
            thread.join(CLOSE_TIMEOUT)
            loop.close()

    def _cancel_async(self, txn_id: int) -> None:
        """BR_CANCELLED: the caller of a detached call gave up; cancel its task."""
        entry = self._async_calls.get(txn_id)
        if entry is not None:
            call, future = entry
            call.cancelled = True
            future.cancel()

    def spawn_looper(self) -> None:
        """BR_SPAWN_LOOPER: start one more looper, below ``max_threads``."""
        with self._lock:
            if not self.closed and len(self._loopers) < self.max_threads:
                self._add_looper()

    def join_thread_pool(self) -> None:
        """Serve transactions on the calling thread until :meth:`close` (or the broker
        goes; with ``reconnect``, it serves again once the broker is back).

        Raises:
            BrokerUnavailableError: the broker went away while the process was open
                (without ``reconnect``).
        """
        self._serve_looping(lambda: self.thread_state().join_looper())

    def _run_looper(self) -> None:
        def serve() -> None:
            state = self.thread_state()
            state.send_command(protocol.encode(BC_SET_MAX_THREADS, self.max_threads))
            state.join_looper(pool=True)

        self._serve_looping(serve)

    def _serve_looping(self, serve: Callable[[], None]) -> None:
        """Run ``serve`` (a looper's loop) until the process closes; with ``reconnect``
        run it again each time a broker is back after the last one went."""
        while not self.closed:
            generation = self.generation
            try:
                serve()
                return
            except BrokerUnavailableError:
                if self.closed:
                    return
                if not self.reconnect:
                    raise
            self._wait_for_new_broker(generation)

    # -- reconnecting ----------------------------------------------------------------------

    def on_reconnect(self, callback: Callable[[ProcessState], Any]) -> None:
        """Call ``callback(process_state)`` after each reconnect (see ``reconnect``),
        on a runtime thread, once the services are added again and the notifications
        registered again: for what else the process needs to set up again (links to
        death, state kept by services). An exception it raises is logged."""
        self._reconnect_callbacks.append(callback)

    def _wait_for_broker(self) -> None:
        """While the broker is gone and this process reconnects (only then is it not
        ``_connected``): wait for it within the deadline in force (``pybinder.deadline``,
        ``call_timeout``), else raise.

        Raises:
            BrokerUnavailableError: no deadline is in force.
            DeadlineExceededError: the deadline passed first.
        """
        if self._connected:
            return
        deadline_ns = deadlines.call_deadline_ns(self.call_timeout)
        if not deadline_ns:
            raise BrokerUnavailableError(
                f"the broker at {self.socket_path} went away; reconnecting"
            )
        with self._broker_changed:
            while not self._connected and not self.closed:
                remaining = (deadline_ns - time.monotonic_ns()) / 1e9
                if remaining <= 0:
                    raise DeadlineExceededError(
                        f"the broker at {self.socket_path} was not back within the deadline"
                    )
                self._broker_changed.wait(remaining)
        self._check_usable()

    def _wait_for_new_broker(self, generation: int) -> None:
        """Wait until a broker connection newer than ``generation`` is up, or the
        process closes."""
        with self._broker_changed:
            while not self.closed and not (self._connected and self.generation > generation):
                self._broker_changed.wait()

    def _broker_went(self) -> None:
        """The broker went away and this process reconnects: everything of the old
        connection goes stale (handles, nodes, releases, detached calls)."""
        with self._lock, self._broker_changed:
            self._connected = False
            self.generation += 1
            proxies = list(self._proxies.values())
            self._proxies.clear()
            for finalizer in self._releases_of.values():
                finalizer.detach()
            self._releases_of.clear()
            self.releases.clear()
            self._nodes.clear()
            self._node_ids.clear()
            async_calls = list(self._async_calls.values())
            self._async_calls.clear()
            self._broker_changed.notify_all()
        for call, future in async_calls:
            call.cancelled = True
            future.cancel()
        for proxy in proxies:
            proxy.died()

    def _reconnect(self) -> bool:
        """Try to reach a broker again, pausing RECONNECT_FIRST_DELAY doubling up to
        RECONNECT_MAX_DELAY between tries, until one answers (True) or the process
        closes (False)."""
        delay = RECONNECT_FIRST_DELAY
        while not self.closed:
            try:
                joined = self._join()
            except BrokerUnavailableError as exc:
                log.debug("reconnecting: %s", exc)
                with self._broker_changed:
                    if not self.closed:
                        self._broker_changed.wait(delay)
                delay = min(2 * delay, RECONNECT_MAX_DELAY)
                continue
            return self._attach(*joined)
        return False

    def _attach(
        self, sock: socket.socket, key: int, region_size: int, max_parcel: int, fd: int
    ) -> bool:
        """Take a new broker connection in place of the old one; False (and the new
        one closed) if the process closed meanwhile."""
        region = map_region_readonly(fd, region_size)
        with self._lock, self._broker_changed:
            if self.closed:
                old = (sock, region, memoryview(region), fd)
            else:
                old = (self._sock, self._region, self.region_view, self.region_fd)
                self._sock, self.key, self.max_parcel = sock, key, max_parcel
                self.region_size, self.region_fd = region_size, fd
                self._region, self.region_view = region, memoryview(region)
                self.generation += 1
                self.reconnects += 1
                self._connected = True
                self._broker_changed.notify_all()
        old_sock, old_region, old_view, old_fd = old
        old_sock.close()
        with contextlib.suppress(BufferError):  # a caller still holds a view: it keeps the map
            old_view.release()
            old_region.close()
        os.close(old_fd)
        return not self.closed

    def _restore(self) -> None:
        """After a reconnect: add the services again, register the notifications
        again, then call the on_reconnect callbacks."""
        log.info("reconnected to the broker at %s", self.socket_path)
        for name, binder in list(self._services.items()):
            try:
                self.service_manager.add_service(name, binder)
            except Exception as exc:
                log.error("could not add the service %r again: %s", name, exc)
        for (name, _), stub in list(self._registrations.items()):
            try:
                self.service_manager.register_for_notifications(name, stub)
            except Exception as exc:
                log.error("could not register for %r again: %s", name, exc)
        for callback in list(self._reconnect_callbacks):
            try:
                callback(self)
            except Exception:
                log.exception("on_reconnect callback %r raised", callback)

    # -- objects in parcels ----------------------------------------------------------------------

    def encode_object(self, obj: Any) -> tuple[int, int, str] | None:
        """The object-table entry for a binder object in an outgoing parcel, or None.

        A local :class:`Binder` becomes a node (kept alive until the broker says no
        other process holds it); a proxy becomes its handle. Either goes with its
        interface descriptor.

        Raises:
            ProxyClosedError: the proxy was closed.
            TypeError: a proxy of another process state.
        """
        if isinstance(obj, Binder):
            return OBJ_NODE, self._node_id(obj), obj.DESCRIPTOR
        if isinstance(obj, ProxyBase):
            obj = obj.binder
        if isinstance(obj, BinderProxy):
            if obj.process is not self:
                raise TypeError("a proxy can only be sent through the process state it came from")
            if obj.closed:
                raise ProxyClosedError(f"{obj.describe()} was closed")
            if obj.generation != self.generation:
                obj = self.rebind(obj)
            return OBJ_HANDLE, obj.handle, obj.descriptor
        return None

    def decode_object(self, kind: int, value: int, descriptor: str = "", extra: int = 0) -> Any:
        """The object for an object-table entry of an incoming parcel: a local
        object (a node of ours come home), a proxy (an interface proxy when the
        descriptor names an interface this process knows, see
        ``pybinder.runtime.interface.typed``), or a ParcelFileDescriptor.

        Raises:
            ProtocolError: an unknown node or kind.
        """
        if kind == OBJ_NODE:
            return self.local_node(value)
        if kind == OBJ_HANDLE:
            return interfaces.typed(self._proxy(value, descriptor, extra))
        if kind == OBJ_FD:
            return ParcelFileDescriptor(value)
        raise ProtocolError(f"unknown object kind {kind}")

    def local_node(self, node_id: int) -> Binder:
        """The local object the broker calls ``node_id``.

        Raises:
            ProtocolError: no such node.
        """
        entry = self._nodes.get(node_id)  # a dict read needs no lock
        if entry is None:
            raise ProtocolError(f"no local node {node_id}")
        binder: Binder = entry[0]
        return binder

    def node_released(self, node_id: int, count: int) -> None:
        """BR_RELEASE_NODE: ``count`` of our sends of ``node_id`` are no longer held."""
        with self._lock:
            entry = self._nodes.get(node_id)
            if entry is None:
                return
            entry[1] -= count
            if entry[1] <= 0:
                del self._nodes[node_id]
                del self._node_ids[id(entry[0])]

    def _node_id(self, binder: Binder) -> int:
        with self._lock:
            node_id = self._node_ids.get(id(binder))
            if node_id is None:
                node_id = next(self._next_node)
                self._node_ids[id(binder)] = node_id
                self._nodes[node_id] = [binder, 0]
            self._nodes[node_id][1] += 1
            return node_id

    def _proxy(self, handle: int, descriptor: str = "", owner_pid: int = 0) -> BinderProxy:
        with self._lock:
            proxy = self._proxies.get(handle)
            if proxy is None:
                proxy = BinderProxy(self, handle, descriptor, owner_pid)
                deliveries = [0]
                proxy._deliveries = deliveries  # type: ignore[attr-defined]
                self._releases_of[handle] = weakref.finalize(
                    proxy, self._queue_release, handle, deliveries
                )
                self._proxies[handle] = proxy
            elif descriptor and not proxy.descriptor:
                proxy.descriptor = descriptor
            proxy._deliveries[0] += 1  # type: ignore[attr-defined]
            return proxy

    def _queue_release(self, handle: int, deliveries: list[int]) -> None:
        self._releases_of.pop(handle, None)
        if not self.closed and not self._forked:
            self.releases.append(protocol.encode(BC_RELEASE, handle, deliveries[0]))

    def release_proxy(self, proxy: BinderProxy) -> None:
        """Release ``proxy``'s reference now (BC_RELEASE of its deliveries), from this
        thread's connection, so it follows this thread's calls that name it."""
        with self._lock:
            if self._proxies.get(proxy.handle) is not proxy:
                return
            del self._proxies[proxy.handle]
            finalizer = self._releases_of.pop(proxy.handle, None)
            if finalizer is None or finalizer.detach() is None:
                return
        if not self.closed and not self._forked:
            deliveries = proxy._deliveries[0]  # type: ignore[attr-defined]
            self.thread_state().send_command(protocol.encode(BC_RELEASE, proxy.handle, deliveries))

    def describe_handle(self, handle: int) -> str:
        """Names the node behind ``handle`` for an error message."""
        proxy = self._proxies.get(handle)
        return proxy.describe() if proxy is not None else f"the node behind handle {handle}"

    # -- deaths -------------------------------------------------------------------------

    def request_death_notification(self, proxy: BinderProxy) -> None:
        """Ask the broker for BR_DEAD_BINDER when ``proxy``'s node dies."""
        command = protocol.encode(BC_REQUEST_DEATH_NOTIFICATION, proxy.handle)
        self.thread_state().send_command(command)

    def clear_death_notification(self, proxy: BinderProxy) -> None:
        """Cancel :meth:`request_death_notification`."""
        if not self.closed:
            command = protocol.encode(BC_CLEAR_DEATH_NOTIFICATION, proxy.handle)
            self.thread_state().send_command(command)

    def on_process_return(self, command: tuple[int, ...]) -> None:
        """Handle a process-wide return (from the runtime thread, or any thread)."""
        op = command[0]
        if op == BR_RELEASE_NODE:
            self.node_released(command[1], command[2])
        elif op == BR_DEAD_BINDER:
            proxy = self._proxies.get(command[1])
            if proxy is not None:
                proxy.died()
        elif op == BR_SPAWN_LOOPER:
            self.spawn_looper()
        elif op == BR_CANCELLED:
            self._cancel_async(command[1])
        elif op == BR_ERROR:
            log.error("the broker refused a command of this process (error %d)", command[1])
        else:
            raise ProtocolError(f"unexpected {protocol.COMMAND_NAMES.get(op, hex(op))}")

    def _serve_process_connection(self) -> None:
        """The runtime thread: read process-wide returns until the broker lets go;
        if it went while this process was open, every proxy is dead. With
        ``reconnect``, reach a broker again; then a new runtime thread reads the new
        connection while this one restores what the process had set up."""
        self._read_process_connection(self._sock)
        if self.closed:
            return
        if not self.reconnect:
            log.warning("the broker at %s went away: every proxy is dead", self.socket_path)
            for proxy in list(self._proxies.values()):
                proxy.died()
            return
        log.warning(
            "the broker at %s went away: every proxy is dead; reconnecting", self.socket_path
        )
        self._broker_went()
        if not self._reconnect():
            return
        self._runtime_thread = threading.Thread(
            target=self._serve_process_connection, name="pybinder-runtime", daemon=True
        )
        self._runtime_thread.start()
        self._restore()

    def _read_process_connection(self, sock: socket.socket) -> None:
        while True:
            try:
                message = sock.recv(MAX_MESSAGE)
            except OSError:
                message = b""
            if not message:
                break
            try:
                for command in protocol.decode(message):
                    self.on_process_return(command)
            except BinderError as exc:
                log.error("pybinder runtime thread: %s", exc)

    def take_releases(self) -> list[bytes]:
        """BC_RELEASE commands queued by dropped proxies, batched into messages."""
        commands = []
        while self.releases:
            commands.append(self.releases.popleft())
        return protocol.batch(commands)

    # -- closing ----------------------------------------------------------------------

    def flush_oneway(self) -> None:
        """Wait until the broker has copied every oneway call this thread sent in the
        window (see ``oneway_window``), and raise the first failure among them.

        Raises:
            DeadObjectError, TransactionTooLargeError, ProtocolError: an earlier
                oneway call of this thread failed.
            BrokerUnavailableError: the broker went away.
        """
        slot: _ThreadSlot | None = getattr(self._local, "slot", None)
        if slot is not None and not self.closed:
            slot.state.flush_oneway()

    def _flush_before_close(self) -> None:
        """Let this thread's windowed oneway calls reach the broker's copy before the
        connection closes (one still waiting for room would be dropped), and log a
        failure among them, which no later call will raise."""
        try:
            self.flush_oneway()
        except BinderError as exc:
            log.warning("%s", exc)

    def close(self) -> None:
        """Leave the broker: stop loopers, close every connection, unmap the region.

        The broker then treats this process as dead: its services go away and
        callers waiting on it get DeadObjectError.
        """
        if self.closed:
            return
        self._flush_before_close()
        with self._broker_changed:
            self.closed = True
            self._broker_changed.notify_all()
        for slot in list(self._thread_slots):
            slot.state.close()
        current = threading.current_thread()
        for looper in self._loopers:
            if looper is not current:
                looper.join(timeout=CLOSE_TIMEOUT)
        self._stop_own_loop(current)
        self._leave_broker()
        try:
            self.region_view.release()
            self._region.close()
        except BufferError:
            pass  # a caller still holds a view; the mapping goes with the last one
        os.close(self.region_fd)

    def _leave_broker(self) -> None:
        """Close the process connection and wait until the broker has let go of this
        process (the runtime thread sees it close), so that when close() returns its
        services are gone."""
        sock = self._sock
        with contextlib.suppress(OSError):  # the broker is gone already
            sock.shutdown(socket.SHUT_WR)
        if self._runtime_thread is not threading.current_thread():
            self._runtime_thread.join(CLOSE_TIMEOUT)
        sock.close()

    def __enter__(self) -> ProcessState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"region {self.region_size} bytes"
        return f"<ProcessState {self.socket_path} {state}>"


_NOBODY = (errno.ENOENT, errno.ECONNREFUSED)
_PEERCRED = struct.Struct("3i")


def _refusal(commands: list[tuple[int, ...]]) -> str:
    """Why the broker refused a hello, from its BR_ERROR."""
    if not commands:
        return "it closed the connection"
    command = commands[0]
    if command[0] != protocol.BR_ERROR:
        return f"unexpected answer {protocol.COMMAND_NAMES.get(command[0], command[0])}"
    _, code, size, limit = command
    if code == CODE_OF_ERROR[QuotaExceededError]:
        return str(quota_error(size, limit))
    if code == CODE_OF_ERROR[BrokerUnavailableError]:
        return (
            f"/dev/shm is full: the broker cannot back a receive region of {size} bytes"
            f" with the {limit} bytes free there"
        )
    return f"error {code} (size {size}, limit {limit})"


class _ServiceCallback(Binder):
    """The node the broker calls for :meth:`ProcessState.register_for_notifications`
    (IServiceCallback.onRegistration): one oneway method, ``(name, binder)``."""

    DESCRIPTOR = SERVICE_CALLBACK_DESCRIPTOR

    def __init__(self, callback: Any) -> None:
        self.callback = callback

    def on_transact(self, code: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        name, binder = args
        self.callback(name, binder)
        return None


class _ThreadSlot:
    """Holds one thread's ThreadState in the thread's ``threading.local``.

    The process state reaches every thread's state through weak references to these
    slots, so a state (and its connection) goes when its thread ends. The slot exists
    because the state cannot be weakly referenced itself: mypyc compiles ThreadState
    to a native class without weak reference support.
    """

    __slots__ = ("__weakref__", "generation", "state")

    def __init__(self, state: ThreadState, generation: int) -> None:
        self.state = state
        self.generation = generation  # the process's broker connection it belongs to


def connect(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    region_size: int | None = None,
    spin_us: float | None = None,
    oneway_window: int | None = None,
    broker_uid: int | None = None,
    call_timeout: float | None = None,
    reconnect: bool = False,
) -> ProcessState:
    """Join the broker as a process; see :class:`ProcessState`.

    Raises:
        BrokerUnavailableError: no broker answers on the socket, or not one this
            process trusts, or it refused this process.
    """
    return ProcessState(
        socket_path,
        region_size=region_size,
        spin_us=spin_us,
        oneway_window=oneway_window,
        broker_uid=broker_uid,
        call_timeout=call_timeout,
        reconnect=reconnect,
    )
