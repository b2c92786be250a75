"""Fixtures: a real broker process per test, real peer processes, and checks that
every test leaves /dev/shm and the process table as it found them."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from raw import answer, raw_connection

import pybinder
from pybinder import protocol
from pybinder.protocol import BC_HELLO_THREAD, BR_HELLO_THREAD, PROTOCOL_VERSION
from pybinder.region import SHM_PREFIX

PEERS = Path(__file__).with_name("peers.py")

#: What the broker logs when its safety net catches an exception (daemon._serve).
UNEXPECTED = "unexpected error"
READY_TIMEOUT = 20.0


class Peer:
    """A child process started with ``python tests/peers.py ROLE ...`` or any argv."""

    def __init__(
        self, argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
    ) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            pass_fds=pass_fds,
        )
        self.pid = self.proc.pid
        self.stderr_text = ""
        self.is_broker = False

    def readline(self, timeout: float = READY_TIMEOUT) -> str:
        """The next line of the child's stdout, or fail after ``timeout`` seconds."""
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise AssertionError(f"no output from {self.proc.args} in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"{self.proc.args} exited ({self.proc.poll()}): {err}")
        return line.strip()

    def wait_ready(self, word: str = "ready") -> str:
        line = self.readline()
        assert line.startswith(word), f"expected {word!r}, got {line!r}"
        return line

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` and reap the child; one that ignores it is killed, and then
        AssertionError says so. A broker's stderr is kept in :attr:`stderr_text`
        (a broker starts no children, which could hold the pipe open)."""
        ignored = False
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            ignored = True
            self.proc.kill()
            code = self.proc.wait(timeout)
        if self.is_broker and self.proc.stderr is not None and not self.proc.stderr.closed:
            self.stderr_text = self.proc.stderr.read()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        if ignored:
            raise AssertionError(f"{self.proc.args} did not exit within {timeout} s of {sig!r}")
        return code


class Cluster:
    """Starts and finally stops every process of one test, each with ``env`` (None:
    this process's environment) unless :meth:`spawn` is given another."""

    def __init__(self, socket_path: str, env: dict[str, str] | None = None) -> None:
        self.socket = socket_path
        self.env = env
        self.peers: list[Peer] = []

    def spawn(
        self, argv: list[str], env: dict[str, str] | None = None, pass_fds: tuple[int, ...] = ()
    ) -> Peer:
        peer = Peer(argv, env if env is not None else self.env, pass_fds)
        self.peers.append(peer)
        return peer

    def peer(self, role: str, *args: object) -> Peer:
        return self.spawn([sys.executable, str(PEERS), role, self.socket, *map(str, args)])

    def server(self, region_size: int = 4 << 20, threads: int = 4) -> Peer:
        peer = self.peer("server", region_size, threads)
        peer.wait_ready()
        return peer

    def broker(self, *extra: str) -> Peer:
        argv = [sys.executable, "-m", "pybinder", "broker", "--socket", self.socket, *extra]
        peer = self.spawn(argv)
        peer.is_broker = True
        line = peer.readline()
        assert "listening" in line and self.socket in line, line
        return peer

    def close(self) -> None:
        """Kill every peer, then stop the broker (the first peer) with SIGTERM, as a
        user would; fail if any of them would not go, or if the broker's safety net
        caught an unexpected exception (it logs "unexpected error"): the net keeps
        the broker alive, and must never hide a bug from the tests."""
        failures = []
        for peer in reversed(self.peers):
            try:
                peer.stop(signal.SIGTERM if peer is self.peers[0] else signal.SIGKILL)
            except AssertionError as exc:
                failures.append(str(exc))
        for peer in self.peers:
            if UNEXPECTED in peer.stderr_text:
                failures.append(f"the broker caught an unexpected error:\n{peer.stderr_text}")
        assert not failures, failures


def our_shm_entries() -> set[str]:
    """/dev/shm entries of this project (every name it creates starts with SHM_PREFIX).

    Other software on a shared machine may add its own entries meanwhile; those are
    not ours to judge.
    """
    return {name for name in os.listdir("/dev/shm") if name.startswith(SHM_PREFIX)}


@pytest.fixture(autouse=True)
def leaves_no_trace() -> Iterator[None]:
    """Fail a test that leaves a /dev/shm entry or a child process behind."""
    before = our_shm_entries()
    yield
    deadline = time.monotonic() + 5.0
    while True:
        added = our_shm_entries() - before
        children = psutil.Process().children(recursive=True)
        if not added and not children:
            return
        if time.monotonic() > deadline:
            for child in children:
                child.kill()
            raise AssertionError(f"left behind: /dev/shm {sorted(added)}, processes {children}")
        time.sleep(0.05)


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short private directory for sockets (AF_UNIX paths must stay < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="pb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def running_cluster(
    socket_path: str, env: dict[str, str] | None = None, broker_args: tuple[str, ...] = ()
) -> Iterator[Cluster]:
    """A :class:`Cluster` whose broker (64 MiB max region, ``env`` as in Cluster, and
    ``broker_args``) runs; every process it started is stopped afterwards."""
    group = Cluster(socket_path, env)
    try:
        group.broker("--max-region-size", str(64 << 20), *broker_args)
        yield group
    finally:
        group.close()


@pytest.fixture
def cluster(socket_dir: Path) -> Iterator[Cluster]:
    """A running broker (64 MiB max region) and a place to start more processes."""
    with running_cluster(str(socket_dir / "broker.sock")) as group:
        yield group


@pytest.fixture
def proc(cluster: Cluster) -> Iterator[pybinder.ProcessState]:
    """This test process, connected to the cluster's broker as a client."""
    with pybinder.connect(cluster.socket, region_size=32 << 20) as state:
        yield state


@pytest.fixture
def raw_thread(cluster: Cluster, proc: pybinder.ProcessState) -> Iterator[socket.socket]:
    """A hand-driven thread connection of ``proc`` (same pid, so the broker admits it)."""
    sock = raw_connection(cluster.socket)
    sock.send(protocol.encode(BC_HELLO_THREAD, PROTOCOL_VERSION, proc.key))
    assert answer(sock)[0][0] == BR_HELLO_THREAD
    yield sock
    sock.close()


#: The policy of :func:`shared_cluster`: anyone may find and call "test" and "open.*".
OPEN_POLICY = """
[[service]]
name = "test"
find = ["*"]
call = ["*"]

[[service]]
name = "open.*"
find = ["*"]
call = ["*"]
"""


@contextlib.contextmanager
def open_cluster(socket_dir: Path, *broker_args: str) -> Iterator[Cluster]:
    """A running broker that other uids may reach: its directory 0755, its socket
    0666, :data:`OPEN_POLICY` as its policy file, and ``broker_args`` (quotas...)."""
    socket_dir.chmod(0o755)
    policy = socket_dir / "policy.toml"
    policy.write_text(OPEN_POLICY)
    args = ("--socket-mode", "666", "--policy", str(policy), *broker_args)
    with running_cluster(str(socket_dir / "broker.sock"), broker_args=args) as group:
        yield group


@pytest.fixture
def shared_cluster(socket_dir: Path) -> Iterator[Cluster]:
    """:func:`open_cluster` with the default quotas."""
    with open_cluster(socket_dir) as group:
        yield group
