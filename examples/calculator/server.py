"""Serve ICalc as "calc": ``python examples/calculator/server.py [--socket PATH]``."""

from __future__ import annotations

import argparse
import hashlib
import os

from calc import ICalc

import pybinder


class Calc(ICalc.Stub):
    """The implementation: every method runs in one of the server's looper threads."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def _note(self, text: str) -> None:
        caller = f"pid {pybinder.get_calling_pid()} uid {pybinder.get_calling_uid()}"
        line = f"{text}  (from {caller})"
        self.lines.append(line)
        print(line, flush=True)

    def add(self, a: int, b: int) -> int:
        self._note(f"add({a}, {b})")
        return a + b

    def log(self, line: str) -> None:
        self._note(f"log({line!r})")

    def checksum(self, data: memoryview) -> str:
        kind = f"{type(data).__name__}, read-only={getattr(data, 'readonly', '?')}"
        self._note(f"checksum of {len(data)} bytes ({kind})")
        return hashlib.sha256(data).hexdigest()

    def history(self) -> list[str]:
        return list(self.lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", help="broker socket (default: the usual search)")
    args = parser.parse_args()
    # Serves until SIGTERM or SIGINT, and comes back if the broker restarts.
    pybinder.serve(
        "calc",
        Calc(),
        socket_path=args.socket,
        region_size=32 << 20,
        ready=lambda proc: print(f'registered "calc" (pid {os.getpid()})', flush=True),
    )
    print("stopped cleanly", flush=True)


if __name__ == "__main__":
    main()
