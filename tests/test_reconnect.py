"""Reconnecting (issue 17, item 3): ``connect(reconnect=True)`` and ``pybinder.serve``
outlive a broker that is killed and started again on the same socket.

Real processes: the broker, a ``serve()``d server (tests/model_peers.py ``serve``),
this test process as a client with reconnect, and a plain client that looks the
service up on the new broker.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from model_peers import IEcho
from peers import calc_interface, start_calc
from waiting import eventually

import pybinder
import pybinder.aio
from pybinder.errors import (
    BrokerUnavailableError,
    DeadlineExceededError,
    DeadObjectError,
    InterfaceMismatchError,
    ProxyClosedError,
)

MODEL_PEERS = Path(__file__).with_name("model_peers.py")
pytestmark = pytest.mark.timeout(90)


def start_model_peer(cluster, role, name):
    peer = cluster.spawn([sys.executable, str(MODEL_PEERS), role, cluster.socket, name])
    peer.wait_ready()
    return peer


def test_a_served_server_and_a_reconnecting_client_outlive_a_broker_restart(cluster):
    server = start_model_peer(cluster, "serve", "echo")
    looper = start_model_peer(cluster, "join", "joined")  # join_thread_pool() only
    old_broker = cluster.peers[0]
    with pybinder.connect(cluster.socket, reconnect=True) as proc:
        echo = proc.get_service("echo", IEcho)
        assert echo.echo(1) == ["echo", server.pid, 1]
        joined = proc.get_service("joined", IEcho)
        assert joined.echo(1) == ["joined", looper.pid, 1]
        closed = proc.get_service("echo.b", IEcho)
        closed.close()
        deaths: list[object] = []
        died = threading.Event()
        echo.link_to_death(lambda who: (deaths.append(who), died.set()))
        reconnected = threading.Event()
        proc.on_reconnect(lambda state: reconnected.set())
        added: list[tuple[str, object]] = []
        proc.register_for_notifications("late", lambda name, binder: added.append((name, binder)))

        old_broker.stop(signal.SIGKILL)
        assert died.wait(5), "the death recipient did not fire when the broker went"
        assert deaths == [echo]
        with pytest.raises(BrokerUnavailableError):
            echo.echo(2)  # no deadline: it does not wait for the broker
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError), pybinder.deadline(0.3):
            echo.echo(3)  # a deadline: it waits for the broker, until then
        assert 0.25 < time.monotonic() - started < 2.0

        waiting: list[object] = []

        def call_within_deadline() -> None:
            with pybinder.deadline(15):
                waiting.append(echo.echo(4))

        waiter = threading.Thread(target=call_within_deadline)
        waiter.start()
        new_broker = cluster.broker("--max-region-size", str(64 << 20))
        restarted = time.monotonic()
        try:
            with pybinder.connect(cluster.socket) as other:
                found = other.get_service("echo", IEcho, timeout=5)
                assert time.monotonic() - restarted < 5.0
                assert found.echo(5) == ["echo", server.pid, 5]
                assert server.readline() == "reconnected 1"

                waiter.join(15)
                assert waiting == [["echo", server.pid, 4]], "the waiting call did not go through"
                assert echo.echo(6) == ["echo", server.pid, 6]  # the same proxy, found again
                with pybinder.deadline(5):  # its main thread serves again
                    assert joined.echo(6) == ["joined", looper.pid, 6]
                assert reconnected.wait(5) and proc.reconnects == 1
                assert echo.is_binder_alive()
                with pytest.raises(ProxyClosedError):
                    closed.echo(7)
                again = proc.get_service("echo.b", IEcho)
                assert again.echo(8) == ["echo.b", server.pid, 8]

                other.add_service("late", Echo("late"))
                assert eventually(lambda: [name for name, _ in added] == ["late"])

                server.proc.send_signal(signal.SIGTERM)
                assert server.readline() == "stopped null"
                assert server.proc.wait(10) == 0
                assert eventually(lambda: other.check_service("echo") is None)
                with pytest.raises(DeadObjectError):
                    echo.echo(9)
        finally:
            new_broker.stop(signal.SIGTERM)


def test_without_reconnect_a_broker_restart_ends_the_process_state(cluster):
    old_broker = cluster.peers[0]
    with pybinder.connect(cluster.socket) as proc:
        assert proc.list_services() == []
        old_broker.stop(signal.SIGKILL)
        new_broker = cluster.broker()
        try:
            for _ in range(3):
                with pytest.raises(BrokerUnavailableError), pybinder.deadline(1):
                    proc.list_services()
            assert proc.reconnects == 0
        finally:
            new_broker.stop(signal.SIGTERM)


class Echo(IEcho.Stub):
    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, value: object) -> list[object]:
        return [self.name, 0, value]


IMPOSTOR = """
import os, socket, sys, time
listener = socket.socket(fileno=int(sys.argv[1]))
os.setgid(65534)
os.setuid(65534)
listener.listen(8)  # SO_PEERCRED gives a client the uid that called listen()
print("listening", flush=True)
listener.settimeout(0.1)
connections = received = 0
give_up = time.monotonic() + float(sys.argv[2])
while time.monotonic() < give_up:
    try:
        conn, _ = listener.accept()
    except TimeoutError:
        continue
    connections += 1
    conn.settimeout(0.5)
    try:
        received += len(conn.recv(4096))
    except TimeoutError:
        pass
    conn.close()
print(connections, received, flush=True)
"""


def test_a_reconnecting_process_sends_nothing_to_a_listener_of_another_uid(cluster):
    """Whoever takes the socket path while the broker is gone gets connections that
    close at once, without a byte: the uid check runs on every reconnect try."""
    old_broker = cluster.peers[0]
    with pybinder.connect(cluster.socket, reconnect=True) as proc:
        old_broker.stop(signal.SIGKILL)
        path = Path(cluster.socket)
        path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        listener.bind(str(path))
        impostor = cluster.spawn(
            [sys.executable, "-c", IMPOSTOR, str(listener.fileno()), "2.5"],
            pass_fds=(listener.fileno(),),
        )
        listener.close()
        impostor.wait_ready("listening")
        connections, received = map(int, impostor.readline(timeout=10).split())
        assert connections >= 2 and received == 0
        assert proc.reconnects == 0
        with pytest.raises(BrokerUnavailableError):
            proc.list_services()
        path.unlink()
        new_broker = cluster.broker()
        try:
            with pybinder.deadline(5):
                assert proc.list_services() == []
            assert proc.reconnects == 1
        finally:
            new_broker.stop(signal.SIGTERM)


def test_an_asyncio_client_with_reconnect_calls_again_after_a_restart(cluster):
    server = start_model_peer(cluster, "serve", "echo")
    old_broker = cluster.peers[0]

    async def main() -> list[object]:
        options = {"reconnect": True, "call_timeout": 10.0}
        async with pybinder.aio.connect(cluster.socket, **options) as proc:
            back = asyncio.Event()
            loop = asyncio.get_running_loop()
            proc.on_reconnect(lambda state: loop.call_soon_threadsafe(back.set))
            echo = await proc.get_service("echo", IEcho)
            first = await echo.echo(1)
            old_broker.stop(signal.SIGKILL)
            new_broker = cluster.broker()
            try:
                again = await echo.echo(2)  # waits, within call_timeout, for the broker
                await asyncio.wait_for(back.wait(), 10)
            finally:
                new_broker.stop(signal.SIGTERM)
            return [first, again]

    first, again = asyncio.run(asyncio.wait_for(main(), 60))
    assert first == ["echo", server.pid, 1] and again == ["echo", server.pid, 2]


def test_a_service_that_does_not_come_back_fails_the_call_at_its_deadline_or_after_5_s(cluster):
    gone = start_model_peer(cluster, "echo", "gone")  # connects without reconnect
    old_broker = cluster.peers[0]
    with pybinder.connect(cluster.socket, reconnect=True) as proc:
        echo = proc.get_service("gone", IEcho)
        assert echo.echo(1) == ["gone", gone.pid, 1]
        old_broker.stop(signal.SIGKILL)
        new_broker = cluster.broker()
        try:
            with pybinder.deadline(5):
                assert proc.list_services() == []  # back, without "gone"
            started = time.monotonic()
            expired = pytest.raises(DeadlineExceededError, match="not come back")
            with expired, pybinder.deadline(0.5):
                echo.echo(2)
            assert 0.4 < time.monotonic() - started < 2.0
            started = time.monotonic()
            with pytest.raises(DeadObjectError, match="not come back"):
                echo.echo(3)  # no deadline: it waits REBIND_TIMEOUT (5 s) for the service
            assert 4.5 < time.monotonic() - started < 8.0
            assert not echo.is_binder_alive()
        finally:
            new_broker.stop(signal.SIGTERM)


def test_a_service_back_with_an_incompatible_interface_is_refused_on_its_next_call(cluster):
    old = calc_interface("old")
    first = start_calc(cluster, "old")
    old_broker = cluster.peers[0]
    with pybinder.connect(cluster.socket, reconnect=True) as proc:
        calc = proc.get_service("calc", old)  # checked against the server's table once
        assert calc.sub(5, 3) == 2
        old_broker.stop(signal.SIGKILL)
        first.stop()
        new_broker = cluster.broker()
        try:
            start_calc(cluster, "inserted")  # sub's code now means mul there
            expected = r"tests\.ICalc\.sub \(code 2\) is 'mul'"
            with pytest.raises(InterfaceMismatchError, match=expected), pybinder.deadline(5):
                calc.sub(5, 3)
            start_calc(cluster, "new")  # compatible (mul appended); replaces the name
            with pybinder.deadline(5):
                assert calc.sub(5, 3) == 2  # checked again, and called
        finally:
            new_broker.stop(signal.SIGTERM)
