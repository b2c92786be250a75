"""The pure pieces on their own: allocator, parcel format, frames, the looper's poll
and its backoff, and the layering rule (the broker never imports the runtime, the runtime
never imports the broker)."""

from __future__ import annotations

import ast
import itertools
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pybinder import parcel, protocol
from pybinder.broker.allocator import ALIGNMENT, BufferAllocator
from pybinder.errors import ProtocolError
from pybinder.region import create_send_area, map_send_area

PACKAGE = Path(__file__).resolve().parent.parent / "pybinder"


def test_allocator_takes_the_best_fitting_hole():
    alloc = BufferAllocator(64 * 1024)
    a = alloc.allocate(1000)
    b = alloc.allocate(8000)
    c = alloc.allocate(1000)
    d = alloc.allocate(3000)
    alloc.allocate(1000)
    alloc.free(b)  # an 8000-byte hole
    alloc.free(d)  # a 3008-byte hole
    assert alloc.allocate(2000) == d  # the smaller hole that fits
    assert alloc.allocate(5000) == b
    assert {a, c} < set(alloc._allocated)


def test_allocator_coalesces_neighbours_back_into_one_range():
    alloc = BufferAllocator(1 << 20)
    offsets = [alloc.allocate(4096 + i) for i in range(100)]
    random.Random(7).shuffle(offsets)
    for offset in offsets:
        alloc.free(offset)
    assert alloc.in_use == 0
    assert alloc.largest_free() == 1 << 20
    assert alloc.allocate(1 << 20) == 0


def test_allocator_never_overlaps_and_accounts_every_byte():
    alloc = BufferAllocator(256 * 1024)
    rng = random.Random(1)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            offset = rng.choice(list(live))
            alloc.free(offset)
            del live[offset]
        else:
            size = rng.choice([1, 64, 100, 4096, 30000])
            offset = alloc.allocate(size)
            if offset is None:
                assert alloc.largest_free() < BufferAllocator.rounded(size)
                continue
            assert offset % ALIGNMENT == 0
            live[offset] = BufferAllocator.rounded(size)
        spans = sorted(live.items())
        assert all(a + n <= b for (a, n), (b, _) in itertools.pairwise(spans))
        assert alloc.in_use == sum(live.values())


def test_small_blocks_kept_for_reuse_are_merged_back_when_room_runs_out():
    alloc = BufferAllocator(64 * 1024)  # keeps up to 1 KiB of small blocks aside
    small = alloc.allocate(200)
    big = alloc.allocate(4096)
    alloc.free(small)
    assert alloc.in_use == 4096
    assert alloc.allocate(250) == small  # the same rounded size takes the kept block
    alloc.free(small)
    alloc.free(big)
    assert alloc.allocate(64 * 1024) == 0  # needs every byte: the kept block is merged
    assert alloc.in_use == 64 * 1024


def test_freeing_an_unknown_offset_is_a_key_error():
    alloc = BufferAllocator(65536)
    with pytest.raises(KeyError):
        alloc.free(64)


def test_parcel_round_trip_with_buffers_and_objects():
    payload = bytes(range(256)) * 64
    value = {"small": b"abc", "big": payload, "items": [1, payload, parcel.ObjectRef(2, 9)]}
    encoded = parcel.encode(value)
    assert len(encoded.buffers) == 2 and encoded.objects == [(2, 9, 0)]
    out = bytearray(encoded.size)
    assert encoded.write_into(out) == encoded.size
    decoded, views = parcel.decode(memoryview(out))
    assert decoded["small"] == b"abc"
    assert bytes(decoded["big"]) == payload and len(views) == 2
    assert decoded["items"][2] == parcel.ObjectRef(2, 9)
    for view in views:
        view.release()


def corrupt(field_offset: int, fmt: str, value: int) -> bytearray:
    import struct

    encoded = parcel.encode([b"x" * 8192])
    out = bytearray(encoded.size)
    encoded.write_into(out)
    struct.pack_into(fmt, out, field_offset, value)
    return out


@pytest.mark.parametrize(
    ("offset", "fmt", "value", "message"),
    [
        (0, "<I", 0x12345678, "magic"),
        (24, "<Q", 10**9, "header says"),
        (16, "<I", 10**6, "body ends"),
        (8, "<I", 10**6, "too many"),
        (32, "<Q", 40, "outside"),
        (40, "<Q", 10**9, "outside"),
    ],
    ids=["magic", "total", "body", "objects", "buffer-start", "buffer-length"],
)
def test_parse_header_rejects_every_out_of_bounds_field(offset, fmt, value, message):
    with pytest.raises(ProtocolError, match=message):
        parcel.parse_header(corrupt(offset, fmt, value))


def test_frames_round_trip_and_reject_garbage():
    message = protocol.encode(protocol.BC_FREE_BUFFER, 64) + protocol.encode(
        protocol.BC_REPLY, 0, 100, 0, 0
    )
    assert list(protocol.decode(message)) == [
        (protocol.BC_FREE_BUFFER, 64),
        (protocol.BC_REPLY, 0, 100, 0, 0),
    ]
    with pytest.raises(ProtocolError, match="unknown command"):
        list(protocol.decode(b"\xff\xff\xff\xff"))
    with pytest.raises(ProtocolError, match="truncated"):
        list(protocol.decode(message[:-1]))


def imported_modules(directory: Path) -> set[str]:
    names: set[str] = set()
    for path in directory.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


SHARED = ("compiled", "errors", "paths", "parcel", "protocol", "region", "values")


def pybinder_parts(directory: Path) -> set[str]:
    """The pybinder subpackages and modules ``directory``'s code imports from."""
    return {
        name.split(".")[1]
        for name in imported_modules(directory)
        if name.startswith("pybinder.") and name.count(".") >= 1
    }


def test_broker_never_imports_the_runtime_and_back():
    assert pybinder_parts(PACKAGE / "broker") <= {"broker", *SHARED}
    assert pybinder_parts(PACKAGE / "runtime") <= {"runtime", *SHARED}


def test_batches_of_commands_never_exceed_one_message():
    commands = [protocol.encode(protocol.BC_RELEASE, handle, 1) for handle in range(1000)]
    messages = protocol.batch(commands)
    assert all(len(m) <= protocol.MAX_MESSAGE for m in messages)
    assert b"".join(messages) == b"".join(commands)
    assert [c for m in messages for c in protocol.decode(m)] == [
        (protocol.BC_RELEASE, h, 1) for h in range(1000)
    ]


class _FakeProcess:
    """What a ThreadState asks of its process state; records the looper_polling flag."""

    spin_seconds = 200e-6
    oneway_window = 1
    max_parcel = 1 << 20
    key = 7

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self.polling_flags: list[bool] = []
        self._polling = False
        self.releases: list[bytes] = []  # BC_RELEASE commands of dropped proxies

    def open_connection(self) -> socket.socket:
        return self._connection

    def take_releases(self) -> list[bytes]:
        batch, self.releases = b"".join(self.releases), []
        return [batch]

    @property
    def looper_polling(self) -> bool:
        return self._polling

    @looper_polling.setter
    def looper_polling(self, value: bool) -> None:
        self.polling_flags.append(value)
        self._polling = value


def _thread_state_on_a_socketpair():
    """A real ThreadState whose broker is the other end of a socketpair (it has
    already answered the thread's hello). Returns the state, that end and the process."""
    from pybinder.runtime.thread_state import ThreadState

    ours, broker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    broker.send(protocol.encode(protocol.BR_HELLO_THREAD, _FakeProcess.key))
    process = _FakeProcess(ours)
    state = ThreadState(process)
    assert protocol.decode(broker.recv(256))[0][0] == protocol.BC_HELLO_THREAD
    return state, broker, process


def test_looper_polls_back_off_when_polls_miss():
    from pybinder.runtime.thread_state import MAX_LOOPER_SKIP, LooperPolls

    misses = 8
    script = itertools.chain([True] + [False] * misses + [True, True], itertools.repeat(True))
    polls = LooperPolls()
    polled = []
    for call in range(300):
        if polls.should_poll():
            polled.append(call)
            polls.polled(timed_out=not next(script))
    # a hit, then misses: each miss doubles the calls let pass (1, 2, 4, ... up to 64)
    gaps = [b - a - 1 for a, b in itertools.pairwise(polled)]
    assert gaps[: misses + 1] == [0, 1, 2, 4, 8, 16, 32, MAX_LOOPER_SKIP, MAX_LOOPER_SKIP]
    assert gaps[misses + 1 :] == [0] * len(gaps[misses + 1 :])  # a hit resets the backoff


def test_a_looper_polls_only_after_a_two_way_call_and_only_if_no_other_looper_does():
    state, broker, process = _thread_state_on_a_socketpair()
    try:
        broker.send(b"after a oneway call")
        assert state._next_work(answered_call=False) == b"after a oneway call"
        assert process.polling_flags == []  # it blocked at once
        broker.send(b"after a two-way call")
        assert state._next_work(answered_call=True) == b"after a two-way call"
        assert process.polling_flags == [True, False]  # it polled, and said so meanwhile
        process.polling_flags.clear()
        process._polling = True  # another looper is polling
        broker.send(b"another looper polls")
        assert state._next_work(answered_call=True) == b"another looper polls"
        assert process.polling_flags == []
    finally:
        state.close()
        broker.close()


def test_releases_of_dropped_proxies_go_after_the_message_that_may_name_them():
    """A reply can carry the last reference to a proxy, which may be dropped (and its
    BC_RELEASE queued) before the reply is sent; the broker must see the reply
    first, or it drops the handle and rejects the reply."""
    from pybinder.runtime.thread_state import DEFERRED_FREE_LIMIT

    state, broker, process = _thread_state_on_a_socketpair()
    try:
        process.releases.append(protocol.encode(protocol.BC_RELEASE, 5, 1))
        state.free_buffer(4096, DEFERRED_FREE_LIMIT + 1)  # large: sent at once
        first, second = protocol.decode(broker.recv(256)), protocol.decode(broker.recv(256))
        assert [command[0] for command in first] == [protocol.BC_FREE_BUFFER]
        assert second == [(protocol.BC_RELEASE, 5, 1)]
        assert process.releases == []
    finally:
        state.close()
        broker.close()


def test_a_poll_runs_out_only_without_a_message_and_without_a_busy_neighbour():
    """The looper's backoff counts only polls that ran their whole spin: one that
    found its message, or gave way to a busy thread on its CPU, is not a miss."""
    from pybinder.runtime import thread_state
    from pybinder.runtime.thread_state import recv_polling

    ours, broker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    poller = select.poll()
    poller.register(ours.fileno(), select.POLLIN)
    cpus = os.sched_getaffinity(0)
    busy = None
    try:
        broker.send(b"waiting")
        assert recv_polling(ours, poller, 1.0) == (b"waiting", False)

        # Polled 2 ms, then blocked. A real yield here may run some other thread (a
        # kernel worker, another test's process) and so rightly end the poll early;
        # with yields that run nothing, the poll must run out. (A busy host may still
        # stop this thread for more than SHARED_CPU_YIELD between two looks at the
        # clock, which the poll would take for a busy neighbour: raised here.)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "sched_yield", lambda: None)
            patch.setattr(thread_state, "SHARED_CPU_YIELD", 1.0)
            threading.Timer(0.02, broker.send, [b"late"]).start()
            assert recv_polling(ours, poller, 0.002) == (b"late", True)

        cpu = min(cpus)
        busy = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile 1: pass"]
        )
        time.sleep(0.2)  # the busy process is pinned and spinning
        os.sched_setaffinity(0, {cpu})
        threading.Timer(0.4, broker.send, [b"shared"]).start()
        # it arrives after the spin, but the poll gave way and blocked first
        assert recv_polling(ours, poller, 0.2) == (b"shared", False)
    finally:
        os.sched_setaffinity(0, cpus)
        if busy is not None:
            busy.kill()
            busy.wait(10)
        ours.close()
        broker.close()


def test_parcel_descriptors_are_named_in_order_and_unclaimed_ones_are_closed():
    reads, writes = zip(*(os.pipe() for _ in range(3)), strict=True)
    with open(os.dup(writes[0]), "wb") as first:
        encoded = parcel.encode({"a": first, "b": [parcel.ObjectRef(parcel.OBJ_FD, 1)]})
    assert [kind for kind, _, _ in encoded.objects] == [parcel.OBJ_FD, parcel.OBJ_FD]
    out = bytearray(encoded.size)
    encoded.write_into(out)
    assert parcel.count_fds(bytes(out)) == 2
    received = [os.dup(writes[1]), os.dup(writes[2]), os.dup(writes[0])]
    got: list[tuple[int, int]] = []

    def decode_object(kind: int, value: int, descriptor: str, extra: int) -> int:
        got.append((kind, value))
        return value

    decoded, _ = parcel.decode(bytes(out), decode_object, fds=received[:2] + received[2:])
    assert decoded == {"a": received[0], "b": [received[1]]}
    with pytest.raises(OSError):  # the third came with the parcel but was never named
        os.fstat(received[2])
    for fd in (*reads, *writes, received[0], received[1]):
        os.close(fd)


def test_a_send_area_reopened_for_appending_is_refused():
    """The fuzz found it: an O_RDWR | O_APPEND reopening of a sealed memfd maps, but
    it is not the plain read-write memfd a send area must be."""
    fd, mapping = create_send_area(4096)
    mapping.close()
    try:
        assert map_send_area(fd, 4096).close() is None  # the plain one is taken
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        appending = os.open(f"/proc/self/fd/{fd}", flags)
        try:
            with pytest.raises(ProtocolError, match="not appending"):
                map_send_area(appending, 4096)
        finally:
            os.close(appending)
    finally:
        os.close(fd)
