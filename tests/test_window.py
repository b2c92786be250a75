"""Oneway calls in a window (TF_WINDOW): a sender goes on before the broker has copied
its oneway call, the broker acknowledges it in the send area's settle words instead of
a message, and hands the calls queued for a receiver over in batches. Calls keep their
order, a failure is raised by the thread's next call, and nothing in flight is lost
when a process closes."""

from __future__ import annotations

import os
import signal
import time

import pytest
from peers import ITest
from raw import answer, give_send_area
from waiting import eventually

import pybinder
from pybinder import parcel, protocol
from pybinder.protocol import (
    BC_TRANSACTION,
    BR_DEAD_REPLY,
    BR_ERROR,
    BR_FAILED_REPLY,
    END_WORDS,
    FAILED_WORD,
    SETTLED_WORD,
    TF_ONE_WAY,
    TF_WINDOW,
)

SLOW_S = 0.01  # seconds the server spends on each slow call


def code_of(name: str) -> int:
    return next(m for m in ITest.METHODS if m.name == name).code


def test_oneway_calls_queued_behind_a_slow_one_reach_the_server_in_batches_in_order(cluster, proc):
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    before = proc.status()["broker"]["oneway_batched"]
    started = time.monotonic()
    for i in range(60):
        service.record_slowly(i, SLOW_S)
    sent_in = time.monotonic() - started
    assert service.recorded() == list(range(60))
    # The calls returned before the server ran them (60 x 5 ms = 0.3 s of its time)...
    assert sent_in < 60 * SLOW_S / 2, f"60 windowed calls took {sent_in:.3f} s to send"
    # ...and those queued meanwhile went to its looper several at a time.
    assert proc.status()["broker"]["oneway_batched"] - before >= 30


def test_a_failed_windowed_call_is_raised_once_by_the_threads_next_call(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    server.stop(signal.SIGKILL)
    assert eventually(lambda: proc.list_services() == [])
    assert service.record(1) is None  # in the window: the broker has not answered yet
    # the next call on this thread raises it, naming the target
    with pytest.raises(pybinder.DeadObjectError, match=r"earlier oneway call to tests\.ITest"):
        proc.list_services()
    assert proc.list_services() == []  # once: the thread goes on


def test_flush_oneway_raises_a_windowed_calls_failure(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    server.stop(signal.SIGKILL)
    assert eventually(lambda: proc.list_services() == [])
    service.record(1)
    with pytest.raises(pybinder.DeadObjectError):
        proc.flush_oneway()
    proc.flush_oneway()  # nothing left to raise


def test_without_a_window_a_oneway_call_raises_its_own_failure(cluster):
    server = cluster.server()
    with pybinder.connect(cluster.socket, oneway_window=1) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        server.stop(signal.SIGKILL)
        assert eventually(lambda: proc.list_services() == [])
        with pytest.raises(pybinder.DeadObjectError):
            service.record(1)


def test_closing_a_process_lets_its_windowed_calls_reach_the_server(cluster, proc):
    cluster.server()
    with pybinder.connect(cluster.socket) as sender:
        service = sender.get_service("test", ITest, timeout=10)
        for i in range(30):
            service.record_slowly(i, SLOW_S / 5)
    # close() returned; the calls still queued in the broker then run in order.
    reader = proc.get_service("test", ITest, timeout=10)
    assert eventually(lambda: len(reader.recorded()) == 30)
    assert reader.recorded() == list(range(30))


def test_windowed_calls_of_several_sizes_keep_their_bytes_and_order(cluster, proc):
    cluster.server(region_size=1 << 20)  # 512 KiB of async space: the window waits
    service = proc.get_service("test", ITest, timeout=10)
    sizes = [64, 5000, 200 << 10, 70 << 10, 1, 150 << 10, 4096, 250 << 10] * 4
    payloads = [os.urandom(size) for size in sizes]
    for payload in payloads:
        service.record(payload)
    assert service.recorded() == payloads


def test_the_broker_settles_a_windowed_call_in_the_send_area_and_sends_nothing(
    cluster, proc, raw_thread
):
    """The protocol by hand: TF_WINDOW calls are counted in the settle words, and a
    failed one is answered as usual and counted as failed too."""
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)  # holds the handle
    handle = service.binder.handle
    encoded = parcel.encode([ITest.DESCRIPTOR, ["hello"], {}])
    area = give_send_area(raw_thread, 65536)
    words = memoryview(area)[len(area) - END_WORDS * 8 :].cast("q")
    encoded.write_into(memoryview(area)[4096:])
    flags = TF_ONE_WAY | TF_WINDOW
    record = code_of("record")
    raw_thread.send(
        protocol.encode(BC_TRANSACTION, handle, record, flags, encoded.size, 0, 0, 4096)
    )
    assert eventually(lambda: words[SETTLED_WORD] == 1)
    assert words[FAILED_WORD] == 0
    raw_thread.settimeout(0.2)
    with pytest.raises(TimeoutError):
        raw_thread.recv(4096)  # no BR_TRANSACTION_COMPLETE
    raw_thread.settimeout(10)

    raw_thread.send(protocol.encode(BC_TRANSACTION, 999, record, flags, encoded.size, 0, 0, 4096))
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    # The failure is sent first, then counted: a sender that sees the count finds it.
    assert eventually(lambda: words[SETTLED_WORD] == 2)
    assert words[FAILED_WORD] == 1
    words.release()
    area.close()
    assert service.recorded() == ["hello"]


def test_a_windowed_call_to_a_dead_node_is_settled_failed(cluster, proc, raw_thread):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)  # holds the handle
    handle = service.binder.handle
    server.stop(signal.SIGKILL)
    assert eventually(lambda: proc.list_services() == [])
    encoded = parcel.encode([ITest.DESCRIPTOR, [1], {}])
    area = give_send_area(raw_thread, 65536)
    words = memoryview(area)[len(area) - END_WORDS * 8 :].cast("q")
    encoded.write_into(area)
    flags = TF_ONE_WAY | TF_WINDOW
    raw_thread.send(
        protocol.encode(BC_TRANSACTION, handle, code_of("record"), flags, encoded.size, 0, 0, 0)
    )
    assert answer(raw_thread)[0][0] == BR_DEAD_REPLY
    assert eventually(lambda: words[SETTLED_WORD] == 1)
    assert words[FAILED_WORD] == 1
    words.release()
    area.close()


def test_a_windowed_call_larger_than_the_async_space_fails_on_the_next_call(cluster, proc):
    cluster.server(region_size=256 << 10)  # 128 KiB of async space
    service = proc.get_service("test", ITest, timeout=10)
    service.record(bytes(200 << 10))  # fits the window (at most 256 KiB), not the space
    with pytest.raises(
        pybinder.TransactionTooLargeError, match=r"earlier oneway call to tests\.ITest in pid"
    ):
        service.add(1, 2)
    assert service.add(1, 2) == 3
    service.record(b"small")
    assert service.recorded() == [b"small"]


def test_a_sender_killed_with_calls_in_flight_loses_at_most_its_tail(cluster, proc):
    cluster.server()
    streamer = cluster.peer("streamer", 40, SLOW_S)
    streamer.wait_ready("sent")
    streamer.stop(signal.SIGKILL)
    service = proc.get_service("test", ITest, timeout=10)
    assert service.add(2, 3) == 5  # the broker and the server go on

    def settled() -> bool:
        before = len(service.recorded())
        time.sleep(5 * SLOW_S)
        return len(service.recorded()) == before

    assert eventually(settled)
    recorded = service.recorded()
    # What the broker had copied runs, in order and without gaps.
    assert recorded == list(range(len(recorded))) and recorded


def test_a_thread_behind_a_call_waiting_for_room_may_queue_64_commands(cluster, proc, raw_thread):
    """The broker holds a thread's commands behind its oneway call that waits for room
    in the receiver, runs them in order once there is room, and refuses the 65th."""
    cluster.server(region_size=64 << 10)  # about 32 KiB of async space
    service = proc.get_service("test", ITest, timeout=10)  # holds the handle
    handle = service.binder.handle
    area = give_send_area(raw_thread, 1 << 20)
    words = memoryview(area)[len(area) - END_WORDS * 8 :].cast("q")
    flags = TF_ONE_WAY | TF_WINDOW

    def windowed(at: int, name: str, *args: object) -> bytes:
        encoded = parcel.encode([ITest.DESCRIPTOR, list(args), {}])
        encoded.write_into(memoryview(area)[at:])
        return protocol.encode(BC_TRANSACTION, handle, code_of(name), flags, encoded.size, 0, 0, at)

    raw_thread.send(windowed(0, "record_slowly", bytes(20 << 10), 1.0))  # holds 20 KiB
    raw_thread.send(windowed(32 << 10, "record", bytes(20 << 10)))  # must wait for room
    for i in range(65):
        raw_thread.send(windowed((64 << 10) + i * 1024, "record", i))
    reply = answer(raw_thread)[0]  # the 65th held command
    assert reply[0] == BR_ERROR
    assert eventually(lambda: words[SETTLED_WORD] == 66)  # then the rest, in order
    assert words[FAILED_WORD] == 0
    # Settled means copied, not run; and this thread's call is not ordered behind the
    # raw thread's oneway calls (only a thread's own are), so wait for the last one.
    expected = [bytes(20 << 10), bytes(20 << 10), *range(64)]
    assert eventually(lambda: len(service.recorded()) == len(expected))
    assert service.recorded() == expected
    words.release()
    area.close()


def test_a_release_behind_a_call_waiting_for_room_waits_with_it(cluster, proc, raw_thread):
    """A thread's BC_RELEASE of a handle that its held windowed call names runs after
    that call is copied, as binder's driver runs a thread's commands in order: the
    handle is still there when the call is translated, and gone afterwards."""
    cluster.server(region_size=64 << 10)  # about 32 KiB of async space
    service = proc.get_service("test", ITest, timeout=10)
    handle = service.binder.handle
    deliveries = service.binder._deliveries[0]
    area = give_send_area(raw_thread, 1 << 20)
    words = memoryview(area)[len(area) - END_WORDS * 8 :].cast("q")
    flags = TF_ONE_WAY | TF_WINDOW

    def windowed(at: int, name: str, *args: object) -> bytes:
        encoded = parcel.encode([ITest.DESCRIPTOR, list(args), {}], proc.encode_object)
        encoded.write_into(memoryview(area)[at:])
        return protocol.encode(BC_TRANSACTION, handle, code_of(name), flags, encoded.size, 0, 0, at)

    raw_thread.send(windowed(0, "record_slowly", bytes(20 << 10), 0.5))  # holds 20 KiB
    raw_thread.send(windowed(32 << 10, "record", bytes(20 << 10)))  # must wait for room
    raw_thread.send(windowed(64 << 10, "record", service.binder))  # names the handle
    raw_thread.send(protocol.encode(protocol.BC_RELEASE, handle, deliveries))
    assert eventually(lambda: words[SETTLED_WORD] == 3)
    assert words[FAILED_WORD] == 0  # the third call found its handle
    with pybinder.connect(cluster.socket) as other:
        recorded = other.get_service("test", ITest, timeout=10).recorded
        assert eventually(lambda: len(recorded()) == 3)
        assert isinstance(recorded()[2], ITest.Proxy)  # the service itself
    with pytest.raises(pybinder.BinderError):  # and then this process's handle went
        service.recorded()
    words.release()
    area.close()
