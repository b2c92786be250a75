"""Interleaved rounds: measuring every transport several times in turn.

On a shared machine a slow spell of a few seconds lands on whichever transport is
being measured, and skews the ratios of one run. With ``--rounds N`` each transport
is measured N times, round-robin, each with 1/N of the time budget, and the median
of its rounds is reported: a spell then falls on every transport alike.
"""

from __future__ import annotations

import math
from dataclasses import replace
from statistics import median
from typing import Any

from benchmarks.workloads import Budget


def split_budget(budget: Budget, rounds: int) -> Budget:
    """The budget of one of ``rounds`` rounds: 1/rounds of the timed work (warm-ups
    stay whole, since every round starts its processes afresh)."""
    if rounds == 1:
        return budget
    return replace(
        budget,
        echo_s=budget.echo_s / rounds,
        echo_min=max(8, budget.echo_min // rounds),
        echo_max=max(1000, budget.echo_max // rounds),
        stream_bytes=budget.stream_bytes // rounds,
        stream_reps=max(1, math.ceil(budget.stream_reps / rounds)),
        stream_s=budget.stream_s / rounds,
        agg_s=budget.agg_s / rounds,
    )


def merge_rounds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One transport's rows from several rounds as one row: the median of the
    rounds' medians and rates, summed counts, and each round's figure kept beside
    (``rounds_median_us``, ``rounds_MBps``, ``rounds_calls_per_s``)."""
    if len(rows) == 1:
        return rows[0]
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        return failed[0]
    merged = dict(rows[0])
    merged["rounds"] = len(rows)
    for kind, merge in (
        ("echo", _merge_echo),
        ("stream", _merge_stream),
        ("aggregate", _merge_aggregate),
    ):
        merged[kind] = [merge(list(ms)) for ms in zip(*(r[kind] for r in rows), strict=True)]
    merged["copies"] = _merge_copies([r["copies"] for r in rows])
    return merged


def _merge_echo(ms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "size": ms[0]["size"],
        "median_us": median(m["median_us"] for m in ms),
        "p99_us": median(m["p99_us"] for m in ms),
        "min_us": min(m["min_us"] for m in ms),
        "n": sum(m["n"] for m in ms),
        "payload_bytes_sent": sum(m["payload_bytes_sent"] for m in ms),
        "rounds_median_us": [m["median_us"] for m in ms],
    }


def _merge_stream(ms: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "size": ms[0]["size"],
        "messages": ms[0]["messages"],
        "reps": sum(m["reps"] for m in ms),
        "MBps": median(m["MBps"] for m in ms),
        "best_MBps": max(m["best_MBps"] for m in ms),
        "payload_bytes_sent": sum(m["payload_bytes_sent"] for m in ms),
        "rounds_MBps": [m["MBps"] for m in ms],
    }


def _merge_aggregate(ms: list[dict[str, Any]]) -> dict[str, Any]:
    merged = dict(ms[0])
    merged["calls_per_s"] = median(m["calls_per_s"] for m in ms)
    merged["calls"] = sum(m["calls"] for m in ms)
    merged["seconds"] = sum(m["seconds"] for m in ms)
    per_client = zip(*(m["per_client_calls"] for m in ms), strict=True)
    merged["per_client_calls"] = [sum(calls) for calls in per_client]
    merged["rounds_calls_per_s"] = [m["calls_per_s"] for m in ms]
    return merged


def _merge_copies(copies: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Derived counts are the same every round; measured ones are summed."""
    first = copies[0]
    if first is None or first.get("kind") != "measured":
        return first
    merged = dict(first)
    for key in ("buffer_bytes_copied", "bytes_copied", "payload_bytes_sent"):
        if all(c is not None and key in c for c in copies):
            merged[key] = sum(c[key] for c in copies if c is not None)
    if merged.get("payload_bytes_sent"):
        merged["per_byte"] = merged["buffer_bytes_copied"] / merged["payload_bytes_sent"]
    merged["by_size"] = {
        size: max(c["by_size"][size] for c in copies if c is not None)
        for size in first.get("by_size", {})
    }
    return merged
