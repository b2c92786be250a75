"""Transport plug-ins: the common interface plus the kernel baselines.

A transport is a :class:`Transport` subclass registered in :data:`REGISTRY`.
The driver calls :meth:`Transport.prepare` to create channels, spawns a
server process that runs :meth:`Transport.serve`, and talks to it through
:class:`Client` objects made by :meth:`Transport.connect` (in the driver for
the echo and streaming workloads, in spawned client processes for the
aggregate-calls workload).

Every server answers three calls:

* ``echo(payload)``: the whole payload is received into a usable buffer,
  the answer is 8 bytes (the payload length, checked by the client);
* ``push(payload)``: one-way, the server only counts it;
* ``count()``: how many pushes arrived (the streaming barrier).

Optional peers live in :mod:`benchmarks.peers`, the pybinder slot in
:mod:`benchmarks.pybinder_transport`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection as mpc
from pathlib import Path
from typing import Any, ClassVar, Protocol

from .common import (
    HDR,
    OP_COUNT,
    OP_ECHO,
    OP_PUSH,
    REPLY,
    BenchError,
    Counter,
    FdBox,
    FrameReader,
    ReadInto,
    close_quietly,
    pipe_reader,
    pipe_writer,
    read_exact,
    socket_writer,
)

Ready = Callable[[], None]


class Client(Protocol):
    """What a workload needs from a connected client endpoint."""

    def echo(self, payload: bytes) -> None:
        """Round trip: send ``payload`` bytes, wait for the 8-byte answer."""

    def push(self, payload: bytes) -> None:
        """One-way send of ``payload`` bytes."""

    def count(self) -> int:
        """Round trip returning how many pushes the server has received."""

    def counters(self) -> dict[str, int] | None:
        """Transport-internal copy counters (pybinder broker), else None."""

    def close(self) -> None:
        """Release the endpoint."""


@dataclass
class Endpoints:
    """Channels created by :meth:`Transport.prepare`.

    ``server`` is handed to the server process, ``clients[i]`` to client
    ``i`` (0 is the driver itself).  Both must pickle under the ``spawn``
    start method.  ``server_side`` lists the driver's copies of what the
    server received; they are closed once the server has started, so that
    EOF is seen if it dies.
    """

    server: Any
    clients: list[Any]
    server_side: list[Any] = field(default_factory=list)


@dataclass
class RunEnv:
    """Per-run facts a transport may need (all sizes in bytes)."""

    workdir: Path
    max_payload: int
    n_endpoints: int
    tag: str
    env: dict[str, str] = field(default_factory=dict)


class Transport:
    """Base class; subclasses describe one IPC mechanism."""

    name: ClassVar[str] = ""
    received: ClassVar[str] = ""  # one line: what "received" means
    copies_kind: ClassVar[str] = "derived"  # or "measured"
    copies_note: ClassVar[str] = ""
    distributions: ClassVar[tuple[str, ...]] = ()  # for version reporting

    def unavailable(self) -> str | None:
        """Return why this transport cannot run here, or None."""
        return None

    def derived_copies(self, size: int) -> float | None:
        """Copies of each payload byte for a ``size``-byte payload, from first principles."""
        return None

    def start_aux(self, env: RunEnv, cpus: frozenset[int] | None) -> list[subprocess.Popen[bytes]]:
        """Start helper processes (e.g. a broker) before the server."""
        return []

    def prepare(self, env: RunEnv) -> Endpoints:
        """Create the channels for one server and ``env.n_endpoints`` clients."""
        raise NotImplementedError

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """Run the server (in its own process) until ``stop`` is set."""
        raise NotImplementedError

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Open a client endpoint (in the driver or a client process)."""
        raise NotImplementedError

    def cleanup(self, env: RunEnv) -> None:
        """Remove anything the transport left outside ``env.workdir``."""


# --------------------------------------------------------------------------
# byte-stream baselines: os.pipe and AF_UNIX socketpair


class StreamClient:
    """Client over a byte stream using the ``HDR`` framing."""

    def __init__(
        self, read_into: ReadInto, write_all: Callable[[Any], None], owned: list[Any]
    ) -> None:
        self._read = read_into
        self._write = write_all
        self._owned = owned
        self._reply = bytearray(REPLY.size)
        self._reply_mv = memoryview(self._reply)

    def _call(self, op: int, payload: bytes) -> int:
        self._write([HDR.pack(op, len(payload)), payload])
        if not read_exact(self._read, self._reply_mv):
            raise BenchError("server closed the connection")
        return REPLY.unpack_from(self._reply)[0]

    def echo(self, payload: bytes) -> None:
        """Send ``payload`` bytes and check the 8-byte answer."""
        if self._call(OP_ECHO, payload) != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Send ``payload`` bytes one way."""
        self._write([HDR.pack(OP_PUSH, len(payload)), payload])

    def count(self) -> int:
        """Return the server's push count."""
        return self._call(OP_COUNT, b"")

    def counters(self) -> dict[str, int] | None:
        """No internal counters."""
        return None

    def close(self) -> None:
        """Close the underlying descriptors."""
        for obj in self._owned:
            close_quietly(obj)


def serve_frames(reader: FrameReader, write_all: Callable[[Any], None], counter: Counter) -> None:
    """Serve ``HDR`` frames from one stream until EOF (server side)."""
    while (frame := reader.next()) is not None:
        op, payload = frame
        if op == OP_ECHO:
            write_all([REPLY.pack(len(payload))])
        elif op == OP_PUSH:
            counter.add()
        elif op == OP_COUNT:
            write_all([REPLY.pack(counter.value)])
        else:
            raise BenchError(f"unknown op {op}")


def capacity_for(index: int, env: RunEnv) -> int:
    """Initial receive-buffer size in bytes: the driver's endpoint gets the max."""
    return env.max_payload if index == 0 else 64 * 1024


def run_threads(targets: list[Callable[[], None]], ready: Ready, stop: threading.Event) -> None:
    """Serve every endpoint on its own blocking thread until ``stop``."""
    for target in targets:
        threading.Thread(target=target, daemon=True).start()
    ready()
    stop.wait()


class PipeTransport(Transport):
    """Two ``os.pipe`` per client (request, answer) with length-prefixed frames."""

    name = "pipe"
    received = (
        "the whole payload is in the server's preallocated bytearray "
        "(os.readv into it), then an 8-byte answer is written back"
    )
    copies_note = "user->pipe buffer (write), pipe buffer->user (read); default 64 KiB pipe size"

    def derived_copies(self, size: int) -> float | None:
        """2 copies: into the kernel pipe buffer and out of it."""
        return 2.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """Create a request pipe and an answer pipe per endpoint."""
        server, clients, server_side = [], [], []
        for _ in range(env.n_endpoints):
            req_r, req_w = os.pipe()
            ans_r, ans_w = os.pipe()
            server.append((FdBox(req_r), FdBox(ans_w)))
            clients.append((FdBox(ans_r), FdBox(req_w)))
            server_side += [server[-1]]
        return Endpoints(server, clients, server_side)

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """One blocking reader thread per endpoint."""
        counter = Counter()
        targets = []
        for i, (req, ans) in enumerate(args):
            reader = FrameReader(pipe_reader(req.fd), capacity_for(i, env))
            writer = pipe_writer(ans.fd)
            targets.append(lambda r=reader, w=writer: serve_frames(r, w, counter))
        run_threads(targets, ready, stop)

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Wrap the client's pipe ends."""
        ans, req = args
        return StreamClient(pipe_reader(ans.fd), pipe_writer(req.fd), [ans, req])


class SocketpairTransport(Transport):
    """AF_UNIX SOCK_STREAM socketpair, length-prefixed, ``recv_into`` on the server."""

    name = "socketpair"
    received = (
        "the whole payload is in the server's preallocated bytearray "
        "(socket.recv_into), then an 8-byte answer is sent back"
    )
    copies_note = "user->skb (sendmsg), skb->user (recv_into)"

    def derived_copies(self, size: int) -> float | None:
        """2 copies: into the socket buffer and out of it."""
        return 2.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """Create one socketpair per endpoint."""
        server, clients = [], []
        for _ in range(env.n_endpoints):
            s_sock, c_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            server.append(s_sock)
            clients.append(c_sock)
        return Endpoints(server, clients, list(server))

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """One blocking reader thread per socket."""
        counter = Counter()
        targets = []
        for i, sock in enumerate(args):
            reader = FrameReader(sock.recv_into, capacity_for(i, env))
            writer = socket_writer(sock)
            targets.append(lambda r=reader, w=writer: serve_frames(r, w, counter))
        run_threads(targets, ready, stop)

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Wrap the client's socket."""
        sock: socket.socket = args
        return StreamClient(sock.recv_into, socket_writer(sock), [sock])


# --------------------------------------------------------------------------
# multiprocessing.Pipe


MP_ECHO_MODE = b"E"  # 1-byte messages are control messages
MP_PUSH_MODE = b"P"
MP_COUNT = b"C"


class MpPipeClient:
    """Client over a ``multiprocessing.Pipe`` Connection.

    Payload messages carry no op byte (that would need a copy); instead a
    1-byte control message switches the server between echo and push mode.
    """

    def __init__(self, conn: mpc.Connection) -> None:
        self._conn = conn
        self._mode = b""
        self._reply = bytearray(REPLY.size)

    def _set_mode(self, mode: bytes) -> None:
        if self._mode != mode:
            self._conn.send_bytes(mode)
            self._mode = mode

    def _answer(self) -> int:
        self._conn.recv_bytes_into(self._reply)
        return REPLY.unpack_from(self._reply)[0]

    def echo(self, payload: bytes) -> None:
        """Send ``payload`` bytes and check the 8-byte answer."""
        self._set_mode(MP_ECHO_MODE)
        self._conn.send_bytes(payload)
        if self._answer() != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Send ``payload`` bytes one way."""
        self._set_mode(MP_PUSH_MODE)
        self._conn.send_bytes(payload)

    def count(self) -> int:
        """Return the server's push count."""
        self._conn.send_bytes(MP_COUNT)
        return self._answer()

    def counters(self) -> dict[str, int] | None:
        """No internal counters."""
        return None

    def close(self) -> None:
        """Close the connection."""
        close_quietly(self._conn)


def serve_mp_conn(conn: mpc.Connection, capacity: int, counter: Counter) -> None:
    """Serve one Connection until EOF (server side)."""
    buf = bytearray(capacity)
    echo_mode = True
    while True:
        try:
            n = conn.recv_bytes_into(buf)
        except EOFError:
            return
        except mpc.BufferTooShort as exc:  # grow once, outside timed loops
            n = len(exc.args[0])
            buf = bytearray(exc.args[0])
        if n == 1:
            op = buf[:1]
            if op == MP_COUNT:
                conn.send_bytes(REPLY.pack(counter.value))
            else:
                echo_mode = op == MP_ECHO_MODE
        elif echo_mode:
            conn.send_bytes(REPLY.pack(n))
        else:
            counter.add()


class MpPipeTransport(Transport):
    """``multiprocessing.Pipe()`` (duplex, an AF_UNIX socketpair underneath)."""

    name = "mp_pipe"
    received = (
        "Connection.recv_bytes_into has filled the server's preallocated "
        "bytearray with the whole payload (it stages it in an io.BytesIO first)"
    )
    copies_note = (
        "send: user->kernel (+1 header concatenation for <= 16 KiB); "
        "recv: kernel->bytes chunk, chunk->BytesIO, BytesIO->buffer"
    )

    def derived_copies(self, size: int) -> float | None:
        """4 copies above 16 KiB, 5 at or below (CPython 3.11 connection.py)."""
        return 4.0 if size > 16384 else 5.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """Create one duplex Pipe per endpoint."""
        server, clients = [], []
        for _ in range(env.n_endpoints):
            s_conn, c_conn = mpc.Pipe(duplex=True)
            server.append(s_conn)
            clients.append(c_conn)
        return Endpoints(server, clients, list(server))

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """One blocking reader thread per Connection."""
        counter = Counter()
        targets = []
        for i, conn in enumerate(args):
            capacity = capacity_for(i, env)
            targets.append(lambda c=conn, cap=capacity: serve_mp_conn(c, cap, counter))
        run_threads(targets, ready, stop)

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Wrap the client's Connection."""
        return MpPipeClient(args)


BASELINES: list[type[Transport]] = [PipeTransport, SocketpairTransport, MpPipeTransport]
