"""The attacks of issue 15, each tried again by hostile code running as uid 65534
next to a root service: the broker lives, other clients keep getting answers, and
the attacker gets a clear error or is disconnected.

Every attack runs in a child that drops to nobody before it acts (tests/hostile.py);
the broker is shared with other uids (``open_cluster``: socket 0666, a policy that
lets anyone find and call "test"), with lower quotas where a test needs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import Cluster, open_cluster, running_cluster
from hostile import NOBODY, run_hostile
from peers import ITest, pattern

import pybinder
from pybinder.errors import QUOTA_NAMES

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid")


def broker_of(cluster: Cluster) -> psutil.Process:
    return psutil.Process(cluster.peers[0].pid)


def still_serves(cluster: Cluster) -> None:
    """A root client of ``cluster`` gets right answers from the "test" service."""
    with pybinder.connect(cluster.socket) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        assert service.add(40, 2) == 42
        assert service.echo(b"still here") == b"still here"


#: The most the broker's resident memory may be after an attack, in bytes.
MAX_BROKER_RSS = 256 << 20


@contextlib.contextmanager
def hostile_cluster(socket_dir: Path, *broker_args: str) -> Iterator[Cluster]:
    """An :func:`open_cluster` with a root "test" server already running. Once the
    test is done with it and the server has gone too, the broker must hold no more
    descriptors than before anyone connected (what the attacker opened is closed),
    and little memory."""
    with open_cluster(socket_dir, *broker_args) as cluster:
        broker = broker_of(cluster)
        before = broker.num_fds()
        cluster.server()
        yield cluster
        for peer in cluster.peers[1:]:
            peer.stop()
        deadline = time.monotonic() + 10
        while broker.num_fds() > before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert broker.num_fds() <= before, "the broker kept descriptors of the attack"
        assert broker.memory_info().rss < MAX_BROKER_RSS


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


# -- descriptors the broker cannot map ------------------------------------------------

UNMAPPABLE_AREAS = """
import errno
from pybinder.region import REQUIRED_SEALS
proc = pybinder.connect(SOCKET)
sock = raw_connection(SOCKET)
sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, proc.key))
assert answer(sock)[0][0] == protocol.BR_HELLO_THREAD
SIZE = 1 << 20

def memfd(seals=REQUIRED_SEALS, flags=0, size=SIZE):
    fd = os.memfd_create("hostile", os.MFD_ALLOW_SEALING | flags)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd

def reopened_read_only():
    fd = memfd()
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(fd)
    return ro

def hugetlb():
    try:
        return memfd(flags=os.MFD_HUGETLB, size=2 << 20)
    except OSError:
        return None

def pipe_end():
    r, w = os.pipe()
    os.close(w)
    return r

cases = {
    "write-sealed": lambda: memfd(REQUIRED_SEALS | fcntl.F_SEAL_WRITE),
    "future-write-sealed": lambda: memfd(REQUIRED_SEALS | 0x10),
    "reopened read-only": reopened_read_only,
    "hugetlb": hugetlb,
    "unsealed": lambda: memfd(0),
    "shrinkable": lambda: memfd(fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL),
    "pipe": pipe_end,
    "smaller than claimed": lambda: memfd(size=4096),
}
for name, make in cases.items():
    fd = make()
    if fd is None:
        result[name] = "unavailable"
        continue
    size = 2 << 20 if name == "hugetlb" else SIZE
    socket.send_fds(sock, [protocol.encode(protocol.BC_SET_SEND_AREA, size, 0)], [fd])
    os.close(fd)
    result[name] = protocol.COMMAND_NAMES[answer(sock)[0][0]]
sock.send(protocol.encode(protocol.BC_SET_SEND_AREA, SIZE, 0))  # no descriptor at all
result["none"] = protocol.COMMAND_NAMES[answer(sock)[0][0]]
give_send_area(sock, SIZE)  # the same thread still gets a proper area
result["then a sealed memfd"] = "BR_OK"
"""


def test_send_areas_the_broker_cannot_safely_map_are_refused(socket_dir):
    with hostile_cluster(socket_dir) as cluster:
        outcome = run_hostile(UNMAPPABLE_AREAS, cluster.socket)
        refused = {name: kind for name, kind in outcome.items() if kind != "unavailable"}
        assert refused.pop("then a sealed memfd") == "BR_OK"
        assert set(refused.values()) == {"BR_ERROR"}, outcome
        assert len(refused) >= 8, outcome
        still_serves(cluster)


def test_a_broker_out_of_descriptors_pauses_accepting_and_recovers(socket_dir):
    with hostile_cluster(socket_dir) as cluster:
        broker = broker_of(cluster)
        soft, hard = broker.rlimit(psutil.RLIMIT_NOFILE)
        broker.rlimit(psutil.RLIMIT_NOFILE, (broker.num_fds() + 4, hard))
        try:
            before = cpu_seconds(broker)
            flood = """
            socks = []
            for _ in range(60):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.settimeout(5)
                try:
                    s.connect(SOCKET)
                except OSError as exc:
                    result.setdefault("refused", []).append(exc.errno)
                    continue
                socks.append(s)
            time.sleep(2.0)
            result["connected"] = len(socks)
            """
            outcome = run_hostile(flood, cluster.socket)
            busy = cpu_seconds(broker) - before
        finally:
            broker.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
        assert outcome["connected"] + len(outcome.get("refused", [])) == 60
        assert busy < 1.5, f"the broker spun for {busy:.2f} s of CPU while out of descriptors"
        still_serves(cluster)


@pytest.mark.parametrize("timeout", ["float('inf')", "float('nan')", "3e6", "-1.0", "'soon'"])
def test_a_wait_for_a_service_with_an_unusable_timeout_is_refused(socket_dir, timeout):
    with hostile_cluster(socket_dir) as cluster:
        broker = broker_of(cluster)
        before = cpu_seconds(broker)
        body = f"""
        with pybinder.connect(SOCKET) as proc:
            try:
                proc.service_manager.wait_for_service("never", {timeout})
                result["error"] = None
            except Exception as exc:
                result["error"] = type(exc).__name__
                result["message"] = str(exc)
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["error"] == "ValueError", outcome
        assert "timeout" in outcome["message"]
        time.sleep(0.5)
        assert cpu_seconds(broker) - before < 1.5
        still_serves(cluster)


def test_a_full_dev_shm_is_a_clear_error_at_connect(socket_dir):
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr!r}")
    path = str(socket_dir / "broker.sock")
    cluster = Cluster(path)
    try:
        # A broker whose /dev/shm is a 2 MiB tmpfs of its own.
        command = (
            "mount -t tmpfs -o size=2m tmpfs /dev/shm && exec "
            f"{sys.executable} -m pybinder broker --socket {path} --max-region-size 8MiB"
        )
        broker = cluster.spawn(["unshare", "-m", "sh", "-c", command])
        broker.is_broker = True
        assert "listening" in broker.readline()
        with pytest.raises(pybinder.BrokerUnavailableError, match=r"/dev/shm is full"):
            pybinder.connect(path, region_size=4 << 20)
        with pybinder.connect(path, region_size=256 << 10) as proc:  # what fits is served
            assert proc.list_services() == []
    finally:
        cluster.close()


# -- reading outside a mapping ----------------------------------------------------------

SWAP_UNDER_A_WAITING_CALL = """
from peers import ITest, pattern
proc = pybinder.connect(SOCKET, oneway_window=1)
service = proc.get_service("test", ITest, timeout=10)
for _ in range(2):  # two slow oneway calls fill most of the server's async space
    service.record_slowly(bytes(700 << 10), 1.5)
sock = raw_connection(SOCKET)
sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, proc.key))
assert answer(sock)[0][0] == protocol.BR_HELLO_THREAD
encoded = parcel.encode([ITest.DESCRIPTOR, [pattern(700 << 10)], {}])
area = give_send_area(sock, encoded.size)
encoded.write_into(area)
record = next(m for m in ITest.METHODS if m.name == "record").code
handle = service.binder.handle
sock.send(protocol.encode(protocol.BC_TRANSACTION, handle, record, protocol.TF_ONE_WAY,
                          encoded.size, 0, 0, 0))
# The call waits for room; now try to swap in a much smaller send area.
small, small_map = __import__("pybinder.region", fromlist=["x"]).create_send_area(4096)
socket.send_fds(sock, [protocol.encode(protocol.BC_SET_SEND_AREA, 4096, 0)], [small])
os.close(small)
result["swap"] = protocol.COMMAND_NAMES[answer(sock)[0][0]]
result["then"] = protocol.COMMAND_NAMES[answer(sock)[0][0]]  # once the server has room
"""


def test_a_send_area_cannot_change_under_a_waiting_oneway_call(socket_dir):
    with hostile_cluster(socket_dir) as cluster:
        outcome = run_hostile(SWAP_UNDER_A_WAITING_CALL, cluster.socket)
        assert outcome == {"swap": "BR_ERROR", "then": "BR_TRANSACTION_COMPLETE"}
        with pybinder.connect(cluster.socket, region_size=8 << 20) as proc:
            service = proc.get_service("test", ITest, timeout=10)
            deadline = time.monotonic() + 20
            while len(service.recorded()) < 3 and time.monotonic() < deadline:
                time.sleep(0.1)
            recorded = service.recorded()
        assert pattern(700 << 10) in recorded  # the bytes the sender wrote, whole


# -- starving and bloating ----------------------------------------------------------------


def test_a_connection_flood_hits_the_uid_quota_and_silent_ones_are_closed(socket_dir):
    args = ("--connections-per-uid", "32", "--hello-timeout-s", "3")
    with hostile_cluster(socket_dir, *args) as cluster:
        broker = broker_of(cluster)
        before = cpu_seconds(broker)
        flood = """
        socks, refused = [], 0
        while len(socks) < 200:
            try:
                socks.append(raw_connection(SOCKET))
            except BlockingIOError:  # the listen backlog is full: the broker catches up
                time.sleep(0.01)
        time.sleep(0.5)
        for s in socks:
            s.settimeout(3)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            if data and protocol.decode(data)[0][0] == protocol.BR_ERROR:
                code, size = protocol.decode(data)[0][1:3]
                result["quota"] = size
                refused += 1
        result["refused"] = refused
        result["kept"] = len(socks) - refused
        # Those the quota let in said no hello: the broker closes them.
        for s in socks:
            s.settimeout(10)
        result["closed"] = sum(1 for s in socks if s.recv(4096) == b"")
        """
        outcome = run_hostile(flood, cluster.socket, timeout=120)
        assert outcome["refused"] >= 160, outcome
        assert QUOTA_NAMES[outcome["quota"]] == "connections_per_uid"
        assert outcome["closed"] == 200
        assert cpu_seconds(broker) - before < 10
        still_serves(cluster)  # root is exempt, and the uid's slots came back


PARTS_NEVER_FINISHED = """
from peers import ITest
from pybinder.runtime.thread_state import PARTS_MIN
proc = pybinder.connect(SOCKET)
service = proc.get_service("test", ITest, timeout=10)
sock = raw_connection(SOCKET)
sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, proc.key))
assert answer(sock)[0][0] == protocol.BR_HELLO_THREAD
encoded = parcel.encode([ITest.DESCRIPTOR, [bytes(PARTS_MIN)], {}])
area = give_send_area(sock, encoded.size)
encoded.write_into(area)
digest = next(m for m in ITest.METHODS if m.name == "digest").code
sock.send(protocol.encode(protocol.BC_TRANSACTION, service.binder.handle, digest,
                          protocol.TF_PARTS, encoded.size, 0, 0, 0)
          + protocol.encode(protocol.BC_PARCEL_READY, encoded.size // 2))
print("half sent", flush=True)
sock.settimeout(15)
failure = answer(sock)[0]
result["answer"] = protocol.COMMAND_NAMES[failure[0]]
result["fields"] = list(failure[1:])
"""


def region_in_use(proc: pybinder.ProcessState, pid: int) -> int:
    return next(p["region_in_use"] for p in proc.status()["processes"] if p["pid"] == pid)


def test_a_parcel_in_parts_that_never_finishes_fails_and_frees_its_space(socket_dir):
    with hostile_cluster(socket_dir, "--parts-timeout-s", "1") as cluster:
        server_pid = cluster.peers[1].pid
        with pybinder.connect(cluster.socket) as proc:
            baseline = region_in_use(proc, server_pid)
            outcome = run_hostile(PARTS_NEVER_FINISHED, cluster.socket)
            assert outcome["answer"] == "BR_FAILED_REPLY"
            code, quota, limit = outcome["fields"]
            assert code == 9 and QUOTA_NAMES[quota] == "parts_timeout_s" and limit == 1
            assert region_in_use(proc, server_pid) == baseline
        still_serves(cluster)


def test_a_client_that_never_reads_is_disconnected_and_others_go_on(socket_dir):
    with hostile_cluster(socket_dir, "--outbox-bytes", "65536") as cluster:
        body = """
        proc = pybinder.connect(SOCKET)
        sock = raw_connection(SOCKET)
        sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, proc.key))
        assert answer(sock)[0][0] == protocol.BR_HELLO_THREAD
        encoded = parcel.encode([protocol.SERVICE_MANAGER_DESCRIPTOR, ["absent"], {}])
        area = give_send_area(sock, encoded.size)
        encoded.write_into(area)
        call = protocol.encode(protocol.BC_TRANSACTION, 0, protocol.SM_CHECK_SERVICE, 0,
                               encoded.size, 0, 0, 0)
        sent = 0
        try:
            for _ in range(20000):  # and never read an answer
                sock.send(call * 64)
                sent += 64
        except OSError as exc:
            result["send"] = type(exc).__name__
        sock.settimeout(10)
        try:
            while sock.recv(4096):
                pass
            result["end"] = "closed"
        except OSError as exc:
            result["end"] = type(exc).__name__
        result["sent"] = sent
        """
        outcome = run_hostile(body, cluster.socket, timeout=120)
        assert outcome["end"] in ("closed", "ConnectionResetError"), outcome
        assert outcome["sent"] < 20000 * 64 or "send" not in outcome
        still_serves(cluster)


class Listener(ITest.Stub):
    pass


def test_nodes_beyond_the_process_quota_are_refused(socket_dir):
    with hostile_cluster(socket_dir, "--nodes-per-process", "64") as cluster:
        body = """
        from peers import ICallback, ITest
        class Listener(ICallback.Stub):
            def on_value(self, value):
                return value
        with pybinder.connect(SOCKET) as proc:
            service = proc.get_service("test", ITest, timeout=10)
            try:
                service.echo([Listener() for _ in range(100)])
                result["many"] = "sent"
            except pybinder.QuotaExceededError as exc:
                result["many"] = [exc.quota, exc.limit]
            few = service.echo([Listener() for _ in range(10)])
            result["few"] = len(few)
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome == {"many": ["nodes_per_process", 64], "few": 10}
        still_serves(cluster)


def test_waiters_beyond_the_process_quota_are_refused(socket_dir):
    with hostile_cluster(socket_dir, "--waiters-per-process", "8") as cluster:
        body = """
        import threading
        proc = pybinder.connect(SOCKET)
        errors = []
        def wait():
            try:
                proc.get_service("never", timeout=3)
            except pybinder.BinderError as exc:
                errors.append(type(exc).__name__)
        threads = [threading.Thread(target=wait) for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        result["errors"] = sorted(errors)
        proc.close()
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["errors"] == ["QuotaExceededError"] * 4 + ["ServiceNotFoundError"] * 8
        still_serves(cluster)


def test_a_huge_service_manager_parcel_is_refused(socket_dir):
    with hostile_cluster(socket_dir) as cluster:
        body = """
        with pybinder.connect(SOCKET, region_size=4 << 20) as proc:
            try:
                proc.service_manager.check_service(bytes(8 << 20))
            except pybinder.QuotaExceededError as exc:
                result["error"] = exc.quota
            result["after"] = proc.list_services()
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome == {"error": "service_manager_parcel", "after": ["test"]}
        still_serves(cluster)


def test_service_names_beyond_the_uid_quota_are_refused(socket_dir):
    with hostile_cluster(socket_dir, "--services-per-uid", "8") as cluster:
        body = """
        from peers import ITest
        class Squatter(ITest.Stub):
            pass
        with pybinder.connect(SOCKET) as proc:
            added = 0
            try:
                for i in range(20):
                    proc.add_service(f"open.squat{i}", Squatter())
                    added += 1
            except pybinder.QuotaExceededError as exc:
                result["error"] = exc.quota
            result["added"] = added
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome == {"error": "services_per_uid", "added": 8}
        still_serves(cluster)


def test_list_services_returns_a_hundred_thousand_names(cluster):
    with pybinder.connect(cluster.socket) as proc:
        stub = Listener()
        names = [f"svc.{i:06d}" for i in range(100_000)]
        for name in names:
            proc.add_service(name, stub)
        assert proc.list_services() == names


# -- impersonation and access policy ------------------------------------------------------


def test_a_name_held_by_root_cannot_be_taken_and_is_not_found_by_default(cluster):
    cluster.server()
    Path(cluster.socket).parent.chmod(0o755)
    os.chmod(cluster.socket, 0o666)  # reachable, with the default policy
    body = """
    from peers import ITest
    class Squatter(ITest.Stub):
        pass
    with pybinder.connect(SOCKET) as proc:
        for action in ("add", "find"):
            try:
                if action == "add":
                    proc.add_service("test", Squatter())
                else:
                    proc.check_service("test")
                result[action] = "allowed"
            except pybinder.SecurityError as exc:
                result[action] = str(exc)
        proc.add_service("mine", Squatter())
        status = proc.status()
        result["pids"] = sorted({p["uid"] for p in status["processes"]})
        result["services"] = sorted(status["services"])
        result["listed"] = proc.list_services()
    """
    outcome = run_hostile(body, cluster.socket)
    assert outcome["add"].startswith("uid 65534 may not add service 'test'"), outcome
    assert "held by uid 0" in outcome["add"]
    assert outcome["find"].startswith("uid 65534 may not find service 'test'"), outcome
    assert outcome["pids"] == [NOBODY]
    assert outcome["services"] == outcome["listed"] == ["mine"]
    still_serves(cluster)


def test_a_reserved_name_and_find_without_call(socket_dir):
    policy = socket_dir / "reserved.toml"
    policy.write_text(
        '[[service]]\nname = "test"\nfind = ["*"]\ncall = ["uid:0"]\n'
        '[[service]]\nname = "robot.*"\nadd = ["uid:0"]\n'
    )
    socket_dir.chmod(0o755)
    args = ("--socket-mode", "666", "--policy", str(policy))
    with running_cluster(str(socket_dir / "broker.sock"), broker_args=args) as cluster:
        cluster.server()
        body = """
        from peers import ITest
        class Squatter(ITest.Stub):
            pass
        with pybinder.connect(SOCKET) as proc:
            service = proc.get_service("test", ITest, timeout=5)  # found...
            try:
                service.add(1, 2)  # ...but not callable
                result["call"] = "allowed"
            except pybinder.SecurityError as exc:
                result["call"] = "SecurityError"
                result["why"] = str(exc)
            try:
                proc.add_service("robot.arm", Squatter())
                result["squat"] = "allowed"
            except pybinder.SecurityError as exc:
                result["squat"] = str(exc)
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["call"] == "SecurityError"
        assert "access policy denies calls" in outcome["why"]
        assert outcome["squat"].startswith("uid 65534 may not add service 'robot.arm'")
        # SIGHUP reloads the file: now nobody may call it too.
        policy.write_text('[[service]]\nname = "test"\nfind = ["*"]\ncall = ["*"]\n')
        os.kill(cluster.peers[0].pid, signal.SIGHUP)
        time.sleep(0.5)
        outcome = run_hostile(body, cluster.socket)
        assert outcome["call"] == "allowed"
        assert outcome["squat"] == "allowed"


def test_the_broker_refuses_a_socket_directory_another_user_prepared(socket_dir):
    for prepare in ("owned by nobody", "writable by all"):
        directory = socket_dir / prepare.replace(" ", "-")
        directory.mkdir()
        if prepare == "owned by nobody":
            os.chown(directory, NOBODY, NOBODY)
        else:
            directory.chmod(0o777)
        broker = subprocess.run(
            [sys.executable, "-m", "pybinder", "broker", "--socket", str(directory / "b.sock")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert broker.returncode != 0
        expected = "belongs to uid 65534" if prepare == "owned by nobody" else "writable by others"
        assert expected in broker.stderr, broker.stderr


def test_a_client_refuses_a_broker_run_by_an_untrusted_uid(socket_dir):
    socket_dir.chmod(0o755)
    directory = socket_dir / "impostor"
    directory.mkdir()
    os.chown(directory, NOBODY, NOBODY)
    path = directory / "broker.sock"
    impostor = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, socket, sys, time\n"
            f"os.setgid({NOBODY}); os.setuid({NOBODY})\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            f"s.bind({str(path)!r}); os.chmod({str(path)!r}, 0o777); s.listen(8)\n"
            "print('listening', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert impostor.stdout is not None
        assert impostor.stdout.readline().strip() == "listening"
        with pytest.raises(pybinder.BrokerUnavailableError, match="runs as uid 65534"):
            pybinder.connect(path)
    finally:
        impostor.kill()
        impostor.wait(10)
        assert impostor.stdout is not None
        impostor.stdout.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- descriptors, death links and loopers ----------------------------------------------


def test_descriptors_beyond_the_call_quota_are_refused_and_none_leak(socket_dir):
    with hostile_cluster(socket_dir, "--fds-per-transaction", "8") as cluster:
        body = """
        pipes = [os.pipe() for _ in range(5)]
        ends = [fd for pair in pipes for fd in pair]  # ten descriptors
        with pybinder.connect(SOCKET) as proc:
            service = proc.get_service("test", __import__("peers").ITest, timeout=10)
            try:
                service.echo([os.fdopen(os.dup(fd), "rb", buffering=0) for fd in ends[:9]])
                result["nine"] = "sent"
            except pybinder.QuotaExceededError as exc:
                result["nine"] = [exc.quota, exc.limit]
            back = service.echo([pybinder.ParcelFileDescriptor.dup(fd) for fd in ends[:8]])
            result["eight"] = [type(b).__name__ for b in back]
            for b in back:
                b.close()
        for fd in ends:
            os.close(fd)
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["nine"] == ["fds_per_transaction", 8]
        assert outcome["eight"] == ["ParcelFileDescriptor"] * 8
        still_serves(cluster)


def test_descriptors_a_uid_keeps_in_flight_are_bounded(socket_dir):
    with hostile_cluster(socket_dir, "--fds-per-uid", "16") as cluster:
        body = """
        from peers import ITest
        read_end, write_end = os.pipe()
        with pybinder.connect(SOCKET, oneway_window=1) as proc:
            service = proc.get_service("test", ITest, timeout=10)
            service.record_slowly("hold the lane", 2.0)  # the calls below queue behind it
            outcomes = []
            for _ in range(6):
                try:
                    service.record([pybinder.ParcelFileDescriptor.dup(write_end)] * 4)
                    outcomes.append("queued")
                except pybinder.QuotaExceededError as exc:
                    outcomes.append(exc.quota)
            result["outcomes"] = outcomes
        os.close(read_end)
        os.close(write_end)
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["outcomes"] == ["queued"] * 4 + ["fds_per_uid"] * 2
        still_serves(cluster)


def test_death_links_are_one_per_handle_and_refused_for_handles_not_held(socket_dir):
    with hostile_cluster(socket_dir) as cluster:
        body = """
        from peers import ITest
        proc = pybinder.connect(SOCKET)
        handle = proc.get_service("test", ITest, timeout=10).binder.handle
        sock = raw_connection(SOCKET)
        sock.send(protocol.encode(protocol.BC_HELLO_THREAD, protocol.PROTOCOL_VERSION, proc.key))
        assert answer(sock)[0][0] == protocol.BR_HELLO_THREAD
        link = protocol.encode(protocol.BC_REQUEST_DEATH_NOTIFICATION, handle)
        for _ in range(200):
            sock.send(link * 100)  # 20,000 requests for one handle
        sock.send(protocol.encode(protocol.BC_REQUEST_DEATH_NOTIFICATION, 999))
        result["unheld"] = answer(sock)[0][0] == protocol.BR_ERROR
        status = proc.status()
        mine = next(p for p in status["processes"] if p["pid"] == os.getpid())
        result["links"] = mine["death_links"]
        result["handle"] = handle
        sock.close()
        proc.close()
        """
        outcome = run_hostile(body, cluster.socket)
        assert outcome["unheld"] is True
        assert outcome["links"] == [outcome["handle"]]
        still_serves(cluster)
