"""benchmarks/soak.py runs end to end, tiny: reports, a summary with 0 errors, exit 0.

No rate or growth is asserted: the soak script's numbers are for people to read.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOAK = ROOT / "benchmarks" / "soak.py"
# report CALLS CALLS_PER_S BROKER_RSS_MIB BROKER_FDS ERRORS [(baseline)]
REPORT = re.compile(r"^report\s+(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+(\d+)\s+(\d+)\b", re.MULTILINE)


@pytest.mark.timeout(150)
def test_tiny_soak_reports_and_passes():
    run = subprocess.run(
        [
            sys.executable,
            str(SOAK),
            "--calls",
            "3000",
            "--clients",
            "2",
            "--report-every",
            "1000",
            "--large-every",
            "50",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    reports = REPORT.findall(run.stdout)
    assert len(reports) >= 3, run.stdout
    calls = [int(r[0]) for r in reports]
    assert calls == sorted(calls) and calls[-1] == 3000, calls
    for _, rate, rss_mib, fds, errors in reports:
        assert float(rate) >= 0 and float(rss_mib) > 0 and int(fds) > 0, reports
        assert int(errors) == 0, reports
    assert re.search(r"^summary: 3000 calls\b.*, 0 errors$", run.stdout, re.MULTILINE), run.stdout
    assert re.search(r"^summary: broker RSS .* growth after warm-up [+-]\d", run.stdout, re.M)
    assert re.search(
        r"^summary: oneway pushes received by the server (\d+) of \1$", run.stdout, re.M
    )
    assert run.stdout.rstrip().endswith("PASS"), run.stdout
