"""Broker start and stop, socket paths, deaths of servers, clients and the broker."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import Cluster, our_shm_entries
from peers import ITest

import pybinder
from pybinder.paths import resolve_socket_path


def test_broker_announces_itself_and_stops_cleanly_on_sigterm(socket_dir):
    cluster = Cluster(str(socket_dir / "b.sock"))
    broker = cluster.broker()
    assert stat.S_ISSOCK(os.stat(cluster.socket).st_mode)
    assert broker.stop(signal.SIGTERM) == 0
    assert list(socket_dir.iterdir()) == []


def test_broker_stops_cleanly_on_sigint_with_clients_connected(socket_dir):
    cluster = Cluster(str(socket_dir / "b.sock"))
    broker = cluster.broker()
    try:
        with pybinder.connect(cluster.socket) as proc:
            assert proc.list_services() == []
            assert broker.stop(signal.SIGINT) == 0
            with pytest.raises(pybinder.BrokerUnavailableError):
                proc.list_services()
    finally:
        cluster.close()
    assert list(socket_dir.iterdir()) == []


def test_second_broker_on_a_live_socket_refuses(cluster):
    second = subprocess.run(
        [sys.executable, "-m", "pybinder", "broker", "--socket", cluster.socket],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert "already" in second.stderr and cluster.socket in second.stderr
    with pybinder.connect(cluster.socket) as proc:  # the first one still serves
        assert proc.list_services() == []


def test_stale_socket_file_is_replaced(socket_dir):
    path = socket_dir / "b.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens
    cluster = Cluster(str(path))
    try:
        cluster.broker()
        with pybinder.connect(path) as proc:
            assert proc.list_services() == []
    finally:
        cluster.close()


def test_socket_path_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("PYBINDER_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    assert resolve_socket_path() == Path(f"/tmp/pybinder-{os.getuid()}/broker.sock")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert resolve_socket_path() == tmp_path / "pybinder" / "broker.sock"
    monkeypatch.setenv("PYBINDER_SOCKET", "/x/env.sock")
    assert resolve_socket_path() == Path("/x/env.sock")
    assert resolve_socket_path("/x/explicit.sock") == Path("/x/explicit.sock")


def test_broker_and_client_find_each_other_through_the_environment(socket_dir):
    env = {**os.environ, "XDG_RUNTIME_DIR": str(socket_dir)}
    env.pop("PYBINDER_SOCKET", None)
    expected = socket_dir / "pybinder" / "broker.sock"
    cluster = Cluster(str(expected))
    broker = cluster.spawn([sys.executable, "-m", "pybinder", "broker"], env=env)
    try:
        assert str(expected) in broker.readline()
        assert stat.S_IMODE(os.stat(expected.parent).st_mode) == 0o700
        listing = subprocess.run(
            [sys.executable, "-m", "pybinder", "services"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert listing.returncode == 0, listing.stderr
    finally:
        cluster.close()


def test_connect_without_a_broker_names_the_path(socket_dir):
    missing = socket_dir / "nobody.sock"
    with pytest.raises(pybinder.BrokerUnavailableError, match=str(missing)):
        pybinder.connect(missing)


def test_unknown_service_times_out_with_service_not_found(proc):
    started = time.monotonic()
    with pytest.raises(pybinder.ServiceNotFoundError, match="nope"):
        proc.get_service("nope", ITest, timeout=0.3)
    assert time.monotonic() - started >= 0.25
    assert proc.check_service("nope") is None
    assert proc.list_services() == []


def test_get_service_waits_for_a_service_that_appears_later(cluster, proc):
    found: list[object] = []
    waiter = threading.Thread(target=lambda: found.append(proc.get_service("test", timeout=20)))
    waiter.start()
    time.sleep(0.2)
    cluster.server()
    waiter.join(30)
    assert isinstance(found[0], ITest.Proxy)  # its descriptor names an interface we know
    assert found[0].add(2, 2) == 4


def test_killing_the_server_during_a_call_raises_dead_object_promptly(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    outcome: list[object] = []

    def call() -> None:
        try:
            outcome.append(service.sleep(30))
        except pybinder.DeadObjectError as exc:
            outcome.append((exc, time.monotonic()))

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the call is now running in the server
    killed = time.monotonic()
    server.stop(signal.SIGKILL)
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], tuple), outcome
    _, raised = outcome[0]
    assert raised - killed < 1.0, f"DeadObjectError came {raised - killed:.2f} s after the kill"
    with pytest.raises(pybinder.DeadObjectError):
        service.add(1, 2)
    assert proc.list_services() == []


def test_calls_queued_behind_a_dead_server_also_fail(cluster, proc):
    server = cluster.server(threads=1)
    service = proc.get_service("test", ITest, timeout=10)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            service.sleep(30)
        except BaseException as exc:
            errors.append(exc)

    callers = [threading.Thread(target=call) for _ in range(3)]  # one runs, two queue
    for caller in callers:
        caller.start()
    time.sleep(0.5)
    server.stop(signal.SIGKILL)
    for caller in callers:
        caller.join(10)
    assert len(errors) == 3 and all(isinstance(e, pybinder.DeadObjectError) for e in errors)


def test_closing_a_server_unregisters_its_services(cluster, proc):
    with pybinder.connect(cluster.socket) as other:
        from peers import TestService

        other.add_service("temporary", TestService())
        assert "temporary" in proc.list_services()
    assert "temporary" not in proc.list_services()


def test_killing_the_broker_fails_pending_calls(cluster, proc):
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            service.sleep(30)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)
    cluster.peers[0].stop(signal.SIGKILL)
    caller.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], pybinder.BrokerUnavailableError)


def test_sigkill_of_broker_server_and_client_leaves_nothing_in_dev_shm(cluster):
    before = our_shm_entries()
    server = cluster.server(region_size=8 << 20)
    client = cluster.peer("idle-client")
    client.wait_ready()
    for peer in (cluster.peers[0], server, client):
        peer.stop(signal.SIGKILL)
    assert our_shm_entries() == before
    assert not any(name.startswith("pybinder") for name in os.listdir("/dev/shm"))
