"""Large parcels sent in parts (TF_PARTS), calls and replies alike: the broker copies
each part while the sender writes the next, the payload still arrives whole and is
copied once, and a sender or target that goes away mid-parcel leaves nothing behind."""

from __future__ import annotations

import hashlib
import os
import socket
import time

import peers
import pytest
from peers import ITest, pattern
from raw import answer

import pybinder
from pybinder import parcel, protocol
from pybinder.protocol import (
    BC_ENTER_LOOPER,
    BC_PARCEL_READY,
    BC_REPLY,
    BC_SET_SEND_AREA,
    BC_TRANSACTION,
    BR_DEAD_REPLY,
    BR_ERROR,
    BR_OK,
    BR_TRANSACTION,
    REPLY_OK,
    TF_PARTS,
)
from pybinder.region import create_send_area
from pybinder.runtime.thread_state import PART_SIZE, PARTS_MIN


def broker_counters(proc) -> dict:
    return proc.status()["broker"]


def region_in_use(proc, pid: int) -> int:
    for entry in proc.status()["processes"]:
        if entry["pid"] == pid:
            return entry["region_in_use"]
    raise LookupError(pid)


def eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


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
    fd, mapping = create_send_area(encoded.size)
    socket.send_fds(sock, [protocol.encode(BC_SET_SEND_AREA, encoded.size, 0)], [fd])
    os.close(fd)
    assert answer(sock)[0][0] == BR_OK
    encoded.write_into(mapping)
    digest = next(m for m in ITest.METHODS if m.name == "digest").code
    start = protocol.encode(
        BC_TRANSACTION, service.binder.handle, digest, TF_PARTS, encoded.size, 0, 0
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
    fd, mapping = create_send_area(body.size)
    socket.send_fds(raw_thread, [protocol.encode(BC_SET_SEND_AREA, body.size, 0)], [fd])
    os.close(fd)
    assert answer(raw_thread)[0][0] == BR_OK
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
