"""pybinder's performance targets, checked against one run's own numbers.

The targets are ratios within one run (absolute times on a shared machine move by
2x between runs); they are stated for ``--full`` with the default ``--pin cross``.
Each is checked for the plain ``pybinder`` row, and the loaned row is shown beside
it. A target whose sizes or transports were not measured in this run is reported as
not measured (``met`` None), never as met.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

MiB = 1024 * 1024
PLAIN, LOAN = "pybinder", "pybinder-loan"
RIVALS = ("pyro5", "zmq")


def _echo(transports: Transports, name: str, size: int) -> float | None:
    """The median echo time (µs) of ``name`` at ``size`` bytes, if measured."""
    for row in transports.get(name, {}).get("echo", []):
        if row["size"] == size:
            return row.get("median_us")
    return None


def _ratio_of(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


Transports = dict[str, dict[str, Any]]
Check = Callable[[Transports], tuple[float | None, float | None]]


def _echo_ratio(size: int, base: str) -> Check:
    def check(t: Transports) -> tuple[float | None, float | None]:
        ref = _echo(t, base, size)
        return _ratio_of(_echo(t, PLAIN, size), ref), _ratio_of(_echo(t, LOAN, size), ref)

    return check


def _stream_share(size: int) -> Check:
    def check(t: Transports) -> tuple[float | None, float | None]:
        plain, loan = (
            [
                r.get("fraction_of_memcpy")
                for r in t.get(name, {}).get("stream", [])
                if r["size"] == size
            ]
            for name in (PLAIN, LOAN)
        )
        return (plain or [None])[0], (loan or [None])[0]

    return check


def _copies(t: Transports) -> tuple[float | None, float | None]:
    plain, loan = ((t.get(name, {}).get("copies") or {}).get("per_byte") for name in (PLAIN, LOAN))
    return plain, loan


def _worst_against_rivals(t: Transports) -> tuple[float | None, float | None]:
    """The largest pybinder/rival echo time, or rival/pybinder streaming rate, over
    every size both measured (< 1: pybinder ahead everywhere)."""
    worst = []
    for name in (PLAIN, LOAN):
        ratios = []
        for rival in RIVALS:
            if t.get(rival, {}).get("status") != "ok":
                continue
            for row in t.get(name, {}).get("echo", []):
                ratios.append(_ratio_of(row.get("median_us"), _echo(t, rival, row["size"])))
            rates = {r["size"]: r.get("MBps") for r in t.get(rival, {}).get("stream", [])}
            for row in t.get(name, {}).get("stream", []):
                ratios.append(_ratio_of(rates.get(row["size"]), row.get("MBps")))
        known = [r for r in ratios if r is not None]
        worst.append(max(known) if known else None)
    return worst[0], worst[1]


#: (what, comparison, limit, check): check returns the (plain, loaned) values.
TARGETS: list[tuple[str, str, float, Check]] = [
    ("16 MiB round trip vs socketpair", "<=", 0.5, _echo_ratio(16 * MiB, "socketpair")),
    ("16 MiB round trip vs pipe", "<=", 0.1, _echo_ratio(16 * MiB, "pipe")),
    ("1 MiB round trip vs socketpair", "<=", 1.0, _echo_ratio(MiB, "socketpair")),
    ("16 MiB streaming, share of memcpy", ">=", 0.5, _stream_share(16 * MiB)),
    ("64 B round trip vs pipe", "<=", 1.5, _echo_ratio(64, "pipe")),
    ("64 B round trip vs Pyro5", "<=", 0.6, _echo_ratio(64, "pyro5")),
    ("copies per payload byte (broker)", "==", 1.0, _copies),
    ("worst time vs Pyro5 and pyzmq, any size", "<", 1.0, _worst_against_rivals),
]


def _met(value: float | None, comparison: str, limit: float) -> bool | None:
    if value is None:
        return None
    if comparison == "<=":
        return value <= limit
    if comparison == ">=":
        return value >= limit
    if comparison == "<":
        return value < limit
    return abs(value - limit) < 0.005


def evaluate(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Check every target against ``result`` (the benchmark's JSON).

    Returns one dict per target: ``target``, ``comparison``, ``limit``, ``value``
    and ``loan_value`` (ratios, None if not measured) and ``met`` (True, False, or
    None when not measured).
    """
    transports = {t["name"]: t for t in result["transports"] if t.get("status") == "ok"}
    rows = []
    for what, comparison, limit, check in TARGETS:
        value, loan_value = check(transports)
        rows.append(
            {
                "target": what,
                "comparison": comparison,
                "limit": limit,
                "value": value,
                "loan_value": loan_value,
                "met": _met(value, comparison, limit),
            }
        )
    return rows
