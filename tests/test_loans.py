"""Loans: a caller fills a buffer in its loan area and sends it; the broker's copy
into the receiver's region is then the only copy of the payload."""

from __future__ import annotations

import hashlib
import os

import pytest
from peers import ITest, pattern

import pybinder


@pytest.fixture
def service(cluster, proc):
    cluster.server(region_size=32 << 20)
    return proc.get_service("test", ITest, timeout=10)


def copied(proc) -> int:
    return proc.status()["broker"]["buffer_bytes_copied"]


def test_a_loaned_buffer_arrives_intact_and_is_copied_once(service, proc):
    data = os.urandom(4 << 20)
    buffer = proc.loan(len(data))
    buffer[:] = data
    before = copied(proc)
    kind, remote_sha, readonly, _ = service.digest(buffer)
    assert (kind, readonly) == ("memoryview", True)
    assert remote_sha == hashlib.sha256(data).hexdigest()
    assert copied(proc) - before == len(data)  # the broker's copy, and no other


def test_a_slice_of_a_loan_is_sent_from_the_loan(service, proc):
    buffer = proc.loan(1 << 20)
    buffer[:] = pattern(1 << 20)
    part = buffer[4096 : 4096 + 65536]
    _, remote_sha, _, _ = service.digest(part)
    assert remote_sha == hashlib.sha256(pattern(1 << 20)[4096 : 4096 + 65536]).hexdigest()


def test_a_loan_can_be_sent_again_and_refilled(service, proc):
    buffer = proc.loan(64 << 10)
    for fill in (b"a", b"b"):
        buffer[:] = fill * (64 << 10)
        assert service.digest(buffer)[1] == hashlib.sha256(fill * (64 << 10)).hexdigest()


def test_a_server_can_answer_from_its_own_loan(service):
    reply = service.loaned_blob(2 << 20)
    assert hashlib.sha256(reply).digest() == hashlib.sha256(pattern(2 << 20)).digest()


def test_a_loan_beyond_the_broker_limit_is_too_large(proc):
    with pytest.raises(pybinder.TransactionTooLargeError):
        proc.loan(65 << 20)


def test_a_larger_loan_replaces_the_area_and_old_views_stay_readable(service, proc):
    small = proc.loan(64 << 10)
    small[:] = b"s" * (64 << 10)
    large = proc.loan(8 << 20)
    large[:8] = b"L" * 8
    assert bytes(small[:1]) == b"s"  # the old mapping lives while a view of it does
    assert service.digest(large[:4096])[1] == hashlib.sha256(large[:4096]).hexdigest()
