"""Binder objects in parcels: stubs become proxies and come back as themselves,
callbacks reach a single-threaded caller, and dropped proxies release their nodes."""

from __future__ import annotations

import gc
import os
import threading
import time

import msgpack
import pytest
from peers import ICallback, ITest
from raw import answer, give_send_area

import pybinder
from pybinder import parcel, protocol


class Callback(ICallback.Stub):
    def __init__(self) -> None:
        self.threads: list[int] = []

    def on_value(self, value):
        self.threads.append(threading.get_ident())
        return ["called back", value, pybinder.get_calling_pid()]


@pytest.fixture
def service(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    service.server_pid = server.pid
    return service


def test_callback_reaches_a_single_threaded_caller_on_its_waiting_thread(service):
    callback = Callback()
    result = service.call_back(callback, 42)
    assert result == ["called back", 42, service.server_pid]
    assert callback.threads == [threading.get_ident()]


def test_a_local_object_sent_away_comes_back_as_itself(service):
    callback = Callback()
    assert service.echo(callback) is callback
    assert service.echo({"cb": [callback]})["cb"][0] is callback


def test_a_proxy_sent_to_its_owner_comes_back_as_the_same_proxy(service):
    back = service.echo(service.binder)  # typed: it arrives as an ITest.Proxy
    assert isinstance(back, ITest.Proxy) and back.binder is service.binder and back == service


def test_as_interface_wraps_proxies_and_returns_local_objects():
    callback = Callback()
    assert ICallback.as_interface(callback) is callback
    with pytest.raises(TypeError):
        ICallback.as_interface("not a binder")


def test_dropped_remote_references_release_the_node(service, proc):
    callback = Callback()
    service.call_back(callback, 1)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        gc.collect()
        service.add(0, 0)  # lets both sides flush queued releases
        if not proc._nodes:
            break
        time.sleep(0.05)
    assert proc._nodes == {}, "the server's proxy to our callback was never released"


def test_dropping_a_proxy_releases_our_handle(cluster, proc):
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    assert service.add(1, 1) == 2

    def our_refs() -> int:
        mine = [p for p in proc.status()["processes"] if p["region_size"] == proc.region_size]
        return mine[0]["refs_count"]

    assert our_refs() == 1
    del service
    gc.collect()
    proc.list_services()  # the next message carries the release
    assert our_refs() == 0


def test_handles_of_a_second_service_are_distinct(cluster, proc):
    cluster.server()
    from peers import TestService

    with pybinder.connect(cluster.socket) as other:
        other.add_service("second", TestService())
        other.start_thread_pool(1)
        first = proc.get_service("test", ITest, timeout=10)
        second = proc.get_service("second", ITest, timeout=10)
        assert first.binder.handle != second.binder.handle
        assert first.who() == second.who() == [os.getpid(), os.getuid(), os.getgid()]


def refs_of(proc: pybinder.ProcessState, pid: int) -> int:
    return next(p["refs_count"] for p in proc.status()["processes"] if p["pid"] == pid)


def test_handles_a_parcel_delivers_but_never_names_are_released(service, proc, raw_thread):
    """A sender may list objects its body never names; each still became a handle in
    the receiver, which must release it, or a hostile client fills its handle table."""
    baseline = refs_of(proc, service.server_pid)
    body = msgpack.packb([ITest.DESCRIPTOR, ["x"], {}])
    entries = [(parcel.OBJ_NODE, 1000 + i, 0) for i in range(20)]  # this process's "objects"
    encoded = parcel.EncodedParcel(body, entries, [])
    area = give_send_area(raw_thread, encoded.size)
    encoded.write_into(area)
    echo = next(m for m in ITest.METHODS if m.name == "echo").code
    raw_thread.send(
        protocol.encode(
            protocol.BC_TRANSACTION, service.binder.handle, echo, 0, encoded.size, 0, 0, 0
        )
    )
    reply = answer(raw_thread)[-1]
    assert reply[0] == protocol.BR_REPLY
    raw_thread.send(protocol.encode(protocol.BC_FREE_BUFFER, reply[1]))
    service.echo("flush")  # the server sends its releases after its next message
    deadline = time.monotonic() + 10
    while refs_of(proc, service.server_pid) > baseline and time.monotonic() < deadline:
        service.echo("flush")
        time.sleep(0.05)
    assert refs_of(proc, service.server_pid) == baseline
    area.close()
