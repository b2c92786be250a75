"""The timed loops: echo latency, one-way streaming, aggregate calls, memcpy.

Garbage collection is collected and disabled around each timed loop only.
Every loop runs under :func:`benchmarks.common.deadline`, so a stuck peer
raises ``TimeoutError`` instead of hanging the run.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .common import MB, BenchError, deadline, median, percentile
from .transports import Client

STEP_DEADLINE_S = 60.0  # s any single measurement may take before it is aborted


@dataclass(frozen=True)
class Budget:
    """How long to measure (seconds) and how much (iterations, bytes)."""

    echo_s: float  # s of timed echo calls per size
    echo_min: int  # minimum timed echo calls per size
    echo_max: int  # maximum timed echo calls per size
    warm_s: float  # s of warm-up before each timed loop
    stream_bytes: int  # bytes pushed per streaming repetition
    stream_min_msgs: int  # minimum messages per streaming repetition
    stream_reps: int  # repetitions per streaming size (median reported)
    stream_s: float  # s after which no further repetition starts
    agg_s: float  # s of timed calls per client count
    memcpy_bytes: int  # bytes copied per memcpy sample
    memcpy_reps: int  # memcpy samples (best reported)


def make_payload(size: int) -> bytes:
    """Return ``size`` bytes of a non-zero pattern (zero pages would flatter copies)."""
    pattern = bytes(range(1, 256))
    return (pattern * (size // len(pattern) + 1))[:size]


@contextmanager
def timed_region(seconds: float) -> Iterator[None]:
    """Collect garbage, disable GC and arm a deadline for one timed loop."""
    gc.collect()
    gc.disable()
    try:
        with deadline(seconds):
            yield
    finally:
        gc.enable()


def _warm_up(call: Callable[[], None], seconds: float, minimum: int = 3) -> int:
    """Call ``call`` for ``seconds``; return calls made.

    At least once, and ``minimum`` times unless that takes over a second
    (a 64 MiB Pyro5 call takes seconds), at most 10 000 times.
    """
    n = 0
    start = time.perf_counter()
    while n < 10_000:
        elapsed = time.perf_counter() - start
        if n >= 1 and elapsed >= seconds and (n >= minimum or elapsed >= 1.0):
            break
        call()
        n += 1
    return n


def measure_echo(client: Client, size: int, budget: Budget) -> dict[str, Any]:
    """Round-trip latency for ``size``-byte payloads: median and p99 in µs."""
    payload = make_payload(size)
    samples: list[int] = []
    clock = time.perf_counter_ns
    with timed_region(STEP_DEADLINE_S):
        warm = _warm_up(lambda: client.echo(payload), budget.warm_s)
        start = time.perf_counter()
        soft, hard = start + budget.echo_s, start + max(5 * budget.echo_s, 2.0)
        while len(samples) < budget.echo_max:
            now = time.perf_counter()
            if now >= hard or (now >= soft and len(samples) >= budget.echo_min):
                break
            t0 = clock()
            client.echo(payload)
            samples.append(clock() - t0)
    samples.sort()
    return {
        "size": size,
        "median_us": median(samples) / 1e3,
        "p99_us": percentile(samples, 99) / 1e3,
        "min_us": samples[0] / 1e3,
        "n": len(samples),
        "payload_bytes_sent": size * (warm + len(samples)),
    }


def barrier(client: Client, expected: int, timeout: float = 30.0) -> int:
    """Round-trip until the server has counted ``expected`` pushes; return the count."""
    give_up = time.monotonic() + timeout
    while (seen := client.count()) < expected:
        if time.monotonic() > give_up:
            raise BenchError(f"only {seen} of {expected} pushes arrived")
    return seen


def _stream_once(client: Client, payload: bytes, messages: int, expected: int) -> float:
    """Push ``messages`` payloads then barrier; return elapsed seconds."""
    push = client.push
    t0 = time.perf_counter()
    for _ in range(messages):
        push(payload)
    barrier(client, expected)
    return time.perf_counter() - t0


def measure_stream(client: Client, size: int, budget: Budget) -> dict[str, Any]:
    """One-way throughput in MB/s for ``size``-byte messages (median of reps)."""
    payload = make_payload(size)
    messages = max(budget.stream_min_msgs, budget.stream_bytes // size)
    rates: list[float] = []
    with timed_region(STEP_DEADLINE_S):
        expected = client.count()
        warm = min(messages, 4)
        expected += warm
        _stream_once(client, payload, warm, expected)
        start = time.perf_counter()
        for _ in range(budget.stream_reps):
            expected += messages
            elapsed = _stream_once(client, payload, messages, expected)
            rates.append(messages * size / elapsed / MB)
            if time.perf_counter() - start > budget.stream_s:
                break
    rates.sort()
    return {
        "size": size,
        "messages": messages,
        "reps": len(rates),
        "MBps": median(rates),
        "best_MBps": rates[-1],
        "payload_bytes_sent": size * (warm + messages * len(rates)),
    }


def timed_calls(
    client: Client, size: int, start_at: float, stop_at: float
) -> tuple[int, float, float]:
    """Echo ``size``-byte calls from ``start_at`` to ``stop_at`` (time.monotonic s).

    Calls made before ``start_at`` are warm-up.  Returns (calls, first
    timed call's start, last timed call's end), times in time.monotonic s.
    """
    payload = make_payload(size)
    echo = client.echo
    clock = time.monotonic
    calls = 0
    with timed_region(stop_at - clock() + STEP_DEADLINE_S):
        while clock() < start_at:
            echo(payload)
        t0 = now = clock()
        while now < stop_at:
            echo(payload)
            calls += 1
            now = clock()
    return calls, t0, now


def measure_memcpy(budget: Budget) -> dict[str, Any]:
    """Single-thread memcpy bandwidth in MB/s (memoryview slice assignment, best of N)."""
    n = budget.memcpy_bytes
    src = bytearray(make_payload(n))
    dst = bytearray(n)
    smv, dmv = memoryview(src), memoryview(dst)
    dmv[:] = smv  # fault in the destination pages
    samples = []
    with timed_region(STEP_DEADLINE_S):
        for _ in range(budget.memcpy_reps):
            t0 = time.perf_counter()
            dmv[:] = smv
            samples.append(time.perf_counter() - t0)
    rates = sorted(n / s / MB for s in samples)
    return {"bytes": n, "best_MBps": rates[-1], "median_MBps": median(rates), "samples": len(rates)}


def measure_memcpy_at(size: int, budget: Budget) -> float:
    """Best MB/s copying one ``size``-byte payload into one reused buffer.

    The same source and destination are reused, like a transport that sends
    one payload object into recycled buffers, so small sizes run from cache
    and can beat the large-copy figure of :func:`measure_memcpy`.
    """
    src = memoryview(make_payload(size))
    dmv = memoryview(bytearray(size))
    dmv[:] = src
    reps = max(1, min(4096, budget.memcpy_bytes // size))
    best = 0.0
    with timed_region(STEP_DEADLINE_S):
        for _ in range(budget.memcpy_reps):
            t0 = time.perf_counter()
            for _ in range(reps):
                dmv[:] = src
            best = max(best, reps * size / (time.perf_counter() - t0) / MB)
    return best


QUICK = Budget(
    echo_s=0.12,
    echo_min=8,
    echo_max=50_000,
    warm_s=0.03,
    stream_bytes=48 * 1024 * 1024,
    stream_min_msgs=4,
    stream_reps=2,
    stream_s=0.4,
    agg_s=0.25,
    memcpy_bytes=64 * 1024 * 1024,
    memcpy_reps=3,
)
STANDARD = Budget(
    echo_s=0.5,
    echo_min=30,
    echo_max=200_000,
    warm_s=0.1,
    stream_bytes=192 * 1024 * 1024,
    stream_min_msgs=8,
    stream_reps=3,
    stream_s=2.0,
    agg_s=1.0,
    memcpy_bytes=64 * 1024 * 1024,
    memcpy_reps=5,
)
FULL = Budget(
    echo_s=1.0,
    echo_min=50,
    echo_max=500_000,
    warm_s=0.2,
    stream_bytes=384 * 1024 * 1024,
    stream_min_msgs=16,
    stream_reps=5,
    stream_s=4.0,
    agg_s=2.0,
    memcpy_bytes=64 * 1024 * 1024,
    memcpy_reps=7,
)
