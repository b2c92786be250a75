"""The comparison benchmark runs end to end and reports every transport.

No timing is asserted: speed lives in benchmarks/, the tests check behaviour.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRANSPORTS = {
    "pipe",
    "socketpair",
    "mp_pipe",
    "zmq",
    "pyro5",
    "iceoryx2",
    "pybinder",
    "pybinder-loan",
}


def test_quick_bench_reports_every_transport(tmp_path):
    result = tmp_path / "bench.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pybinder",
            "bench",
            "--quick",
            "--sizes",
            "64,4096",
            "--stream-sizes",
            "65536",
            "--clients",
            "1",
            "--rounds",
            "2",
            "--json",
            str(result),
            "--no-plot",
            "--no-progress",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads(result.read_text())
    rows = {row["name"]: row for row in report["transports"]}
    assert set(rows) == TRANSPORTS
    for name in ("pipe", "socketpair", "mp_pipe", "pybinder", "pybinder-loan"):
        assert rows[name]["status"] == "ok", rows[name]
        assert [e["size"] for e in rows[name]["echo"]] == [64, 4096]
    for row in rows.values():
        assert row["status"] in ("ok", "skipped"), row
        assert row["status"] == "ok" or row["reason"]
    for name in ("pybinder", "pybinder-loan"):
        assert rows[name]["copies"]["kind"] == "measured"
        assert rows[name]["copies"]["per_byte"] == 1.0
    assert report["machine"]["cpus_online"] >= 1
    assert report["config"]["rounds"] == 2
    assert [len(e["rounds_median_us"]) for e in rows["pybinder"]["echo"]] == [2, 2]
    assert "| pybinder |" in run.stdout
    checked = {row["target"]: row for row in report["targets"]}
    assert checked["16 MiB round trip vs socketpair"]["met"] is None  # 16 MiB not run
    assert checked["64 B round trip vs pipe"]["value"] > 0
    assert checked["copies per payload byte (broker)"]["met"] is True
    assert "pybinder's targets" in run.stdout


def test_rounds_merge_into_medians_and_sums():
    from benchmarks.rounds import merge_rounds

    def row(median_us: float, mbps: float, calls: int, copied: int) -> dict:
        return {
            "name": "x",
            "status": "ok",
            "echo": [
                {"size": 64, "median_us": median_us, "p99_us": 2 * median_us, "min_us": 1.0}
                | {"n": 10, "payload_bytes_sent": 640}
            ],
            "stream": [
                {"size": 65536, "messages": 4, "reps": 1, "MBps": mbps, "best_MBps": mbps}
                | {"payload_bytes_sent": 262144}
            ],
            "aggregate": [
                {"clients": 1, "size": 64, "calls": calls, "seconds": 1.0}
                | {"calls_per_s": float(calls), "per_client_calls": [calls]}
            ],
            "copies": {"kind": "measured", "per_byte": 1.0, "by_size": {"64": 1.0}}
            | {"buffer_bytes_copied": copied, "bytes_copied": copied, "payload_bytes_sent": 100},
        }

    merged = merge_rounds(
        [row(50.0, 900.0, 10, 100), row(90.0, 100.0, 30, 100), row(60.0, 500.0, 20, 100)]
    )
    assert merged["rounds"] == 3
    assert merged["echo"][0]["median_us"] == 60.0 and merged["echo"][0]["n"] == 30
    assert merged["stream"][0]["MBps"] == 500.0 and merged["stream"][0]["best_MBps"] == 900.0
    assert merged["aggregate"][0]["calls_per_s"] == 20.0
    assert merged["aggregate"][0]["per_client_calls"] == [60]
    assert merged["copies"]["per_byte"] == 1.0 and merged["copies"]["payload_bytes_sent"] == 300
    failed = row(1.0, 1.0, 1, 1) | {"status": "error", "reason": "boom"}
    assert merge_rounds([row(50.0, 1.0, 1, 100), failed])["status"] == "error"


def test_targets_are_checked_against_the_runs_own_ratios():
    from benchmarks.targets import evaluate

    def transport(name: str, echo_us: dict[int, float], stream: dict[int, float]) -> dict:
        return {
            "name": name,
            "status": "ok",
            "echo": [{"size": size, "median_us": us} for size, us in echo_us.items()],
            "stream": [
                {"size": size, "MBps": rate, "fraction_of_memcpy": rate / 20_000}
                for size, rate in stream.items()
            ],
            "copies": {"per_byte": 1.0},
        }

    mib16 = 16 << 20
    result = {
        "transports": [
            transport("pipe", {64: 50.0, mib16: 20_000.0}, {}),
            transport("socketpair", {64: 45.0, mib16: 2_600.0}, {}),
            transport("pyro5", {64: 70.0, mib16: 22_000.0}, {mib16: 1_600.0}),
            transport("pybinder", {64: 40.0, mib16: 1_690.0}, {mib16: 12_000.0}),
            transport("pybinder-loan", {64: 41.0, mib16: 780.0}, {mib16: 24_000.0}),
        ]
    }
    checked = {row["target"]: row for row in evaluate(result)}
    sixteen = checked["16 MiB round trip vs socketpair"]
    assert sixteen["met"] is False and round(sixteen["value"], 2) == 0.65
    assert round(sixteen["loan_value"], 2) == 0.30
    assert checked["16 MiB round trip vs pipe"]["met"] is True
    assert checked["64 B round trip vs Pyro5"]["met"] is True  # 40 / 70 = 0.57
    assert checked["16 MiB streaming, share of memcpy"]["met"] is True  # 0.6
    assert checked["1 MiB round trip vs socketpair"]["met"] is None  # not measured
    rivals = checked["worst time vs Pyro5 and pyzmq, any size"]
    assert rivals["met"] is True and rivals["value"] < 1  # zmq absent: Pyro5 only
    result["transports"][2]["echo"][0]["median_us"] = 35.0  # Pyro5 now faster at 64 B
    checked = {row["target"]: row for row in evaluate(result)}
    assert checked["64 B round trip vs Pyro5"]["met"] is False
    assert checked["worst time vs Pyro5 and pyzmq, any size"]["met"] is False
