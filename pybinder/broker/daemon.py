"""The broker daemon: socket, event loop, accept, credentials, command dispatch.

One thread, one epoll loop. Every process opens one *process connection*
(BC_HELLO_PROCESS: the broker creates its receive region and sends the read-only
descriptor) and one *thread connection* per thread that talks to the broker
(BC_HELLO_THREAD). A process is dead when its process connection closes; a thread
is gone when its own connection closes. Credentials come from SO_PEERCRED, which
the kernel fills in and a client cannot forge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import heapq
import itertools
import logging
import os
import secrets
import select
import signal
import socket
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pybinder import protocol
from pybinder.broker.one_copy import STREAM_MIN
from pybinder.broker.process import ProcessRecord, ThreadRecord
from pybinder.broker.service_manager import ServiceManager
from pybinder.broker.transaction import Router
from pybinder.compiled import running_compiled
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    BrokerAlreadyRunningError,
    ProtocolError,
)
from pybinder.paths import ensure_socket_dir
from pybinder.protocol import BC_FREE_BUFFER, BC_REPLY, BC_TRANSACTION, MAX_MESSAGE
from pybinder.region import DEFAULT_REGION_SIZE, MIN_REGION_SIZE, map_send_area

log: Final = logging.getLogger("pybinder.broker")

#: Default cap on a region (and so on a parcel), in bytes: 256 MiB.
DEFAULT_MAX_REGION_SIZE: Final = 256 * 1024 * 1024

#: How long the loop polls before sleeping in epoll_wait, in µs: as long as a
#: client's longest poll for a reply (the runtime's default ``spin_us``). At 50 µs
#: the broker slept through a server's reply whenever the method and the server's
#: wake-up took longer, as they do on a busy VM, and every hop then paid a wake-up.
DEFAULT_SPIN_US: Final = 200.0

_PEERCRED: Final = struct.Struct("3i")
_MAX_FDS: Final = 4
_ANCILLARY: Final = socket.CMSG_SPACE(_MAX_FDS * 4)
_TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)
_READABLE: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_HOT_COMMANDS: Final = frozenset((BC_TRANSACTION, BC_REPLY, protocol.BC_FREE_BUFFER))

#: A thread's commands that wait, in order, behind its oneway call waiting for room
#: (Router.hold). BC_RELEASE too: a held call may name the handle it releases.
_HELD_COMMANDS: Final = frozenset(
    (BC_TRANSACTION, BC_REPLY, protocol.BC_PARCEL_READY, protocol.BC_RELEASE)
)
_STOP_SIGNALS: Final = frozenset((int(signal.SIGTERM), int(signal.SIGINT)))


class Connection:
    """One accepted socket: a process connection, a thread connection, or not yet
    introduced. Outgoing messages queue when the peer's receive buffer is full."""

    __slots__ = ("fd", "gid", "outbox", "pid", "process", "sock", "thread", "uid")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        self.process: ProcessRecord | None = None
        self.thread: ThreadRecord | None = None
        self.outbox: deque[tuple[bytes, list[int]]] = deque()


class _Timer:
    __slots__ = ("callback", "cancelled", "deadline")

    def __init__(self, deadline: float, callback: Callable[[], None]) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Broker:
    """The daemon that plays the binder driver.

    Args:
        socket_path: where to listen (see :func:`pybinder.paths.resolve_socket_path`).
        max_region_size: the largest receive region a process may ask for, in bytes.
        default_region_size: the region a process gets when it asks for none, in bytes.
        spin_us: how long the loop polls, yielding the CPU, before it sleeps in
            epoll, in µs; the next command of a call in progress then needs no wake-up.

    Raises:
        BrokerAlreadyRunningError: from :meth:`start`, if another broker is live.
    """

    def __init__(
        self,
        socket_path: Path,
        max_region_size: int = DEFAULT_MAX_REGION_SIZE,
        default_region_size: int = DEFAULT_REGION_SIZE,
        spin_us: float = DEFAULT_SPIN_US,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.spin_seconds = max(0.0, spin_us) / 1e6
        self.max_region_size = max(MIN_REGION_SIZE, max_region_size)
        self.default_region_size = min(default_region_size, self.max_region_size)
        self.router = Router(self._send)
        self.router.service_manager = ServiceManager(self.router, self.call_later, self.status)
        self._conns: dict[int, Connection] = {}
        self._closing: list[Connection] = []
        self._timers: list[tuple[float, int, _Timer]] = []
        self._timer_seq = itertools.count()
        self._epoll = select.epoll()
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self._owns_wakeup_fd = False
        self._stopping = False
        self._started = time.time()
        self._socket_ino = 0
        router = self.router
        self._connection_handlers: dict[
            int, Callable[[Connection, tuple[int, ...], list[int]], None]
        ] = {
            protocol.BC_HELLO_PROCESS: self._hello_process,
            protocol.BC_HELLO_THREAD: self._hello_thread,
            protocol.BC_SET_SEND_AREA: self._set_send_area,
        }
        self._thread_handlers: dict[int, Callable[..., None]] = {
            protocol.BC_ENTER_LOOPER: router.enter_looper,
            protocol.BC_EXIT_LOOPER: router.exit_looper,
            protocol.BC_TRANSACTION: router.transaction,
            protocol.BC_REPLY: router.reply,
            protocol.BC_FREE_BUFFER: router.free_buffer,
            protocol.BC_RELEASE: router.release,
            protocol.BC_PARCEL_READY: router.parcel_ready,
        }

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Take the lock, bind the socket and start listening.

        Raises:
            BrokerAlreadyRunningError: another broker is listening on the path.
            OSError: the path cannot be created or bound.
        """
        ensure_socket_dir(self.socket_path)
        self._take_lock()
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if _is_live(self.socket_path):
                raise BrokerAlreadyRunningError(
                    f"a broker is already listening on {self.socket_path}"
                )
            log.info("replacing stale socket %s", self.socket_path)
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(self.socket_path))
        listener.listen(128)
        listener.setblocking(False)
        self._socket_ino = os.stat(self.socket_path).st_ino
        self._listener = listener
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._epoll.register(self._wakeup_r.fileno(), select.EPOLLIN)

    def serve_forever(self) -> None:
        """Run the event loop until :meth:`stop` (or SIGTERM/SIGINT once
        :meth:`install_signal_handlers` ran)."""
        listener = self._listener
        assert listener is not None, "call start() first"
        listen_fd, wakeup_fd = listener.fileno(), self._wakeup_r.fileno()
        conns = self._conns
        while not self._stopping:
            for fd, events in self._poll():
                conn = conns.get(fd)
                if conn is not None:
                    if events & select.EPOLLOUT:
                        self._flush(conn)
                    if events & _READABLE:
                        self._read(conn)
                elif fd == listen_fd:
                    self._accept()
                elif fd == wakeup_fd:
                    self._drain_wakeup()
                if self._closing:
                    self._close_pending()
            if self._timers:
                self._run_timers()
                if self._closing:
                    self._close_pending()

    def stop(self) -> None:
        """Ask the loop to finish; safe from a signal handler or another thread."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wakeup_w.send(b"x")

    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGTERM and SIGINT; call from the main thread.

        The signal's number also arrives on the loop's wakeup socket
        (``signal.set_wakeup_fd``), and the loop stops when it reads it: compiled code
        runs a Python signal handler only when it next enters the interpreter, so a
        signal that came while the loop was busy would otherwise wait for the next
        message, which may never come.
        """
        for sig in _STOP_SIGNALS:
            signal.signal(sig, self._on_stop_signal)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self._owns_wakeup_fd = True

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stop()

    def close(self) -> None:
        """Close every connection, release every region, remove the socket and lock."""
        for conn in list(self._conns.values()):
            self._drop_connection(conn, notify=False)
        for process in list(self.router.processes.values()):
            process.dead = True
            process.region.close()
        self.router.processes.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                if os.stat(self.socket_path).st_ino == self._socket_ino:
                    self.socket_path.unlink()
        self._release_lock()
        if self._owns_wakeup_fd:
            signal.set_wakeup_fd(-1)
        self._epoll.close()
        self._wakeup_r.close()
        self._wakeup_w.close()

    def call_later(self, delay: float, callback: Callable[[], None]) -> _Timer:
        """Run ``callback`` on the loop after ``delay`` seconds; returns a cancellable timer."""
        timer = _Timer(time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_seq), timer))
        return timer

    def status(self) -> dict[str, Any]:
        """Everything ``pybinder status`` shows; sizes in bytes, times in seconds."""
        router = self.router
        sm = router.service_manager
        assert sm is not None
        processes = []
        for process in router.processes.values():
            entry: dict[str, Any] = dict(process.status())
            entry["services"] = sm.services_of(process)
            processes.append(entry)
        return {
            "broker": {
                "pid": os.getpid(),
                "socket": str(self.socket_path),
                "uptime_s": round(time.time() - self._started, 3),
                "max_region_size": self.max_region_size,
                "default_region_size": self.default_region_size,
                "transactions": router.transactions,
                "bytes_copied": router.bytes_copied,
                "buffer_bytes_copied": router.buffer_bytes_copied,
                "parcels_in_parts": router.parcels_in_parts,
                "oneway_batched": router.oneway_batched,
                "parcels_streamed": router.parcels_streamed,
                "stream_min": STREAM_MIN,
                "compiled": running_compiled(),
            },
            "processes": processes,
            "services": {name: s.pid for name, s in sorted(sm.services.items())},
        }

    # -- lock and socket ------------------------------------------------------------------

    def _take_lock(self) -> None:
        lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BrokerAlreadyRunningError(
                f"a broker is already running on {self.socket_path} (lock {lock_path} is held)"
            ) from None
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            lock_path = self.socket_path.with_name(self.socket_path.name + ".lock")
            with contextlib.suppress(OSError):
                lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the loop's pieces ------------------------------------------------------------------

    def _next_timeout(self) -> float:
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return -1
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _poll(self) -> list[tuple[int, int]]:
        """The next events: polled without sleeping for up to ``spin_seconds``
        (yielding the CPU between polls), then waited for in epoll."""
        if self.spin_seconds:
            deadline = time.perf_counter() + self.spin_seconds
            while True:
                events = self._epoll.poll(0)
                if events:
                    return events
                if time.perf_counter() >= deadline or self._timers:
                    break
                os.sched_yield()
        return self._epoll.poll(self._next_timeout())

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.callback()

    def _drain_wakeup(self) -> None:
        """Read the wakeup socket: a byte from :meth:`stop`, or a signal's number."""
        with contextlib.suppress(BlockingIOError):
            while data := self._wakeup_r.recv(64):
                if not _STOP_SIGNALS.isdisjoint(data):
                    self._stopping = True

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            return
        sock.setblocking(False)
        conn = Connection(sock)
        self._conns[conn.fd] = conn
        self._epoll.register(conn.fd, select.EPOLLIN)

    def _read(self, conn: Connection) -> None:
        try:
            data, ancillary, flags, _ = conn.sock.recvmsg(MAX_MESSAGE, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._closing.append(conn)
            return
        fds = _received_fds(ancillary) if ancillary else []
        try:
            if not data:
                self._closing.append(conn)
            elif flags & _TRUNCATED:
                self._reject(conn, ProtocolError(f"message longer than {MAX_MESSAGE} bytes"))
            else:
                self._handle_message(conn, data, fds)
        finally:
            for fd in fds:  # any not consumed by a command
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _handle_message(self, conn: Connection, data: bytes, fds: list[int]) -> None:
        router, thread = self.router, conn.thread
        try:
            for command in protocol.decode(data):
                op = command[0]
                if thread is not None and op in _HELD_COMMANDS and thread.held:
                    router.hold(thread, command)
                    continue
                # The hot commands skip the handler table.
                if thread is not None and op in _HOT_COMMANDS:
                    if op == BC_FREE_BUFFER:
                        router.free_buffer(thread, command[1])
                    else:
                        router.run_command(thread, command)
                    continue
                handler = self._thread_handlers.get(op)
                if handler is None:
                    self._connection_handlers[op](conn, command[1:], fds)
                    thread = conn.thread  # a hello may have just made it a thread connection
                elif thread is None:
                    raise ProtocolError("this command needs a thread connection (BC_HELLO_THREAD)")
                else:
                    handler(thread, *command[1:])
        except (ProtocolError, KeyError) as exc:
            error = exc if isinstance(exc, ProtocolError) else ProtocolError(f"unexpected {exc}")
            self._reject(conn, error)

    def _reject(self, conn: Connection, error: ProtocolError) -> None:
        """Answer a malformed message with BR_ERROR; the connection stays usable."""
        log.warning("pid %d sent a bad message: %s", conn.pid, error)
        self._send(conn, protocol.encode(protocol.BR_ERROR, CODE_OF_ERROR[ProtocolError], 0, 0))

    # -- hello and send areas -----------------------------------------------------------------

    def _hello_process(self, conn: Connection, fields: tuple[int, ...], fds: list[int]) -> None:
        version, requested = fields
        self._check_fresh(conn, version)
        size = requested or self.default_region_size
        size = min(max(size, MIN_REGION_SIZE), self.max_region_size)
        key = secrets.randbits(63)
        try:
            process = ProcessRecord(key, conn.pid, conn.uid, conn.gid, size)
        except OSError as exc:
            log.error("cannot create a %d-byte region for pid %d: %s", size, conn.pid, exc)
            code = CODE_OF_ERROR[BinderError]
            self._send(conn, protocol.encode(protocol.BR_ERROR, code, size, 0))
            return
        self.router.processes[key] = process
        conn.process = process
        reply = protocol.encode(protocol.BR_HELLO_PROCESS, key, size, self.max_region_size)
        owner_fd = process.region.take_owner_fd()
        try:
            self._send(conn, reply, [owner_fd])
        finally:
            os.close(owner_fd)
        log.info("pid %d (uid %d) connected, region %d bytes", conn.pid, conn.uid, size)

    def _hello_thread(self, conn: Connection, fields: tuple[int, ...], fds: list[int]) -> None:
        version, key = fields
        self._check_fresh(conn, version)
        process = self.router.processes.get(key)
        if process is None or process.pid != conn.pid or process.uid != conn.uid:
            raise ProtocolError("BC_HELLO_THREAD names no process state of this caller")
        thread = ThreadRecord(process, conn)
        process.threads.append(thread)
        conn.thread = thread
        self._send(conn, protocol.encode(protocol.BR_HELLO_THREAD, key))

    def _check_fresh(self, conn: Connection, version: int) -> None:
        if conn.process is not None or conn.thread is not None:
            raise ProtocolError("hello on a connection that already said hello")
        if version != protocol.PROTOCOL_VERSION:
            raise ProtocolError(
                f"protocol version {version}; this broker speaks {protocol.PROTOCOL_VERSION}"
            )

    def _set_send_area(self, conn: Connection, fields: tuple[int, ...], fds: list[int]) -> None:
        thread = self._thread_of(conn)
        size, which = fields
        if not fds:
            raise ProtocolError("BC_SET_SEND_AREA without a descriptor")
        if size > self.max_region_size:
            raise ProtocolError(f"an area of {size} bytes exceeds {self.max_region_size}")
        if which not in (protocol.SEND_AREA, protocol.LOAN_AREA):
            raise ProtocolError(f"no area {which}")
        thread.set_area(which, map_send_area(fds[0], size))
        self._send(conn, protocol.encode(protocol.BR_OK))

    @staticmethod
    def _thread_of(conn: Connection) -> ThreadRecord:
        if conn.thread is None:
            raise ProtocolError("this command needs a thread connection (BC_HELLO_THREAD)")
        return conn.thread

    # -- sending --------------------------------------------------------------------------

    def _send(self, conn: Connection, message: bytes, fds: list[int] | None = None) -> None:
        if conn.outbox:
            conn.outbox.append((message, [os.dup(fd) for fd in fds or []]))
            return
        try:
            if fds:
                socket.send_fds(conn.sock, [message], fds)
            else:
                conn.sock.send(message)
        except BlockingIOError:
            conn.outbox.append((message, [os.dup(fd) for fd in fds or []]))
            with contextlib.suppress(OSError):
                self._epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        except OSError:
            self._closing.append(conn)

    def _flush(self, conn: Connection) -> None:
        while conn.outbox:
            message, fds = conn.outbox[0]
            try:
                if fds:
                    socket.send_fds(conn.sock, [message], fds)
                else:
                    conn.sock.send(message)
            except BlockingIOError:
                return
            except OSError:
                self._closing.append(conn)
                return
            conn.outbox.popleft()
            for fd in fds:
                os.close(fd)
        with contextlib.suppress(OSError):
            self._epoll.modify(conn.fd, select.EPOLLIN)

    # -- closing --------------------------------------------------------------------------

    def _close_pending(self) -> None:
        while self._closing:
            self._drop_connection(self._closing.pop(), notify=True)

    def _drop_connection(self, conn: Connection, notify: bool) -> None:
        if self._conns.pop(conn.fd, None) is None:
            return
        with contextlib.suppress(OSError):
            self._epoll.unregister(conn.fd)
        conn.sock.close()
        for _, fds in conn.outbox:
            for fd in fds:
                os.close(fd)
        conn.outbox.clear()
        if not notify:
            return
        if conn.process is not None:
            log.info("pid %d disconnected", conn.pid)
            process = conn.process
            for thread in list(process.threads):
                self._closing.append(thread.conn)
            self.router.process_died(process)
        elif conn.thread is not None:
            self.router.thread_exited(conn.thread)


def _received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds


def _is_live(path: Path) -> bool:
    """Whether a broker answers on ``path`` (a stale socket file refuses)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    else:
        return True
    finally:
        probe.close()
