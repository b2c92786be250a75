"""The one copy with streaming stores: parcels of at least the broker's ``stream_min``
bytes (here set low with $PYBINDER_STREAM_MIN, so the tests need no machine with a
small cache) arrive intact whichever way they travel, and smaller ones are copied as
before; the C copy keeps every byte at every alignment."""

from __future__ import annotations

import ctypes
import hashlib
import os
from pathlib import Path

import pytest
from conftest import running_cluster
from peers import ITest, pattern
from test_cli import run_cli

import pybinder
from pybinder import compiled
from pybinder.broker import one_copy
from pybinder.runtime.thread_state import PARTS_MIN

STREAM_MIN = 3 << 20  # bytes: above PARTS_MIN, so both a whole copy and parts stream


@pytest.fixture
def cluster(socket_dir):
    """A broker (64 MiB max region) that streams parcels of STREAM_MIN bytes or more."""
    env = {**os.environ, one_copy.STREAM_MIN_ENV: str(STREAM_MIN)}
    with running_cluster(str(socket_dir / "broker.sock"), env) as group:
        yield group


@pytest.fixture
def service(cluster, proc):
    if one_copy._load_stream_copy() is None:
        pytest.skip("no streaming copy in this build or on this machine")
    cluster.server(region_size=32 << 20)
    return proc.get_service("test", ITest, timeout=10)


def counters(proc) -> dict:
    return proc.status()["broker"]


def streamed_by(proc, call) -> tuple[object, int]:
    """``call()``'s result and how many parcels the broker streamed meanwhile."""
    before = counters(proc)["parcels_streamed"]
    result = call()
    return result, counters(proc)["parcels_streamed"] - before


def test_the_broker_reports_its_threshold_and_what_it_streamed(cluster, service, proc):
    assert counters(proc)["stream_min"] == STREAM_MIN
    service.digest(bytes(STREAM_MIN))
    status = run_cli(cluster.socket, "status")
    assert status.returncode == 0, status.stderr
    assert f"parcels of {STREAM_MIN} bytes or more streamed to memory: 1 so far" in status.stdout


def test_a_parcel_in_parts_over_the_threshold_streams_and_arrives_intact(service, proc):
    data = os.urandom(STREAM_MIN + 5 * 4096 + 77)  # parts, an uneven last one
    assert len(data) >= PARTS_MIN
    (kind, sha, readonly, _), streamed = streamed_by(proc, lambda: service.digest(data))
    assert (kind, readonly) == ("memoryview", True)
    assert sha == hashlib.sha256(data).hexdigest()
    assert streamed == 1


def test_a_loaned_parcel_over_the_threshold_streams_and_arrives_intact(service, proc):
    data = os.urandom(STREAM_MIN + 333)  # one whole copy, split over two threads
    buffer = proc.loan(len(data))
    buffer[:] = data
    (_, sha, _, _), streamed = streamed_by(proc, lambda: service.digest(buffer))
    assert sha == hashlib.sha256(data).hexdigest()
    assert streamed == 1


def test_a_large_reply_streams_and_arrives_intact(service, proc):
    size = STREAM_MIN + 4096 + 1
    reply, streamed = streamed_by(proc, lambda: service.blob(size))
    assert bytes(reply) == pattern(size)
    assert streamed == 1


def test_a_parcel_below_the_threshold_is_copied_as_before(service, proc):
    data = os.urandom(STREAM_MIN - (1 << 20))  # in parts too, but not streamed
    (_, sha, _, _), streamed = streamed_by(proc, lambda: service.digest(data))
    assert sha == hashlib.sha256(data).hexdigest()
    assert streamed == 0


def test_the_streaming_copy_is_built_where_the_broker_is_compiled():
    if compiled.pure_requested() or not compiled.running_compiled():
        pytest.skip("pure Python: the broker copies with memmove")
    from pybinder.broker import _stream

    on_x86_64 = os.uname().machine in ("x86_64", "amd64")
    assert bool(_stream.STREAMING) is on_x86_64


@pytest.mark.parametrize("dst_offset", [0, 1, 15, 63, 64, 100])
@pytest.mark.parametrize("src_offset", [0, 7, 32])
def test_the_c_copy_keeps_every_byte_and_touches_no_other(dst_offset, src_offset):
    stream_copy = one_copy._load_stream_copy()
    if stream_copy is None:
        pytest.skip("no streaming copy in this build or on this machine")
    source = os.urandom(300_000)
    src = ctypes.create_string_buffer(source, len(source))
    for size in (0, 1, 255, 320, 4096, 65_537, len(source) - src_offset):
        room = len(source) + 200
        dst = ctypes.create_string_buffer(b"\xaa" * room, room)
        stream_copy(ctypes.addressof(dst) + dst_offset, ctypes.addressof(src) + src_offset, size)
        raw = dst.raw
        assert raw[dst_offset : dst_offset + size] == source[src_offset : src_offset + size]
        assert raw[:dst_offset] == b"\xaa" * dst_offset
        assert raw[dst_offset + size :] == b"\xaa" * (len(raw) - dst_offset - size)


def test_the_threshold_is_three_eighths_of_the_last_level_cache(tmp_path: Path, monkeypatch):
    for index, size in (("index0", "32K"), ("index2", "512K"), ("index3", "32768K")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    assert one_copy.last_level_cache_bytes(tmp_path) == 32 << 20
    assert one_copy.last_level_cache_bytes(tmp_path / "missing") == 0
    if one_copy._load_stream_copy() is None:
        assert one_copy.stream_threshold() == 0  # nothing to stream with
        return
    monkeypatch.delenv(one_copy.STREAM_MIN_ENV, raising=False)
    assert one_copy.stream_threshold(tmp_path) == 12 << 20
    assert one_copy.stream_threshold(tmp_path / "missing") == 0
    monkeypatch.setenv(one_copy.STREAM_MIN_ENV, "123")
    assert one_copy.stream_threshold(tmp_path) == 123
    monkeypatch.setenv(one_copy.STREAM_MIN_ENV, "0")
    assert one_copy.stream_threshold(tmp_path) == 0


def test_a_broker_told_never_to_stream_copies_as_before(socket_dir):
    env = {**os.environ, one_copy.STREAM_MIN_ENV: "0"}
    with running_cluster(str(socket_dir / "broker.sock"), env) as cluster:
        cluster.server(region_size=16 << 20, threads=2)
        with pybinder.connect(cluster.socket) as proc:
            service = proc.get_service("test", ITest, timeout=10)
            data = os.urandom(PARTS_MIN + 12345)
            (_, sha, _, _), streamed = streamed_by(proc, lambda: service.digest(data))
            assert sha == hashlib.sha256(data).hexdigest()
            assert (streamed, counters(proc)["stream_min"]) == (0, 0)
            status = run_cli(cluster.socket, "status")
            assert "copied with memmove (no streaming stores)" in status.stdout
