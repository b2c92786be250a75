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
import resource
import secrets
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from pybinder import protocol
from pybinder.broker.connection import (
    BROKEN,
    QUEUED,
    SENT,
    Connection,
    error_message,
)
from pybinder.broker.death import process_died, thread_exited
from pybinder.broker.one_copy import STREAM_MIN
from pybinder.broker.policy import Policy, PolicyError
from pybinder.broker.process import ProcessRecord, ThreadRecord, count_down
from pybinder.broker.quotas import LogBudget, Quotas
from pybinder.broker.router import Router
from pybinder.broker.service_manager import ServiceManager
from pybinder.compiled import running_compiled
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    BrokerAlreadyRunningError,
    BrokerUnavailableError,
    ProtocolError,
    QuotaExceededError,
)
from pybinder.paths import ensure_socket_dir
from pybinder.protocol import (
    BC_CANCEL_TRANSACTION,
    BC_FREE_BUFFER,
    BC_REPLY,
    BC_TRANSACTION,
    MAX_MESSAGE,
)
from pybinder.region import (
    DEFAULT_REGION_SIZE,
    MIN_REGION_SIZE,
    RegionUnavailableError,
    map_send_area,
    sweep_dead_brokers_names,
)

log: Final = logging.getLogger("pybinder.broker")
log.addFilter(LogBudget())

#: Protocol offences (malformed or refused commands) a connection may commit within
#: :data:`OFFENCE_WINDOW_S` seconds; the next one disconnects its process.
MAX_OFFENCES: Final = 100
OFFENCE_WINDOW_S: Final = 10.0

#: How long the listener rests when the broker is out of descriptors (EMFILE, ENFILE),
#: in seconds, so that a connection flood does not spin the loop.
ACCEPT_PAUSE_S: Final = 0.1

#: How often the loop looks for parcels in parts whose sender stopped, in seconds.
SWEEP_INTERVAL_S: Final = 1.0

#: Default cap on a region (and so on a parcel), in bytes: 256 MiB.
DEFAULT_MAX_REGION_SIZE: Final = 256 * 1024 * 1024

#: How long the loop polls before sleeping in epoll_wait, in µs: as long as a
#: client's longest poll for a reply (the runtime's default ``spin_us``). At 50 µs
#: the broker slept through a server's reply whenever the method and the server's
#: wake-up took longer, as they do on a busy VM, and every hop then paid a wake-up.
DEFAULT_SPIN_US: Final = 200.0

_READABLE: Final = select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR
_HOT_COMMANDS: Final = frozenset((BC_TRANSACTION, BC_REPLY, protocol.BC_FREE_BUFFER))

#: A thread's commands that wait, in order, behind its oneway call waiting for room
#: (Router.hold). BC_RELEASE too: a held call may name the handle it releases.
_HELD_COMMANDS: Final = frozenset(
    (
        BC_TRANSACTION,
        BC_REPLY,
        protocol.BC_PARCEL_READY,
        protocol.BC_RELEASE,
        protocol.BC_DEADLINE,
        protocol.BC_CANCEL_TRANSACTION,
        protocol.BC_DETACH,
        protocol.BC_REPLY_TO,
    )
)
_STOP_SIGNALS: Final = frozenset((int(signal.SIGTERM), int(signal.SIGINT)))
_RELOAD_SIGNAL: Final = int(signal.SIGHUP)


class _Timer:
    """A callback due at ``deadline`` (monotonic seconds); see Broker.call_later."""

    __slots__ = ("broker", "callback", "cancelled", "deadline")

    def __init__(self, broker: Broker, deadline: float, callback: Callable[[], None]) -> None:
        self.broker = broker
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.broker.timer_cancelled()


class Broker:
    """The daemon that plays the binder driver.

    Args:
        socket_path: where to listen (see :func:`pybinder.paths.resolve_socket_path`).
        max_region_size: the largest receive region a process may ask for, in bytes.
        default_region_size: the region a process gets when it asks for none, in bytes.
        spin_us: how long the loop polls, yielding the CPU, before it sleeps in
            epoll, in µs; the next command of a call in progress then needs no wake-up.
        quotas: the limits on what clients can make it hold (see
            :mod:`pybinder.broker.quotas`); None: the defaults.
        socket_mode: the socket file's permission bits (0o600: its owner only;
            0o660 with ``socket_group``: a group may connect too).
        socket_group: the gid the socket file gets, or None to leave it.
        policy_path: the access policy's TOML file (see :mod:`pybinder.broker.policy`),
            read now and again on SIGHUP; None: the default policy.

    Raises:
        BrokerAlreadyRunningError: from :meth:`start`, if another broker is live.
        PolicyError, OSError: the policy file cannot be used.
    """

    def __init__(
        self,
        socket_path: Path,
        max_region_size: int = DEFAULT_MAX_REGION_SIZE,
        default_region_size: int = DEFAULT_REGION_SIZE,
        spin_us: float = DEFAULT_SPIN_US,
        quotas: Quotas | None = None,
        socket_mode: int = 0o600,
        socket_group: int | None = None,
        policy_path: Path | None = None,
    ) -> None:
        self.socket_path = Path(socket_path)
        self.spin_seconds = max(0.0, spin_us) / 1e6
        self.max_region_size = max(MIN_REGION_SIZE, max_region_size)
        self.default_region_size = min(default_region_size, self.max_region_size)
        self.quotas = (quotas or Quotas()).with_total_from_shm()
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.router = Router(self._send, self.quotas)
        self.policy_path = policy_path
        policy = Policy.load(policy_path) if policy_path is not None else None
        self.router.service_manager = ServiceManager(
            self.router, self.call_later, self.status, policy
        )
        self._conns: dict[int, Connection] = {}
        self._conns_of_uid: dict[int, int] = {}
        self._process_conns: dict[int, Connection] = {}
        self._region_bytes_of_uid: dict[int, int] = {}
        self._region_bytes = 0
        self._cancelled_timers = 0
        self._accept_paused = False
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
            protocol.BC_PARCEL_READY: router.parts.ready,
            protocol.BC_REQUEST_DEATH_NOTIFICATION: router.request_death_notification,
            protocol.BC_CLEAR_DEATH_NOTIFICATION: router.clear_death_notification,
            protocol.BC_SET_MAX_THREADS: router.set_max_threads,
            protocol.BC_REGISTER_LOOPER: router.register_looper,
            protocol.BC_DEADLINE: router.set_deadline,
            protocol.BC_CANCEL_TRANSACTION: router.cancel,
            protocol.BC_DETACH: router.detach,
            protocol.BC_REPLY_TO: router.reply_to,
        }

    # -- life cycle -------------------------------------------------------------------

    def start(self) -> None:
        """Take the lock, bind the socket and start listening.

        Raises:
            BrokerAlreadyRunningError: another broker is listening on the path.
            OSError: the path cannot be created or bound.
        """
        ensure_socket_dir(self.socket_path, shared=self.socket_mode & 0o077 != 0)
        raise_fd_limit()
        self._take_lock()
        swept = sweep_dead_brokers_names()
        if swept:
            log.info("removed %d /dev/shm names that brokers killed earlier left", swept)
        if self.socket_path.exists() or self.socket_path.is_symlink():
            if _is_live(self.socket_path):
                raise BrokerAlreadyRunningError(
                    f"a broker is already listening on {self.socket_path}"
                )
            log.info("replacing stale socket %s", self.socket_path)
            self.socket_path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        listener.bind(str(self.socket_path))
        if self.socket_group is not None:
            os.chown(self.socket_path, -1, self.socket_group)
        os.chmod(self.socket_path, self.socket_mode)
        listener.listen(128)
        listener.setblocking(False)
        self._socket_ino = os.stat(self.socket_path).st_ino
        self._listener = listener
        self._epoll.register(listener.fileno(), select.EPOLLIN)
        self._epoll.register(self._wakeup_r.fileno(), select.EPOLLIN)
        self.call_later(SWEEP_INTERVAL_S, self._sweep)

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
                    self._serve(conn, events)
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

    def _serve(self, conn: Connection, events: int) -> None:
        """Handle a connection's events. This is the safety net of the edge: an
        unexpected exception while serving one client disconnects that client, with
        the traceback in the log, and never stops the broker."""
        try:
            if events & select.EPOLLOUT:
                self._flush(conn)
            if events & _READABLE:
                self._read(conn)
        except Exception:
            log.exception("unexpected error serving pid %d; disconnecting it", conn.pid)
            self._disconnect(conn)

    def _disconnect(self, conn: Connection) -> None:
        """Close ``conn`` and, if it said hello, its whole process: a process one of
        whose threads the broker stopped serving cannot go on consistently."""
        self._closing.append(conn)
        owner = conn.owner
        if owner is not None and not owner.dead:
            for thread in owner.threads:
                self._closing.append(thread.conn)
            process_conn = self._process_conns.get(owner.key)
            if process_conn is not None:
                self._closing.append(process_conn)

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
        signal.signal(signal.SIGHUP, self._on_reload_signal)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        self._owns_wakeup_fd = True

    def _on_stop_signal(self, signum: int, frame: object) -> None:
        self.stop()

    def _on_reload_signal(self, signum: int, frame: object) -> None:
        """SIGHUP: the loop reloads the policy when it reads the signal's number."""

    def reload_policy(self) -> None:
        """Read the policy file again (SIGHUP); a file that cannot be used is logged
        and the policy in force stays."""
        if self.policy_path is None:
            return
        sm = self.router.service_manager
        assert sm is not None
        try:
            sm.policy = Policy.load(self.policy_path)
        except (OSError, PolicyError) as exc:
            log.error("policy not reloaded, the old one stays: %s", exc)
            return
        log.warning("policy reloaded from %s", self.policy_path)

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
        timer = _Timer(self, time.monotonic() + delay, callback)
        heapq.heappush(self._timers, (timer.deadline, next(self._timer_seq), timer))
        return timer

    def timer_cancelled(self) -> None:
        """Count a cancelled timer; once they are half the heap, drop them all, so
        that waits given up (a get_service that found its name) cost no memory."""
        self._cancelled_timers += 1
        if self._cancelled_timers * 2 > len(self._timers) + 64:
            self._timers = [entry for entry in self._timers if not entry[2].cancelled]
            heapq.heapify(self._timers)
            self._cancelled_timers = 0

    def status(self, caller: ProcessRecord | None = None) -> dict[str, Any]:
        """Everything ``pybinder status`` shows; sizes in bytes, times in seconds.

        A ``caller`` other than root sees only its own uid's processes and the
        services it may find; the cost is O(its own processes), not O(every process).
        """
        router = self.router
        sm = router.service_manager
        assert sm is not None
        if caller is None or caller.uid == 0:
            caller = None
            shown = list(router.processes.values())
        else:
            shown = list(router.processes_of_uid.get(caller.uid, ()))
        processes = []
        now = time.monotonic()
        for process in shown:
            entry: dict[str, Any] = process.status(now)
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
                "parcels_in_parts": router.parts.parcels_in_parts,
                "oneway_batched": router.oneway_batched,
                "parcels_streamed": router.parcels_streamed,
                "stream_min": STREAM_MIN,
                "compiled": running_compiled(),
            },
            "processes": processes,
            "services": sm.visible_services(caller),
            "quotas": {
                name: getattr(self.quotas, name) for name in type(self.quotas).__dataclass_fields__
            },
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
            self._cancelled_timers = max(0, self._cancelled_timers - 1)
        if not self._timers:
            return -1
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _poll(self) -> list[tuple[int, int]]:
        """The next events: polled without sleeping for up to ``spin_seconds``
        (yielding the CPU between polls), then waited for in epoll."""
        timeout = self._next_timeout()
        if self.spin_seconds and timeout != 0:
            spin = self.spin_seconds if timeout < 0 else min(self.spin_seconds, timeout)
            deadline = time.perf_counter() + spin
            while True:
                events = self._epoll.poll(0)
                if events:
                    return events
                if time.perf_counter() >= deadline:
                    break
                os.sched_yield()
            timeout = self._next_timeout()
        return self._epoll.poll(timeout)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if timer.cancelled:
                self._cancelled_timers = max(0, self._cancelled_timers - 1)
                continue
            try:
                timer.callback()
            except Exception:  # the safety net, as in _serve: never the broker
                log.exception("unexpected error in a timer callback %r", timer.callback)

    def _drain_wakeup(self) -> None:
        """Read the wakeup socket: a byte from :meth:`stop`, or a signal's number."""
        with contextlib.suppress(BlockingIOError):
            while data := self._wakeup_r.recv(64):
                if not _STOP_SIGNALS.isdisjoint(data):
                    self._stopping = True
                if _RELOAD_SIGNAL in data:
                    self.reload_policy()

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                self._pause_accepting()
            return
        sock.setblocking(False)
        conn = Connection(sock)
        count = self._conns_of_uid.get(conn.uid, 0) + 1
        if self.quotas.over("connections_per_uid", conn.uid, count):
            log.warning("uid %d (pid %d) refused: connections_per_uid reached", conn.uid, conn.pid)
            error = self.quotas.error("connections_per_uid")
            with contextlib.suppress(OSError):
                sock.send(error_message(error))
            sock.close()
            return
        self._conns_of_uid[conn.uid] = count
        if self.quotas.applies_to(conn.uid):
            conn.outbox_limit = self.quotas.outbox_bytes
        self._conns[conn.fd] = conn
        self._epoll.register(conn.fd, select.EPOLLIN)
        conn.hello_timer = self.call_later(
            self.quotas.hello_timeout_s, lambda: self._hello_overdue(conn)
        )

    def _pause_accepting(self) -> None:
        """Stop watching the listener for a moment: out of descriptors, it would be
        readable (and failing) at once again."""
        if self._accept_paused or self._listener is None:
            return
        self._accept_paused = True
        self._epoll.unregister(self._listener.fileno())
        self.call_later(ACCEPT_PAUSE_S, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._accept_paused and self._listener is not None:
            self._accept_paused = False
            self._epoll.register(self._listener.fileno(), select.EPOLLIN)

    def _hello_overdue(self, conn: Connection) -> None:
        conn.hello_timer = None
        if conn.process is None and conn.thread is None and conn.fd in self._conns:
            log.warning("pid %d (uid %d) said no hello in time; closed", conn.pid, conn.uid)
            self._closing.append(conn)
            self._close_pending()

    def _sweep(self) -> None:
        """Fail parcels in parts whose sender stopped sending (parts_timeout_s), and
        warn of processes whose loopers are all busy while calls queue."""
        now = time.monotonic()
        self.router.parts.expire(now - self.quotas.parts_timeout_s)
        for process, waited in self.router.starving(now):
            log.warning(
                "pid %d: all %d of its loopers (max_threads %d) have been busy while calls"
                " queued for %.1f s: thread-pool starvation",
                process.pid,
                process.loopers,
                process.max_threads,
                waited,
            )
        self.call_later(SWEEP_INTERVAL_S, self._sweep)

    def _read(self, conn: Connection) -> None:
        received = conn.receive()
        if received is None:
            return
        data, fds, truncated = received
        try:
            if not data:
                self._closing.append(conn)
            elif truncated:
                error = ProtocolError(f"message longer than {MAX_MESSAGE} bytes, or too many fds")
                self._reject(conn, error)
            else:
                self._handle_message(conn, data, fds)
        finally:
            for fd in fds:  # any not consumed by a command
                with contextlib.suppress(OSError):
                    os.close(fd)
            fds.clear()  # the thread's view of them (ThreadRecord.fds) too

    def _handle_message(self, conn: Connection, data: bytes, fds: list[int]) -> None:
        router, thread = self.router, conn.thread
        if thread is not None:
            thread.fds = fds  # a transaction or reply takes them (ThreadRecord.take_fds)
        try:
            for command in protocol.decode(data):
                op = command[0]
                if thread is not None and op in _HELD_COMMANDS and thread.held:
                    if op != BC_CANCEL_TRANSACTION or not router.cancel_waiting_oneway(thread):
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
        except KeyError:
            self._reject(conn, ProtocolError("a command this connection may not send"))
        except (ProtocolError, QuotaExceededError, BrokerUnavailableError) as exc:
            self._reject(conn, exc)

    def _reject(self, conn: Connection, error: BinderError) -> None:
        """Answer a malformed or refused message with BR_ERROR (binder answers
        BR_FAILED_REPLY); the connection stays usable. A connection that offends
        :data:`MAX_OFFENCES` times within :data:`OFFENCE_WINDOW_S` is disconnected."""
        log.warning("pid %d (uid %d) sent a bad message: %s", conn.pid, conn.uid, error)
        now = time.monotonic()
        if now - conn.offences_since > OFFENCE_WINDOW_S:
            conn.offences, conn.offences_since = 0, now
        conn.offences += 1
        if conn.offences > MAX_OFFENCES:
            log.warning("pid %d (uid %d) keeps offending; disconnected", conn.pid, conn.uid)
            self._disconnect(conn)
            return
        self._send(conn, error_message(error))

    # -- hello and send areas -----------------------------------------------------------------

    def _hello_process(self, conn: Connection, fields: tuple[int, ...], fds: list[int]) -> None:
        version, requested = fields
        self._check_fresh(conn, version)
        size = requested or self.default_region_size
        size = min(max(size, MIN_REGION_SIZE), self.max_region_size)
        self._check_region_quota(conn.uid, size)
        key = secrets.randbits(63)
        try:
            process = ProcessRecord(key, conn.pid, conn.uid, conn.gid, size)
        except RegionUnavailableError as exc:
            log.error("cannot create a region for pid %d: %s", conn.pid, exc)
            code = CODE_OF_ERROR[BrokerUnavailableError]
            self._send(conn, protocol.encode(protocol.BR_ERROR, code, size, exc.free))
            return
        self._said_hello(conn)
        self.router.add_process(process)
        self._process_conns[key] = conn
        process.conn = conn
        self._region_bytes += size
        self._region_bytes_of_uid[conn.uid] = self._region_bytes_of_uid.get(conn.uid, 0) + size
        conn.process = process
        reply = protocol.encode(protocol.BR_HELLO_PROCESS, key, size, self.max_region_size)
        owner_fd = process.region.take_owner_fd()
        try:
            self._send(conn, reply, [owner_fd])
        finally:
            os.close(owner_fd)
        log.info("pid %d (uid %d) connected, region %d bytes", conn.pid, conn.uid, size)

    def _check_region_quota(self, uid: int, size: int) -> None:
        """Raise QuotaExceededError if a new region of ``size`` bytes for ``uid``
        would pass region_bytes_per_uid or region_bytes_total."""
        quotas = self.quotas
        if quotas.over("region_bytes_per_uid", uid, self._region_bytes_of_uid.get(uid, 0) + size):
            raise quotas.error("region_bytes_per_uid", f"a region of {size} bytes")
        if quotas.over("region_bytes_total", uid, self._region_bytes + size):
            raise quotas.error("region_bytes_total", f"a region of {size} bytes")

    def _said_hello(self, conn: Connection) -> None:
        if conn.hello_timer is not None:
            conn.hello_timer.cancel()
            conn.hello_timer = None

    def _hello_thread(self, conn: Connection, fields: tuple[int, ...], fds: list[int]) -> None:
        version, key = fields
        self._check_fresh(conn, version)
        process = self.router.processes.get(key)
        if process is None or process.pid != conn.pid or process.uid != conn.uid:
            raise ProtocolError("BC_HELLO_THREAD names no process state of this caller")
        self._said_hello(conn)
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
        if len(fds) != 1:
            raise ProtocolError(f"BC_SET_SEND_AREA with {len(fds)} descriptors, not one")
        if not 0 < size <= self.max_region_size:
            raise ProtocolError(f"an area of {size} bytes; the most is {self.max_region_size}")
        if which not in (protocol.SEND_AREA, protocol.LOAN_AREA):
            raise ProtocolError(f"no area {which}")
        if thread.held or thread.parts is not None:
            raise ProtocolError("an area cannot change while a transaction still reads it")
        thread.set_area(which, map_send_area(fds[0], size))
        self._send(conn, protocol.encode(protocol.BR_OK))

    def _forget_region(self, process: ProcessRecord) -> None:
        """Take a closed process's region off the byte counts (once)."""
        if self._process_conns.pop(process.key, None) is None:
            return
        size = process.region_size
        self._region_bytes -= size
        count_down(self._region_bytes_of_uid, process.uid, size)

    @staticmethod
    def _thread_of(conn: Connection) -> ThreadRecord:
        if conn.thread is None:
            raise ProtocolError("this command needs a thread connection (BC_HELLO_THREAD)")
        return conn.thread

    # -- sending --------------------------------------------------------------------------

    def _send(self, conn: Connection, message: bytes, fds: list[int] | None = None) -> None:
        outcome = conn.send(message, fds)
        if outcome == SENT:
            return
        if outcome == QUEUED:
            if len(conn.outbox) == 1:  # the first to wait: watch for room
                with contextlib.suppress(OSError):
                    self._epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)
        elif outcome == BROKEN:
            self._closing.append(conn)
        elif conn.fd in self._conns and conn not in self._closing:  # OVERFULL
            log.warning(
                "pid %d (uid %d) does not read its socket (outbox_bytes reached); disconnected",
                conn.pid,
                conn.uid,
            )
            self._disconnect(conn)

    def _flush(self, conn: Connection) -> None:
        outcome = conn.flush()
        if outcome == BROKEN:
            self._closing.append(conn)
        elif outcome == SENT:
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
        conn.close()
        self._said_hello(conn)
        count_down(self._conns_of_uid, conn.uid)
        if conn.process is not None:
            self._forget_region(conn.process)
        if not notify:
            return
        if conn.process is not None:
            log.info("pid %d disconnected", conn.pid)
            process = conn.process
            for thread in list(process.threads):
                self._closing.append(thread.conn)
            process_died(self.router, process)
        elif conn.thread is not None:
            thread_exited(self.router, conn.thread)


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open descriptors to its hard limit (the
    broker holds a connection per client thread and the descriptors in flight, each
    bounded by a quota); return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


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
