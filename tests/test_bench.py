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
    assert "| pybinder |" in run.stdout
