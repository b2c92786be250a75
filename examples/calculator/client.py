"""Call the "calc" service: ``python examples/calculator/client.py [--socket PATH]``."""

from __future__ import annotations

import argparse
import hashlib
import os

from calc import ICalc

import pybinder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--socket", help="broker socket (default: the usual search)")
    args = parser.parse_args()
    with pybinder.connect(args.socket) as proc:
        calc = proc.get_service("calc", ICalc, timeout=10.0)
        print(f"calc.add(2, 40) = {calc.add(2, 40)}", flush=True)
        calc.log(f"hello from pid {os.getpid()}")
        print("calc.log(...) sent oneway", flush=True)
        data = os.urandom(8 << 20)
        remote = calc.checksum(data)
        same = "matches" if remote == hashlib.sha256(data).hexdigest() else "DIFFERS from"
        print(f"calc.checksum(8 MiB) = {remote[:16]}... {same} the local sha256", flush=True)
        print(f"the server has done {len(calc.history())} things", flush=True)
        try:
            calc.add("two", 40)  # type: ignore[arg-type]  # wrong on purpose
        except TypeError as exc:
            print(f"calc.add('two', 40) raised TypeError remotely: {exc}", flush=True)


if __name__ == "__main__":
    main()
