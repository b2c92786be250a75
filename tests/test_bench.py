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
