"""Optional peer transports: pyzmq, Pyro5 and iceoryx2.

Each is measured only when its package imports; otherwise the transport is
reported as skipped with the import error as the reason.
"""

from __future__ import annotations

import ctypes
import importlib
import threading
import time
from pathlib import Path
from typing import Any

from .common import OP_COUNT, OP_ECHO, OP_PUSH, REPLY, BenchError
from .transports import Client, Endpoints, Ready, RunEnv, Transport

POLL_MS = 200  # ms a server waits before re-checking its stop flag
CLIENT_TIMEOUT_S = 30.0  # s a client waits for one answer


def import_error(module: str) -> str | None:
    """Return why ``module`` cannot be imported, or None if it can."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return f"cannot import {module}: {exc.__class__.__name__}: {exc}"
    return None


# --------------------------------------------------------------------------
# pyzmq: DEALER client -> ROUTER server over ipc://


ZMQ_OPS = {op: bytes([op]) for op in (OP_ECHO, OP_PUSH, OP_COUNT)}


class ZmqClient:
    """DEALER socket; request = [op byte, payload], answer = [8 bytes]."""

    def __init__(self, address: str) -> None:
        import zmq

        self._ctx = zmq.Context(io_threads=1)
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVTIMEO, int(CLIENT_TIMEOUT_S * 1000))
        self._sock.setsockopt(zmq.SNDTIMEO, int(CLIENT_TIMEOUT_S * 1000))
        self._sock.connect(address)

    def _answer(self) -> int:
        return REPLY.unpack(self._sock.recv())[0]

    def echo(self, payload: bytes) -> None:
        """Send ``payload`` bytes (zero-copy hand-off from 64 KiB) and check the answer."""
        self._sock.send_multipart([ZMQ_OPS[OP_ECHO], payload], copy=False)
        if self._answer() != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Send ``payload`` bytes one way."""
        self._sock.send_multipart([ZMQ_OPS[OP_PUSH], payload], copy=False)

    def count(self) -> int:
        """Return the server's push count."""
        self._sock.send_multipart([ZMQ_OPS[OP_COUNT], b""])
        return self._answer()

    def counters(self) -> dict[str, int] | None:
        """No internal counters."""
        return None

    def close(self) -> None:
        """Close socket and context."""
        self._sock.close(linger=0)
        self._ctx.term()


def _zmq_serve(sock: Any, stop: threading.Event) -> None:
    """ROUTER loop: one thread, messages from all clients fair-queued."""
    import zmq

    pushes = 0
    while not stop.is_set():
        try:
            ident, op_frame, payload = sock.recv_multipart(copy=False)
        except zmq.Again:
            continue
        op = op_frame.buffer[0]
        if op == OP_ECHO:
            sock.send_multipart([ident, REPLY.pack(payload.buffer.nbytes)])
        elif op == OP_PUSH:
            pushes += 1
        elif op == OP_COUNT:
            sock.send_multipart([ident, REPLY.pack(pushes)])
        else:
            raise BenchError(f"unknown op {op}")


class ZmqTransport(Transport):
    """pyzmq DEALER/ROUTER over ``ipc://`` in the run's temporary directory."""

    name = "zmq"
    received = (
        "ROUTER recv_multipart(copy=False) returned the payload frame complete "
        "in a libzmq message buffer, usable as a memoryview (Frame.buffer)"
    )
    copies_note = (
        "ipc socket in+out = 2; +1 pyzmq copy on send below its 64 KiB "
        "zero-copy threshold; +2 libzmq batching below 8 KiB"
    )
    distributions = ("pyzmq",)

    def unavailable(self) -> str | None:
        """Skip when pyzmq is missing."""
        return import_error("zmq")

    def derived_copies(self, size: int) -> float | None:
        """2 copies from 64 KiB, 3 from 8 KiB, 5 below (approximate)."""
        if size >= 65536:
            return 2.0
        return 3.0 if size >= 8192 else 5.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """One ipc:// address shared by all clients."""
        address = f"ipc://{env.workdir / 'zmq.sock'}"
        return Endpoints(address, [address] * env.n_endpoints)

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """Bind a ROUTER socket and serve until ``stop``."""
        import zmq

        ctx = zmq.Context(io_threads=1)
        sock = ctx.socket(zmq.ROUTER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVTIMEO, POLL_MS)
            sock.bind(args)
            ready()
            _zmq_serve(sock, stop)
        finally:
            sock.close(linger=0)
            ctx.term()

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Connect a DEALER socket."""
        return ZmqClient(args)


# --------------------------------------------------------------------------
# Pyro5 over a Unix socket with the msgpack serializer


def _pyro_echo_class() -> type:
    """Build the exposed Pyro5 echo class (Pyro5 is imported lazily)."""
    import Pyro5.api

    @Pyro5.api.expose
    class PyroEcho:
        """Server object: echo answers 8 bytes, push is oneway."""

        def __init__(self) -> None:
            self._lock = threading.Lock()
            self._pushes = 0

        def echo(self, payload: bytes) -> bytes:
            return REPLY.pack(len(payload))

        @Pyro5.api.oneway
        def push(self, payload: bytes) -> None:
            with self._lock:
                self._pushes += 1

        def count(self) -> int:
            return self._pushes

    return PyroEcho


class PyroClient:
    """A Pyro5 proxy using msgpack."""

    def __init__(self, uri: str) -> None:
        import Pyro5.api

        self._proxy = Pyro5.api.Proxy(uri)
        self._proxy._pyroSerializer = "msgpack"
        self._proxy._pyroTimeout = CLIENT_TIMEOUT_S
        self._proxy._pyroBind()

    def echo(self, payload: bytes) -> None:
        """Call ``echo`` with ``payload`` bytes and check the answer."""
        if REPLY.unpack(self._proxy.echo(payload))[0] != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Oneway call with ``payload`` bytes."""
        self._proxy.push(payload)

    def count(self) -> int:
        """Return the server's push count."""
        return int(self._proxy.count())

    def counters(self) -> dict[str, int] | None:
        """No internal counters."""
        return None

    def close(self) -> None:
        """Release the proxy's connection."""
        self._proxy._pyroRelease()


class Pyro5Transport(Transport):
    """Pyro5 threaded daemon on a Unix socket, msgpack serializer."""

    name = "pyro5"
    received = (
        "the exposed method was called with the payload as a bytes object "
        "unpacked by msgpack (oneway calls run on a fresh thread each, Pyro5 style)"
    )
    copies_note = (
        "msgpack pack, header+body concatenation, kernel in, kernel out "
        "(recv MSG_WAITALL), msgpack unpack to bytes"
    )
    distributions = ("Pyro5", "msgpack")

    def unavailable(self) -> str | None:
        """Skip when Pyro5 or msgpack is missing."""
        return import_error("Pyro5.api") or import_error("msgpack")

    def derived_copies(self, size: int) -> float | None:
        """5 copies of every payload byte."""
        return 5.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """One Unix socket path shared by all clients."""
        path = str(env.workdir / "pyro.sock")
        return Endpoints(path, [f"PYRO:echo@./u:{path}"] * env.n_endpoints)

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """Run a threaded Pyro5 daemon until ``stop``."""
        import Pyro5.api
        from Pyro5 import config

        config.SERVERTYPE = "thread"
        config.POLLTIMEOUT = POLL_MS / 1000
        config.MAX_MESSAGE_SIZE = max(config.MAX_MESSAGE_SIZE, 4 * env.max_payload)
        daemon = Pyro5.api.Daemon(unixsocket=args)
        try:
            daemon.register(_pyro_echo_class()(), "echo")
            ready()
            daemon.requestLoop(lambda: not stop.is_set())
        finally:
            daemon.close()

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Create and bind a proxy."""
        from Pyro5 import config

        config.MAX_MESSAGE_SIZE = max(config.MAX_MESSAGE_SIZE, 4 * env.max_payload)
        return PyroClient(args)


# --------------------------------------------------------------------------
# iceoryx2: request-response with loaned slices, woken by event services


class IoxHeader(ctypes.Structure):
    """Request user header: operation and client index."""

    _fields_ = [("op", ctypes.c_uint32), ("client", ctypes.c_uint32)]

    @staticmethod
    def type_name() -> str:
        """Type name both sides register with iceoryx2."""
        return "PyBinderBenchHeader"


IOX_IN_FLIGHT = 8  # requests a client may have outstanding (streaming window)


def _iox_node(env: RunEnv) -> Any:
    """Create a node whose files live under the run's temp dir and shm prefix."""
    import iceoryx2 as iox

    config = iox.config.default()
    glob = config.global_cfg
    glob.root_path = iox.Path.new(str(env.workdir / "iceoryx2") + "/")
    glob.prefix = iox.FileName.new(f"{env.tag}_")
    builder = iox.NodeBuilder.new().config(config)
    builder = builder.signal_handling_mode(iox.SignalHandlingMode.Disabled)
    return builder.create(iox.ServiceType.Ipc)


def _iox_service(node: Any, name: str, create: bool) -> Any:
    """Create or open the request-response service (u8 slices both ways)."""
    import iceoryx2 as iox

    u8 = iox.Slice[ctypes.c_uint8]
    builder = node.service_builder(iox.ServiceName.new(name)).request_response(u8, u8)
    builder = builder.request_header(IoxHeader)
    if not create:
        return builder.open()
    builder = builder.enable_fire_and_forget_requests(True)
    builder = builder.enable_safe_overflow_for_requests(False)  # never drop pushes
    builder = builder.max_active_requests_per_client(IOX_IN_FLIGHT)
    return builder.max_clients(16).create()


def _iox_event(node: Any, name: str, create: bool) -> Any:
    """Create or open an event service (used for wake-ups)."""
    import iceoryx2 as iox

    builder = node.service_builder(iox.ServiceName.new(name)).event()
    return builder.create() if create else builder.open()


class IoxClient:
    """Loans a request slice, copies the payload in, sends, notifies the server."""

    def __init__(self, args: tuple[str, int], env: RunEnv) -> None:
        import iceoryx2 as iox

        name, self._index = args
        self._iox = iox
        self._node = _iox_node(env)
        service = _iox_service(self._node, f"{name}/rr", create=False)
        initial = env.max_payload if self._index == 0 else 65536  # bytes
        builder = service.client_builder().initial_max_slice_len(initial)
        self._client = builder.allocation_strategy(iox.AllocationStrategy.PowerOfTwo).create()
        self._wake = (
            _iox_event(self._node, f"{name}/wake", create=False).notifier_builder().create()
        )
        self._own = _iox_event(self._node, f"{name}/c{self._index}", create=True)
        self._listener = self._own.listener_builder().create()
        self._wait = iox.Duration.from_millis(POLL_MS)

    def _send(self, op: int, payload: bytes) -> Any:
        request = self._client.loan_slice_uninit(len(payload))
        header = request.user_header().contents
        header.op, header.client = op, self._index
        request.payload().as_memory_view().cast("B")[:] = payload
        pending = request.assume_init().send()
        self._wake.notify()
        return pending

    def _answer(self, pending: Any) -> int:
        give_up = time.monotonic() + CLIENT_TIMEOUT_S
        while (response := pending.receive()) is None:
            if time.monotonic() > give_up:
                raise BenchError("iceoryx2 server did not answer")
            self._listener.timed_wait(self._wait)
        value = REPLY.unpack(bytes(response.payload().as_memory_view()))[0]
        response.delete()
        pending.delete()
        return value

    def echo(self, payload: bytes) -> None:
        """Copy ``payload`` bytes into a loaned slice and wait for the answer."""
        if self._answer(self._send(OP_ECHO, payload)) != len(payload):
            raise BenchError("echo answer does not match the payload length")

    def push(self, payload: bytes) -> None:
        """Fire-and-forget request with ``payload`` bytes."""
        self._send(OP_PUSH, payload).delete()

    def count(self) -> int:
        """Return the server's push count."""
        return self._answer(self._send(OP_COUNT, b"\0"))

    def counters(self) -> dict[str, int] | None:
        """No internal counters."""
        return None

    def close(self) -> None:
        """Drop ports and node (iceoryx2 removes its files on drop)."""
        for port in (self._listener, self._wake, self._client):
            port.delete()
        self._own = self._node = None


class _IoxServer:
    """Server state: drains requests whenever its listener wakes."""

    def __init__(self, name: str, env: RunEnv) -> None:
        import iceoryx2 as iox

        self._iox = iox
        self._name = name
        self.node = _iox_node(env)
        self.service = _iox_service(self.node, f"{name}/rr", create=True)
        self.server = self.service.server_builder().initial_max_slice_len(REPLY.size).create()
        self.event = _iox_event(self.node, f"{name}/wake", create=True)
        self.listener = self.event.listener_builder().create()
        self.notifiers: dict[int, Any] = {}
        self.pushes = 0

    def _notify(self, client: int) -> None:
        notifier = self.notifiers.get(client)
        if notifier is None:
            event = _iox_event(self.node, f"{self._name}/c{client}", create=False)
            notifier = self.notifiers[client] = event.notifier_builder().create()
        notifier.notify()

    def _answer(self, request: Any, value: int, client: int) -> None:
        response = request.loan_slice_uninit(REPLY.size)
        response.payload().as_memory_view().cast("B")[:] = REPLY.pack(value)
        response.assume_init().send()
        request.delete()
        self._notify(client)

    def drain(self) -> None:
        """Handle every request that is waiting."""
        while (request := self.server.receive()) is not None:
            header = request.user_header().contents
            op, client = header.op, header.client
            received = request.payload().as_memory_view().cast("B")
            size = received.nbytes
            if op == OP_PUSH:
                self.pushes += 1
                request.delete()
            elif op == OP_ECHO:
                self._answer(request, size, client)
            else:
                self._answer(request, self.pushes, client)

    def run(self, stop: threading.Event) -> None:
        """Wait for wake-ups until ``stop``."""
        timeout = self._iox.Duration.from_millis(POLL_MS)
        while not stop.is_set():
            self.listener.timed_wait(timeout)
            self.drain()

    def close(self) -> None:
        """Drop ports before the node."""
        for port in [*self.notifiers.values(), self.listener, self.server]:
            port.delete()
        self.event = self.service = self.node = None


class Iceoryx2Transport(Transport):
    """iceoryx2 request-response with loaned shared-memory slices."""

    name = "iceoryx2"
    received = (
        "the server took an ActiveRequest whose payload is a memoryview into "
        "the client's shared-memory data segment (read in place, no copy)"
    )
    copies_note = (
        "client copies the payload into its loaned shm slice; the server "
        "reads it in place (0 if the payload were produced in the loan)"
    )
    distributions = ("iceoryx2",)

    def unavailable(self) -> str | None:
        """Skip when the iceoryx2 Python binding is missing."""
        return import_error("iceoryx2")

    def derived_copies(self, size: int) -> float | None:
        """1 copy: into the loaned sample."""
        return 1.0

    def prepare(self, env: RunEnv) -> Endpoints:
        """Service names are unique per run; clients are numbered."""
        name = f"{env.tag}/echo"
        return Endpoints(name, [(name, i) for i in range(env.n_endpoints)])

    @staticmethod
    def serve(args: Any, env: RunEnv, ready: Ready, stop: threading.Event) -> None:
        """Create the service and serve until ``stop``."""
        server = _IoxServer(args, env)
        try:
            ready()
            server.run(stop)
        finally:
            server.close()

    @staticmethod
    def connect(args: Any, env: RunEnv) -> Client:
        """Open the service as a client."""
        return IoxClient(args, env)

    def cleanup(self, env: RunEnv) -> None:
        """Remove shared-memory files left under this run's prefix."""
        for path in Path("/dev/shm").glob(f"{env.tag}_*"):
            path.unlink(missing_ok=True)


PEERS: list[type[Transport]] = [ZmqTransport, Pyro5Transport, Iceoryx2Transport]
