"""The object model across real processes: listeners called back in a single-threaded
client, proxies passed on to a third process, death notifications and dead calls,
file descriptors, service notifications, reference release, the thread pool, and
local objects coming home as themselves."""

from __future__ import annotations

import gc
import json
import os
import queue
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Cluster, Peer
from model_peers import IEcho, IHub, IListener
from peers import ITest
from waiting import eventually, fill_thread_pool, loopers

import pybinder
from pybinder import ParcelFileDescriptor, ProxyClosedError

MODEL_PEERS = Path(__file__).with_name("model_peers.py")


def model_peer(cluster: Cluster, role: str, *args: object) -> Peer:
    argv = [sys.executable, str(MODEL_PEERS), role, cluster.socket, *map(str, args)]
    return cluster.spawn(argv)


def start_hub(cluster: Cluster, name: str, threads: int = 4) -> Peer:
    peer = model_peer(cluster, "hub", name, threads)
    assert peer.wait_ready() == f"ready {peer.pid}"
    return peer


def read_word(peer: Peer, word: str, timeout: float = 10.0) -> Any:
    """The JSON value of the peer's next line, which must start with ``word``."""
    line = peer.readline(timeout)
    found, _, value = line.partition(" ")
    assert found == word, f"expected {word!r}, got {line!r}"
    return json.loads(value)


def entry(proc: pybinder.ProcessState, pid: int) -> dict[str, Any]:
    """The broker's status entry of the process ``pid``."""
    return next(p for p in proc.status()["processes"] if p["pid"] == pid)


class Listener(IListener.Stub):
    def on_event(self, event: str) -> str:
        return event


# -- 1. callbacks into a single-threaded client ------------------------------------------


def test_a_single_threaded_client_serves_its_listener_on_its_waiting_and_main_thread(cluster, proc):
    hub_peer = start_hub(cluster, "hub")
    client = model_peer(cluster, "listener-client", "hub")
    assert read_word(client, "loopers") == 0  # it never started a thread pool
    report = read_word(client, "report")
    assert report == {
        "type": "IListener.Proxy",
        "typed": True,
        "raw": False,
        "owner_pid": client.pid,
        "caller": client.pid,
        "answer": f"during handled by {client.pid}",
    }
    # the call during add_listener() ran on the thread waiting for add_listener()
    assert read_word(client, "calls") == [["during", "main"]]
    # the hub's timer thread called later; join_thread_pool() served it on main
    assert read_word(client, "calls") == [["during", "main"], ["later", "main"]]
    assert read_word(client, "done") is None
    assert client.proc.wait(10) == 0
    hub = proc.get_service("hub", IHub, timeout=10)
    assert hub.events() == [["later", f"later handled by {client.pid}"]]
    assert hub.pid() == hub_peer.pid


# -- 2. a proxy passed on to a third process ---------------------------------------------


def test_a_client_passes_server_b_to_server_a_which_calls_it(cluster, proc):
    a_peer = start_hub(cluster, "a")
    b_peer = model_peer(cluster, "echo", "b")
    assert b_peer.wait_ready() == f"ready {b_peer.pid}"
    a = proc.get_service("a", IHub, timeout=10)
    b = proc.get_service("b", IEcho, timeout=10)
    assert b.echo("direct") == ["b", b_peer.pid, "direct"]
    answer = a.ask(b, {"value": [1, 2]})
    assert answer == {
        "answer": ["b", b_peer.pid, {"value": [1, 2]}],
        "type": "IEcho.Proxy",
        "owner_pid": b_peer.pid,
    }
    assert a.pid() == a_peer.pid


# -- 3. death: recipients in two clients, pending calls, alive checks --------------------


def test_killing_a_server_notifies_two_clients_and_fails_their_pending_calls(cluster, proc):
    hub_peer = start_hub(cluster, "hub-x", threads=8)
    clients = [model_peer(cluster, "death-client", "hub-x") for _ in range(2)]
    for client in clients:
        assert read_word(client, "ready") == client.pid
    hub = proc.get_service("hub-x", IHub, timeout=10)
    sleep_code = next(spec.code for spec in IHub.METHODS if spec.name == "sleep")

    def sleeping_callers() -> set[int]:
        pending = entry(proc, hub_peer.pid)["pending"]
        return {p["from_pid"] for p in pending if p["code"] == sleep_code}

    assert eventually(lambda: sleeping_callers() == {c.pid for c in clients}, timeout=10)

    # this process too: recipients linked, unlinked, and a check while alive
    fired: queue.Queue[tuple[float, Any]] = queue.Queue()
    kept_linked = lambda who: fired.put((time.monotonic(), who))  # noqa: E731
    unlinked = lambda who: fired.put((time.monotonic(), "unlinked fired"))  # noqa: E731
    assert hub.unlink_to_death(unlinked) is False  # never linked
    hub.link_to_death(kept_linked)
    hub.link_to_death(unlinked)
    assert hub.unlink_to_death(unlinked) is True
    assert hub.unlink_to_death(unlinked) is False  # already unlinked
    assert hub.binder.handle in entry(proc, os.getpid())["death_links"]
    assert hub.ping_binder() is True
    assert hub.is_binder_alive() is True
    assert hub.binder.ping_binder() is True

    killed_at = time.monotonic()
    os.kill(hub_peer.pid, signal.SIGKILL)
    hub_peer.proc.wait(10)

    for client in clients:
        seen: dict[str, Any] = {}
        while len(seen) < 2:
            line = client.readline(10)
            word, _, value = line.partition(" ")
            assert word in ("died", "pending") and word not in seen, line
            seen[word] = json.loads(value)
        died_at, recipient_got, is_the_proxy = seen["died"]
        assert died_at - killed_at < 1.0, f"the recipient fired {died_at - killed_at:.2f} s late"
        assert recipient_got == "IHub.Proxy" and is_the_proxy is True
        failed_at, error, message = seen["pending"]
        assert error == "DeadObjectError", message
        assert IHub.DESCRIPTOR in message and f"pid {hub_peer.pid}" in message, message
        assert "hub-x" in message, message
        assert failed_at - killed_at < 1.0
        assert read_word(client, "after") == {"alive": False, "ping": False}
        assert client.proc.wait(10) == 0

    when, who = fired.get(timeout=1.0)
    assert when - killed_at < 1.0 and who is hub
    assert hub.is_binder_alive() is False
    assert hub.ping_binder() is False
    with pytest.raises(queue.Empty):  # the unlinked recipient never fires
        fired.get(timeout=0.2)
    # linking to a node known dead fires at once, on this thread
    late: list[tuple[Any, int]] = []
    hub.link_to_death(lambda who: late.append((who, threading.get_ident())))
    assert late == [(hub, threading.get_ident())]
    with pytest.raises(pybinder.DeadObjectError):
        hub.pid()


# -- 4. file descriptors -----------------------------------------------------------------


def read_to_eof(fd: int, timeout: float = 5.0) -> bytes:
    """Everything readable from ``fd`` until end of file (every write end closed)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"no end of file on fd {fd} within {timeout} s (got {data!r})"
        chunk = os.read(fd, 65536)
        if not chunk:
            return data
        data += chunk


def fd_counts(*pids: int) -> tuple[int, ...]:
    return (len(os.listdir("/proc/self/fd")), *(len(os.listdir(f"/proc/{p}/fd")) for p in pids))


def test_a_pipe_end_written_by_the_server_and_descriptors_not_leaked(cluster, proc):
    hub_peer = start_hub(cluster, "hub", threads=1)
    broker_pid = cluster.peers[0].pid
    hub = proc.get_service("hub", IHub, timeout=10)

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "wb", buffering=0) as writer:
        assert hub.write_to(writer, b"hello through the broker") == "ParcelFileDescriptor"
    # end of file: the server's copy and any the broker held are closed too
    assert read_to_eof(read_end) == b"hello through the broker"
    os.close(read_end)

    before = fd_counts(hub_peer.pid, broker_pid)
    for i in range(1000):
        read_end, write_end = os.pipe()
        try:
            with ParcelFileDescriptor(write_end) as sent:
                assert hub.write_to(sent, b"%d" % i) == "ParcelFileDescriptor"
            assert os.read(read_end, 64) == b"%d" % i
        finally:
            os.close(read_end)
    assert eventually(lambda: fd_counts(hub_peer.pid, broker_pid) == before), (
        f"descriptors (test, server, broker) were {before}, now "
        f"{fd_counts(hub_peer.pid, broker_pid)}"
    )


def test_more_than_64_descriptors_in_one_call_are_refused_without_leaks(cluster, proc):
    hub_peer = start_hub(cluster, "hub", threads=1)
    broker_pid = cluster.peers[0].pid
    hub = proc.get_service("hub", IHub, timeout=10)
    assert hub.count_fds([]) == 0
    before = fd_counts(hub_peer.pid, broker_pid)

    read_end, write_end = os.pipe()
    copies = [ParcelFileDescriptor.dup(write_end) for _ in range(65)]
    os.close(write_end)
    try:
        with pytest.raises(pybinder.QuotaExceededError) as refused:
            hub.count_fds(copies)
        assert refused.value.quota == "fds_per_transaction"
        assert refused.value.limit == 64
        assert hub.count_fds(copies[:64]) == 64  # the limit itself passes
    finally:
        for copy in copies:
            copy.close()
    assert read_to_eof(read_end) == b""  # no copy survives anywhere
    os.close(read_end)
    assert eventually(lambda: fd_counts(hub_peer.pid, broker_pid) == before), (
        f"descriptors (test, server, broker) were {before}, now "
        f"{fd_counts(hub_peer.pid, broker_pid)}"
    )


# -- 5. service notifications ------------------------------------------------------------


def test_notifications_for_present_later_and_re_added_services(cluster, proc):
    present = start_hub(cluster, "present")
    added: queue.Queue[tuple[str, Any]] = queue.Queue()

    def on_added(name: str, service: Any) -> None:
        added.put((name, service))

    def next_added() -> tuple[str, Any]:
        name, service = added.get(timeout=5)
        assert isinstance(service, IHub.Proxy), service
        return name, service.binder.owner_pid

    proc.register_for_notifications("present", on_added)
    assert next_added() == ("present", present.pid)  # at once: it exists

    proc.register_for_notifications("later", on_added)
    with pytest.raises(queue.Empty):
        added.get(timeout=0.3)  # nobody has added "later" yet
    first = start_hub(cluster, "later")
    assert next_added() == ("later", first.pid)

    os.kill(first.pid, signal.SIGKILL)
    first.proc.wait(10)
    assert eventually(lambda: "later" not in proc.list_services(), timeout=5)
    second = start_hub(cluster, "later")
    name, service = added.get(timeout=5)
    assert (name, service.binder.owner_pid) == ("later", second.pid)
    assert service.pid() == second.pid  # the notified proxy is usable
    assert added.empty()  # the death itself notified nobody

    assert proc.unregister_for_notifications("later", on_added) is True
    assert proc.unregister_for_notifications("later", on_added) is False


# -- 6. releasing references -------------------------------------------------------------


def test_closed_and_dropped_proxies_release_the_node(cluster, proc):
    hub_peer = start_hub(cluster, "hub")
    hub = proc.get_service("hub", IHub, timeout=10)

    def graph() -> tuple[Any, int, int]:
        server = entry(proc, hub_peer.pid)
        nodes = sorted((n["id"], n["descriptor"], n["refs"]) for n in server["nodes"])
        return nodes, server["refs_count"], entry(proc, os.getpid())["refs_count"]

    baseline = graph()
    server_nodes, _, our_refs = baseline

    def take_one(name: str) -> Any:
        token = hub.make_echo(name)
        assert isinstance(token, IEcho.Proxy)
        assert token.echo(name) == [name, hub_peer.pid, name]
        nodes, _, refs = graph()
        assert refs == our_refs + 1
        new = [n for n in nodes if n not in server_nodes]
        assert [(descriptor, refs) for _, descriptor, refs in new] == [(IEcho.DESCRIPTOR, 1)]
        return token

    token = take_one("closed")
    token.close()
    assert eventually(lambda: graph() == baseline), (baseline, graph())
    with pytest.raises(ProxyClosedError):
        token.echo("after close")

    with take_one("with") as token:
        pass
    assert eventually(lambda: graph() == baseline), (baseline, graph())

    token = take_one("dropped")
    del token
    gc.collect()
    assert eventually(lambda: graph() == baseline), (baseline, graph())


# -- 7. the thread pool ------------------------------------------------------------------


def test_a_pool_of_four_starts_with_one_looper_and_runs_four_calls_at_once(cluster, proc):
    hub_peer = start_hub(cluster, "pool", threads=4)

    def pool() -> dict[str, int]:
        return entry(proc, hub_peer.pid)["loopers"]

    # before any call reaches it (a call that finds the looper busy may add one)
    assert eventually(lambda: pool()["busy"] + pool()["idle"] >= 1, timeout=5), pool()
    time.sleep(0.2)  # time enough for a second looper to show, were one started
    first = pool()
    assert first["busy"] + first["idle"] == 1 and first["max_threads"] == 4, first

    hub = proc.get_service("pool", IHub, timeout=10)
    assert hub.peak() == 0

    def concurrent_sleeps(calls: int, seconds: float) -> float:
        barrier = threading.Barrier(calls)
        answers: list[int] = []

        def call() -> None:
            barrier.wait(5)
            answers.append(hub.sleep(seconds))

        threads = [threading.Thread(target=call) for _ in range(calls)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert answers == [hub_peer.pid] * calls
        return time.monotonic() - started

    elapsed = concurrent_sleeps(4, 1.0)
    assert elapsed < 1.8, f"four 1 s calls took {elapsed:.2f} s"
    assert hub.peak() == 4
    assert loopers(entry(proc, hub_peer.pid)) == 4

    elapsed = concurrent_sleeps(5, 0.4)  # one more than the pool: it waits its turn
    assert elapsed >= 0.8 - 0.05, f"five 0.4 s calls on four loopers took {elapsed:.2f} s"
    assert hub.peak() == 4
    assert loopers(entry(proc, hub_peer.pid)) == 4


# -- 8. local objects come home as themselves --------------------------------------------


def test_fresh_local_objects_sent_away_and_back_arrive_as_themselves(cluster, proc):
    start_hub(cluster, "hub")
    hub = proc.get_service("hub", IHub, timeout=10)
    for i in range(300):
        mine = Listener()
        back = hub.echo(mine)
        assert back is mine, f"iteration {i}: {back!r}"
        assert hub.echo([i, mine])[1] is mine
        if i % 20 == 0:
            del mine, back
            gc.collect()
    del mine, back
    gc.collect()

    def our_nodes() -> int:
        hub.pid()  # the server sends its queued releases with its next message
        return entry(proc, os.getpid())["nodes_count"]

    assert eventually(lambda: our_nodes() == 0), entry(proc, os.getpid())["nodes"]


def test_a_server_whose_loopers_stay_busy_while_calls_queue_is_named_in_the_log(cluster, proc):
    server = cluster.server(threads=1)  # one pool looper, and its main thread
    service = proc.get_service("test", ITest, timeout=10)
    fill_thread_pool(service, 3, 2.5)  # the third call queues for 2.5 s (sweeps: 1 s)
    broker = cluster.peers[0]
    broker.stop(signal.SIGTERM)
    assert f"pid {server.pid}: all 2 of its loopers" in broker.stderr_text
    assert "thread-pool starvation" in broker.stderr_text


def test_when_the_broker_goes_every_proxy_is_dead_and_its_recipients_fire(cluster, proc):
    cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    fired = threading.Event()
    service.link_to_death(lambda dead: fired.set() if dead is service else None)
    cluster.peers[0].stop(signal.SIGTERM)
    assert fired.wait(2.0)
    assert not service.is_binder_alive()
