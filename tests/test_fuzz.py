"""Hypothesis fuzzing of a real broker: whatever a client sends, the broker answers it
or closes the connection, never hangs, never dies, never logs "unexpected error",
leaks no descriptor, mapping, process record or buffer, and keeps serving others.

One broker per test function (the ``cluster`` fixture); each hypothesis example
opens its own hand-driven connections (tests/raw.py style) to it and closes them,
and is followed by :meth:`Env.check`: an ordinary client's call through a real
server (tests/peers.py) and to the service manager must still come back right and in
time, and the broker's descriptors, shared-memory mappings and process records must
be back where they were. Every wait has a timeout.

What is fuzzed:

- raw frames: random bytes, and batches of commands (valid codes with random and
  boundary fields, BR_* codes, unknown codes) on a fresh connection, and on the
  thread connection (and process connection) of a process that has a send area and
  a handle to the real service;
- parcels: random or mutated parcels (header fields, object table, buffer table,
  msgpack body, length) in BC_TRANSACTION, whole or in parts, to the real service
  and to the service manager (handle 0), whose answers are predicted exactly;
- replies: mutated BC_REPLY parcels (whole or in parts) to a call-back the server
  makes into the fuzzing process;
- oneway streams: random programs of two hand-driven processes (oneway calls in and
  out of a window that fill the receiver, releases, new send areas, the receiver
  freeing, answering, leaving its looper, dying), after which every call must be
  answered or settled exactly once;
- descriptors: BC_SET_SEND_AREA with every kind of unsuitable descriptor.

``PYBINDER_FUZZ_EXAMPLES`` is the number of examples of the whole file (shared out
between the tests by weight); the default keeps the file well under a minute.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import itertools
import math
import mmap
import os
import select
import socket
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgpack
import pytest
from conftest import UNEXPECTED
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from peers import ICallback, ITest
from waiting import eventually, grow_thread_pool, loopers

from pybinder import parcel, protocol
from pybinder.errors import (
    CODE_OF_ERROR,
    InterfaceMismatchError,
    ProtocolError,
    QuotaExceededError,
    ServiceNotFoundError,
    TransactionTooLargeError,
    UnknownTransactionError,
)
from pybinder.parcel import HEADER, OBJ_HANDLE, OBJ_NODE, ObjectRef
from pybinder.protocol import (
    BC_ENTER_LOOPER,
    BC_EXIT_LOOPER,
    BC_FREE_BUFFER,
    BC_HELLO_PROCESS,
    BC_HELLO_THREAD,
    BC_PARCEL_READY,
    BC_RELEASE,
    BC_REPLY,
    BC_SET_SEND_AREA,
    BC_TRANSACTION,
    BR_DEAD_REPLY,
    BR_ERROR,
    BR_FAILED_REPLY,
    BR_HELLO_PROCESS,
    BR_HELLO_THREAD,
    BR_OK,
    BR_RELEASE_NODE,
    BR_REPLY,
    BR_TRANSACTION,
    BR_TRANSACTION_COMPLETE,
    COMMAND_STRUCTS,
    LOAN_AREA,
    MAX_BACKLOG,
    MAX_MESSAGE,
    PARTS_RING,
    PROTOCOL_VERSION,
    REPLY_BINDER_ERROR,
    REPLY_EXCEPTION,
    REPLY_OK,
    SEND_AREA,
    SERVICE_MANAGER_DESCRIPTOR,
    SM_ADD_SERVICE,
    SM_CHECK_SERVICE,
    SM_LIST_SERVICES,
    SM_REGISTER_FOR_NOTIFICATIONS,
    SM_STATUS,
    SM_UNREGISTER_FOR_NOTIFICATIONS,
    SM_WAIT_FOR_SERVICE,
    TF_ONE_WAY,
    TF_PARTS,
    TF_RING,
    TF_WINDOW,
)
from pybinder.region import DEFAULT_REGION_SIZE, MIN_REGION_SIZE, REQUIRED_SEALS, WRITE_SEALS

# -- budget --------------------------------------------------------------------------

#: Examples in the whole file; each test gets its weight's share.
TOTAL_EXAMPLES = int(os.environ.get("PYBINDER_FUZZ_EXAMPLES", "2500"))
_WEIGHTS = {
    "bytes": 2,
    "commands": 2,
    "thread": 3,
    "service": 3,
    "manager": 3,
    "reply": 2,
    "program": 3,
    "descriptors": 2,
}


def examples(name: str) -> int:
    return max(1, TOTAL_EXAMPLES * _WEIGHTS[name] // sum(_WEIGHTS.values()))


def fuzz_settings(name: str) -> settings:
    return settings(
        max_examples=examples(name),
        deadline=None,
        database=None,  # nothing written into the checkout; a failure prints its blob
        print_blob=True,
        suppress_health_check=list(HealthCheck),
    )


def time_limit(name: str) -> pytest.MarkDecorator:
    """pytest-timeout for a test: generous per example, as shrinking re-runs many."""
    return pytest.mark.timeout(120 + examples(name) // 10)


# -- constants of the setup ------------------------------------------------------------

#: Seconds any single wait for the broker (or the server through it) may take.
WAIT_S = 10.0
#: The fixture's broker caps regions and send areas at this (conftest.running_cluster).
MAX_REGION = 64 << 20
#: memfds this file makes are named so, to find the broker's mappings of them.
AREA_NAME = "pybinder-fuzz"
#: A thread's send area holds the fuzzed parcel from 0 and helper calls from here.
SYNC_AT = 32768
#: The largest fuzzed parcel (it must stay clear of SYNC_AT).
MAX_FRAME = SYNC_AT
#: The node id the fuzzing process hands the server to call back.
CALLBACK_NODE = 77
_ERROR = CODE_OF_ERROR[ProtocolError]
_MISMATCH = CODE_OF_ERROR[InterfaceMismatchError]
_UNKNOWN = CODE_OF_ERROR[UnknownTransactionError]
_NOT_FOUND = CODE_OF_ERROR[ServiceNotFoundError]
_TOO_LARGE = CODE_OF_ERROR[TransactionTooLargeError]
_CODES = {m.name: m.code for m in ITest.METHODS}
_ON_VALUE = ICallback.METHODS[0].code
#: ITest methods fuzzed parcels may call: none that sleeps, allocates what its
#: argument says, raises what its argument names, calls back, or returns what others
#: recorded (which grows without bound).
_HARMLESS_CODES = [_CODES[n] for n in ("echo", "digest", "who", "add", "keep", "unsendable")]
_IS_ROOT = os.getuid() == 0


class BrokerClosed(Exception):
    """The broker closed a hand-driven connection."""


# -- hand-driven connections --------------------------------------------------------


class Conn:
    """A SEQPACKET connection driven by hand. Every command the broker sends is
    decoded (it must always send well-formed frames) and kept in :attr:`seen`;
    descriptors that come with a message are counted and closed."""

    def __init__(self, socket_path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(socket_path)
        self.pending: deque[tuple[int, ...]] = deque()
        self.seen: list[tuple[int, ...]] = []
        self.fds_received: list[int] = []  # how many came with each message that had any
        self.closed = False

    def send(self, data: bytes, fds: Iterable[int] = ()) -> bool:
        """Send one message; False if the broker had already closed the connection."""
        fds = list(fds)
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.send(data)
        except (BrokenPipeError, ConnectionResetError):
            self.closed = True
            return False
        return True

    def _receive(self, timeout: float) -> bool:
        """Receive one message into :attr:`pending`; False if none came in time.

        Raises:
            BrokerClosed: the broker closed the connection.
        """
        if self.closed:
            raise BrokerClosed
        self.sock.settimeout(max(timeout, 1e-4))
        try:
            message, fds, _, _ = socket.recv_fds(self.sock, MAX_MESSAGE, 4)
        except TimeoutError:
            return False
        except ConnectionResetError:
            message, fds = b"", []
        for fd in fds:
            os.close(fd)
        if not message:  # the broker never sends an empty message: this is EOF
            self.closed = True
            raise BrokerClosed
        if fds:
            self.fds_received.append(len(fds))
        commands = protocol.decode(message)  # raises on a malformed frame from the broker
        self.seen.extend(commands)
        self.pending.extend(commands)
        return True

    def next(self, timeout: float = WAIT_S) -> tuple[int, ...] | None:
        """The next command from the broker, or None if none comes in ``timeout`` s."""
        deadline = _now() + timeout
        while not self.pending:
            if not self._receive(deadline - _now()):
                return None
        return self.pending.popleft()

    def wait_for(self, ops: Iterable[int], timeout: float = WAIT_S) -> tuple[tuple[int, ...], list]:
        """The first command whose code is in ``ops``, and the commands before it.

        Raises:
            AssertionError: none came within ``timeout`` seconds.
            BrokerClosed: the broker closed the connection first.
        """
        wanted = set(ops)
        skipped = []
        deadline = _now() + timeout
        while True:
            command = self.next(deadline - _now())
            if command is None:
                names = [protocol.COMMAND_NAMES[op] for op in wanted]
                raise AssertionError(
                    f"no {names} within {timeout} s; got {_names(skipped)} meanwhile"
                )
            if command[0] in wanted:
                return command, skipped
            skipped.append(command)

    def quiet(self, timeout: float) -> list[tuple[int, ...]]:
        """Whatever the broker sends within ``timeout`` seconds (it must stay open)."""
        got = list(self.pending)
        self.pending.clear()
        deadline = _now() + timeout
        while self._receive(deadline - _now()):
            got.extend(self.pending)
            self.pending.clear()
        return got

    def finish(self, timeout: float = WAIT_S) -> list[tuple[int, ...]]:
        """Stop sending and read until the broker closes its end; return what came.

        The broker reads its socket in order, so the EOF it sees comes after every
        message sent before: its closing the connection proves it has handled them
        all, and that it is not stuck on this connection.
        """
        got = list(self.pending)
        self.pending.clear()
        try:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            deadline = _now() + timeout
            while True:
                if not self._receive(deadline - _now()):
                    raise AssertionError(f"the broker did not close the connection in {timeout} s")
                got.extend(self.pending)
                self.pending.clear()
        except BrokerClosed:
            return got
        finally:
            self.sock.close()
            self.closed = True


_now = time.monotonic


def _names(commands: Iterable[tuple[int, ...]]) -> list[str]:
    return [protocol.COMMAND_NAMES.get(c[0], hex(c[0])) for c in commands]


def memfd(size: int, seals: int = REQUIRED_SEALS, sealing: bool = True, extra: int = 0) -> int:
    """A memfd of ``size`` bytes named :data:`AREA_NAME`, with ``seals`` added."""
    flags = os.MFD_CLOEXEC | extra | (os.MFD_ALLOW_SEALING if sealing else 0)
    fd = os.memfd_create(AREA_NAME, flags)
    try:
        os.ftruncate(fd, size)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except BaseException:
        os.close(fd)
        raise
    return fd


class Area:
    """A sealed memfd mapped here, for a send area or a loan area."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = memfd(size)
        self.map = mmap.mmap(self.fd, size)

    def write(self, offset: int, data: bytes) -> None:
        self.map[offset : offset + len(data)] = data

    def words(self) -> tuple[int, int, int]:
        """The settle words and the progress word the broker writes at the end."""
        return struct.unpack_from("<qqq", self.map, self.size - 24)

    def close(self) -> None:
        self.map.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def give_away_fd(self) -> int:
        """The descriptor, now the caller's to close (the mapping stays)."""
        fd, self.fd = self.fd, -1
        return fd


class RawProcess:
    """A process state opened by hand (BC_HELLO_PROCESS) with its region mapped."""

    def __init__(self, socket_path: str, region_size: int = MIN_REGION_SIZE) -> None:
        self.socket_path = socket_path
        self.conn = Conn(socket_path)
        self.threads: list[RawThread] = []
        self.region: mmap.mmap | None = None
        try:
            self.conn.send(protocol.encode(BC_HELLO_PROCESS, PROTOCOL_VERSION, region_size))
            message, fds, _, _ = socket.recv_fds(self.conn.sock, MAX_MESSAGE, 4)
            try:
                [(op, self.key, self.region_size, _)] = protocol.decode(message)
                assert op == BR_HELLO_PROCESS and len(fds) == 1, (message, fds)
                self.region = mmap.mmap(fds[0], self.region_size, prot=mmap.PROT_READ)
            finally:
                for fd in fds:
                    os.close(fd)
        except BaseException:
            self.conn.sock.close()
            raise

    def thread(self, area_size: int | None = 1 << 16) -> RawThread:
        thread = RawThread(self, area_size)
        self.threads.append(thread)
        return thread

    def read(self, offset: int, size: int) -> Any:
        """The value of the parcel the broker put at ``offset`` of the region."""
        assert self.region is not None
        assert offset + size <= self.region_size, (offset, size)
        value, _ = parcel.decode(self.region[offset : offset + size], copy_buffers=True)
        return value

    def close(self) -> list[tuple[int, ...]]:
        """Close every thread connection, then the process connection, each once the
        broker has closed its end; return what the threads received meanwhile."""
        got = []
        try:
            for thread in self.threads:
                got += thread.close()
            self.conn.finish()
        finally:
            for thread in self.threads:
                thread.release()
            if self.region is not None:
                self.region.close()
        return got


class RawThread(Conn):
    """A thread connection of a :class:`RawProcess`, with a send area."""

    def __init__(self, process: RawProcess, area_size: int | None) -> None:
        super().__init__(process.socket_path)
        self.process = process
        self.area: Area | None = None
        self.extra_areas: list[Area] = []
        try:
            self.send(protocol.encode(BC_HELLO_THREAD, PROTOCOL_VERSION, process.key))
            command, _ = self.wait_for([BR_HELLO_THREAD, BR_ERROR])
            assert command[0] == BR_HELLO_THREAD, command
            if area_size:
                self.area = self.give_area(area_size, SEND_AREA)
        except BaseException:
            self.sock.close()
            raise

    def give_area(self, size: int, which: int) -> Area:
        area = Area(size)
        try:
            fd = area.give_away_fd()
            try:
                self.send(protocol.encode(BC_SET_SEND_AREA, size, which), [fd])
            finally:
                os.close(fd)
            command, _ = self.wait_for([BR_OK, BR_ERROR])
            assert command[0] == BR_OK, command
        except BaseException:
            area.close()
            raise
        return area

    def call_manager(self, code: int, args: list, kwargs: dict | None = None) -> Any:
        """A two-way service-manager call whose parcel is written at SYNC_AT; its reply
        body (the buffer is freed). Also a barrier: the broker has handled everything
        sent before when it answers."""
        assert self.area is not None
        encoded = parcel.encode([SERVICE_MANAGER_DESCRIPTOR, args, kwargs or {}])
        data = bytearray(encoded.size)
        encoded.write_into(data)
        self.area.write(SYNC_AT, bytes(data))
        self.send(protocol.encode(BC_TRANSACTION, 0, code, 0, len(data), 0, 0, SYNC_AT))
        command, _ = self.wait_for([BR_REPLY, BR_FAILED_REPLY, BR_DEAD_REPLY])
        assert command[0] == BR_REPLY, command
        body = self.process.read(command[1], command[2])
        self.send(protocol.encode(BC_FREE_BUFFER, command[1]))
        return body

    def barrier(self) -> list[tuple[int, ...]]:
        """A oneway service-manager call at SYNC_AT; returns the commands received
        before its BR_TRANSACTION_COMPLETE, which the broker sends only once it has
        handled everything sent before it."""
        assert self.area is not None
        encoded = parcel.encode([SERVICE_MANAGER_DESCRIPTOR, [], {}])
        data = bytearray(encoded.size)
        encoded.write_into(data)
        self.area.write(SYNC_AT, bytes(data))
        code = SM_LIST_SERVICES
        self.send(protocol.encode(BC_TRANSACTION, 0, code, TF_ONE_WAY, len(data), 0, 0, SYNC_AT))
        _, before = self.wait_for([BR_TRANSACTION_COMPLETE])
        return before

    def look_up_test(self) -> int:
        """This process's handle to the server's "test" service."""
        body = self.call_manager(SM_CHECK_SERVICE, ["test"])
        assert body[0] == REPLY_OK and isinstance(body[1], ObjectRef), body
        assert body[1].kind == OBJ_HANDLE, body
        return body[1].value

    def close(self) -> list[tuple[int, ...]]:
        return self.finish()

    def release(self) -> None:
        for area in [self.area, *self.extra_areas]:
            if area is not None:
                area.close()
        self.area = None
        self.extra_areas = []


@contextlib.contextmanager
def raw_process(socket_path: str, region_size: int = MIN_REGION_SIZE) -> Iterator[RawProcess]:
    """A :class:`RawProcess`, closed (and its closing checked) afterwards."""
    process = RawProcess(socket_path, region_size)
    try:
        yield process
    except BaseException:
        with contextlib.suppress(Exception):
            process.close()
        raise
    process.close()


def encode_body(value: Any) -> bytes:
    encoded = parcel.encode(value)
    data = bytearray(encoded.size)
    encoded.write_into(data)
    return bytes(data)


# -- the environment of each test: a broker, a server, a client, and the checks ------


class Env:
    """The broker, a real server and this process as an ordinary client, and the
    checks made after every example."""

    def __init__(self, cluster: Any, proc: Any) -> None:
        self.cluster = cluster
        self.proc = proc
        self.broker = cluster.peers[0]
        self.server = cluster.server()
        self.socket = cluster.socket
        self.service = proc.get_service("test", ITest, timeout=WAIT_S)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="fuzz-check")
        self.stuck = False
        # Both children's stderr are pipes nobody reads until they stop: read here, or
        # their logs (the server logs every failing oneway call) fill them and block.
        self.logs: dict[int, str] = {}
        for peer in (self.broker, self.server):
            fd = peer.proc.stderr.fileno()
            os.set_blocking(fd, False)
            self.logs[fd] = ""
        self._checked = 0  # how much of the broker's log was checked
        self.unattributed: list[str] = []  # unexpected errors logged between examples
        self.tokens = itertools.count()
        try:
            assert self.call(self.service.echo, "hello") == "hello"
            # The server's pool starts one looper and grows on demand up to 4 (plus its
            # main thread): fill it now, so that no looper connects during an example.
            serving = lambda: loopers(self.server_entry())  # noqa: E731
            assert grow_thread_pool(self.service, serving, 5, timeout=WAIT_S)
            self.baseline = self.snapshot()
            self.names = self.call(self.proc.list_services)  # "test"
        except BaseException:
            self.close()
            raise

    # -- the checks --------------------------------------------------------------------

    def call(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` through the ordinary client, failing after WAIT_S s."""
        future = self.pool.submit(function, *args)
        try:
            return future.result(timeout=WAIT_S)
        except FutureTimeout:
            self.stuck = True
            raise AssertionError(
                f"{function} got no answer in {WAIT_S} s: the broker hangs"
            ) from None

    def server_entry(self) -> dict[str, Any]:
        status = self.call(self.proc.status)
        [entry] = [p for p in status["processes"] if p["pid"] == self.server.pid]
        return entry

    def broker_fds(self) -> list[str]:
        """What the broker's descriptors are (sockets, pipes, files...), sorted; but
        the ordinary clients' areas (``pybinder-send``): a runtime thread makes its
        send area when it first sends, so a server looper's first reply adds one."""
        kinds = []
        for fd in os.listdir(f"/proc/{self.broker.pid}/fd"):
            with contextlib.suppress(OSError):  # one closed meanwhile
                target = os.readlink(f"/proc/{self.broker.pid}/fd/{fd}")
                if "memfd:pybinder-send" not in target:
                    kinds.append(target.split(":[")[0] if ":[" in target else target)
        return sorted(kinds)

    def broker_mappings(self) -> tuple[int, int]:
        """(mappings of this file's memfds, mappings of receive regions) in the broker."""
        with open(f"/proc/{self.broker.pid}/maps") as maps:
            lines = maps.readlines()
        ours = sum(f"memfd:{AREA_NAME}" in line for line in lines)
        regions = sum("/dev/shm/pybinder-" in line for line in lines)
        return ours, regions

    def snapshot(self) -> tuple[Any, ...]:
        """What must come back to its baseline once an example's connections are closed."""
        status = self.call(self.proc.status)
        processes = sorted(p["pid"] for p in status["processes"])
        server_in_use = [
            p["region_in_use"] for p in status["processes"] if p["pid"] == self.server.pid
        ]
        return (
            ("fds", self.broker_fds()),
            ("mappings", self.broker_mappings()),
            ("processes", processes),
            ("server region in use", server_in_use),
            ("services", status["services"]),
        )

    def read_logs(self) -> None:
        for fd in self.logs:
            chunks = []
            while True:
                try:
                    chunk = os.read(fd, 1 << 16)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            if chunks:
                self.logs[fd] += b"".join(chunks).decode(errors="replace")

    def broker_log(self) -> str:
        return self.logs[self.broker.proc.stderr.fileno()]

    def check_log(self) -> None:
        self.read_logs()
        log = self.broker_log()
        new, self._checked = log[self._checked :], len(log)
        assert UNEXPECTED not in new, f"the broker caught an unexpected error:\n{new}"

    def each(self, function: Callable[..., None]) -> Callable[..., None]:
        """Decorate a test's example function (under ``given``) to run in :meth:`example`."""

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> None:
            with self.example():
                function(*args, **kwargs)

        return run

    @contextlib.contextmanager
    def example(self) -> Iterator[None]:
        """Run one example: an unexpected error the broker logs meanwhile fails it,
        whatever else failed (the error is what the broker got wrong); one logged
        before it (a timer's, after its example passed) fails the test at the end."""
        self.read_logs()
        log = self.broker_log()
        if UNEXPECTED in log[self._checked :]:
            self.unattributed.append(log[self._checked :])
        self._checked = len(log)
        try:
            yield
        except BaseException:
            # The broker logs a kind of line 20 times, then once a second: while
            # hypothesis shrinks, the failing example's own line may be held back.
            self.read_logs()
            if self.broker_log():
                note(f"the broker's log ends with:\n{self.broker_log()[-4000:]}")
            raise
        finally:
            self.check_log()

    def check(self) -> None:
        """The broker lives, logged nothing unexpected, still serves an ordinary
        client (a call through the server, a service-manager call), and holds no
        more than before the example."""
        assert self.broker.proc.poll() is None, "the broker died"
        self.check_log()
        token = ["alive", next(self.tokens)]
        assert self.call(self.service.echo, token) == token
        assert self.call(self.proc.list_services) == self.names
        if not eventually(lambda: self.snapshot() == self.baseline, timeout=WAIT_S):
            raise AssertionError(
                f"the broker holds more than before: {self.snapshot()}; before: {self.baseline}"
            )
        self.check_log()

    def close(self) -> None:
        self.pool.shutdown(wait=not self.stuck, cancel_futures=True)
        self.read_logs()
        for fd in self.logs:
            os.set_blocking(fd, True)
        log = self.broker_log()
        assert UNEXPECTED not in log[self._checked :], f"unexpected error:\n{log}"
        assert not self.unattributed, f"unexpected errors:\n{self.unattributed}"


@pytest.fixture
def env(cluster, proc) -> Iterator[Env]:
    environment = Env(cluster, proc)
    try:
        yield environment
    finally:
        environment.close()


# -- strategies ----------------------------------------------------------------------

U16_EDGES = (0, 1, 2, 3, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
U32_EDGES = (
    *(0, 1, 2, 3, 4, 5, 7, 8, 15, 16, 24, 31, 32, 33, 47, 48, 63, 64, 255, 256),
    *(1023, 1024, 4095, 4096, 4097, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1),
)
U64_EDGES = (
    *U32_EDGES,
    *(2**32, 2**32 + 1, PARTS_RING, PARTS_RING + 8, MAX_REGION, MAX_REGION + 1, 2**48),
    *(2**63 - 1, 2**63, 2**64 - 2, 2**64 - 1),
)


def u16() -> st.SearchStrategy[int]:
    return st.sampled_from(U16_EDGES) | st.integers(0, 2**16 - 1)


def u32() -> st.SearchStrategy[int]:
    return st.sampled_from(U32_EDGES) | st.integers(0, 2**32 - 1)


def u64() -> st.SearchStrategy[int]:
    return st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)


def of_format(char: str) -> st.SearchStrategy[int]:
    return {"H": u16, "I": u32, "Q": u64, "i": lambda: st.integers(-(2**31), 2**31 - 1)}[char]()


BC_CODES = sorted(c for c in protocol.COMMAND_NAMES if protocol.COMMAND_NAMES[c].startswith("BC_"))
BR_CODES = sorted(c for c in protocol.COMMAND_NAMES if protocol.COMMAND_NAMES[c].startswith("BR_"))
FLAG_BITS = (TF_ONE_WAY, TF_PARTS, TF_RING, TF_WINDOW)


def flag_sets() -> st.SearchStrategy[int]:
    combos = st.lists(st.sampled_from(FLAG_BITS), max_size=4).map(lambda bits: sum(set(bits)))
    return combos | u32()


@st.composite
def command(draw: st.DrawFn, fields: dict[int, tuple[st.SearchStrategy[int], ...]] | None = None):
    """One encoded command: a BC_* code (mostly), a BR_* code or an unknown code, with
    its fields (from ``fields`` when given for the code, else boundary values)."""
    code = draw(
        st.sampled_from(BC_CODES) | st.sampled_from(BR_CODES) | u32(),
    )
    layout = COMMAND_STRUCTS.get(code)
    if layout is None:
        return struct.pack("<I", code) + draw(st.binary(max_size=60))
    chosen = (fields or {}).get(code)
    formats = layout.format.lstrip("<")[1:]
    values = [
        draw(chosen[i]) if chosen is not None else draw(of_format(char))
        for i, char in enumerate(formats)
    ]
    return layout.pack(code, *values)


def batches(fields: dict[int, tuple[st.SearchStrategy[int], ...]] | None = None):
    """A message: commands back to back, sometimes cut short or with bytes after."""

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        message = b"".join(draw(st.lists(command(fields), min_size=1, max_size=12)))
        tweak = draw(st.sampled_from(["none", "none", "none", "cut", "extend"]))
        if tweak == "cut" and len(message) > 1:
            message = message[: draw(st.integers(1, len(message) - 1))]
        elif tweak == "extend":
            message += draw(st.binary(min_size=1, max_size=8))
        return message

    return build()


def hello_fields() -> dict[int, tuple[st.SearchStrategy[int], ...]]:
    version = st.sampled_from([PROTOCOL_VERSION]) | u32()
    region = st.sampled_from([0, 1, MIN_REGION_SIZE - 1, MIN_REGION_SIZE, 1 << 20]) | u64()
    return {BC_HELLO_PROCESS: (version, region), BC_HELLO_THREAD: (version, u64())}


# Values a parcel carries. Big bytes go out of band (parcel.OUT_OF_BAND_THRESHOLD).
big_bytes = st.builds(lambda n, b: bytes([b]) * n, st.integers(4096, 12000), st.integers(0, 255))
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=24)
)
keys = st.text(max_size=8) | st.integers(-3, 3)


def values(refs: st.SearchStrategy[Any] | None = None, big: bool = True) -> st.SearchStrategy:
    leaves = scalars
    if refs is not None:
        leaves = leaves | refs
    if big:
        leaves = leaves | big_bytes
    return st.recursive(
        leaves,
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(keys, kids, max_size=4),
        max_leaves=10,
    )


# Mutations of an encoded parcel: (table, where, op, value). A table's fields are
# (struct format, offset); "set" writes a value, "add" adds a small delta.
_HEADER_FORMATS = ["4s", "H", "H", "I", "I", "I", "I", "Q"]  # parcel.HEADER, field by field
HEADER_FIELDS = [
    (fmt, struct.calcsize("<" + "".join(_HEADER_FORMATS[:i])))
    for i, fmt in enumerate(_HEADER_FORMATS)
]
OBJECT_FIELDS = [("I", 0), ("I", 4), ("Q", 8)]
BUFFER_FIELDS = [("Q", 0), ("Q", 8)]
_TABLES = {"header": HEADER_FIELDS, "object": OBJECT_FIELDS, "buffer": BUFFER_FIELDS}


@st.composite
def mutation(draw: st.DrawFn) -> tuple:
    what = draw(st.sampled_from(["header", "header", "object", "buffer", "byte", "cut", "extend"]))
    if what in _TABLES:
        fields = _TABLES[what]
        entry = 0 if what == "header" else draw(st.integers(0, 4))
        field = draw(st.integers(0, len(fields) - 1))
        fmt = fields[field][0]
        if fmt == "4s":
            return (what, (entry, field), "set", draw(st.binary(min_size=4, max_size=4)))
        if draw(st.booleans()):
            return (what, (entry, field), "add", draw(st.integers(-3, 3)))
        return (what, (entry, field), "set", draw(of_format(fmt)))
    if what == "byte":
        return ("byte", draw(st.integers(0, 2**16)), None, draw(st.integers(0, 255)))
    if what == "cut":
        return ("cut", draw(st.integers(0, 2**16)), None, None)
    return ("extend", None, None, draw(st.binary(min_size=1, max_size=40)))


def _poke(buf: bytearray, fmt: str, at: int, op: str, value: Any) -> None:
    """Set (or add to) the ``fmt`` field at ``at`` of ``buf``, if it lies inside."""
    layout = struct.Struct("<" + fmt)
    if at + layout.size > len(buf):
        return
    if op == "add":
        (old,) = layout.unpack_from(buf, at)
        value = (old + value) % (1 << (8 * layout.size))
    layout.pack_into(buf, at, value)


def mutate(data: bytes, mutations: list[tuple]) -> bytes:
    """Apply ``mutations`` (see :func:`mutation`) to a parcel's bytes, in order."""
    buf = bytearray(data)
    for what, where, op, value in mutations:
        if what in _TABLES:
            entry, field = where
            fmt, offset = _TABLES[what][field]
            base = 0
            if what != "header":
                n_objects = struct.unpack_from("<I", buf, 8)[0] if len(buf) >= 12 else 0
                table = HEADER.size + (0 if what == "object" else 16 * min(n_objects, 4096))
                base = table + 16 * entry
            _poke(buf, fmt, base + offset, op, value)
        elif what == "byte" and buf:
            buf[where % len(buf)] = value
        elif what == "cut" and buf:
            del buf[where % len(buf) :]
        elif what == "extend":
            buf += value
    return bytes(buf)


@st.composite
def frames(draw: st.DrawFn, bodies: st.SearchStrategy[Any]) -> tuple[bytes, bool]:
    """(parcel bytes, whether they are a valid parcel unmutated): random bytes, a
    valid parcel of one of ``bodies``, or one mutated; at most MAX_FRAME bytes."""
    # (hypothesis favours small integers: branches are chosen by label)
    kind = draw(st.sampled_from(["random bytes"] + ["valid"] * 4 + ["mutated"] * 3))
    if kind == "random bytes":
        return draw(st.binary(max_size=2048)), False
    data = encode_body(draw(bodies))
    assume(len(data) <= MAX_FRAME - 64)
    changes = draw(st.lists(mutation(), min_size=1, max_size=4)) if kind == "mutated" else []
    if not changes:
        return data, True
    data = mutate(data, changes)
    if len(data) >= HEADER.size and draw(st.booleans()):  # total_len made right again
        data = data[:24] + struct.pack("<Q", len(data)) + data[32:]
    assume(len(data) <= MAX_FRAME)
    return data, False


def parcel_of_body(body: bytes) -> bytes:
    """A parcel whose msgpack body is ``body`` (bytes made by hand), with no objects."""
    size = HEADER.size + len(body)
    return HEADER.pack(parcel.MAGIC, parcel.VERSION, 0, 0, 0, len(body), 0, size) + body


@st.composite
def deep_manager_frames(draw: st.DrawFn) -> tuple[bytes, bool]:
    """Service-manager calls with a list or map nested up to thousands deep (deeper
    than msgpack packs, or Python's repr recurses) as descriptor, argument or
    keyword argument; the msgpack is made by hand."""
    # Python's repr gives up near 1000 levels, msgpack's decoder at 1024
    near = st.sampled_from([995, 1000, 1005, 1010, 1015, 1020, 1023, 1024])
    depth = draw(st.one_of(near, near, st.sampled_from([10, 500, 5000]), st.integers(1, 9000)))
    opener = draw(st.sampled_from([b"\x91", b"\x81\xa1k"]))  # [x] or {"k": x}
    deep = opener * depth + b"\xc0"
    manager = msgpack.packb(SERVICE_MANAGER_DESCRIPTOR)
    where = draw(st.sampled_from(["descriptor", "descriptor", "args", "kwargs"]))
    if where == "descriptor":
        body = b"\x93" + deep + b"\x90\x80"
    elif where == "args":
        body = b"\x93" + manager + b"\x91" + deep + b"\x80"
    else:
        body = b"\x93" + manager + b"\x90\x81\xa4name" + deep
    return parcel_of_body(body), False


def data_lengths(frame: bytes) -> st.SearchStrategy[int]:
    """The data_len a BC_TRANSACTION gives for ``frame``: mostly its length."""
    n = len(frame)
    near = [max(0, n - 1), n + 1, 0, 31, 32, SYNC_AT, 1 << 16, (1 << 16) + 1]
    return st.one_of(st.just(n), st.just(n), st.just(n), st.sampled_from(near), u64())


@st.composite
def readies(draw: st.DrawFn, size: int) -> list[int]:
    """BC_PARCEL_READY values for a parcel in parts of ``size`` bytes: mostly well
    formed (increasing, ending at ``size``), sometimes anything."""
    if draw(st.integers(0, 4)):
        cuts = draw(st.lists(st.integers(0, max(size, 0)), max_size=3))
        return [*sorted(cuts), size]
    return draw(
        st.lists(
            st.sampled_from([0, size, min(size + 1, 2**64 - 1), max(0, size - 1)]) | u64(),
            max_size=4,
        )
    )


def parts_complete(size: int, ready_list: list[int]) -> bool:
    """Whether a parcel in parts of ``size`` bytes completes with these
    BC_PARCEL_READY values (Router.parcel_ready), given no part is refused for
    lying outside the send area."""
    copied = 0
    for ready in ready_list:
        if not copied <= ready <= size:
            return False
        copied = ready
        if ready == size:
            return True
    return False


def in_area(area: bytes, data_len: int, head_offset: int = 0) -> bytes | None:
    """The bytes the broker copies for a parcel of ``data_len`` at ``head_offset``,
    or None if they do not lie in the send area (ThreadRecord.parcel_fits)."""
    if data_len < HEADER.size or head_offset + data_len > len(area):
        return None
    return area[head_offset : head_offset + data_len]


def broker_accepts(frame: bytes, handles: set[int]) -> bool:
    """Whether the broker delivers ``frame`` to a process (Router._copy): a checked
    header, and an object table of nodes and of handles the sender holds."""
    try:
        header = parcel.parse_header(frame)
    except ProtocolError:
        return False
    for kind, value in parcel.read_objects(frame, header):
        if kind not in (OBJ_NODE, OBJ_HANDLE) or (kind == OBJ_HANDLE and value not in handles):
            return False
    return True


def canonical(value: Any) -> bytes:
    """A comparable form of a decoded value (NaN equals NaN, tuples are lists)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, ObjectRef):
            return msgpack.ExtType(2, struct.pack("<IQ", obj.kind, obj.value))
        if isinstance(obj, memoryview):
            return obj.tobytes()
        raise TypeError(type(obj))

    return msgpack.packb(value, default=default, use_bin_type=True, strict_types=False)


def is_echo_call(body: Any) -> bool:
    """Whether ``body`` is [ITest.DESCRIPTOR, [value], {}]."""
    return (
        isinstance(body, list)
        and len(body) == 3
        and body[0] == ITest.DESCRIPTOR
        and isinstance(body[1], list)
        and len(body[1]) == 1
        and body[2] == {}
    )


def reply_ok(status: Any) -> bool:
    return (
        isinstance(status, list)
        and bool(status)
        and status[0] in (REPLY_OK, REPLY_EXCEPTION, REPLY_BINDER_ERROR)
    )


# -- 1. raw frames ---------------------------------------------------------------------


def expected_on_fresh(message: bytes) -> list[int] | None:
    """The commands the broker answers ``message`` with on a connection that has not
    said hello; None when it closes it (an empty message reads as EOF)."""
    if not message:
        return None
    if len(message) > MAX_MESSAGE:
        return [BR_ERROR]
    try:
        commands = protocol.decode(message)
    except ProtocolError:
        return [BR_ERROR]
    answers = []
    for command in commands:
        if not answers and command[0] == BC_HELLO_PROCESS and command[1] == PROTOCOL_VERSION:
            answers.append(BR_HELLO_PROCESS)
            continue
        answers.append(BR_ERROR)  # every other command there is refused; the rest is dropped
        break
    return answers


def check_fresh_answers(message: bytes, got: list[tuple[int, ...]], conn: Conn) -> None:
    expected = expected_on_fresh(message)
    note(f"answers {_names(got)}, expected {expected}")
    if expected is None:
        assert got == []
        return
    assert [c[0] for c in got] == expected
    for answer in got:
        if answer[0] == BR_ERROR:
            assert answer[1] == _ERROR, answer
        else:
            _, _, size, max_parcel = answer
            requested = protocol.decode(message)[0][2]
            assert size == min(max(requested or DEFAULT_REGION_SIZE, MIN_REGION_SIZE), MAX_REGION)
            assert max_parcel == MAX_REGION
    assert conn.fds_received == [1] * expected.count(BR_HELLO_PROCESS)


@time_limit("bytes")
def test_random_bytes_on_a_fresh_connection(env):
    @fuzz_settings("bytes")
    @given(message=st.binary(max_size=64) | st.binary(max_size=MAX_MESSAGE + 200))
    @env.each
    def example(message: bytes) -> None:
        conn = Conn(env.socket)
        conn.send(message)
        check_fresh_answers(message, conn.finish(), conn)
        env.check()

    example()


@time_limit("commands")
def test_random_commands_on_a_fresh_connection(env):
    @fuzz_settings("commands")
    @given(message=batches(hello_fields()))
    @env.each
    def example(message: bytes) -> None:
        conn = Conn(env.socket)
        conn.send(message)
        check_fresh_answers(message, conn.finish(), conn)
        env.check()

    example()


def thread_fields(sizes: list[int]) -> dict[int, tuple[st.SearchStrategy[int], ...]]:
    """Fields of a thread's commands that reach the broker's deeper checks: handles
    it holds, sizes of the parcels in its send area, offsets that exist."""
    size = st.sampled_from(sizes) | u64()
    handle = st.sampled_from([0, 1, 1, 2]) | u64()
    small = st.sampled_from([0, 0, 64, 4096]) | u64()
    head = st.sampled_from([0, 0, SYNC_AT]) | u64()
    offset = st.sampled_from([0, 64, 128, 4096]) | u64()
    code = st.sampled_from([1, 2, 4, 11, SM_CHECK_SERVICE, SM_LIST_SERVICES]) | u32()
    area = st.sampled_from([4096, 1 << 16]) | u64()
    return {
        BC_TRANSACTION: (handle, code, flag_sets(), size, small, small, head),
        BC_REPLY: (flag_sets(), size, small, small),
        BC_FREE_BUFFER: (offset,),
        BC_RELEASE: (handle, st.sampled_from([0, 1, 2]) | u64()),
        BC_PARCEL_READY: (size,),
        BC_SET_SEND_AREA: (area, st.sampled_from([SEND_AREA, LOAN_AREA]) | u32()),
        protocol.BC_REQUEST_DEATH_NOTIFICATION: (handle,),
        protocol.BC_CLEAR_DEATH_NOTIFICATION: (handle,),
        protocol.BC_SET_MAX_THREADS: (st.sampled_from([0, 1, 4, 256, 257]) | u32(),),
        **hello_fields(),
    }


#: What a thread connection may get back from the broker when nothing it holds can be
#: called (it hands out no node): never a BR_TRANSACTION, a hello or a descriptor.
THREAD_ANSWERS = {
    protocol.BR_CANCEL_DONE,  # the answer to BC_CANCEL_TRANSACTION, with or without a call
    BR_ERROR,
    BR_REPLY,
    BR_TRANSACTION_COMPLETE,
    BR_DEAD_REPLY,
    BR_FAILED_REPLY,
    BR_RELEASE_NODE,
}


@time_limit("thread")
def test_random_commands_on_a_thread_and_a_process_connection(env):
    """Commands with fields aimed at the broker's checks, on the thread connection
    (or the process connection) of a process whose send area holds an echo call
    (at 0) and a service-manager call (at SYNC_AT), and which holds a handle (1) to
    the server; some messages come with a descriptor."""
    echo = encode_body([ITest.DESCRIPTOR, ["fuzz"], {}])
    lookup = encode_body([SERVICE_MANAGER_DESCRIPTOR, ["test"], {}])
    sizes = [len(echo), len(lookup), 32, 1 << 16, (1 << 16) + 1]
    fields = thread_fields(sizes)

    @fuzz_settings("thread")
    @given(
        messages=st.lists(batches(fields) | st.binary(max_size=80), min_size=1, max_size=3),
        on_process=st.integers(0, 5).map(lambda n: n == 0),
        attach=st.sampled_from([None, None, None, "area", "pipe"]),
        area_size=st.sampled_from([1 << 16, 1 << 16, PARTS_RING + 64]),
    )
    @env.each
    def example(messages: list[bytes], on_process: bool, attach: str | None, area_size: int):
        with raw_process(env.socket) as process:
            thread = process.thread(area_size)
            assert thread.area is not None
            assert thread.look_up_test() == 1
            thread.area.write(0, echo)
            thread.area.write(SYNC_AT, lookup)
            target = process.conn if on_process else thread
            for message in messages:
                fds = []
                if attach == "area":
                    fds = [memfd(4096)]
                elif attach == "pipe":
                    fds = list(os.pipe())
                try:
                    target.send(message, fds)
                finally:
                    for fd in fds:
                        os.close(fd)
            got = thread.close()
            if on_process:
                process_got = process.conn.finish()
                note(f"process connection got {_names(process_got)}")
                # every command there is refused: one BR_ERROR a message, at most
                assert {c[0] for c in process_got} <= {BR_ERROR}
                assert len(process_got) <= len(messages)
            note(f"thread got {_names(got)}")
            allowed = THREAD_ANSWERS | ({BR_OK} if attach == "area" else set())
            assert {c[0] for c in got} <= allowed, _names(got)
            assert thread.fds_received == []
        env.check()

    example()


# -- 2. parcels ------------------------------------------------------------------------


def call_bodies(refs: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """[descriptor, args, kwargs] bodies for the server, or anything else."""
    descriptor = st.sampled_from([ITest.DESCRIPTOR] * 6 + [""]) | st.text(max_size=30)
    args = st.lists(values(refs), max_size=3)
    kwargs = st.dictionaries(
        st.sampled_from(["value", "a", "b", "data"]) | st.text(max_size=6), values(refs), max_size=2
    )
    proper = st.tuples(descriptor, args, kwargs).map(list)
    echo = values(refs).map(lambda v: [ITest.DESCRIPTOR, [v], {}])
    return echo | echo | proper | values(refs)


@time_limit("service")
def test_random_parcels_to_a_service(env):
    """Parcels, valid, mutated or random, sent whole or in parts to a real service:
    the broker refuses exactly those whose header or object table is bad
    (BR_FAILED_REPLY ProtocolError) and delivers the rest, which the server answers;
    an unmutated echo comes back exactly."""
    refs = st.builds(ObjectRef, st.just(OBJ_NODE), u64()) | st.builds(
        ObjectRef, st.just(OBJ_HANDLE), st.sampled_from([1, 1, 0, 2, 2**64 - 1])
    )

    @fuzz_settings("service")
    @given(
        frame=frames(call_bodies(refs)),
        code=st.sampled_from([_CODES["echo"]] * 4 + _HARMLESS_CODES + [0, 16, 2**32 - 1]),
        flags=st.sampled_from(
            [
                0,
                0,
                0,
                TF_ONE_WAY,
                TF_ONE_WAY | TF_WINDOW,
                TF_PARTS,
                TF_PARTS | TF_RING,
                TF_PARTS | TF_ONE_WAY,
            ]
        ),
        data=st.data(),
    )
    @env.each
    def example(frame: tuple[bytes, bool], code: int, flags: int, data: st.DataObject):
        parcel_bytes, clean = frame
        data_len = data.draw(data_lengths(parcel_bytes), label="data_len")
        oneway, parts = bool(flags & TF_ONE_WAY), bool(flags & TF_PARTS)
        ready_list = data.draw(readies(data_len), label="readies") if parts else []
        with raw_process(env.socket, region_size=4 << 20) as process:
            thread = process.thread(PARTS_RING + 64 if flags & TF_RING else 1 << 16)
            assert thread.area is not None
            handle = thread.look_up_test()
            thread.area.write(0, parcel_bytes)
            area = bytes(thread.area.map)
            frame_in_area = in_area(area, data_len)
            accepted = frame_in_area is not None and broker_accepts(frame_in_area, {handle})
            message = protocol.encode(BC_TRANSACTION, handle, code, flags, data_len, 0, 0, 0)
            for ready in ready_list:
                message += protocol.encode(BC_PARCEL_READY, ready)
            thread.send(message)
            if parts and not parts_complete(data_len, ready_list):
                # an incomplete parcel in parts waits for more: nothing is delivered,
                # and any refusal is a BR_ERROR
                got = thread.barrier()
                note(f"incomplete parts: {_names(got)}")
                assert {c[0] for c in got} <= {BR_ERROR, BR_RELEASE_NODE}
            elif oneway and flags & TF_WINDOW and not parts:
                got = thread.barrier()
                failed, settled, _ = thread.area.words()
                note(f"window: {_names(got)} settled {settled} failed {failed}")
                assert settled == 1
                assert failed == (0 if accepted else 1)
                assert [c[0] for c in got if c[0] != BR_RELEASE_NODE] == (
                    [] if accepted else [BR_FAILED_REPLY]
                )
            else:
                outcomes = [BR_REPLY, BR_FAILED_REPLY, BR_DEAD_REPLY, BR_TRANSACTION_COMPLETE]
                outcome, before = thread.wait_for(outcomes)
                note(f"outcome {_names([outcome])} {outcome} after {_names(before)}")
                assert {c[0] for c in before} <= {BR_RELEASE_NODE, BR_ERROR}
                if not accepted:
                    assert outcome[0] == BR_FAILED_REPLY
                    # a span past the send area may be refused before it is read, as
                    # too large for the target
                    beyond = data_len > thread.area.size
                    assert outcome[1] in ((_ERROR, _TOO_LARGE) if beyond else (_ERROR,))
                elif oneway:
                    assert outcome[0] == BR_TRANSACTION_COMPLETE
                else:
                    assert outcome[0] == BR_REPLY
                    reply = process.read(outcome[1], outcome[2])
                    note(f"reply {reply!r}"[:2000])
                    assert reply_ok(reply)
                    if clean and code == _CODES["echo"] and data_len == len(parcel_bytes):
                        sent, _ = parcel.decode(parcel_bytes, copy_buffers=True)
                        if is_echo_call(sent):
                            assert canonical(reply) == canonical([REPLY_OK, sent[1][0]])
                    thread.send(protocol.encode(BC_FREE_BUFFER, outcome[1]))
        env.check()

    example()


# -- 2b. the service manager -----------------------------------------------------------

NAMES = st.sampled_from(
    ["test", "", "x", "fuzz.a", "x" * 255, "x" * 256, "é" * 255, "\0"]
) | st.text(max_size=300)
TIMEOUTS = st.sampled_from(
    [
        None,
        math.nan,
        math.inf,
        -math.inf,
        -1,
        -0.0,
        0,
        0.0,
        86400,
        86400.5,
        2**64 - 1,
        -(2**63),
        1e-9,
        0.001,
        True,
        False,
        "1",
        [],
        3600.0,
    ]
) | st.floats(min_value=1e-9, max_value=0.05)
SM_REFS = st.builds(ObjectRef, st.sampled_from([OBJ_NODE, OBJ_HANDLE, 0, 3, 2**32 - 1]), u64())
SM_VALUES = NAMES | TIMEOUTS | SM_REFS | values(SM_REFS, big=False)
START = st.sampled_from([0, 1, 2, -1, True, 1.0, 2**63]) | u64()


@st.composite
def manager_bodies(draw: st.DrawFn) -> Any:
    descriptor = draw(st.sampled_from([SERVICE_MANAGER_DESCRIPTOR] * 8) | values(big=False))
    args = draw(st.lists(SM_VALUES, max_size=3) | values(SM_REFS, big=False))
    kwargs = draw(
        st.dictionaries(
            st.sampled_from(["name", "timeout", "start", "binder", "thread", "self"])
            | st.text(max_size=5)
            | st.integers(-2, 2),
            SM_VALUES,
            max_size=2,
        )
        | values(big=False)
    )
    shape = draw(st.integers(0, 9))
    if shape == 0:
        return draw(values(SM_REFS, big=False))
    if shape == 1:
        return [descriptor, args]
    return [descriptor, args, kwargs]


_ARGUMENTS = {
    SM_CHECK_SERVICE: ("name",),
    SM_WAIT_FOR_SERVICE: ("name", "timeout"),
    SM_ADD_SERVICE: ("name", "binder"),
    SM_LIST_SERVICES: ("start",),
    SM_STATUS: (),
}


@st.composite
def manager_calls(draw: st.DrawFn) -> tuple[tuple[bytes, bool], int]:
    """((parcel, unmutated), code) of a service-manager call: a well-formed call of
    one of its methods (odd values in the right places, some passed by keyword), a
    random or deeply nested one, with any code."""
    kind = draw(st.sampled_from(["matched"] * 3 + ["random", "random", "deep", "wait"]))
    any_code = st.sampled_from([1, 2, 3, 4, 5, 0, 6, 2**32 - 1]) | u32()
    if kind == "wait":  # for a name nobody has: it waits, or its time runs out
        timeout = draw(st.none() | st.floats(1e-6, 0.05) | st.sampled_from([0.0, 3600.0]))
        body = [SERVICE_MANAGER_DESCRIPTOR, ["fuzz.nobody", timeout], {}]
        return (encode_body(body), True), SM_WAIT_FOR_SERVICE
    if kind == "deep":
        return draw(deep_manager_frames()), draw(any_code)
    if kind == "random":
        return draw(frames(manager_bodies())), draw(any_code)
    code = draw(st.sampled_from([*sorted(_ARGUMENTS), SM_WAIT_FOR_SERVICE]))
    of_kind = {"name": NAMES, "timeout": TIMEOUTS, "binder": SM_REFS, "start": START}
    args, kwargs = [], {}
    for name in _ARGUMENTS[code]:
        value = draw(of_kind[name] | SM_VALUES if draw(st.booleans()) else of_kind[name])
        if kwargs or draw(st.integers(0, 3)) == 0:  # positional ones first
            kwargs[name] = value
        else:
            args.append(value)
    return draw(frames(st.just([SERVICE_MANAGER_DESCRIPTOR, args, kwargs]))), code


class Deferred(Exception):
    """A wait_for_service that waits (``timeout`` seconds, or None: on)."""

    def __init__(self, timeout: float | None) -> None:
        super().__init__(timeout)
        self.timeout = timeout


# The service manager's methods' signatures (after its ``thread`` argument).


def _check(name):
    return name


def _wait(name, timeout=None):
    return name, timeout


def _add(name, binder):
    return name, binder


def _list(start=0):
    return start


def _status():
    return None


def _register(name, callback):
    return name, callback


_SIGNATURES = {
    SM_CHECK_SERVICE: _check,
    SM_WAIT_FOR_SERVICE: _wait,
    SM_ADD_SERVICE: _add,
    SM_LIST_SERVICES: _list,
    SM_STATUS: _status,
    SM_REGISTER_FOR_NOTIFICATIONS: _register,
    SM_UNREGISTER_FOR_NOTIFICATIONS: _register,
}


def _valid_name(name: Any) -> bool:
    return isinstance(name, str) and 0 < len(name) <= 255


def expected_manager_reply(frame: bytes, code: int, registered: set[str]) -> list[Any]:
    """The reply body the service manager gives (ServiceManager.transact), as
    [status, what]: what is the result for REPLY_OK, the exception's name for
    REPLY_EXCEPTION, the error code for REPLY_BINDER_ERROR.

    Raises:
        Deferred: the call waits for its name.
    """
    try:
        value, _ = parcel.decode(frame)
        descriptor, args, kwargs = value
    except (ProtocolError, TypeError, ValueError):
        return [REPLY_BINDER_ERROR, _ERROR]
    if descriptor != SERVICE_MANAGER_DESCRIPTOR:
        return [REPLY_BINDER_ERROR, _MISMATCH]
    if code not in _SIGNATURES:
        return [REPLY_BINDER_ERROR, _UNKNOWN]
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        return [REPLY_BINDER_ERROR, _ERROR]
    if "thread" in kwargs:
        return [REPLY_EXCEPTION, "TypeError"]
    try:
        bound = _SIGNATURES[code](*args, **kwargs)
    except TypeError:
        return [REPLY_EXCEPTION, "TypeError"]
    if code == SM_CHECK_SERVICE:
        if not _valid_name(bound):
            return [REPLY_EXCEPTION, "ValueError"]
        return [REPLY_OK, ObjectRef(OBJ_HANDLE, 1) if bound in registered else None]
    if code == SM_WAIT_FOR_SERVICE:
        name, timeout = bound
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not 0 <= timeout <= 86400
        ):
            return [REPLY_EXCEPTION, "ValueError"]
        if not _valid_name(name):
            return [REPLY_EXCEPTION, "ValueError"]
        if name in registered:
            return [REPLY_OK, ObjectRef(OBJ_HANDLE, 1)]
        if timeout is not None and timeout <= 0:
            return [REPLY_BINDER_ERROR, _NOT_FOUND]
        raise Deferred(None if timeout is None else float(timeout))
    if code == SM_ADD_SERVICE:
        name, binder = bound
        if not _valid_name(name):
            return [REPLY_EXCEPTION, "ValueError"]
        if not isinstance(binder, ObjectRef):
            return [REPLY_EXCEPTION, "TypeError"]
        if binder.kind != OBJ_NODE:  # the fuzzing process holds no handle
            return [REPLY_BINDER_ERROR, _ERROR]
        return [REPLY_OK, None]
    if code == SM_LIST_SERVICES:
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
            return [REPLY_EXCEPTION, "ValueError"]
        return [REPLY_OK, sorted(registered)[bound:]]
    if code in (SM_REGISTER_FOR_NOTIFICATIONS, SM_UNREGISTER_FOR_NOTIFICATIONS):
        name, callback = bound
        if not _valid_name(name):
            return [REPLY_EXCEPTION, "ValueError"]
        if not isinstance(callback, ObjectRef):
            return [REPLY_EXCEPTION, "TypeError"]
        if callback.kind != OBJ_NODE:  # the fuzzing process holds no handle
            return [REPLY_BINDER_ERROR, _ERROR]
        return [REPLY_OK, None]
    return [REPLY_OK, dict]


def _adds_test(frame: bytes) -> bool:
    """Whether ``frame`` might be an add_service("test", ...) (which would replace the
    server's name for good): any "test" string in it."""
    return b"test" in frame


@time_limit("manager")
def test_random_service_manager_calls(env):
    """[descriptor, args, kwargs] calls to handle 0 with odd names, timeouts (NaN,
    inf, -1, huge, wrong types), keywords, codes and mutated parcels: the reply is
    exactly what the service manager's contract says, or the wait it promises."""

    @fuzz_settings("manager")
    @given(
        call=manager_calls(),
        flags=st.sampled_from([0, 0, 0, TF_ONE_WAY, TF_ONE_WAY, TF_ONE_WAY | TF_WINDOW, TF_PARTS]),
        data=st.data(),
    )
    @env.each
    def example(call: tuple[tuple[bytes, bool], int], flags: int, data: st.DataObject):
        (parcel_bytes, _), code = call
        if code == SM_ADD_SERVICE:
            assume(not _adds_test(parcel_bytes))
        data_len = data.draw(data_lengths(parcel_bytes), label="data_len")
        parts = bool(flags & TF_PARTS)
        ready_list = data.draw(readies(data_len), label="readies") if parts else []
        assume(not parts or parts_complete(data_len, ready_list))
        with raw_process(env.socket, region_size=1 << 20) as process:
            thread = process.thread()
            assert thread.area is not None
            thread.area.write(0, parcel_bytes)
            frame_in_area = in_area(bytes(thread.area.map), data_len)
            message = protocol.encode(BC_TRANSACTION, 0, code, flags, data_len, 0, 0, 0)
            for ready in ready_list:
                message += protocol.encode(BC_PARCEL_READY, ready)
            thread.send(message)
            too_big = not _IS_ROOT and data_len > 64 * 1024  # quota service_manager_parcel
            if frame_in_area is None or too_big:
                outcome, _ = thread.wait_for([BR_FAILED_REPLY, BR_REPLY, BR_TRANSACTION_COMPLETE])
                assert outcome[0] == BR_FAILED_REPLY, outcome
                assert outcome[1] == (CODE_OF_ERROR[QuotaExceededError] if too_big else _ERROR)
            elif flags & TF_ONE_WAY:
                if flags & TF_WINDOW:
                    thread.barrier()
                    failed, settled, _ = thread.area.words()
                    assert (settled, failed) == (1, 0)
                else:
                    outcome, _ = thread.wait_for(
                        [BR_TRANSACTION_COMPLETE, BR_REPLY, BR_FAILED_REPLY]
                    )
                    assert outcome[0] == BR_TRANSACTION_COMPLETE, outcome
                check_no_reply(thread, frame_in_area, code)
            else:
                check_manager_reply(thread, process, frame_in_area, code)
        env.check()

    example()


def check_no_reply(thread: RawThread, frame: bytes, code: int) -> None:
    """A oneway call is never answered: not even a wait_for_service that waits, once
    its time is up (a BR_REPLY nobody waits for is taken for the answer to the
    thread's next call)."""
    wait = 0.01
    try:
        expected_manager_reply(frame, code, {"test"})
    except Deferred as deferred:
        if deferred.timeout is not None and deferred.timeout <= 1.0:
            wait = deferred.timeout + 0.2
    later = thread.quiet(wait)
    assert BR_REPLY not in {c[0] for c in later}, f"a oneway call got {_names(later)}"


def check_manager_reply(thread: RawThread, process: RawProcess, frame: bytes, code: int):
    try:
        expected = expected_manager_reply(frame, code, {"test"})
    except Deferred as deferred:
        note(f"deferred {deferred.timeout}")
        if deferred.timeout is not None and deferred.timeout <= 1.0:
            outcome, _ = thread.wait_for([BR_REPLY, BR_FAILED_REPLY], deferred.timeout + WAIT_S)
            assert outcome[0] == BR_REPLY
            body = process.read(outcome[1], outcome[2])
            assert body[:2] == [REPLY_BINDER_ERROR, _NOT_FOUND], body
        else:
            early = thread.quiet(0.02)
            assert [c for c in early if c[0] in (BR_REPLY, BR_FAILED_REPLY)] == [], early
        return
    outcome, _ = thread.wait_for([BR_REPLY, BR_FAILED_REPLY])
    note(f"expected {expected!r}"[:1000])
    assert outcome[0] == BR_REPLY, outcome
    body = process.read(outcome[1], outcome[2])
    note(f"reply {body!r}"[:2000])
    status, what = expected
    assert body[0] == status, (body, expected)
    if status == REPLY_BINDER_ERROR:
        assert body[1] == what
    elif status == REPLY_EXCEPTION:
        assert body[1:3] == ["builtins", what]
    elif what is dict:
        assert isinstance(body[1], dict) and "broker" in body[1]
    else:
        assert body[1] == what
    thread.send(protocol.encode(BC_FREE_BUFFER, outcome[1]))


# -- 2c. replies -------------------------------------------------------------------------


def reply_bodies() -> st.SearchStrategy[Any]:
    ok = values().map(lambda v: [REPLY_OK, v])
    error = st.tuples(
        st.sampled_from([REPLY_EXCEPTION, REPLY_BINDER_ERROR]) | st.integers(-2, 9),
        st.text(max_size=10) | st.integers(0, 12),
        st.text(max_size=10),
    ).map(list)
    return ok | ok | error | values()


@time_limit("reply")
def test_random_replies_to_a_call_back(env):
    """The server calls back into the fuzzing process (call_back), which answers with
    a fuzzed BC_REPLY (whole or in parts, with odd fields and mutated parcels): the
    server's own reply still comes, and is exactly the answer when the answer was
    well formed."""

    @fuzz_settings("reply")
    @given(
        frame=frames(reply_bodies()),
        flags=st.sampled_from([0, 0, 0, TF_ONE_WAY, TF_PARTS, TF_PARTS | TF_RING]) | u32(),
        tail=st.sampled_from([(0, 0)] * 6 + [(0, 8), (8, 0)]) | st.tuples(u64(), u64()),
        free_first=st.booleans(),
        data=st.data(),
    )
    @env.each
    def example(frame, flags, tail, free_first, data):
        parcel_bytes, clean = frame
        data_len = data.draw(data_lengths(parcel_bytes), label="data_len")
        parts = bool(flags & TF_PARTS)
        ready_list = data.draw(readies(data_len), label="readies") if parts else []
        tail_offset, tail_len = tail
        with raw_process(env.socket, region_size=1 << 20) as process:
            thread = process.thread(PARTS_RING + 64 if flags & TF_RING else 1 << 16)
            assert thread.area is not None
            handle = thread.look_up_test()
            callback = encode_body([ITest.DESCRIPTOR, [ObjectRef(OBJ_NODE, CALLBACK_NODE), 7], {}])
            thread.area.write(SYNC_AT // 2, callback)
            thread.send(
                protocol.encode(
                    BC_TRANSACTION,
                    handle,
                    _CODES["call_back"],
                    0,
                    len(callback),
                    0,
                    0,
                    SYNC_AT // 2,
                )
            )
            incoming, before = thread.wait_for([BR_TRANSACTION, BR_REPLY, BR_FAILED_REPLY])
            assert incoming[0] == BR_TRANSACTION, (incoming, before)
            _, node, method, txn_flags, offset, size, *_ = incoming
            assert (node, method, txn_flags) == (CALLBACK_NODE, _ON_VALUE, 0)
            assert process.read(offset, size) == [ICallback.DESCRIPTOR, [7], {}]

            thread.area.write(0, parcel_bytes)
            message = protocol.encode(BC_FREE_BUFFER, offset) if free_first else b""
            message += protocol.encode(BC_REPLY, flags, data_len, tail_offset, tail_len)
            for ready in ready_list:
                message += protocol.encode(BC_PARCEL_READY, ready)
            thread.send(message)
            # A reply sent whole always ends the call back (delivered, or failed to the
            # server); one in parts only once complete.
            answered = not parts or (tail_len == 0 and parts_complete(data_len, ready_list))
            before = thread.barrier()
            note(f"answered {answered}; before the barrier: {_names(before)}")
            assert {c[0] for c in before} <= {BR_ERROR, BR_REPLY, BR_RELEASE_NODE}
            final = [c for c in before if c[0] == BR_REPLY]
            if not final:
                # Whatever happened, this thread's call still waits for the server.
                # Answer the call back properly now (the broker has read the fuzzed
                # reply: the barrier came back): it must take this answer only if the
                # fuzzed one did not end the call back.
                recovery = encode_body([REPLY_OK, "recovered"])
                thread.area.write(0, recovery)
                thread.send(protocol.encode(BC_REPLY, 0, len(recovery), 0, 0))
                final = [thread.wait_for([BR_REPLY, BR_FAILED_REPLY])[0]]
            else:
                assert answered
            assert final[0][0] == BR_REPLY, final
            result = process.read(final[0][1], final[0][2])
            note(f"server's reply {result!r}"[:2000])
            assert reply_ok(result)
            assert (result == [REPLY_OK, "recovered"]) == (not answered)
            if answered and clean and tail_len == 0 and data_len == len(parcel_bytes):
                sent, _ = parcel.decode(parcel_bytes, copy_buffers=True)
                if isinstance(sent, list) and len(sent) == 2 and sent[0] == REPLY_OK:
                    assert canonical(result) == canonical([REPLY_OK, sent[1]])
        env.check()

    example()


# -- 2d. oneway streams between two hand-driven processes ---------------------------------

#: Oneway parcels a sender keeps in its send area: (offset, payload bytes). The
#: receiver's region is the smallest (its async space a half of it), so a few of the
#: larger ones fill it and later calls wait for room (held commands, backlog).
ONEWAY_PARCELS = ((16384, 16), (20480, 4096), (0, 14000))
ONEWAY_BODIES = [encode_body(["fuzz.oneway", [bytes(size)], {}]) for _, size in ONEWAY_PARCELS]
#: A parcel in parts is read from the send area's start: the largest one is there.
PARTS_PARCEL = 2
_PROGRAM_OUTCOMES = {BR_TRANSACTION_COMPLETE, BR_FAILED_REPLY, BR_DEAD_REPLY}


def program_steps(fields: dict[int, tuple[st.SearchStrategy[int], ...]]) -> st.SearchStrategy:
    """One step of a program; oneway calls (one, or a burst) are the most common."""
    sender = st.integers(0, 1)
    parcel_index = st.sampled_from([0, 1, 2, 2, 2])
    kinds: dict[str, tuple[int, tuple[st.SearchStrategy[Any], ...]]] = {
        "oneway": (12, (sender, parcel_index, st.booleans(), st.integers(1, 8))),
        "parts": (2, (sender,)),
        "ready": (3, (sender, st.sampled_from([0.0, 0.25, 0.5, 1.0]))),
        "release": (1, (sender, st.sampled_from([0, 1]) | u64())),
        "area": (1, (sender,)),
        "random": (1, (sender, batches(fields))),
        "free": (3, (st.integers(0, 3),)),
        "done": (3, (st.integers(0, 1),)),
        "looper": (1, (st.integers(0, 1), st.booleans())),
        "receiver thread": (1, ()),
        "sender thread": (1, ()),
        "receiver dies": (1, ()),
    }
    names = [name for name, (weight, _) in kinds.items() for _ in range(weight)]
    return st.sampled_from(names).flatmap(lambda name: st.tuples(st.just(name), *kinds[name][1]))


class Sender:
    """A thread of the sending process, and what it sent."""

    def __init__(self, thread: RawThread, handle: int) -> None:
        self.thread = thread
        self.handle = handle
        self.plain = 0  # oneway calls sent without a window: one answer each
        self.windowed = 0  # oneway calls sent in a window: settled in the area's words
        self.random = False  # it sent random commands: no accounting
        self.holdable = 0  # commands it sent that wait behind a call waiting for room
        self.new_areas = 0  # BC_SET_SEND_AREA it sent (refused while a call waits)
        self.parts: int | None = None  # bytes announced of its oneway call in parts
        self.areas = [thread.area]
        thread.seen.clear()

    def fill(self, area: Area) -> None:
        for (offset, _), body in zip(ONEWAY_PARCELS, ONEWAY_BODIES, strict=True):
            area.write(offset, body)

    def ready(self, share: float) -> None:
        """Announce ``share`` of the rest of its parcel in parts (all of it: 1.0)."""
        assert self.parts is not None
        size = len(ONEWAY_BODIES[PARTS_PARCEL])
        ready = self.parts + int((size - self.parts) * share)
        self.thread.send(protocol.encode(BC_PARCEL_READY, ready))
        self.holdable += 1
        self.parts = None if ready == size else ready

    def answers(self) -> int:
        return sum(c[0] in _PROGRAM_OUTCOMES for c in self.thread.seen)

    def words(self) -> tuple[int, int]:
        """(failed, settled): the latest the broker wrote, in whichever area it used."""
        words = [area.words()[:2] for area in self.areas if area is not None]
        return max(w[0] for w in words), max(w[1] for w in words)

    def unsettled(self) -> int:
        """Its calls neither answered nor counted as settled yet."""
        failed, settled = self.words()
        return self.plain - (self.answers() - failed) + self.windowed - settled

    def errors(self) -> int:
        return sum(c[0] == BR_ERROR for c in self.thread.seen)

    def settled(self) -> bool:
        """Every call answered or settled, but those dropped with a BR_ERROR. Only a
        thread that had more than MAX_BACKLOG commands held loses any (one BR_ERROR
        each, as for each of its BC_RELEASE dropped so); besides, each new send area
        is refused with a BR_ERROR while a call waits, and taken with a BR_OK."""
        refused = self.new_areas - sum(c[0] == BR_OK for c in self.thread.seen)
        dropped = self.errors() - refused
        if self.holdable <= MAX_BACKLOG:
            assert dropped == 0, f"{dropped} BR_ERROR besides {refused} refused areas"
            return self.unsettled() == 0
        return 0 <= self.unsettled() <= dropped


class Receiver:
    """A looper thread of the receiving process, and the calls it holds."""

    def __init__(self, thread: RawThread) -> None:
        self.thread = thread
        self.held: list[int] = []  # buffers of calls received and not freed
        self.unanswered = 0  # calls received and not yet ended with BC_REPLY
        thread.seen.clear()
        thread.send(protocol.encode(BC_ENTER_LOOPER))

    def take(self) -> None:
        """Note the calls that have come."""
        for command in self.thread.quiet(0):
            if command[0] == BR_TRANSACTION:
                self.held.append(command[4])
                self.unanswered += 1

    def finish_all(self) -> None:
        """End every call received: free its buffer, and reply to each as a runtime
        ends a oneway call (a two-way call, which only random commands make, fails
        for want of a reply parcel)."""
        message = b"".join(protocol.encode(BC_FREE_BUFFER, offset) for offset in self.held)
        message += protocol.encode(BC_REPLY, TF_ONE_WAY, 0, 0, 0) * self.unanswered
        message += protocol.encode(BC_ENTER_LOOPER)
        self.held, self.unanswered = [], 0
        self.thread.send(message)


@time_limit("program")
def test_random_oneway_programs_between_two_processes(env):
    """A receiving process (two threads at most, the smallest region) and a sending
    one (two threads at most) run a random program: oneway calls in and out of a
    window that fill the receiver's async space (so the sender's later commands are
    held behind a call waiting for room), releases of the handle, new send areas,
    random commands, the receiver freeing, answering, leaving and re-entering its
    looper, adding a thread, dying. Then the receiver ends every call it got until
    the senders' calls are all settled: each oneway call gets exactly one answer
    (BR_TRANSACTION_COMPLETE, BR_FAILED_REPLY or BR_DEAD_REPLY; a windowed one is
    counted in the settle words instead, and answered only when it fails). A call
    left waiting for room is a lost wake-up."""
    names = itertools.count()
    fields = thread_fields([64, 4096, 1 << 16])

    @fuzz_settings("program")
    @given(steps=st.lists(program_steps(fields), min_size=3, max_size=25))
    @env.each
    def example(steps: list[tuple]) -> None:
        name = f"fuzz.receiver.{next(names)}"
        with raw_process(env.socket) as receiving, raw_process(env.socket) as sending:
            first = receiving.thread()
            added = first.call_manager(SM_ADD_SERVICE, [name, ObjectRef(OBJ_NODE, 5)])
            assert added == [REPLY_OK, None], added
            receivers = [Receiver(first)]
            looked_up = sending.thread()
            handle = looked_up.call_manager(SM_CHECK_SERVICE, [name])[1].value
            senders = [Sender(looked_up, handle)]
            senders[0].fill(looked_up.area)
            dead = False
            for step in steps:
                what = step[0]
                if what in ("oneway", "parts", "ready", "release", "area", "random"):
                    sender = senders[min(step[1], len(senders) - 1)]
                    thread = sender.thread
                    if what == "oneway":
                        offset = ONEWAY_PARCELS[step[2]][0]
                        length = len(ONEWAY_BODIES[step[2]])
                        flags = TF_ONE_WAY | (TF_WINDOW if step[3] else 0)
                        call = protocol.encode(
                            BC_TRANSACTION, handle, 1, flags, length, 0, 0, offset
                        )
                        thread.send(call * step[4])
                        sender.holdable += step[4]
                        if step[3]:
                            sender.windowed += step[4]
                        else:
                            sender.plain += step[4]
                    elif what == "release":
                        thread.send(protocol.encode(BC_RELEASE, handle, step[2]))
                        sender.holdable += 1
                    elif what == "parts":
                        if sender.parts is None:  # one at a time
                            length = len(ONEWAY_BODIES[PARTS_PARCEL])
                            flags = TF_ONE_WAY | TF_PARTS
                            thread.send(
                                protocol.encode(BC_TRANSACTION, handle, 1, flags, length, 0, 0, 0)
                            )
                            sender.parts = 0
                            sender.plain += 1
                            sender.holdable += 1
                    elif what == "ready":
                        if sender.parts is not None:
                            sender.ready(step[2])
                    elif what == "area":  # taken, or refused while a call waits
                        area = Area(1 << 16)
                        sender.fill(area)
                        sender.areas.append(area)
                        sender.new_areas += 1
                        thread.extra_areas.append(area)
                        fd = area.give_away_fd()
                        try:
                            thread.send(protocol.encode(BC_SET_SEND_AREA, area.size, 0), [fd])
                        finally:
                            os.close(fd)
                    else:
                        assert what == "random"
                        sender.random = True
                        thread.send(step[2])
                elif what == "sender thread" and len(senders) < 2:
                    thread = sending.thread()
                    senders.append(Sender(thread, handle))
                    senders[-1].fill(thread.area)
                elif dead:
                    pass
                elif what == "free":
                    receiver = receivers[0]
                    receiver.take()
                    if receiver.held:
                        offset = receiver.held.pop(step[1] % len(receiver.held))
                        receiver.thread.send(protocol.encode(BC_FREE_BUFFER, offset))
                elif what == "done":
                    receiver = receivers[min(step[1], len(receivers) - 1)]
                    receiver.take()
                    if receiver.unanswered:
                        receiver.unanswered -= 1
                        receiver.thread.send(protocol.encode(BC_REPLY, TF_ONE_WAY, 0, 0, 0))
                elif what == "looper":
                    receiver = receivers[min(step[1], len(receivers) - 1)]
                    code = BC_ENTER_LOOPER if step[2] else BC_EXIT_LOOPER
                    receiver.thread.send(protocol.encode(code))
                elif what == "receiver thread" and len(receivers) < 2:
                    receivers.append(Receiver(receiving.thread()))
                elif what == "receiver dies":
                    receiving.close()
                    dead = True
            for sender in senders:  # the rest of any parcel in parts
                if sender.parts is not None:
                    sender.ready(1.0)
            # The receiver ends everything it gets until every sender is settled.
            deadline = _now() + WAIT_S
            accounted = [s for s in senders if not s.random]
            for sender in senders:
                sender.thread.quiet(0.002)
            event(f"calls waiting for room: {any(s.unsettled() for s in accounted)}")
            overfilled = any(s.holdable > MAX_BACKLOG for s in senders)
            event(f"a sender overfilled its backlog: {overfilled}")
            event(f"receiver died: {dead}")
            while True:
                for sender in senders:
                    sender.thread.quiet(0)
                if all(s.settled() for s in accounted):
                    break
                if _now() > deadline:
                    report = [
                        (s.plain, s.windowed, s.answers(), s.words(), s.errors(), s.holdable)
                        for s in accounted
                    ]
                    raise AssertionError(f"oneway calls left unanswered: {report}")
                if not dead:
                    for receiver in receivers:
                        receiver.take()
                        receiver.finish_all()
                time.sleep(0.001)
            for sender in senders:
                assert sender.thread.fds_received == []
                allowed = _PROGRAM_OUTCOMES | {BR_ERROR, BR_OK}
                if sender.random:
                    allowed |= THREAD_ANSWERS
                assert {c[0] for c in sender.thread.seen} <= allowed, _names(sender.thread.seen)
            for receiver in receivers:  # it only ever ends calls it has
                assert {c[0] for c in receiver.thread.seen} <= {BR_TRANSACTION}
            sending.close()
        env.check()

    example()


# -- 3. descriptors ----------------------------------------------------------------------

AREA_SIZES = [0, 1, 24, 4096, 1 << 16, 1 << 20]
_VALID_KINDS = {"sealed", "rdwr-reopen"}
FD_KINDS = [
    "sealed",
    "sealed",
    "rdwr-reopen",
    "unsealed",
    "no-sealing",
    "shrink-only",
    "no-seal-seal",
    "write-sealed",
    "future-write-sealed",
    "rdonly-reopen",
    "wronly-reopen",
    "append-reopen",
    "path-reopen",
    "pipe-read",
    "pipe-write",
    "socket",
    "own-connection",
    "tmpfile",
    "shm-tmpfile",
    "dev-null",
    "dev-zero",
    "directory",
    "eventfd",
    "epoll",
    "hugetlb",
]


def make_fd(kind: str, size: int, conn: Conn, mappings: list[mmap.mmap]) -> int:
    """A descriptor of ``kind`` (memfds of ``size`` bytes); a valid one is also mapped
    here (in ``mappings``) so a call can be written through it."""
    if kind == "sealed":
        fd = memfd(size)
        if size:
            mappings.append(mmap.mmap(fd, size))
        return fd
    if kind.endswith("-reopen"):
        base = memfd(size)
        try:
            if kind == "rdwr-reopen" and size:
                mappings.append(mmap.mmap(base, size))
            mode = {
                "rdwr-reopen": os.O_RDWR,
                "rdonly-reopen": os.O_RDONLY,
                "wronly-reopen": os.O_WRONLY,
                "append-reopen": os.O_RDWR | os.O_APPEND,
                "path-reopen": os.O_PATH,
            }[kind]
            return os.open(f"/proc/self/fd/{base}", mode | os.O_CLOEXEC)
        finally:
            os.close(base)
    seals = {
        "unsealed": (0, True),
        "no-sealing": (0, False),
        "shrink-only": (fcntl.F_SEAL_SHRINK, True),
        "no-seal-seal": (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW, True),
        "write-sealed": (REQUIRED_SEALS | fcntl.F_SEAL_WRITE, True),
        "future-write-sealed": (REQUIRED_SEALS | (WRITE_SEALS & ~fcntl.F_SEAL_WRITE), True),
    }
    if kind in seals:
        seal, sealing = seals[kind]
        return memfd(size, seal, sealing)
    if kind in ("pipe-read", "pipe-write"):
        read, write = os.pipe()
        keep, drop = (read, write) if kind == "pipe-read" else (write, read)
        os.close(drop)
        return keep
    if kind == "socket":
        one, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        other.close()
        return one.detach()
    if kind == "own-connection":
        return os.dup(conn.sock.fileno())
    if kind in ("tmpfile", "shm-tmpfile"):  # a regular file (on tmpfs: shmem, no memfd)
        where = "/dev/shm" if kind == "shm-tmpfile" else None
        try:
            fd = os.open(where or tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR, 0o600)
        except OSError:  # no O_TMPFILE there
            with tempfile.TemporaryFile(dir=where) as file:
                fd = os.dup(file.fileno())
        os.ftruncate(fd, size)
        return fd
    if kind in ("dev-null", "dev-zero"):
        return os.open(f"/dev/{kind[4:]}", os.O_RDWR | os.O_CLOEXEC)
    if kind == "directory":
        return os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    if kind == "eventfd":
        return os.eventfd(0, os.EFD_CLOEXEC)
    if kind == "epoll":
        poller = select.epoll()
        fd = os.dup(poller.fileno())
        poller.close()
        return fd
    if kind == "hugetlb":
        try:
            return memfd(2 << 20, REQUIRED_SEALS, True, extra=os.MFD_HUGETLB)
        except OSError as exc:
            assert exc.errno in (errno.EINVAL, errno.ENOMEM, errno.EPERM, errno.ENOSPC), exc
            return memfd(size, 0, False)  # no huge pages here: another unsuitable one
    raise AssertionError(kind)


def manager_list_parcel() -> bytes:
    return encode_body([SERVICE_MANAGER_DESCRIPTOR, [], {}])


@time_limit("descriptors")
def test_send_areas_from_unsuitable_descriptors(env):
    """BC_SET_SEND_AREA with pipes, sockets, files, unsealed or write-sealed memfds,
    reopened memfds of the wrong mode, wrong sizes, zero or several descriptors, on
    any connection: exactly a sealed read-write memfd of at least the size claimed is
    taken (BR_OK), and a call then goes through it; anything else gets BR_ERROR, the
    area in force stays, and the broker keeps no descriptor of it."""

    @fuzz_settings("descriptors")
    @given(
        kinds=st.lists(st.sampled_from(FD_KINDS), max_size=5),
        memfd_size=st.sampled_from(AREA_SIZES),
        claim=st.sampled_from(["same", "same", "less", "more", "zero"]) | u64(),
        which=st.sampled_from([SEND_AREA, SEND_AREA, LOAN_AREA, 2]) | u32(),
        where=st.sampled_from(["thread"] * 6 + ["process", "fresh", "other-command"]),
        had_area=st.booleans(),
    )
    @env.each
    def example(kinds, memfd_size, claim, which, where, had_area):
        size = {
            "same": memfd_size,
            "less": max(memfd_size - 1, 0),
            "more": memfd_size + 1,
            "zero": 0,
        }.get(claim, claim)
        with raw_process(env.socket, region_size=1 << 20) as process:
            thread = process.thread(1 << 16 if had_area else None)
            fresh = Conn(env.socket) if where == "fresh" else None
            target: Conn = thread
            if fresh is not None:
                target = fresh
            elif where == "process":
                target = process.conn
            mappings: list[mmap.mmap] = []
            fds = []
            try:
                for kind in kinds:
                    fds.append(make_fd(kind, memfd_size, thread, mappings))
                if where == "other-command":
                    message = protocol.encode(BC_FREE_BUFFER, 0)
                else:
                    message = protocol.encode(BC_SET_SEND_AREA, size, which)
                target.send(message, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            try:
                valid = (
                    where == "thread"
                    and len(kinds) == 1
                    and kinds[0] in _VALID_KINDS
                    and 0 < size <= min(memfd_size, MAX_REGION)
                    and which in (SEND_AREA, LOAN_AREA)
                )
                answer = target.next()
                note(f"answer {answer}")
                assert answer is not None
                assert answer[0] == (BR_OK if valid else BR_ERROR), answer
                if answer[0] == BR_ERROR:
                    assert answer[1] == _ERROR
                assert target.quiet(0) == []
                check_areas(thread, process, valid, which, size, had_area, mappings)
            finally:
                for mapping in mappings:
                    mapping.close()
                if fresh is not None:
                    assert fresh.finish() == []
        env.check()

    example()


def check_areas(
    thread: RawThread,
    process: RawProcess,
    taken: bool,
    which: int,
    size: int,
    had_area: bool,
    mappings: list[mmap.mmap],
) -> None:
    """A service-manager call goes through the areas now in force, or fails when they
    cannot hold it."""
    call = manager_list_parcel()
    tail_len = 16 if taken and which == LOAN_AREA else 0
    head = call[: len(call) - tail_len]
    if taken and which == SEND_AREA:
        send: mmap.mmap | None = mappings[0]
        send_size = size
    elif had_area:
        assert thread.area is not None
        send, send_size = thread.area.map, thread.area.size
    else:
        send, send_size = None, 0
    fits = send is not None and len(head) <= send_size and len(head) >= HEADER.size
    if send is not None and len(head) <= send_size:
        send[: len(head)] = head
    if tail_len:
        fits = fits and tail_len <= size
        if tail_len <= size:
            mappings[0][:tail_len] = call[len(head) :]
    thread.send(protocol.encode(BC_TRANSACTION, 0, SM_LIST_SERVICES, 0, len(call), 0, tail_len, 0))
    outcome, _ = thread.wait_for([BR_REPLY, BR_FAILED_REPLY])
    if not fits:
        assert outcome[:2] == (BR_FAILED_REPLY, _ERROR), outcome
        return
    assert outcome[0] == BR_REPLY, outcome
    assert process.read(outcome[1], outcome[2]) == [REPLY_OK, ["test"]]
    thread.send(protocol.encode(BC_FREE_BUFFER, outcome[1]))
