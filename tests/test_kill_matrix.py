"""kill -9 under load: a client, the server or the broker dies at a random point of
a load, and everyone else must come through it.

Each case runs a broker, tests/peers.py's server and 2-3 load clients
(tests/kill_peers.py), each calling from two threads, and SIGKILLs the victim at a
point chosen by a seeded ``random.Random``:

* ``start``: 0-20 ms after every client got the service (calls of 0 B to 4 MiB);
* ``large``: 0.1-0.5 s into a stream of 1-4 MiB echo and blob calls;
* ``small``: 0.1-0.5 s into many small oneway and two-way calls;
* ``wait``: while the clients wait in get_service for the server (for the server
  itself: 0-30 ms after it registered, as the waits resolve), with waits for a name
  nobody registers going on beside the load.

Then, for every case: each call returned the right bytes or raised a BinderError
subclass (a client reports anything else, and a call that hangs, as "unexpected");
the survivors saw what they must (nothing, DeadObjectError then ServiceNotFoundError,
or BrokerUnavailableError, exiting by themselves); no /dev/shm name and no child
process is left (the autouse fixture). If the broker survived, it serves a fresh
client, shows no entry for any dead process and has as many descriptors as before
the load (within FD_MARGIN); if it died, a new broker on the same socket path
removes the names dead brokers left, serves, and stops cleanly.

``PYBINDER_KILL_CASES=N`` runs N cases: the 12 pairs of victim x timing in turn,
each time with the next seed (default 24: every pair with seeds 0 and 1, about
40-55 s on 2 cores; a smaller N runs only the first pairs). A failing case names
its seed in its id: ``-k 'server-large-0'`` runs it again the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import posix_ipc
import psutil
import pytest
from conftest import Cluster, Peer, our_shm_entries
from peers import ITest, pattern
from waiting import eventually

import pybinder
from pybinder.region import SHM_PREFIX

KILL_PEERS = Path(__file__).with_name("kill_peers.py")

MiB = 1 << 20
VICTIMS = ("client", "server", "broker")
TIMINGS = ("start", "large", "small", "wait")
COMBOS = [(victim, timing) for victim in VICTIMS for timing in TIMINGS]
CASE_COUNT = int(os.environ.get("PYBINDER_KILL_CASES", 2 * len(COMBOS)))
CASES = [(*COMBOS[i % len(COMBOS)], i // len(COMBOS)) for i in range(CASE_COUNT)]

MODES = {"start": "mixed", "large": "large", "small": "small", "wait": "wait"}
SERVER_REGION = 32 * MiB  # 3 clients x 2 threads x 4 MiB in flight fit
BROKER_MAX_REGION = 64 * MiB  # as conftest's running_cluster
CLIENT_MAX_SECONDS = 30.0  # a load client stops by itself after this, whatever happens
READY_S = 20.0  # for a client's "ready" / "waiting" line
SUMMARY_S = 15.0  # for a client's summary once it should stop
RUN_ON_S = 0.3  # how long the survivors go on after the kill before they are stopped
FD_MARGIN = 2  # descriptors the broker may hold beyond its count before the load
SETTLE_S = 10.0  # for the broker to let go of dead processes


class LoadClient:
    """A ``kill_peers.py load`` process whose stdout and stderr are read by threads
    (so neither pipe fills, and no line waits in a buffer select() cannot see)."""

    def __init__(self, cluster: Cluster, mode: str, seed: int, stop_file: Path) -> None:
        argv = [sys.executable, str(KILL_PEERS), "load", cluster.socket, mode]
        argv += [str(seed), str(stop_file), str(CLIENT_MAX_SECONDS)]
        self.peer: Peer = cluster.spawn(argv)
        self.pid = self.peer.pid
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.readers = [
            threading.Thread(target=self._read, args=(self.peer.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.peer.proc.stderr, False), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read(self, stream: Any, is_stdout: bool) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in stream:
                (self.stdout if is_stdout else self.stderr).append(line.rstrip("\n"))
                if is_stdout:
                    self.lines.put(line.strip())
        if is_stdout:
            self.lines.put(None)

    def expect(self, word: str, timeout: float = READY_S) -> str:
        """The next stdout line, which must start with ``word``."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"client {self.pid}: no {word!r} in {timeout} s; {self}") from None
        assert line is not None and line.startswith(word), (
            f"expected {word!r}, got {line!r}; {self}"
        )
        return line

    def summary(self, timeout: float = SUMMARY_S) -> dict[str, Any]:
        """The client's summary, once it has exited (code 0) by itself or been stopped."""
        give_up = time.monotonic() + timeout
        line = self.expect("", timeout)
        while line.startswith(("ready", "waiting")):  # a wait may resolve as the victim dies
            line = self.expect("", max(0.0, give_up - time.monotonic()))
        assert line.startswith("summary"), f"expected a summary, got {line!r}; {self}"
        try:
            code = self.peer.proc.wait(timeout)
        except Exception:
            raise AssertionError(
                f"client {self.pid} printed its summary but did not exit"
            ) from None
        for reader in self.readers:
            reader.join(timeout)
        result: dict[str, Any] = json.loads(line.removeprefix("summary "))
        result["exit"] = code
        return result

    def __str__(self) -> str:
        return f"stdout {self.stdout[-5:]}, stderr {self.stderr[-20:]}"


def broker_fds(pid: int) -> int:
    return psutil.Process(pid).num_fds()


def status_pids(socket_path: str) -> tuple[set[int], dict[int, dict[str, Any]]]:
    """The pids of the broker's status, except this process's own; and their entries."""
    with pybinder.connect(socket_path) as proc:
        entries = {e["pid"]: e for e in proc.status()["processes"] if e["pid"] != os.getpid()}
    return set(entries), entries


def check_summary(client: LoadClient, summary: dict[str, Any], seed_text: str) -> None:
    """What holds for every load client: right answers and BinderErrors only."""
    where = f"{seed_text}: client {client.pid}: {summary}; {client}"
    assert summary["exit"] == 0, where
    assert summary["unexpected"] == [] and summary["wrong"] == 0, where
    for name in summary["errors"]:
        error_type = getattr(pybinder, name, None)
        assert isinstance(error_type, type) and issubclass(error_type, pybinder.BinderError), where


def serves(socket_path: str) -> None:
    """A fresh client finds "test" and gets the right bytes back from it."""
    with pybinder.connect(socket_path, region_size=16 * MiB) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        data = random.Random(1).randbytes(3 * MiB + 5)
        assert service.echo(data) == data
        assert service.blob(2 * MiB + 3) == pattern(2 * MiB + 3)
        assert service.add(2, 40) == 42
        assert proc.list_services() == ["test"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("victim", "timing", "seed"), CASES, ids=[f"{v}-{t}-{s}" for v, t, s in CASES]
)
def test_kill_9_under_load(cluster, socket_dir, tmp_path, victim, timing, seed):
    seed_text = f"case {victim}-{timing}-{seed}"
    rng = random.Random(f"kill-matrix-{victim}-{timing}-{seed}")
    broker = cluster.peers[0]
    stop_file = tmp_path / "stop"

    # The broker's descriptors with nobody connected (after one client came and went).
    serves_nothing_yet = pybinder.connect(cluster.socket)
    serves_nothing_yet.close()
    assert eventually(lambda: status_pids(cluster.socket)[0] == set())
    fds_before = broker_fds(broker.pid)

    server = cluster.server(region_size=SERVER_REGION) if timing != "wait" else None
    count = rng.choice((2, 3))
    clients = [
        LoadClient(cluster, MODES[timing], rng.randrange(1 << 30), stop_file) for _ in range(count)
    ]

    # -- the kill ------------------------------------------------------------------------
    if timing == "wait":
        for client in clients:
            client.expect("waiting")
        if victim == "server":
            server = cluster.server(region_size=SERVER_REGION)
            time.sleep(rng.uniform(0, 0.03))
        else:
            time.sleep(rng.uniform(0, 0.2))
    else:
        for client in clients:
            client.expect("ready")
        time.sleep(rng.uniform(0, 0.02) if timing == "start" else rng.uniform(0.1, 0.5))
    if victim == "client":
        dead = clients.pop(rng.randrange(count))
        killed_pid = dead.pid
        dead.peer.stop(signal.SIGKILL)
    elif victim == "server":
        assert server is not None
        killed_pid = server.pid
        server.stop(signal.SIGKILL)
    else:
        killed_pid = broker.pid
        broker.stop(signal.SIGKILL)

    # -- the survivors -----------------------------------------------------------------
    if victim == "client" and timing == "wait":
        server = cluster.server(region_size=SERVER_REGION)
        for client in clients:
            client.expect("ready")
    if victim != "broker":
        time.sleep(RUN_ON_S)
        stop_file.touch()  # a broker's death they must notice by themselves
    summaries = [client.summary() for client in clients]
    for client, summary in zip(clients, summaries, strict=True):
        check_summary(client, summary, seed_text)
        where = f"{seed_text}: client {client.pid}: {summary}"
        if victim == "client":
            assert summary["reason"] == "stop" and summary["errors"] == {}, where
            assert summary["ok"] > 0, where
        elif victim == "server":
            assert summary["reason"] == "server", where
            assert set(summary["errors"]) == {"DeadObjectError"}, where
            assert summary["probe"] == "ServiceNotFoundError", where
        else:
            assert summary["reason"] == "broker", where
            assert set(summary["errors"]) == {"BrokerUnavailableError"}, where
    if timing == "wait" and victim != "broker":
        assert sum(s["waits"] for s in summaries) > 0 or victim == "server", summaries

    if victim == "broker":
        check_broker_restart(cluster, socket_dir, killed_pid, server, seed_text)
        return
    if victim == "server":
        assert eventually(lambda: killed_pid not in status_pids(cluster.socket)[0], SETTLE_S)
        server = cluster.server(region_size=SERVER_REGION)  # a new one, the same name
    assert server is not None
    check_broker_recovered(cluster.socket, broker, server, killed_pid, fds_before, seed_text)


def check_broker_recovered(
    socket_path: str, broker: Peer, server: Peer, killed_pid: int, fds_before: int, seed_text: str
) -> None:
    """The broker that saw the kill still serves, forgets every dead process, is left
    with nothing in use, and holds no more descriptors than before the load."""
    serves(socket_path)

    def only_the_server_is_left() -> bool:
        pids, entries = status_pids(socket_path)
        return pids == {server.pid} and entries[server.pid]["region_in_use"] == 0

    assert eventually(only_the_server_is_left, SETTLE_S), (seed_text, status_pids(socket_path))
    assert killed_pid not in status_pids(socket_path)[0]
    server.stop(signal.SIGKILL)
    assert eventually(lambda: status_pids(socket_path)[0] == set(), SETTLE_S), seed_text
    assert eventually(lambda: broker_fds(broker.pid) <= fds_before + FD_MARGIN, SETTLE_S), (
        f"{seed_text}: the broker holds {broker_fds(broker.pid)} descriptors,"
        f" {fds_before} before the load"
    )


def check_broker_restart(
    cluster: Cluster, socket_dir: Path, killed_pid: int, server: Peer | None, seed_text: str
) -> None:
    """After the broker's kill -9: no name of it in /dev/shm, the server exits by
    itself, and a new broker on the same socket path removes a name the dead one
    could have left (one made in the microseconds before unlinking it), serves, and
    stops cleanly leaving an empty socket directory."""
    assert not any(name.startswith(f"{SHM_PREFIX}{killed_pid}-") for name in our_shm_entries())
    if server is not None:
        try:
            server.proc.wait(SETTLE_S)
        except Exception:
            raise AssertionError(f"{seed_text}: the server outlived its broker") from None
    left_over = f"/{SHM_PREFIX}{killed_pid}-killmatrix"
    posix_ipc.SharedMemory(left_over, posix_ipc.O_CREX, size=4096).close_fd()
    try:
        new_broker = cluster.broker("--max-region-size", str(BROKER_MAX_REGION))
        assert left_over[1:] not in our_shm_entries(), f"{seed_text}: the new broker left it"
    finally:
        with contextlib.suppress(posix_ipc.ExistentialError):
            posix_ipc.unlink_shared_memory(left_over)
    new_server = cluster.server(region_size=SERVER_REGION)
    serves(cluster.socket)
    assert eventually(lambda: status_pids(cluster.socket)[0] == {new_server.pid}, SETTLE_S)
    new_server.stop(signal.SIGKILL)
    assert new_broker.stop(signal.SIGTERM) == 0
    assert sorted(p.name for p in socket_dir.iterdir()) == [], seed_text
