"""Peer processes for the tests: ``python tests/peers.py ROLE SOCKET [ARGS...]``.

Each role runs in its own interpreter, connects to a real broker and prints one
line starting with ``ready`` once it can be called.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import sys
import threading
import time
from typing import Any

import pybinder


class ITest(pybinder.Interface):
    """Everything the tests exercise, in one interface."""

    DESCRIPTOR = "tests.ITest"

    @pybinder.method
    def echo(self, value: Any) -> Any: ...

    @pybinder.method
    def digest(self, data: Any) -> list[Any]:
        """[type name, sha256 hex, readonly, error type of a write attempt]."""

    @pybinder.method
    def blob(self, size: int) -> bytes:
        """``size`` deterministic bytes (so the caller can check them)."""

    @pybinder.method
    def who(self) -> list[int]:
        """[calling pid, calling uid, calling gid] as the server sees them."""

    @pybinder.oneway
    def record(self, value: Any) -> None: ...

    @pybinder.oneway
    def record_slowly(self, value: Any, seconds: float) -> None:
        """record(value) after sleeping ``seconds``: oneway calls queue behind it."""

    @pybinder.method
    def recorded(self) -> list[Any]: ...

    @pybinder.method
    def fail(self, kind: str, message: str) -> None: ...

    @pybinder.method
    def sleep(self, seconds: float) -> int: ...

    @pybinder.method
    def call_back(self, callback: Any, value: Any) -> Any: ...

    @pybinder.method
    def add(self, a: int, b: int) -> int: ...

    @pybinder.method
    def keep(self, data: Any) -> None:
        """Keep a reference to ``data`` past the call (it must be invalidated)."""

    @pybinder.method
    def unsendable(self) -> Any:
        """Return something msgpack cannot carry."""

    @pybinder.method
    def loaned_blob(self, size: int) -> bytes:
        """Like blob(), but the server builds the answer in its own loan area."""

    @pybinder.method
    def read_kept(self) -> str:
        """Try to read the kept view; the error type name, or "readable"."""


class ICallback(pybinder.Interface):
    DESCRIPTOR = "tests.ICallback"

    @pybinder.method
    def on_value(self, value: Any) -> Any: ...


class CustomError(Exception):
    pass


def pattern(size: int) -> bytes:
    """Deterministic bytes of ``size``."""
    block = hashlib.sha256(b"pybinder").digest() * 128
    return (block * (size // len(block) + 1))[:size]


class TestService(ITest.Stub):
    proc: pybinder.ProcessState

    def __init__(self) -> None:
        self._recorded: list[Any] = []
        self._lock = threading.Lock()

    def echo(self, value: Any) -> Any:
        return value

    def digest(self, data: Any) -> list[Any]:
        error = "none"
        try:
            data[0] = 0
        except Exception as exc:
            error = type(exc).__name__
        readonly = getattr(data, "readonly", None)
        return [type(data).__name__, hashlib.sha256(data).hexdigest(), readonly, error]

    def blob(self, size: int) -> bytes:
        return pattern(size)

    def who(self) -> list[int]:
        return [pybinder.get_calling_pid(), pybinder.get_calling_uid(), pybinder.get_calling_gid()]

    def record(self, value: Any) -> None:
        if isinstance(value, memoryview):
            value = bytes(value)  # the view is only valid until this method returns
        with self._lock:
            self._recorded.append(value)

    def record_slowly(self, value: Any, seconds: float) -> None:
        time.sleep(seconds)
        self.record(value)

    def recorded(self) -> list[Any]:
        with self._lock:
            return list(self._recorded)

    def fail(self, kind: str, message: str) -> None:
        error_type = CustomError if kind == "custom" else getattr(builtins, kind)
        raise error_type(message)

    def sleep(self, seconds: float) -> int:
        time.sleep(seconds)
        return os.getpid()

    def call_back(self, callback: Any, value: Any) -> Any:
        return ICallback.as_interface(callback).on_value(value)

    def add(self, a: int, b: int) -> int:
        return a + b

    def keep(self, data: Any) -> None:
        self._kept = data

    def unsendable(self) -> Any:
        return object()

    def loaned_blob(self, size: int) -> memoryview:
        buffer = self.proc.loan(size)
        buffer[:] = pattern(size)
        return buffer

    def read_kept(self) -> str:
        try:
            bytes(self._kept[:1])
        except Exception as exc:
            return type(exc).__name__
        return "readable"


def serve(socket_path: str, region_size: int, threads: int) -> None:
    with pybinder.connect(socket_path, region_size=region_size) as proc:
        service = TestService()
        service.proc = proc
        proc.add_service("test", service)
        proc.start_thread_pool(threads)
        print(f"ready {os.getpid()}", flush=True)
        proc.join_thread_pool()


def hammer(socket_path: str, calls: int) -> None:
    """Make ``calls`` add() calls; print how many answers were right."""
    with pybinder.connect(socket_path) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        print("ready", flush=True)
        right = sum(service.add(i, os.getpid()) == i + os.getpid() for i in range(calls))
        print(f"right {right}", flush=True)


def idle_client(socket_path: str) -> None:
    """Connect, call once, then wait to be killed."""
    with pybinder.connect(socket_path) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        service.echo(pattern(64 * 1024))
        print("ready", flush=True)
        time.sleep(60)


def streamer(socket_path: str, calls: int, seconds: float) -> None:
    """Send ``calls`` record_slowly(i, seconds) oneway calls (in the window), print
    "sent", then wait to be killed with calls still queued in the broker."""
    with pybinder.connect(socket_path) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        for i in range(calls):
            service.record_slowly(i, seconds)
        print("sent", flush=True)
        time.sleep(60)


def caller(socket_path: str, name: str, region_size: int) -> None:
    """Call blob(64) on the service ``name`` once, print what happened, then wait to
    be killed (still connected, so its region can be inspected)."""
    with pybinder.connect(socket_path, region_size=region_size) as proc:
        # unchecked (no INTERFACE_TRANSACTION): the test may serve it by hand
        service = ITest.as_interface(proc.get_service(name, timeout=10))
        print(f"ready {os.getpid()}", flush=True)
        try:
            service.blob(64)
        except Exception as exc:
            print(type(exc).__name__, flush=True)
        else:
            print("answered", flush=True)
        time.sleep(60)


def main(argv: list[str]) -> None:
    role, socket_path, *rest = argv
    if role == "server":
        region_size = int(rest[0]) if rest else 4 * 1024 * 1024
        threads = int(rest[1]) if len(rest) > 1 else 4
        serve(socket_path, region_size, threads)
    elif role == "hammer":
        hammer(socket_path, int(rest[0]))
    elif role == "idle-client":
        idle_client(socket_path)
    elif role == "streamer":
        streamer(socket_path, int(rest[0]), float(rest[1]))
    elif role == "caller":
        caller(socket_path, rest[0], int(rest[1]))
    else:
        raise SystemExit(f"unknown role {role}")


if __name__ == "__main__":
    main(sys.argv[1:])


# -- versions of one interface (tests/test_interfaces.py) -------------------------------
# Run as ``python -c "import peers; peers.calc_server(SOCKET, VERSION)"`` (with tests/ on
# sys.path): appended after main(), whose roles are left as they are.

#: The methods of each version of tests.ICalc, in declaration order.
CALC_VERSIONS = {
    "old": ("add", "sub"),
    "new": ("add", "sub", "mul"),  # mul appended: compatible both ways
    "inserted": ("add", "mul", "sub"),  # mul inserted: sub's code now means mul
}


def calc_interface(version: str) -> type[pybinder.Interface]:
    """tests.ICalc as ``version`` declares it (see :data:`CALC_VERSIONS`).

    Made on demand, not at module level: the interface registry is keyed by
    descriptor, and only the process that plays this version should register it."""
    namespace: dict[str, Any] = {"DESCRIPTOR": "tests.ICalc"}
    for name in CALC_VERSIONS[version]:

        def declaration(self: Any, a: int, b: int) -> int: ...

        declaration.__name__ = declaration.__qualname__ = name
        namespace[name] = pybinder.method(declaration)
    return type("ICalc", (pybinder.Interface,), namespace)


def start_calc(cluster: Any, version: str) -> Any:
    """Start a server process of "calc" as ``version`` of tests.ICalc in ``cluster``
    (a conftest.Cluster); its Peer, once ready."""
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path.insert(0, {tests!r}); import peers; "
        "peers.calc_server(sys.argv[1], sys.argv[2])"
    )
    peer = cluster.spawn([sys.executable, "-c", code, cluster.socket, version])
    peer.wait_ready()
    return peer


def calc_stub(interface: type[pybinder.Interface]) -> pybinder.Binder:
    """A Stub of ``interface`` (a version of tests.ICalc) that has every method any
    version declares."""

    class Calc(interface.Stub):  # type: ignore[name-defined,misc]
        def add(self, a: int, b: int) -> int:
            return a + b

        def sub(self, a: int, b: int) -> int:
            return a - b

        def mul(self, a: int, b: int) -> int:
            return a * b

    stub: pybinder.Binder = Calc()
    return stub


def calc_server(socket_path: str, version: str) -> None:
    """Serve "calc" as ``version`` of tests.ICalc until killed."""
    with pybinder.connect(socket_path) as proc:
        proc.add_service("calc", calc_stub(calc_interface(version)))
        proc.start_thread_pool(2)
        print(f"ready {os.getpid()}", flush=True)
        proc.join_thread_pool()


# -- values that arrive as they were sent (tests/test_values.py) -------------------------
# Run as ``python -c "import peers; peers.values_server(SOCKET)"`` (with tests/ on
# sys.path), so that the classes below are defined (main() above never returns), and
# registered under the same names as in the test process.

import dataclasses  # noqa: E402


@pybinder.parcelable(name="tests.Frame")
@dataclasses.dataclass
class Frame:
    """A parcelable both sides import."""

    index: int
    size: tuple[int, int]
    tags: list[str] = dataclasses.field(default_factory=list)
    payload: Any = None


@pybinder.remote_exception(name="tests.QuotaError")
class QuotaError(Exception):
    """A registered exception whose ``__init__`` takes more than its ``args``."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit
        self.where = ("disk", 3)


class IValues(pybinder.Interface):
    DESCRIPTOR = "tests.IValues"

    @pybinder.method
    def inspect(self, value: Any) -> dict[str, Any]:
        """How ``value`` arrived: its type, and for a numpy array its dtype, shape,
        whether it is writeable, owns its memory, and lies on a memoryview (the
        receiver's region)."""

    @pybinder.method
    def raise_quota(self, limit: int) -> None:
        """Raise QuotaError("over quota", limit)."""

    @pybinder.method
    def bad_result(self) -> Any:
        """A result with a set deep inside, which cannot be sent."""


class ValuesService(IValues.Stub):
    def inspect(self, value: Any) -> dict[str, Any]:
        kind = type(value)
        found: dict[str, Any] = {"type": f"{kind.__module__}.{kind.__qualname__}"}
        if kind.__name__ == "ndarray":
            base = value
            while getattr(base, "base", None) is not None and not isinstance(base, memoryview):
                base = base.base
            found.update(
                dtype=value.dtype.str,
                shape=list(value.shape),
                writeable=bool(value.flags.writeable),
                owndata=bool(value.flags.owndata),
                on_memoryview=isinstance(base, memoryview),
                sha256=hashlib.sha256(value.tobytes()).hexdigest(),
            )
        return found

    def raise_quota(self, limit: int) -> None:
        raise QuotaError("over quota", limit)

    def bad_result(self) -> Any:
        return {"frames": [1, 2, {3}]}


def values_server(socket_path: str) -> None:
    """Serve "test" (TestService) and "values" (ValuesService) until killed."""
    with pybinder.connect(socket_path, region_size=32 << 20) as proc:
        service = TestService()
        service.proc = proc
        proc.add_service("test", service)
        proc.add_service("values", ValuesService())
        proc.start_thread_pool(2)
        print(f"ready {os.getpid()}", flush=True)
        proc.join_thread_pool()
