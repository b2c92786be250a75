"""The command line against a real broker: services, status, call."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
from peers import ITest
from waiting import loopers

from pybinder.cli import parse_size


def run_cli(socket_path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pybinder", "--socket", socket_path, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_services_lists_registered_names(cluster):
    cluster.server()
    listing = run_cli(cluster.socket, "services")
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.split() == ["test"]


def test_status_json_reports_processes_and_bytes_copied(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    service.digest(bytes(1 << 20))
    status = run_cli(cluster.socket, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    broker = report["broker"]
    assert broker["bytes_copied"] > 1 << 20
    assert broker["buffer_bytes_copied"] >= 1 << 20
    assert broker["transactions"] >= 3
    by_pid = {p["pid"]: p for p in report["processes"]}
    assert {server.pid, os.getpid()} <= set(by_pid)
    serving = by_pid[server.pid]
    assert serving["services"] == ["test"]
    assert serving["region_size"] == 4 << 20
    assert serving["transactions_received"] >= 1
    assert serving["bytes_copied_in"] >= 1 << 20
    assert loopers(serving) == 2  # start_thread_pool(4) starts one; join_thread_pool() one
    assert report["services"] == {"test": server.pid}


def test_status_table_names_each_process(cluster):
    server = cluster.server()
    status = run_cli(cluster.socket, "status")
    assert status.returncode == 0, status.stderr
    assert "bytes copied" in status.stdout
    rows = [line.split() for line in status.stdout.splitlines()]
    assert any(row and row[0] == str(server.pid) for row in rows)


def test_call_invokes_a_method_by_code(cluster):
    cluster.server()
    add = next(m.code for m in ITest.METHODS if m.name == "add")
    called = run_cli(cluster.socket, "call", "test", ITest.DESCRIPTOR, str(add), "2", "40")
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == 42


def test_call_of_a_missing_service_says_so(cluster):
    called = run_cli(cluster.socket, "call", "missing", "x", "1")
    assert called.returncode == 1
    assert "ServiceNotFoundError" in called.stderr


def test_commands_without_a_broker_exit_2_with_a_hint(socket_dir):
    listing = run_cli(str(socket_dir / "none.sock"), "services")
    assert listing.returncode == 2
    assert "pybinder broker" in listing.stderr


@pytest.mark.parametrize(
    ("text", "size"),
    [("1048576", 1 << 20), ("64K", 64 << 10), ("16MiB", 16 << 20), ("1g", 1 << 30)],
)
def test_sizes_parse_in_binary_units(text, size):
    assert parse_size(text) == size


def test_status_shows_the_object_graph_and_pending_calls_with_their_age(cluster, proc):
    server = cluster.server()
    service = proc.get_service("test", ITest, timeout=10)
    service.link_to_death(lambda _: None)
    sleeper = threading.Thread(target=service.sleep, args=(1.5,))
    sleeper.start()
    time.sleep(0.5)
    report = json.loads(run_cli(cluster.socket, "status", "--json").stdout)
    table = run_cli(cluster.socket, "status").stdout
    sleeper.join(10)
    by_pid = {p["pid"]: p for p in report["processes"]}
    serving, me = by_pid[server.pid], by_pid[os.getpid()]
    # held by the service manager's entry and by this process
    assert {"descriptor": "tests.ITest", "id": 1, "refs": 2} in [
        {k: n[k] for k in ("descriptor", "id", "refs")} for n in serving["nodes"]
    ]
    handle = service.binder.handle
    (ref,) = [r for r in me["refs"] if r["handle"] == handle]
    assert ref["node"]["pid"] == server.pid and ref["death_link"] is True
    assert me["death_links"] == [handle]
    (running,) = [t for t in serving["pending"] if t["from_pid"] == os.getpid()]
    assert running["state"] == "running" and running["age_s"] >= 0.4
    assert f"pid {server.pid} node 1 tests.ITest: 2 refs held by others" in table
    assert f"pid {os.getpid()} handle {handle} -> pid {server.pid} node 1" in table
    assert "death link" in table and "running call code" in table
