"""Large parcels sent in parts (TF_PARTS), calls and replies alike: the broker copies
each part while the sender writes the next, the payload still arrives whole and is
copied once, and a sender or target that goes away mid-parcel leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time

import peers
import pytest
from peers import ITest, pattern
from raw import answer, give_send_area
from waiting import eventually

import pybinder
from pybinder import parcel, protocol
from pybinder.protocol import (
    BC_ENTER_LOOPER,
    BC_PARCEL_READY,
    BC_RELEASE,
    BC_REPLY,
    BC_TRANSACTION,
    BR_DEAD_REPLY,
    BR_ERROR,
    BR_FAILED_REPLY,
    BR_TRANSACTION,
    BR_TRANSACTION_COMPLETE,
    PARTS_RING,
    PROGRESS,
    REPLY_OK,
    TF_ONE_WAY,
    TF_PARTS,
    TF_RING,
    WRITE_WHOLE,
)
from pybinder.runtime.thread_state import PART_SIZE, PARTS_MIN


def broker_counters(proc) -> dict:
    return proc.status()["broker"]


def region_in_use(proc, pid: int) -> int:
    for entry in proc.status()["processes"]:
        if entry["pid"] == pid:
            return entry["region_in_use"]
    raise LookupError(pid)


@pytest.fixture
def server(cluster):
    return cluster.server(region_size=32 << 20)


@pytest.fixture
def service(server, proc):
    return proc.get_service("test", ITest, timeout=10)


def test_a_large_argument_goes_in_parts_arrives_whole_and_is_copied_once(service, proc):
    data = os.urandom(PARTS_MIN + 3 * PART_SIZE + 123)  # an uneven last part
    before = broker_counters(proc)
    kind, remote_sha, readonly, _ = service.digest(data)
    after = broker_counters(proc)
    assert (kind, readonly) == ("memoryview", True)
    assert remote_sha == hashlib.sha256(data).hexdigest()
    assert after["parcels_in_parts"] - before["parcels_in_parts"] == 1
    assert after["buffer_bytes_copied"] - before["buffer_bytes_copied"] == len(data)


def test_a_smaller_argument_is_sent_whole(service, proc):
    before = broker_counters(proc)["parcels_in_parts"]
    data = bytes(PARTS_MIN // 2)
    assert service.digest(data)[1] == hashlib.sha256(data).hexdigest()
    assert broker_counters(proc)["parcels_in_parts"] == before


def test_oneway_calls_in_parts_stay_in_order(service):
    blobs = [bytes([i]) * (PARTS_MIN + i) for i in range(3)]
    for blob in blobs:
        service.record(blob)
    assert service.recorded() == blobs


def test_a_parcel_in_parts_that_does_not_fit_fails_and_the_next_call_works(cluster, proc):
    cluster.server(region_size=2 << 20)
    service = proc.get_service("test", ITest, timeout=10)
    with pytest.raises(pybinder.TransactionTooLargeError):
        service.digest(bytes(3 << 20))
    assert service.add(2, 3) == 5


def test_a_oneway_call_larger_than_the_async_space_fails_in_parts_too(cluster, proc):
    cluster.server(region_size=4 << 20)  # async space: half of it
    service = proc.get_service("test", ITest, timeout=10)
    with pytest.raises(pybinder.TransactionTooLargeError) as info:
        service.record(bytes(3 << 20))
    assert info.value.limit == 2 << 20
    assert service.add(2, 3) == 5


def test_a_parcel_in_parts_to_a_dead_server_is_a_dead_object(server, service):
    server.stop()
    with pytest.raises(pybinder.DeadObjectError):
        service.digest(bytes(PARTS_MIN))


@pytest.fixture
def raw_sender(raw_thread, service):
    """A hand-driven thread of ``proc`` with a send area holding a parcel in parts."""
    sock = raw_thread
    body = [ITest.DESCRIPTOR, [bytes(PARTS_MIN)], {}]
    encoded = parcel.encode(body)
    mapping = give_send_area(sock, encoded.size)
    encoded.write_into(mapping)
    digest = next(m for m in ITest.METHODS if m.name == "digest").code
    start = protocol.encode(
        BC_TRANSACTION, service.binder.handle, digest, TF_PARTS, encoded.size, 0, 0, 0
    )
    yield sock, start, encoded.size
    mapping.close()


def test_a_sender_that_leaves_mid_parcel_leaves_no_buffer_behind(server, proc, raw_sender):
    sock, start, size = raw_sender
    baseline = region_in_use(proc, server.pid)
    sock.send(start + protocol.encode(BC_PARCEL_READY, size // 2))
    assert eventually(lambda: region_in_use(proc, server.pid) > baseline)  # the early copy
    sock.close()
    assert eventually(lambda: region_in_use(proc, server.pid) == baseline)


def test_a_target_that_dies_mid_parcel_gives_a_dead_reply(server, proc, raw_sender):
    sock, start, size = raw_sender
    sock.send(start + protocol.encode(BC_PARCEL_READY, size // 2))
    server.stop()
    assert eventually(lambda: all(p["pid"] != server.pid for p in proc.status()["processes"]))
    sock.send(protocol.encode(BC_PARCEL_READY, size))
    assert answer(sock)[0][0] == BR_DEAD_REPLY


@pytest.mark.parametrize(
    "commands",
    [
        lambda start, size: protocol.encode(BC_PARCEL_READY, size),  # no parcel in parts
        lambda start, size: start + protocol.encode(BC_PARCEL_READY, size + 1),  # past its end
        lambda start, size: (
            start
            + protocol.encode(BC_PARCEL_READY, size // 2)
            + protocol.encode(BC_PARCEL_READY, size // 4)
        ),  # backwards
    ],
    ids=["ready-without-parts", "past-the-end", "backwards"],
)
def test_parts_out_of_order_get_br_error_and_nothing_leaks(
    server, proc, service, raw_sender, commands
):
    sock, start, size = raw_sender
    baseline = region_in_use(proc, server.pid)
    sock.send(commands(start, size))
    assert BR_ERROR in [command[0] for command in answer(sock)]
    assert eventually(lambda: region_in_use(proc, server.pid) == baseline)
    assert service.add(1, 1) == 2


def test_a_large_reply_goes_in_parts_arrives_whole_and_is_copied_once(service, proc):
    size = PARTS_MIN + 3 * PART_SIZE + 123
    before = broker_counters(proc)
    assert service.blob(size) == pattern(size)
    after = broker_counters(proc)
    assert after["parcels_in_parts"] - before["parcels_in_parts"] == 1
    assert after["buffer_bytes_copied"] - before["buffer_bytes_copied"] == size


def test_an_argument_echoed_back_goes_in_parts_both_ways(cluster, server):
    data = os.urandom(PARTS_MIN + PART_SIZE)
    with pybinder.connect(cluster.socket, region_size=8 << 20) as caller:
        service = caller.get_service("test", ITest, timeout=10)
        before = broker_counters(caller)
        assert service.echo(data) == data  # the reply is a view of the request's buffer
        after = broker_counters(caller)
    assert after["parcels_in_parts"] - before["parcels_in_parts"] == 2
    assert after["buffer_bytes_copied"] - before["buffer_bytes_copied"] == 2 * len(data)


def test_a_reply_in_parts_too_large_for_the_caller_fails_and_the_next_call_works(cluster, server):
    with pybinder.connect(cluster.socket, region_size=2 << 20) as caller:
        service = caller.get_service("test", ITest, timeout=10)
        with pytest.raises(pybinder.TransactionTooLargeError):
            service.blob(PARTS_MIN + PART_SIZE)
        assert service.add(2, 3) == 5


def test_a_server_thread_that_leaves_mid_reply_gives_a_dead_reply(cluster, proc, raw_thread):
    """``proc`` serves "raw" on a hand-driven looper, which starts a reply in parts
    and leaves halfway: the caller gets a dead object, and its region is as before."""
    body = parcel.encode([REPLY_OK, bytes(PARTS_MIN)])
    mapping = give_send_area(raw_thread, body.size)
    body.write_into(mapping)
    proc.add_service("raw", peers.TestService())
    raw_thread.send(protocol.encode(BC_ENTER_LOOPER))
    caller = cluster.peer("caller", "raw", 8 << 20)
    caller_pid = int(caller.wait_ready().split()[1])
    assert any(command[0] == BR_TRANSACTION for command in answer(raw_thread))
    baseline = region_in_use(proc, caller_pid)
    start = protocol.encode(BC_REPLY, TF_PARTS, body.size, 0, 0)
    raw_thread.send(start + protocol.encode(BC_PARCEL_READY, body.size // 2))
    assert eventually(lambda: region_in_use(proc, caller_pid) > baseline)  # the early copy
    raw_thread.close()
    assert caller.readline() == "DeadObjectError"
    assert region_in_use(proc, caller_pid) == baseline
    mapping.close()


def test_a_reply_in_parts_without_a_call_to_answer_gets_br_error(raw_thread, service):
    raw_thread.send(protocol.encode(BC_REPLY, TF_PARTS, PARTS_MIN, 0, 0))
    assert answer(raw_thread)[0][0] == BR_ERROR
    assert service.add(1, 1) == 2  # the broker goes on


# -- parts written through a ring (TF_RING) ------------------------------------------


class RingSender:
    """A hand-driven thread of ``proc`` sending ``ITest.record(data)`` (oneway) in parts
    through a ring: ``whole`` is the parcel, ``area`` its send area (``extra`` bytes
    past the parcel, where the broker's progress word goes)."""

    def __init__(self, sock: socket.socket, handle: int, data: bytes, extra: int) -> None:
        encoded = parcel.encode([ITest.DESCRIPTOR, [data], {}])
        self.whole = bytearray(encoded.size)
        encoded.write_into(self.whole)
        self.sock = sock
        self.area = give_send_area(sock, encoded.size + extra)
        record = next(m for m in ITest.METHODS if m.name == "record").code
        flags = TF_ONE_WAY | TF_PARTS | TF_RING
        self.opening = protocol.encode(BC_TRANSACTION, handle, record, flags, encoded.size, 0, 0, 0)

    def progress(self) -> int:
        return PROGRESS.unpack_from(self.area, len(self.area) - PROGRESS.size)[0]

    def send_part(self, start: int, end: int, at: int) -> None:
        """Write bytes ``start:end`` of the parcel at ``at`` in the area and announce them."""
        self.area[at : at + end - start] = self.whole[start:end]
        opening, self.opening = self.opening, b""
        self.sock.send(opening + protocol.encode(BC_PARCEL_READY, end))


def test_a_sender_reuses_its_ring_as_the_broker_reports_and_every_byte_arrives(
    service, proc, raw_thread
):
    data = os.urandom(3 * PARTS_RING + 12345)
    sender = RingSender(raw_thread, service.binder.handle, data, PROGRESS.size)
    size, part = len(sender.whole), PARTS_RING // 4
    before = broker_counters(proc)
    for start in range(0, size, part):
        end = min(size, start + part)
        sender.send_part(start, end, start % PARTS_RING)  # over bytes the broker copied
        assert eventually(lambda end=end: sender.progress() == end)
    assert answer(raw_thread)[0][0] == BR_TRANSACTION_COMPLETE
    after = broker_counters(proc)
    assert after["parcels_in_parts"] - before["parcels_in_parts"] == 1
    assert after["buffer_bytes_copied"] - before["buffer_bytes_copied"] == len(data)
    # Complete means copied, not run, and only the raw thread's own later calls would
    # be ordered behind it: wait for the server to have run it.
    assert eventually(lambda: service.recorded()[-1:] == [data])
    sender.area.close()


def test_a_ring_without_room_for_the_progress_word_is_refused_and_the_parcel_goes_whole(
    service, raw_thread
):
    data = os.urandom(3 * PARTS_RING)
    sender = RingSender(raw_thread, service.binder.handle, data, 0)
    size = len(sender.whole)
    sender.send_part(0, PARTS_RING // 2, 0)
    assert eventually(lambda: sender.progress() == WRITE_WHOLE)
    sender.send_part(PARTS_RING // 2, size, PARTS_RING // 2)  # whole: no wrap
    assert answer(raw_thread)[0][0] == BR_TRANSACTION_COMPLETE
    assert eventually(lambda: service.recorded()[-1:] == [data])  # copied; then run
    sender.area.close()


def test_a_ring_to_a_target_without_room_is_refused_and_the_call_fails_when_complete(
    cluster, proc, raw_thread
):
    cluster.server(region_size=2 << 20)  # async space: 1 MiB
    service = proc.get_service("test", ITest, timeout=10)
    sender = RingSender(raw_thread, service.binder.handle, bytes(3 * PARTS_RING), PROGRESS.size)
    sender.send_part(0, PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == WRITE_WHOLE)
    sender.send_part(PARTS_RING, len(sender.whole), PARTS_RING)
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    assert service.add(2, 3) == 5
    sender.area.close()


def test_a_call_refused_a_ring_for_want_of_async_space_goes_whole_and_arrives(cluster, proc):
    cluster.server(region_size=8 << 20, threads=1)  # async space 4 MiB; two loopers
    service = proc.get_service("test", ITest, timeout=10)
    first, second = os.urandom(3 << 20), os.urandom(3 << 20)
    sleepers = [threading.Thread(target=service.sleep, args=(1.0,)) for _ in range(2)]
    for sleeper in sleepers:
        sleeper.start()
    time.sleep(0.3)  # every looper is busy now
    before = broker_counters(proc)
    service.record(first)  # its buffer waits in the async space for a looper
    service.record(second)  # only 1 MiB of async space is left: no early copy
    for sleeper in sleepers:
        sleeper.join(10)
    after = broker_counters(proc)
    assert after["parcels_in_parts"] - before["parcels_in_parts"] == 1  # the first only
    assert service.recorded()[-2:] == [first, second]


def test_a_ring_sender_that_errs_is_told_to_stop_waiting(service, raw_thread):
    sender = RingSender(raw_thread, service.binder.handle, bytes(3 * PARTS_RING), PROGRESS.size)
    sender.send_part(0, PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == PARTS_RING)
    raw_thread.send(protocol.encode(BC_PARCEL_READY, PARTS_RING // 2))  # backwards
    assert answer(raw_thread)[0][0] == BR_ERROR
    assert sender.progress() == WRITE_WHOLE
    assert service.add(1, 1) == 2
    sender.area.close()


def test_the_broker_reports_progress_past_a_target_that_died(server, service, raw_thread):
    sender = RingSender(raw_thread, service.binder.handle, bytes(3 * PARTS_RING), PROGRESS.size)
    sender.send_part(0, PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == PARTS_RING)
    server.stop()
    size = len(sender.whole)
    sender.send_part(PARTS_RING, 2 * PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == 2 * PARTS_RING)  # a sender never hangs
    sender.send_part(2 * PARTS_RING, size, 0)
    assert answer(raw_thread)[0][0] == BR_DEAD_REPLY
    sender.area.close()


def test_a_call_through_a_ring_whose_handle_is_released_midway_fails(proc, service, raw_thread):
    handle = service.binder.handle
    sender = RingSender(raw_thread, handle, bytes(3 * PARTS_RING), PROGRESS.size)
    sender.send_part(0, PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == PARTS_RING)
    raw_thread.send(protocol.encode(BC_RELEASE, handle, 1 << 30))  # every reference held
    sender.send_part(PARTS_RING, 2 * PARTS_RING, 0)
    assert eventually(lambda: sender.progress() == 2 * PARTS_RING)
    sender.send_part(2 * PARTS_RING, len(sender.whole), 0)
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    again = proc.get_service("test", ITest, timeout=10)
    assert again.binder.handle != handle and again.add(1, 1) == 2
    sender.area.close()


def test_a_call_waiting_for_ring_space_when_the_broker_dies_raises(cluster, service):
    broker = cluster.peers[0]
    warmed, stopped = threading.Event(), threading.Event()
    outcome: list[BaseException] = []

    def call() -> None:
        service.digest(bytes(PARTS_MIN))  # this thread's send area is large enough now
        warmed.set()
        stopped.wait(10)
        try:
            service.digest(bytes(PARTS_MIN))
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    assert warmed.wait(10)
    os.kill(broker.pid, signal.SIGSTOP)  # it copies nothing: the caller's ring fills
    stopped.set()
    time.sleep(0.3)
    assert caller.is_alive()
    broker.stop(signal.SIGKILL)
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], pybinder.BrokerUnavailableError)


def test_a_parcel_of_exactly_the_broker_limit_goes_in_parts(cluster, proc):
    """Its send area has no room for the progress word: it goes without the ring."""
    cluster.server(region_size=proc.max_parcel)
    service = proc.get_service("test", ITest, timeout=10)
    overhead = parcel.encode([ITest.DESCRIPTOR, [bytes(PARTS_MIN)], {}]).size - PARTS_MIN
    data = os.urandom(proc.max_parcel - overhead)
    before = broker_counters(proc)["parcels_in_parts"]
    assert service.digest(data)[1] == hashlib.sha256(data).hexdigest()
    assert broker_counters(proc)["parcels_in_parts"] == before + 1


def test_threads_sending_through_their_rings_at_once_each_arrive_whole(service, proc):
    """Each thread has its own send area and ring; the broker keeps their parts apart."""
    failures: list[BaseException] = []

    def send_three(seed: int) -> None:
        try:
            for i in range(3):
                data = bytes([seed]) * 1000 + os.urandom(PARTS_MIN + i * PART_SIZE + seed)
                assert service.digest(data)[1] == hashlib.sha256(data).hexdigest()
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=send_three, args=(seed,)) for seed in range(3)]
    before = broker_counters(proc)["parcels_in_parts"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures and not any(thread.is_alive() for thread in threads)
    assert broker_counters(proc)["parcels_in_parts"] - before == 9
