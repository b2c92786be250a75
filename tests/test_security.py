"""Who may read, write, map and call what: regions are read-only to their owners,
names leave /dev/shm at once, and the caller's identity comes from the kernel.

Root bypasses file permissions, so checks of permissions run in a child that has
dropped to another uid (``os.setuid``) before it tries anything.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from peers import ITest

NOBODY = 65534


def region_maps(region_size: int) -> list[list[str]]:
    """The /proc/self/maps lines of this project's regions of ``region_size`` bytes."""
    lines = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and "/pybinder-" in fields[5]:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if end - start == region_size:
                lines.append(fields)
    return lines


def test_receive_region_is_mapped_read_only_in_its_owner(proc):
    (mapping,) = region_maps(proc.region_size)
    assert mapping[1] == "r--s", mapping
    assert mapping[5].startswith("/dev/shm/pybinder-") and mapping[-1] == "(deleted)"
    with pytest.raises(TypeError):
        proc.region_view[0] = 1


def test_region_descriptor_refuses_writable_mappings_even_for_root(proc):
    with pytest.raises(PermissionError):
        mmap.mmap(proc.region_fd, proc.region_size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    (mapping,) = region_maps(proc.region_size)
    start, end = (int(x, 16) for x in mapping[0].split("-"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    assert libc.mprotect(start, end - start, mmap.PROT_READ | mmap.PROT_WRITE) == -1
    assert ctypes.get_errno() == 13  # EACCES: the mapping may never become writable


def test_region_name_is_gone_from_dev_shm_once_connected(proc):
    (mapping,) = region_maps(proc.region_size)
    name = mapping[5]
    assert not os.path.exists(name)
    assert not any(entry.startswith("pybinder") for entry in os.listdir("/dev/shm"))


CHILD_AS_NOBODY = textwrap.dedent(
    """
    import json, mmap, os, sys
    sys.path.insert(0, {tests!r})
    import pybinder  # imported first: the interpreter itself may live where nobody can read
    from peers import ITest
    os.setgid({uid}); os.setuid({uid})
    result = {{}}
    with pybinder.connect({socket!r}) as proc:
        service = proc.get_service("test", ITest, timeout=10)
        result["seen"] = service.who()
        result["me"] = [os.getpid(), os.getuid(), os.getgid()]
        try:
            os.open(f"/proc/self/fd/{{proc.region_fd}}", os.O_RDWR)
            result["reopen"] = "opened"
        except OSError as exc:
            result["reopen"] = type(exc).__name__
        try:
            mmap.mmap(proc.region_fd, proc.region_size, prot=mmap.PROT_WRITE | mmap.PROT_READ)
            result["map"] = "mapped"
        except OSError as exc:
            result["map"] = type(exc).__name__
    print(json.dumps(result))
    """
)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid")
def test_another_uid_is_seen_as_itself_and_cannot_write_its_region(shared_cluster):
    shared_cluster.server()
    script = CHILD_AS_NOBODY.format(
        uid=NOBODY, tests=str(Path(__file__).parent), socket=shared_cluster.socket
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    import json

    result = json.loads(child.stdout)
    assert result["me"][1] == NOBODY
    assert result["seen"] == result["me"]
    assert result["reopen"] == "PermissionError"
    assert result["map"] == "PermissionError"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to drop to another uid")
def test_private_socket_directory_keeps_other_uids_out(cluster):
    script = textwrap.dedent(
        f"""
        import os, pybinder  # imported before dropping privileges
        os.setgid({NOBODY}); os.setuid({NOBODY})
        try:
            pybinder.connect({cluster.socket!r})
        except pybinder.BrokerUnavailableError as exc:
            print("refused", exc)
        """
    )
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert child.stdout.startswith("refused"), child.stderr


def test_calling_identity_of_another_process_is_its_own(cluster, proc):
    cluster.server()
    client = cluster.peer("hammer", 1)
    client.wait_ready()
    assert client.readline() == "right 1"
    service = proc.get_service("test", ITest, timeout=10)
    assert service.who()[0] == os.getpid() != client.pid
