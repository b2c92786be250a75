"""Calls between real processes through a real broker: values, payloads, errors,
oneway ordering, concurrency and many clients."""

from __future__ import annotations

import hashlib
import os
import threading
import time

import pytest
from peers import ITest, pattern

import pybinder
from pybinder.runtime.thread_state import MIN_SPIN


@pytest.fixture
def service(cluster, proc):
    cluster.server(region_size=32 << 20)
    return proc.get_service("test", ITest, timeout=10)


def test_nested_values_round_trip(service):
    value = {
        "none": None,
        "flags": [True, False],
        "int": -(2**62),
        "float": 3.25,
        "text": "grüße 🚀",
        "bytes": b"\x00\x01\xff",
        "nested": {"list": [1, [2, [3, {"deep": "yes"}]]], 7: "int key"},
    }
    assert service.echo(value) == value


def test_tuples_arrive_as_tuples_and_lists_as_lists(service):
    assert service.echo((1, (2, 3), [4])) == (1, (2, 3), [4])


def test_8_mib_payload_keeps_its_sha256_both_ways(service):
    payload = os.urandom(8 << 20)
    kind, remote_sha, _, _ = service.digest(payload)
    assert kind == "memoryview"
    assert remote_sha == hashlib.sha256(payload).hexdigest()
    returned = service.blob(8 << 20)
    assert hashlib.sha256(returned).hexdigest() == hashlib.sha256(pattern(8 << 20)).hexdigest()


def test_1_mib_argument_arrives_as_read_only_memoryview(service):
    kind, _, readonly, write_error = service.digest(bytearray(1 << 20))
    assert (kind, readonly, write_error) == ("memoryview", True, "TypeError")


def test_small_bytes_arrive_as_bytes(service):
    kind, remote_sha, _, _ = service.digest(b"x" * 100)
    assert kind == "bytes"
    assert remote_sha == hashlib.sha256(b"x" * 100).hexdigest()


def test_buffer_protocol_objects_travel_out_of_band(service):
    import array

    data = array.array("d", range(4096))
    kind, remote_sha, _, _ = service.digest(data)
    assert kind == "memoryview"
    assert remote_sha == hashlib.sha256(data.tobytes()).hexdigest()


def test_calling_pid_and_uid_are_the_callers(service):
    assert service.who() == [os.getpid(), os.getuid(), os.getgid()]


def test_calling_identity_outside_a_call_is_our_own():
    assert pybinder.get_calling_pid() == os.getpid()
    assert pybinder.get_calling_uid() == os.getuid()


def test_1000_oneway_calls_arrive_in_order(service):
    for i in range(1000):
        assert service.record(i) is None
    assert service.recorded() == list(range(1000))


def test_remote_value_error_is_a_value_error_with_the_remote_traceback(service):
    with pytest.raises(ValueError, match="bad input") as info:
        service.fail("ValueError", "bad input")
    remote = info.value.remote_traceback
    assert "Traceback" in remote and "in fail" in remote and "ValueError: bad input" in remote


def test_remote_custom_error_is_a_remote_error_naming_its_type(service):
    with pytest.raises(pybinder.RemoteError) as info:
        service.fail("custom", "it broke")
    assert info.value.remote_type.endswith("CustomError")
    assert "it broke" in str(info.value)
    assert "CustomError" in info.value.remote_traceback


def test_too_large_parcel_raises_and_the_next_call_works(cluster, proc):
    cluster.server(region_size=1 << 20)
    service = proc.get_service("test", ITest, timeout=10)
    with pytest.raises(pybinder.TransactionTooLargeError) as info:
        service.digest(bytes(2 << 20))
    error = info.value
    assert error.size > 2 << 20 and 0 < error.limit <= 1 << 20
    assert str(error.size) in str(error) and str(error.limit) in str(error)
    assert service.add(2, 3) == 5


def test_too_large_reply_raises_and_the_next_call_works(cluster, socket_dir):
    cluster.server(region_size=32 << 20)
    with pybinder.connect(cluster.socket, region_size=1 << 20) as small:
        service = small.get_service("test", ITest, timeout=10)
        with pytest.raises(pybinder.TransactionTooLargeError):
            service.blob(4 << 20)
        assert service.add(1, 1) == 2


def test_oneway_larger_than_async_space_is_too_large(cluster, proc):
    cluster.server(region_size=1 << 20)
    service = proc.get_service("test", ITest, timeout=10)
    with pytest.raises(pybinder.TransactionTooLargeError):
        service.record(bytes(600 << 10))
    assert service.add(1, 2) == 3


def test_oneway_backpressure_waits_for_space_instead_of_failing(cluster, proc):
    cluster.server(region_size=1 << 20)
    service = proc.get_service("test", ITest, timeout=10)
    for i in range(40):  # 40 x 200 KiB through 512 KiB of async space
        service.record(bytes([i]) * (200 << 10))
    recorded = service.recorded()
    assert [bytes(r[:1])[0] for r in recorded] == list(range(40))


def test_thread_pool_of_four_runs_four_calls_at_once(service):
    results: list[float] = []

    def call() -> None:
        started = time.monotonic()
        service.sleep(1.0)
        results.append(time.monotonic() - started)

    started = time.monotonic()
    callers = [threading.Thread(target=call) for _ in range(4)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(10)
    elapsed = time.monotonic() - started
    assert len(results) == 4
    assert elapsed < 2.0, f"4 one-second calls on 4 loopers took {elapsed:.2f} s"


def test_six_client_processes_make_300_calls_each(cluster):
    cluster.server()
    clients = [cluster.peer("hammer", 300) for _ in range(6)]
    for client in clients:
        client.wait_ready()
    for client in clients:
        assert client.readline(timeout=60) == "right 300"


def test_many_threads_of_one_process_share_a_server(service):
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(100):
                assert service.add(i, offset) == i + offset
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []


def test_in_place_view_is_released_when_the_method_returns(service):
    service.keep(bytes(64 << 10))
    assert service.read_kept() == "ValueError"


def test_unsendable_argument_is_a_type_error_before_sending(service):
    with pytest.raises(TypeError, match="cannot send"):
        service.echo(object())
    assert service.add(1, 1) == 2


def test_unsendable_result_is_a_type_error_and_the_server_goes_on(service):
    with pytest.raises(TypeError, match="cannot send"):
        service.unsendable()
    assert service.add(1, 1) == 2


def test_parcel_over_the_broker_limit_is_refused_before_sending(service):
    with pytest.raises(pybinder.TransactionTooLargeError, match="limit") as info:
        service.digest(bytes(65 << 20))  # the test broker caps regions at 64 MiB
    assert info.value.limit == 64 << 20
    assert service.add(1, 2) == 3


def test_a_caller_spins_only_briefly_while_replies_are_slow(cluster):
    cluster.server()
    with pybinder.connect(cluster.socket, spin_us=5_000) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        thread = proc.thread_state()
        for _ in range(4):
            service.sleep(0.008)
        assert thread._spin == 0.005  # 8 ms replies, over the limit: the whole limit
        for _ in range(12):
            service.sleep(0.03)
        assert thread._spin == MIN_SPIN  # 30 ms, over 4x the limit: only the short poll
        for _ in range(60):
            service.add(1, 1)
        assert MIN_SPIN < thread._spin <= 0.005  # fast again: longer, within the limit
