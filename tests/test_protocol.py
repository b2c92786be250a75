"""Bad input gets a clear error and loses nothing: malformed frames, forged buffers,
unsealed send areas, bad parcels, wrong interfaces and unknown methods."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
from peers import ITest
from raw import answer, give_send_area, raw_connection

import pybinder
from pybinder import protocol
from pybinder.protocol import (
    BC_FREE_BUFFER,
    BC_HELLO_THREAD,
    BC_SET_SEND_AREA,
    BC_TRANSACTION,
    BR_ERROR,
    BR_FAILED_REPLY,
)
from pybinder.region import create_send_area


@pytest.mark.parametrize(
    "garbage",
    [b"\x01\x02\x03", b"\xff" * 8, protocol.encode(BC_HELLO_THREAD, 1, 5)[:-1], b"A" * 5000],
    ids=["short", "unknown-command", "truncated", "oversized"],
)
def test_malformed_frames_get_br_error_and_the_broker_goes_on(cluster, proc, garbage):
    cluster.server()
    sock = raw_connection(cluster.socket)
    sock.send(garbage)
    assert answer(sock)[0][0] == BR_ERROR
    sock.close()
    assert proc.get_service("test", ITest, timeout=10).add(2, 2) == 4


def test_a_thread_cannot_join_another_process(cluster, proc):
    script = textwrap.dedent(
        f"""
        import socket
        from pybinder import protocol
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(10)
        sock.connect({cluster.socket!r})
        sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, {proc.key}))
        print(list(protocol.decode(sock.recv(4096)))[0][0])
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert int(child.stdout) == BR_ERROR, child.stderr


def test_freeing_a_buffer_that_is_not_ours_is_refused(raw_thread, proc):
    raw_thread.send(protocol.encode(BC_FREE_BUFFER, 4096))
    assert answer(raw_thread)[0][0] == BR_ERROR
    assert proc.list_services() == []


def test_a_send_area_must_be_a_sealed_memfd(raw_thread):
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 65536)
    try:
        socket.send_fds(
            raw_thread, [protocol.encode(BC_SET_SEND_AREA, 65536, protocol.SEND_AREA)], [fd]
        )
    finally:
        os.close(fd)
    assert answer(raw_thread)[0][0] == BR_ERROR


def test_a_send_area_cannot_claim_more_than_it_holds(raw_thread):
    fd, mapping = create_send_area(65536)
    try:
        socket.send_fds(
            raw_thread, [protocol.encode(BC_SET_SEND_AREA, 1 << 20, protocol.SEND_AREA)], [fd]
        )
    finally:
        os.close(fd)
        mapping.close()
    assert answer(raw_thread)[0][0] == BR_ERROR


def test_transactions_are_checked_against_send_area_and_parcel(cluster, raw_thread, proc):
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    handle = service.binder.handle
    mapping = give_send_area(raw_thread, 65536)

    raw_thread.send(
        protocol.encode(BC_TRANSACTION, handle, 1, 0, 1 << 20, 0, 0, 0)
    )  # past the area
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    raw_thread.send(
        protocol.encode(BC_TRANSACTION, 999, 1, 0, 64, 0, 0, 0)
    )  # a handle we never got
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    mapping[:64] = b"NOT A PARCEL".ljust(64, b"\0")
    raw_thread.send(protocol.encode(BC_TRANSACTION, handle, 1, 0, 64, 0, 0, 0))  # bad magic
    failed = answer(raw_thread)[0]
    assert failed[0] == BR_FAILED_REPLY and failed[1] == 7  # ProtocolError
    raw_thread.send(protocol.encode(BC_TRANSACTION, handle, 1, 0, 4096, 0, 1024, 0))  # no loan area
    assert answer(raw_thread)[0][0] == BR_FAILED_REPLY
    mapping.close()
    assert service.add(20, 22) == 42


class IWrong(pybinder.Interface):
    DESCRIPTOR = "tests.IWrong"

    @pybinder.method
    def echo(self, value): ...


class IExtended(ITest):
    """ITest as a newer client knows it: one more method the server lacks."""

    DESCRIPTOR = ITest.DESCRIPTOR

    @pybinder.method
    def not_there(self): ...


def test_a_mismatched_interface_is_refused_not_misrouted(cluster, proc):
    cluster.server()
    with pytest.raises(pybinder.InterfaceMismatchError, match=r"tests\.IWrong"):
        proc.get_service("test", IWrong, timeout=10)  # checked once, at the lookup
    wrong = IWrong.as_interface(proc.get_service("test", timeout=10))  # unchecked
    with pytest.raises(pybinder.InterfaceMismatchError, match=r"tests\.IWrong"):
        wrong.echo("hello")  # the Stub checks every call (enforceInterface)


def test_an_unknown_method_is_unknown_transaction(cluster, proc):
    cluster.server()
    extended = proc.get_service("test", IExtended, timeout=10)
    assert extended.add(1, 2) == 3
    with pytest.raises(pybinder.UnknownTransactionError):
        extended.not_there()


def test_method_codes_follow_declaration_order():
    assert [(m.name, m.code, m.oneway) for m in ITest.METHODS[:5]] == [
        ("echo", 1, False),
        ("digest", 2, False),
        ("blob", 3, False),
        ("who", 4, False),
        ("record", 5, True),
    ]


def test_service_manager_codes_match_the_broker():
    from pybinder.runtime.service_manager import IServiceManager

    codes = {m.name: m.code for m in IServiceManager.METHODS}
    assert codes == {
        "check_service": protocol.SM_CHECK_SERVICE,
        "wait_for_service": protocol.SM_WAIT_FOR_SERVICE,
        "add_service": protocol.SM_ADD_SERVICE,
        "list_services": protocol.SM_LIST_SERVICES,
        "status": protocol.SM_STATUS,
        "register_for_notifications": protocol.SM_REGISTER_FOR_NOTIFICATIONS,
        "unregister_for_notifications": protocol.SM_UNREGISTER_FOR_NOTIFICATIONS,
    }


def test_bad_service_names_are_value_errors(proc):
    from peers import TestService

    with pytest.raises(ValueError):
        proc.add_service("", TestService())
    with pytest.raises(ValueError):
        proc.check_service("x" * 300)
