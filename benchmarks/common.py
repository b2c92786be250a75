"""Shared helpers: sizes, deadlines, CPU pinning, process hygiene and framing.

Wire format used by the pipe and socket transports: every request is an
8-byte header ``<op:uint32, length:uint32>`` followed by ``length`` payload
bytes; every reply is one little-endian uint64 (8 bytes).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from multiprocessing import reduction
from typing import Any

from pybinder.cli import parse_size

KiB = 1024
MiB = 1024 * KiB
MB = 1_000_000  # throughput unit: 1 MB/s = 10**6 bytes per second

HDR = struct.Struct("<II")  # (op, payload length in bytes)
REPLY = struct.Struct("<Q")  # 8-byte answer: payload length or push count

OP_ECHO = 1
OP_PUSH = 2
OP_COUNT = 3
OP_STOP = 4

MIN_PAYLOAD = 8  # bytes; smaller payloads are rejected by the CLI
PEEK = 4 * KiB  # bytes a server reads beyond a header to catch small frames

ReadInto = Callable[[memoryview], int]


class BenchError(RuntimeError):
    """A transport misbehaved (wrong reply, early EOF, ...)."""


# --------------------------------------------------------------------------
# sizes


def parse_size_list(text: str) -> list[int]:
    """Parse a comma-separated size list (``"64,4k,1MiB"``, see
    :func:`pybinder.cli.parse_size`) into sorted unique byte counts.

    Raises:
        ValueError: a part is not a size, the list is empty, or a size is too small.
    """
    try:
        sizes = sorted({parse_size(part) for part in text.split(",") if part.strip()})
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None
    if not sizes:
        raise ValueError("empty size list")
    if sizes[0] < MIN_PAYLOAD:
        raise ValueError(f"payloads must be at least {MIN_PAYLOAD} bytes")
    return sizes


def fmt_size(n: int) -> str:
    """Render a byte count as ``64 B``, ``4 KiB``, ``16 MiB``."""
    for unit, scale in (("GiB", 1024 * MiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} B"


def round_up(n: int, quantum: int) -> int:
    """Round ``n`` bytes up to a multiple of ``quantum`` bytes."""
    return max(quantum, math.ceil(n / quantum) * quantum)


# --------------------------------------------------------------------------
# statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return float(sorted_values[rank - 1])


def median(sorted_values: Sequence[float]) -> float:
    """Median of already sorted values."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    mid = n // 2
    if n % 2:
        return float(sorted_values[mid])
    return (sorted_values[mid - 1] + sorted_values[mid]) / 2.0


# --------------------------------------------------------------------------
# deadlines and process hygiene


def _raise_timeout(signum: int, frame: Any) -> None:
    """SIGALRM handler: abort whatever blocking call the main thread is in."""
    raise TimeoutError("benchmark step exceeded its deadline")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the main thread if the block runs > ``seconds``.

    Uses an interval timer so that hot loops carry no per-call polling cost.
    Only usable from the main thread (it is a no-op elsewhere).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _raise_timeout)
    signal.setitimer(signal.ITIMER_REAL, max(0.001, seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind with SystemExit so ``finally`` blocks run."""
    raise SystemExit(128 + signum)


def child_setup(cpus: frozenset[int] | None) -> None:
    """Common start-up for spawned server and client processes."""
    die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    set_affinity(0, cpus)


def set_affinity(pid: int, cpus: frozenset[int] | None) -> None:
    """Pin ``pid`` (0 = this process) to ``cpus``; ``None`` leaves it alone."""
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, cpus)


class FdBox:
    """A raw file descriptor that survives pickling into a spawned child."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_fd, (reduction.DupFd(self.fd),))


def _rebuild_fd(dup: Any) -> FdBox:
    """Unpickle an :class:`FdBox` in the child."""
    return FdBox(dup.detach())


def close_quietly(obj: Any) -> None:
    """Close an FdBox, socket or Connection (tuples/lists recursively).

    Bare ints and strings are ignored on purpose: they are addresses or
    indices, never descriptors, in this package.
    """
    if isinstance(obj, (tuple, list)):
        for item in obj:
            close_quietly(item)
        return
    try:
        if isinstance(obj, FdBox):
            if obj.fd >= 0:
                os.close(obj.fd)
                obj.fd = -1
        elif hasattr(obj, "close") and not isinstance(obj, (str, bytes)):
            obj.close()
    except OSError:
        pass


# --------------------------------------------------------------------------
# framing for byte-stream transports (os.pipe, AF_UNIX socketpair)


def pipe_reader(fd: int) -> ReadInto:
    """Return ``read_into(mv) -> n`` for a pipe fd (one ``readv`` syscall)."""

    def read_into(mv: memoryview) -> int:
        return os.readv(fd, [mv])

    return read_into


def pipe_writer(fd: int) -> Callable[[Sequence[Any]], None]:
    """Return ``write_all(buffers)`` for a pipe fd using ``writev``."""

    def write_all(bufs: Sequence[Any]) -> None:
        total = sum(len(b) for b in bufs)
        sent = os.writev(fd, bufs)
        if sent < total:
            _finish_partial(lambda mv: os.write(fd, mv), bufs, sent)

    return write_all


def socket_writer(sock: socket.socket) -> Callable[[Sequence[Any]], None]:
    """Return ``write_all(buffers)`` for a stream socket using ``sendmsg``."""

    def write_all(bufs: Sequence[Any]) -> None:
        total = sum(len(b) for b in bufs)
        sent = sock.sendmsg(bufs)
        if sent < total:
            _finish_partial(sock.send, bufs, sent)

    return write_all


def _finish_partial(send: Callable[[memoryview], int], bufs: Sequence[Any], done: int) -> None:
    """Send what a short ``writev``/``sendmsg`` left over (rare slow path)."""
    for buf in bufs:
        mv = memoryview(buf).cast("B")
        if done >= len(mv):
            done -= len(mv)
            continue
        mv = mv[done:]
        done = 0
        while len(mv):
            mv = mv[send(mv) :]


def read_exact(read_into: ReadInto, mv: memoryview) -> bool:
    """Fill ``mv`` completely; return False on EOF before the first byte."""
    got = 0
    size = len(mv)
    while got < size:
        n = read_into(mv[got:])
        if n == 0:
            if got == 0:
                return False
            raise BenchError("peer closed the stream mid-message")
        got += n
    return True


class FrameReader:
    """Read ``HDR``-framed messages from a byte stream into one reusable buffer.

    The payload of every frame is read straight into a preallocated
    ``bytearray`` (one kernel-to-user copy).  After a header the reader asks
    for up to :data:`PEEK` bytes, so a small frame costs one syscall; the rest
    of a large payload is read exactly, so a large payload is never moved.
    """

    def __init__(self, read_into: ReadInto, capacity: int) -> None:
        self._read_into = read_into
        self._buf = bytearray(max(capacity, PEEK) + HDR.size)
        self._mv = memoryview(self._buf)
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last byte read

    def _compact(self) -> None:
        """Move a leftover partial frame (< PEEK bytes) to the buffer start."""
        left = self._end - self._start
        if self._start and left:
            self._mv[:left] = bytes(self._mv[self._start : self._end])
        self._start, self._end = 0, left

    def _ensure_capacity(self, need: int) -> None:
        """Grow the buffer to at least ``need`` bytes (outside timed loops)."""
        if need <= len(self._buf):
            return
        bigger = bytearray(need)
        bigger[: self._end] = self._mv[: self._end]
        self._buf, self._mv = bigger, memoryview(bigger)

    def _fill(self, need: int, limit: int) -> bool:
        """Read until ``need`` bytes are buffered, asking for at most ``limit``."""
        while self._end < need:
            n = self._read_into(self._mv[self._end : max(limit, need)])
            if n == 0:
                if self._end == 0:
                    return False
                raise BenchError("peer closed the stream mid-frame")
            self._end += n
        return True

    def next(self) -> tuple[int, memoryview] | None:
        """Return ``(op, payload view)`` for the next frame, or None at EOF.

        The view stays valid until the following call.
        """
        self._compact()
        if not self._fill(HDR.size, min(PEEK, len(self._buf))):
            return None
        op, length = HDR.unpack_from(self._buf, 0)
        end = HDR.size + length
        self._ensure_capacity(end)
        if not self._fill(end, end):
            raise BenchError("peer closed the stream mid-frame")
        self._start = end
        return op, self._mv[HDR.size : end]


class Counter:
    """Thread-safe counter of received one-way messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self) -> None:
        """Count one message."""
        with self._lock:
            self.value += 1
