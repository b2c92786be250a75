"""The broker's parts in process, without sockets: the router with a fake sender,
and each quota and bound it enforces, in milliseconds.

Processes here are real ProcessRecords (real regions in /dev/shm) and real send
areas (sealed memfds); only the connections are fakes that record what the broker
would send.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import posix_ipc
import pytest

from pybinder import parcel, protocol
from pybinder.broker.daemon import Broker
from pybinder.broker.death import process_died, thread_exited
from pybinder.broker.process import ProcessRecord, ThreadRecord
from pybinder.broker.quotas import LogBudget, Quotas, add_arguments, from_arguments
from pybinder.broker.router import Router
from pybinder.broker.service_manager import ServiceManager
from pybinder.broker.translate import node_for_entry
from pybinder.errors import CODE_OF_ERROR, QUOTA_NAMES, ProtocolError, QuotaExceededError
from pybinder.parcel import OBJ_NODE, ObjectRef
from pybinder.protocol import (
    BR_DEAD_REPLY,
    BR_FAILED_REPLY,
    BR_REPLY,
    BR_TRANSACTION,
    BR_TRANSACTION_COMPLETE,
    SEND_AREA,
    TF_ONE_WAY,
    TF_PARTS,
)
from pybinder.region import SHM_PREFIX, create_send_area, map_send_area, sweep_dead_brokers_names
from pybinder.runtime.file_descriptor import ParcelFileDescriptor

REGION = 64 * 1024
QUOTA = CODE_OF_ERROR[QuotaExceededError]


class FakeConnection:
    """Stands for a thread's socket: keeps what the broker sends it."""

    def __init__(self) -> None:
        self.received: list[tuple[int, ...]] = []
        self.fds: list[int] = []  # duplicates of the descriptors sent with messages

    def commands(self) -> list[int]:
        return [command[0] for command in self.received]


class World:
    """A router, its service manager, and processes made on demand."""

    def __init__(self, quotas: Quotas) -> None:
        self.router = Router(self._send, quotas)
        self.timers: list[tuple[float, object]] = []
        self.router.service_manager = ServiceManager(
            self.router, self._call_later, lambda caller: {}
        )
        self.processes: list[ProcessRecord] = []
        self.maps: list[object] = []

    def _send(self, conn: FakeConnection, message: bytes, fds: list[int] | None = None) -> None:
        conn.received.extend(protocol.decode(message))
        conn.fds.extend(os.dup(fd) for fd in fds or ())

    def _call_later(self, delay: float, callback: object) -> object:
        self.timers.append((delay, callback))
        return _Cancellable()

    def process(self, uid: int = 1000) -> ProcessRecord:
        key = len(self.processes) + 1
        process = ProcessRecord(key, 4000 + key, uid, uid, REGION)
        process.conn = FakeConnection()  # where process-wide returns go
        self.router.add_process(process)
        self.processes.append(process)
        return process

    def thread(self, process: ProcessRecord, area: int = REGION) -> ThreadRecord:
        thread = ThreadRecord(process, FakeConnection())  # type: ignore[arg-type]
        process.threads.append(thread)
        fd, mapping = create_send_area(area)
        try:
            thread.set_area(SEND_AREA, map_send_area(fd, area))
        finally:
            os.close(fd)
        self.maps.append(mapping)
        return thread

    def looper(self, process: ProcessRecord) -> ThreadRecord:
        thread = self.thread(process)
        self.router.enter_looper(thread)
        return thread

    def close(self) -> None:
        for process in self.processes:
            for thread in list(process.threads):
                thread_exited(self.router, thread)
                for fd in thread.conn.fds:  # type: ignore[attr-defined]
                    os.close(fd)
            process.region.close()
        for mapping in self.maps:
            mapping.close()  # type: ignore[attr-defined]


class _Cancellable:
    def cancel(self) -> None:
        pass


@pytest.fixture
def world(request: pytest.FixtureRequest) -> Iterator[World]:
    marker = request.node.get_closest_marker("quotas")
    quotas = Quotas(**(marker.kwargs if marker else {}))
    made = World(quotas)
    yield made
    made.close()


def write_call(thread: ThreadRecord, body: object) -> int:
    """Write a parcel of ``body`` in ``thread``'s send area; its size in bytes."""
    encoded = parcel.encode(body)
    area = thread.areas[SEND_AREA]
    assert area is not None
    encoded.write_into(area.view)
    return encoded.size


def node_of(world: World, owner: ProcessRecord, holder: ProcessRecord, local_id: int = 1) -> int:
    """A node of ``owner`` that ``holder`` has a handle to; the handle."""
    node = node_for_entry(owner, OBJ_NODE, local_id)
    ref = holder.ref_for(node)
    ref.count += 1
    return ref.handle


def caller_and_server(world: World) -> tuple[ProcessRecord, ProcessRecord, int, ThreadRecord]:
    """A process ``a`` with a thread and a handle to a node of ``b``, which has a looper."""
    a, b = world.process(), world.process()
    world.looper(b)
    return a, b, node_of(world, b, a), world.thread(a)


def last(thread: ThreadRecord) -> tuple[int, ...]:
    return thread.conn.received[-1]  # type: ignore[attr-defined]


def quota_named(command: tuple[int, ...]) -> str:
    assert command[0] == BR_FAILED_REPLY and command[1] == QUOTA, command
    return QUOTA_NAMES[command[2]]


@pytest.mark.quotas(nodes_per_process=3)
def test_a_parcel_with_more_new_nodes_than_the_quota_fails_and_changes_nothing(world):
    a, b, handle, thread = caller_and_server(world)
    size = write_call(thread, ["d", [ObjectRef(OBJ_NODE, i) for i in range(1, 5)], {}])
    world.router.transaction(thread, handle, 1, 0, size)
    assert quota_named(last(thread)) == "nodes_per_process"
    assert not a.nodes and b.allocator.in_use == 0 and not b.refs
    size = write_call(thread, ["d", [ObjectRef(OBJ_NODE, i) for i in range(1, 4)], {}])
    world.router.transaction(thread, handle, 1, 0, size)
    assert len(a.nodes) == 3 and len(b.refs) == 3  # three fit


@pytest.mark.quotas(handles_per_process=2)
def test_a_target_at_its_handle_quota_gets_no_more_handles(world):
    _a, b, handle, thread = caller_and_server(world)
    size = write_call(thread, ["d", [ObjectRef(OBJ_NODE, i) for i in range(1, 4)], {}])
    world.router.transaction(thread, handle, 1, 0, size)
    assert quota_named(last(thread)) == "handles_per_process"
    assert not b.refs and b.allocator.in_use == 0


@pytest.mark.quotas(region_share_per_sender=10)
def test_one_sender_may_hold_only_its_share_of_a_target_region(world):
    a, b, c = world.process(), world.process(), world.process()
    handle = node_of(world, b, a)  # b has no looper: calls queue, holding their buffers
    first, second = world.thread(a), world.thread(a)
    size = write_call(first, ["d", [bytes(4000)], {}])
    world.router.transaction(first, handle, 1, 0, size)
    assert b.held_by(a) == size
    write_call(second, ["d", [bytes(4000)], {}])
    world.router.transaction(second, handle, 1, 0, size)
    assert quota_named(last(second)) == "region_share_per_sender"
    other = world.thread(c)  # another sender still has room
    handle_c = node_of(world, b, c)
    write_call(other, ["d", [bytes(4000)], {}])
    world.router.transaction(other, handle_c, 1, 0, size)
    assert b.held_by(c) == size


def test_root_is_exempt_from_the_quotas(world):
    world.router.quotas = Quotas(region_share_per_sender=10)
    root, b = world.process(uid=0), world.process()
    handle = node_of(world, b, root)
    for _ in range(3):
        thread = world.thread(root)
        size = write_call(thread, ["d", [bytes(4000)], {}])
        world.router.transaction(thread, handle, 1, 0, size)
        assert not thread.conn.received  # queued, not refused
    assert b.held_by(root) == 3 * size


def test_a_parcel_in_parts_whose_sender_stopped_fails_and_frees_its_space(world):
    _a, b, handle, thread = caller_and_server(world)
    size = write_call(thread, ["d", [bytes(8000)], {}])
    world.router.transaction(thread, handle, 1, TF_PARTS, size)
    world.router.parts.ready(thread, size // 2)
    assert b.allocator.in_use > 0  # the early copy holds its space
    world.router.parts.expire(time.monotonic() - 60)  # recent: kept
    assert thread.parts is not None
    world.router.parts.expire(time.monotonic() + 1)
    assert quota_named(last(thread)) == "parts_timeout_s"
    assert thread.parts is None and b.allocator.in_use == 0
    assert thread not in world.router.parts.senders


def test_a_copy_checks_the_areas_as_they_are_when_the_bytes_move(world):
    a, b = world.process(), world.process()
    looper = world.looper(b)
    handle = node_of(world, b, a)
    filler, sender = world.thread(a), world.thread(a)
    big = write_call(filler, ["d", [bytes(b.async_space - 2048)], {}])
    world.router.transaction(filler, handle, 1, TF_ONE_WAY, big)  # fills the async space
    size = write_call(sender, ["d", [bytes(4096)], {}])
    world.router.transaction(sender, handle, 1, TF_ONE_WAY, size)
    assert sender.waiting_oneway is not None  # waits for room
    fd, small = create_send_area(4096)
    try:
        sender.set_area(SEND_AREA, map_send_area(fd, 4096))  # behind the daemon's back
    finally:
        os.close(fd)
    world.maps.append(small)
    delivered = [c for c in looper.conn.received if c[0] == BR_TRANSACTION]
    world.router.free_buffer(looper, delivered[0][4])  # room now: the retry copies...
    refused = last(sender)
    assert refused[0] == BR_FAILED_REPLY and refused[1] == CODE_OF_ERROR[ProtocolError]
    assert BR_TRANSACTION_COMPLETE not in sender.conn.commands()  # ...nothing read outside


def test_a_held_command_refused_when_it_runs_does_not_stop_the_other_waiters(world):
    """Found by the fuzz: a BC_DETACH (without a call to detach) held behind a oneway
    call waiting for room raised out of the retry that another process's free ran,
    and the waiters after it never heard of the room."""
    a, b = world.process(), world.process()
    looper = world.looper(b)
    handle = node_of(world, b, a)
    filler, first, second = world.thread(a), world.thread(a), world.thread(a)
    big = write_call(filler, ["d", [bytes(b.async_space - 2048)], {}])
    world.router.transaction(filler, handle, 1, TF_ONE_WAY, big)  # fills the async space
    for sender in (first, second):
        size = write_call(sender, ["d", [bytes(4096)], {}])
        world.router.transaction(sender, handle, 1, TF_ONE_WAY, size)
        assert sender.waiting_oneway is not None  # waits for room
    world.router.hold(first, (protocol.BC_DETACH,))
    delivered = [c for c in looper.conn.received if c[0] == BR_TRANSACTION]
    world.router.free_buffer(looper, delivered[0][4])  # room for both
    assert first.conn.commands()[-2:] == [BR_TRANSACTION_COMPLETE, protocol.BR_ERROR]
    assert last(second)[0] == BR_TRANSACTION_COMPLETE and second.waiting_oneway is None
    assert not first.backlog and first.waiting_oneway is None


@pytest.mark.quotas(service_manager_parcel=1024)
def test_a_service_manager_parcel_over_its_quota_is_refused_unread(world):
    a = world.process()
    thread = world.thread(a)
    size = write_call(thread, [protocol.SERVICE_MANAGER_DESCRIPTOR, [bytes(4096)], {}])
    world.router.transaction(thread, 0, protocol.SM_CHECK_SERVICE, 0, size)
    assert quota_named(last(thread)) == "service_manager_parcel"


@pytest.mark.quotas(waiters_per_process=2)
def test_waits_for_a_name_are_bounded_per_process(world):
    a = world.process()
    sm = world.router.service_manager
    threads = [world.thread(a) for _ in range(3)]
    for thread in threads:
        size = write_call(thread, [protocol.SERVICE_MANAGER_DESCRIPTOR, ["x", 10.0], {}])
        world.router.transaction(thread, 0, protocol.SM_WAIT_FOR_SERVICE, 0, size)
    assert len(world.timers) == 2  # two wait; the third was answered with the quota error
    assert threads[2].conn.received  # a BR_REPLY carrying the error
    thread_exited(world.router, threads[0])
    assert sm._waiters_of[a] == 1


def test_cancelled_timers_leave_the_loop(tmp_path: Path):
    broker = Broker(tmp_path / "b.sock")
    try:
        timers = [broker.call_later(3600, lambda: None) for _ in range(1000)]
        for timer in timers:
            timer.cancel()
        assert len(broker._timers) < 200
    finally:
        broker.close()


def test_a_log_flood_costs_a_counter_not_lines():
    budget = LogBudget(burst=5, per_second=1000.0)
    record = logging.LogRecord("x", logging.WARNING, "f", 1, "pid %d sent junk", (1,), None)
    passed = sum(budget.filter(record) for _ in range(1000))
    assert 5 <= passed < 50
    time.sleep(0.01)
    assert budget.filter(record)
    assert "similar lines dropped" in record.msg


def test_quotas_are_broker_options():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    quotas = from_arguments(parser.parse_args(["--nodes-per-process", "7", "--no-exempt-root"]))
    assert quotas.nodes_per_process == 7 and not quotas.exempt_root
    assert quotas.over("nodes_per_process", 0, 8)
    with pytest.raises(ValueError, match="parts_timeout_s"):
        from_arguments(parser.parse_args(["--parts-timeout-s", "0"]))
    assert set(QUOTA_NAMES) <= set(Quotas.__dataclass_fields__)


def test_names_a_killed_broker_left_are_swept_and_live_ones_kept():
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)  # a pid that no longer runs
    dead = f"/{SHM_PREFIX}{child}-sweeptest"
    live = f"/{SHM_PREFIX}{os.getpid()}-sweeptest"
    for name in (dead, live):
        posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096).close_fd()
    try:
        assert sweep_dead_brokers_names() >= 1
        names = os.listdir("/dev/shm")
        assert dead[1:] not in names and live[1:] in names
    finally:
        for name in (dead, live):
            with contextlib.suppress(posix_ipc.ExistentialError):
                posix_ipc.unlink_shared_memory(name)


def test_a_call_queued_behind_oneway_calls_gets_a_dead_reply_when_its_target_dies(world):
    _a, b, handle, thread = caller_and_server(world)
    size = write_call(thread, ["d", [1], {}])
    world.router.transaction(thread, handle, 1, TF_ONE_WAY, size)  # runs in b's oneway lane
    world.router.transaction(thread, handle, 2, 0, size)  # two-way: queued behind it
    assert thread.outgoing is not None and not thread.outgoing.to_thread
    process_died(world.router, b)
    assert last(thread)[0] == BR_DEAD_REPLY
    assert thread.outgoing is None


def test_loopers_taking_turns_keep_the_idle_stack_bounded(world):
    a, b = world.process(), world.process()
    loopers = [world.looper(b) for _ in range(3)]
    handle = node_of(world, b, a)
    callers = [world.thread(a), world.thread(a)]
    for caller in callers:
        size = write_call(caller, ["d", [1], {}])
    for _ in range(500):  # two calls at a time, answered in the order they were taken
        taken = []
        for caller in callers:
            world.router.transaction(caller, handle, 1, 0, size)
            taken.append(next(t for t in loopers if t.incoming and t not in taken))
        for looper in taken:
            world.router.free_buffer(looper, looper.conn.received[-1][4])
            write_call(looper, [0, None])
            world.router.reply(looper, 0, size)
        for caller in callers:
            world.router.free_buffer(caller, caller.conn.received[-1][1])
    assert len(b.idle_stack) <= 2 * len(b.threads) + 8


def test_a_service_manager_call_nested_past_the_recursion_limit_is_answered(world):
    a = world.process()
    thread = world.thread(a)
    body = ["X" * 1010, [], {}]
    encoded = parcel.encode(body)
    whole = bytearray(encoded.size)
    encoded.write_into(whole)
    packed = msgpack.packb(body)
    at = whole.find(packed)
    # The same length, but the descriptor is a list nested ~1000 deep (its repr fails).
    whole[at : at + len(packed)] = b"\x93" + b"\x91" * (len(packed) - 4) + b"\xc0\x90\x80"
    area = thread.areas[SEND_AREA]
    assert area is not None
    area.view[: len(whole)] = whole
    world.router.transaction(thread, 0, protocol.SM_CHECK_SERVICE, 0, len(whole))
    assert last(thread)[0] == BR_REPLY  # an error reply, and no exception in the broker


def test_a_oneway_wait_for_a_name_leaves_no_waiter_and_sends_no_reply(world):
    a = world.process()
    thread = world.thread(a)
    size = write_call(thread, [protocol.SERVICE_MANAGER_DESCRIPTOR, ["x", 0.5], {}])
    world.router.transaction(thread, 0, protocol.SM_WAIT_FOR_SERVICE, TF_ONE_WAY, size)
    assert thread.conn.commands() == [BR_TRANSACTION_COMPLETE]
    assert not world.timers and not world.router.service_manager._waiters


# -- the object model: pins, death links, loopers on demand, descriptors ---------------


def process_returns(process: ProcessRecord) -> list[tuple[int, ...]]:
    return process.conn.received  # type: ignore[no-any-return]


def test_a_node_on_its_way_home_stays_until_its_buffer_is_freed(world):
    """hub.echo(mine): the reply carries the caller's own node home while the hub
    releases its handle; the node must outlive the reply buffer (the 'no local node'
    race), and be released once that buffer is freed."""
    a, b, handle, caller = caller_and_server(world)
    server = b.threads[0]
    size = write_call(caller, ["d", [ObjectRef(OBJ_NODE, 7)], {}])
    world.router.transaction(caller, handle, 1, 0, size)
    world.router.free_buffer(server, last(server)[4])  # the hub has read the call
    (b_handle,) = [h for h, ref in b.refs.items() if ref.node.owner is a]
    reply = parcel.encode([0, ObjectRef(protocol_handle_kind(), b_handle)])
    reply.write_into(server.areas[SEND_AREA].view)
    world.router.reply(server, 0, reply.size)
    world.router.release(server, b_handle, 1)  # the hub drops its proxy at once
    assert protocol.BR_RELEASE_NODE not in [c[0] for c in process_returns(a)]
    assert 7 in a.nodes and a.nodes[7].pinned == 1
    offset = last(caller)[1]
    world.router.free_buffer(caller, offset)
    assert (protocol.BR_RELEASE_NODE, 7, 1) in process_returns(a)
    assert 7 not in a.nodes


def protocol_handle_kind() -> int:
    return parcel.OBJ_HANDLE


def test_death_links_fire_once_per_linked_handle_and_at_once_for_a_dead_node(world):
    a, b, handle, thread = caller_and_server(world)
    world.router.request_death_notification(thread, handle)
    world.router.request_death_notification(thread, handle)  # one link per handle
    assert list(b.nodes[1].refs) == [a.refs[handle]] and a.refs[handle].death_linked
    with pytest.raises(ProtocolError):
        world.router.request_death_notification(thread, handle + 100)
    process_died(world.router, b)
    assert process_returns(a).count((protocol.BR_DEAD_BINDER, handle)) == 1
    world.router.request_death_notification(thread, handle)  # dead already: at once
    assert process_returns(a).count((protocol.BR_DEAD_BINDER, handle)) == 2


def test_every_holder_learns_of_a_death_linked_or_not_and_a_cleared_link_shows_no_more(world):
    a, b, handle, thread = caller_and_server(world)
    c = world.process()
    other = node_of(world, b, c)
    world.router.request_death_notification(thread, handle)
    world.router.clear_death_notification(thread, handle)
    assert not a.refs[handle].death_linked
    process_died(world.router, b)
    assert (protocol.BR_DEAD_BINDER, handle) in process_returns(a)
    assert (protocol.BR_DEAD_BINDER, other) in process_returns(c)


def test_a_process_whose_loopers_are_busy_is_asked_for_one_more_up_to_max_threads(world):
    a, b = world.process(), world.process()
    pool = world.thread(b)
    world.router.set_max_threads(pool, 2)
    world.router.register_looper(pool)
    handle = node_of(world, b, a)
    callers = [world.thread(a) for _ in range(4)]
    for caller in callers[:2]:
        size = write_call(caller, ["d", [], {}])
        world.router.transaction(caller, handle, 1, 0, size)
    spawns = [c for c in process_returns(b) if c[0] == protocol.BR_SPAWN_LOOPER]
    assert len(spawns) == 1 and b.spawn_pending == 1  # one request at a time
    world.router.register_looper(world.thread(b))  # the spawned looper arrives
    assert b.spawn_pending == 0 and not b.todo  # and takes the queued call
    for caller in callers[2:]:
        size = write_call(caller, ["d", [], {}])
        world.router.transaction(caller, handle, 1, 0, size)
    spawns = [c for c in process_returns(b) if c[0] == protocol.BR_SPAWN_LOOPER]
    assert len(spawns) == 1  # max_threads (2) reached: calls queue, no more requests
    assert len(b.todo) == 2
    assert world.router.starving(time.monotonic() + 2) == [(b, pytest.approx(2, abs=1))]
    assert world.router.starving(time.monotonic() + 3) == []  # reported once


def fd_call(world: World, thread: ThreadRecord, count: int) -> tuple[int, list[int]]:
    """Write a call naming ``count`` descriptors (pipe write ends) and attach them as
    the daemon does; the parcel's size, and the write ends (the test's to close)."""
    pipes = [os.pipe() for _ in range(count)]
    ends = [w for _, w in pipes]
    sent = [ParcelFileDescriptor.dup(w) for w in ends]
    encoded = parcel.encode(["d", sent, {}])
    assert len(encoded.fds) == count
    encoded.write_into(thread.areas[SEND_AREA].view)
    thread.fds = [os.dup(w) for w in ends]  # what the daemon received
    for r, _ in pipes:
        os.close(r)
    for pfd in sent:
        pfd.close()
    return encoded.size, ends


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_descriptors_go_with_the_call_to_the_receiver_and_the_broker_keeps_none(world):
    _a, b, handle, thread = caller_and_server(world)
    before = open_fds()
    size, ends = fd_call(world, thread, 3)
    world.router.transaction(thread, handle, 1, 0, size)
    looper = b.threads[0]
    assert last(looper)[0] == BR_TRANSACTION
    assert len(looper.conn.fds) == 3  # type: ignore[attr-defined]
    assert world.router.fds_of_uid == {}
    for fd in [*looper.conn.fds, *ends]:  # type: ignore[attr-defined]
        os.close(fd)
    looper.conn.fds.clear()  # type: ignore[attr-defined]
    assert open_fds() == before


@pytest.mark.quotas(fds_per_transaction=2)
def test_descriptors_beyond_the_call_quota_fail_the_call_and_are_closed(world):
    _a, b, handle, thread = caller_and_server(world)
    size, ends = fd_call(world, thread, 3)
    held = open_fds()
    world.router.transaction(thread, handle, 1, 0, size)
    assert quota_named(last(thread)) == "fds_per_transaction"
    assert open_fds() == held - 3 and not b.buffers
    for fd in ends:
        os.close(fd)


def test_descriptors_a_parcel_does_not_name_fail_it_and_are_closed(world):
    _a, b, handle, thread = caller_and_server(world)
    size = write_call(thread, ["d", [], {}])
    read_end, write_end = os.pipe()
    thread.fds = [read_end, write_end]
    world.router.transaction(thread, handle, 1, 0, size)
    assert last(thread)[0] == BR_FAILED_REPLY
    assert thread.fds == [] and world.router.fds_of_uid == {} and not b.buffers
    with pytest.raises(OSError):
        os.fstat(read_end)


# -- deadlines and cancellation -------------------------------------------------------


def test_a_deadline_travels_with_its_call_and_a_cancel_drops_the_late_reply(world):
    a, b, handle, caller = caller_and_server(world)
    server = b.threads[0]
    size = write_call(caller, ["d", [], {}])
    world.router.set_deadline(caller, 123_456_789)
    world.router.transaction(caller, handle, 1, 0, size)
    received = server.conn.received  # type: ignore[attr-defined]
    assert received[-2] == (protocol.BR_DEADLINE, 123_456_789)
    assert received[-1][0] == BR_TRANSACTION and caller.next_deadline == 0
    offset = received[-1][4]
    world.router.cancel(caller)
    assert last(caller) == (protocol.BR_CANCEL_DONE, 1) and caller.outgoing is None
    assert received[-1] == (protocol.BR_CALL_CANCELLED, offset)  # for is_cancelled()
    world.router.free_buffer(server, offset)
    reply = parcel.encode([0, "late"])
    reply.write_into(server.areas[SEND_AREA].view)
    world.router.reply(server, 0, reply.size)
    assert last(caller) == (protocol.BR_CANCEL_DONE, 1)  # nothing more for that call
    assert not a.buffers and not b.buffers and not b.nodes[1].active
    world.router.cancel(caller)  # nothing outstanding: the outcome went already
    assert last(caller) == (protocol.BR_CANCEL_DONE, 0)


def test_a_cancelled_call_still_queued_leaves_its_queue_and_frees_its_buffer(world):
    a, b = world.process(), world.process()
    handle = node_of(world, b, a)
    caller = world.thread(a)
    size = write_call(caller, ["d", [], {}])
    world.router.transaction(caller, handle, 1, 0, size)  # no looper: it queues
    assert len(b.todo) == 1 and b.buffers
    world.router.cancel(caller)
    assert not b.todo and not b.buffers and not b.nodes[1].active
    assert last(caller) == (protocol.BR_CANCEL_DONE, 1)


def test_a_call_while_a_parcel_in_parts_is_unfinished_is_refused_not_held(world):
    """Its own unfinished parcel may hold the room the call would wait for, and the
    parcel's parts would be held behind the waiting call: found by the fuzz."""
    _a, _b, handle, thread = caller_and_server(world)
    write_call(thread, ["d", [bytes(8192)], {}])
    world.router.transaction(thread, handle, 1, TF_ONE_WAY | TF_PARTS, 1 << 20)
    assert thread.parts is not None
    size = write_call(thread, ["d", [], {}])
    world.router.transaction(thread, handle, 1, TF_ONE_WAY, size)
    assert last(thread)[0] == BR_FAILED_REPLY and thread.waiting_oneway is None
