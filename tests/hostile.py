"""Hostile code in a child process that drops to another uid before it acts.

Root bypasses file permissions and is exempt from the broker's quotas, so every
attack runs as uid 65534 (nobody) in a child of its own: :func:`run_hostile` runs
a snippet there and returns what it put in ``result``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

NOBODY = 65534

_PREAMBLE = """
import json, mmap, os, socket, struct, sys, time, fcntl
sys.path.insert(0, {tests!r})
import pybinder  # imported first: the interpreter may live where nobody can read
from pybinder import protocol, parcel
from raw import answer, give_send_area, raw_connection
os.setgroups([]); os.setgid({uid}); os.setuid({uid})
SOCKET = {socket!r}
result = {{}}
"""


def run_hostile(body: str, socket_path: str, timeout: float = 60.0, uid: int = NOBODY) -> Any:
    """Run ``body`` (Python) as ``uid`` in a new interpreter; it sees ``SOCKET``,
    ``pybinder``, ``protocol``, ``parcel`` and the helpers of tests/raw.py, and fills
    ``result``, which comes back decoded from JSON.

    Raises:
        AssertionError: the child failed, with its stderr.
    """
    preamble = _PREAMBLE.format(tests=str(Path(__file__).parent), uid=uid, socket=socket_path)
    script = preamble + textwrap.dedent(body) + "\nprint(json.dumps(result))\n"
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout
    )
    assert child.returncode == 0, child.stderr[-4000:]
    return json.loads(child.stdout.strip().splitlines()[-1])
