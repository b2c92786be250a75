"""Deadlines across real processes: a call into a stopped server gives up on time and
is cancelled in the broker, the deadline travels to the server and on to the calls
it makes, and an interrupted call leaves its thread usable."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import pytest
from peers import ICallback, ITest
from waiting import eventually

import pybinder


def region_in_use(proc: pybinder.ProcessState, pid: int) -> int:
    return int(next(p["region_in_use"] for p in proc.status()["processes"] if p["pid"] == pid))


@pytest.fixture
def served(cluster, proc):
    server = cluster.server()
    return server, proc.get_service("test", ITest, timeout=10)


def test_a_call_into_a_stopped_server_gives_up_on_time_and_its_late_reply_is_dropped(served, proc):
    server, service = served
    assert service.add(1, 1) == 2
    mine, theirs = region_in_use(proc, os.getpid()), region_in_use(proc, server.pid)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        expired = pytest.raises(pybinder.DeadlineExceededError, match=r"tests\.ITest\.add")
        with expired as caught, pybinder.deadline(0.5):
            service.add(20, 22)
        waited = time.monotonic() - started
        assert 0.5 <= waited < 1.5, waited
        assert isinstance(caught.value, TimeoutError)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    # The server now answers 42 to nobody: the broker drops it, and this thread's next
    # call gets its own answer.
    assert service.add(2, 3) == 5
    assert service.who()[0] == os.getpid()
    assert eventually(lambda: region_in_use(proc, os.getpid()) == mine)
    assert eventually(lambda: region_in_use(proc, server.pid) == theirs)


class Remaining(ICallback.Stub):
    """A second server: reports the time its caller's deadline leaves it."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_value(self, value: Any) -> Any:
        self.seen.append((pybinder.time_remaining(), pybinder.is_cancelled()))
        return value


def test_a_server_calling_a_second_server_passes_on_the_time_left(served):
    _, service = served
    second = Remaining()
    with pybinder.deadline(5.0):
        assert service.call_back(second, "hi") == "hi"  # the server calls `second`
    ((remaining, cancelled),) = second.seen
    assert remaining is not None and 3.0 < remaining < 5.0
    assert cancelled is False
    assert service.call_back(second, "again") == "again"  # no deadline: none passed on
    assert second.seen[1] == (None, False)


def test_nested_deadlines_keep_the_earlier_and_a_timeout_view_bounds_each_call(served):
    _, service = served
    expired = pytest.raises(pybinder.DeadlineExceededError)
    with expired, pybinder.deadline(0.3), pybinder.deadline(30):
        service.sleep(2)
    with pytest.raises(pybinder.DeadlineExceededError, match=r"tests\.ITest\.sleep"):
        service.with_timeout(0.3).sleep(2)
    assert service.with_timeout(5).add(1, 2) == 3


def test_a_process_default_call_timeout_bounds_calls(cluster, served):
    with pybinder.connect(cluster.socket, call_timeout=0.3) as bounded:
        service = bounded.get_service("test", ITest, timeout=10)
        with pytest.raises(pybinder.DeadlineExceededError):
            service.sleep(2)
        assert service.add(2, 2) == 4
    with pytest.raises(ValueError):
        pybinder.connect(cluster.socket, call_timeout=0)


def test_a_keyboard_interrupt_during_a_call_leaves_the_thread_able_to_call(served):
    _, service = served
    main = threading.main_thread().ident
    assert threading.get_ident() == main
    assert main is not None
    # A shell starts a background job with SIGINT ignored, and Python then keeps it so.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            service.sleep(2)
    finally:
        timer.join(5)
        signal.signal(signal.SIGINT, previous)
    assert service.add(40, 2) == 42  # its own answer, not the abandoned sleep's
    assert service.sleep(0) > 0


def test_a_oneway_call_waiting_for_room_gives_up_at_its_deadline_and_is_never_delivered(
    cluster, proc
):
    cluster.server(region_size=1 << 20)  # 512 KiB of async space
    service = proc.get_service("test", ITest, timeout=10)
    service.record_slowly("slow", 1.5)  # holds the node's oneway lane
    service.record(b"a" * (200 << 10))  # queued behind it: 400 KiB held
    service.record(b"b" * (200 << 10))
    started = time.monotonic()
    with pytest.raises(pybinder.DeadlineExceededError, match="copied"), pybinder.deadline(0.4):
        service.record(b"c" * (200 << 10))  # no room until the slow call ends
    assert 0.35 < time.monotonic() - started < 1.3
    assert service.add(1, 2) == 3  # the thread is usable: behind the lane, after 1.5 s
    recorded = service.recorded()
    assert [bytes(value[:1]) if isinstance(value, bytes) else value for value in recorded] == [
        "slow",
        b"a",
        b"b",
    ]
    with pybinder.deadline(5):
        service.record(b"d" * (200 << 10))  # within its deadline: copied
    assert bytes(service.recorded()[-1][:1]) == b"d"


def test_a_get_service_given_up_at_its_deadline_leaves_no_answer_for_the_next_call(proc):
    started = time.monotonic()
    with pytest.raises(pybinder.DeadlineExceededError), pybinder.deadline(0.2):
        proc.get_service("never", timeout=0.5)  # waits in the broker, with a timer
    assert time.monotonic() - started < 0.45
    time.sleep(0.5)  # past the broker's timer: a wait it still held would answer now
    assert proc.list_services() == []  # its own answer, not the given-up wait's
    status = proc.status()
    me = next(p for p in status["processes"] if p["pid"] == os.getpid())
    assert me["pending"] == []
