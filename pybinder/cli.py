"""The ``pybinder`` command: ``broker``, ``services``, ``status``, ``call``.

Run ``pybinder --help`` or ``pybinder COMMAND --help`` for the options.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """Parse a byte count: ``1048576``, ``64K``, ``16MiB``, ``1g`` (binary units).

    Raises:
        argparse.ArgumentTypeError: not a size.
    """
    match = _SIZE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size in bytes: {text!r}")
    unit = (match.group(2) or "").lower()[:1]
    return int(match.group(1)) * _UNITS[unit]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pybinder", description="Binder-style one-copy IPC for Linux processes."
    )
    parser.add_argument("--socket", help="broker socket path (default: $PYBINDER_SOCKET, ...)")
    commands = parser.add_subparsers(dest="command", required=True)

    broker = commands.add_parser("broker", help="run the broker daemon (the 'driver')")
    broker.add_argument("--socket", dest="broker_socket", help="socket path to listen on")
    broker.add_argument(
        "--max-region-size",
        type=parse_size,
        default=None,
        help="largest receive region a process may get, bytes (default 256MiB)",
    )
    broker.add_argument(
        "--region-size",
        type=parse_size,
        default=None,
        help="region a process gets when it asks for none, bytes (default 1MiB-8KiB)",
    )
    broker.add_argument(
        "--spin-us",
        type=float,
        default=None,
        help="µs the loop polls before it sleeps (default 200; 0: never spin)",
    )
    broker.add_argument(
        "--socket-mode",
        type=lambda text: int(text, 8),
        default=0o600,
        help="octal permission bits of the socket (default 600: this user only;"
        " 660 with --group shares it with a group, 666 with everyone)",
    )
    broker.add_argument("--group", default=None, help="group (name or gid) the socket belongs to")
    broker.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="TOML file: who may add, find and call which service names (SIGHUP reloads it)",
    )
    broker.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    from pybinder.broker.quotas import add_arguments

    add_arguments(broker)

    commands.add_parser("services", help="list registered service names")

    status = commands.add_parser("status", help="show connected processes and counters")
    status.add_argument("--json", action="store_true", help="print JSON")

    call = commands.add_parser("call", help="call a method of a service by transaction code")
    call.add_argument("service")
    call.add_argument("descriptor", help="the service's interface descriptor")
    call.add_argument("code", type=int, help="transaction code (methods start at 1)")
    call.add_argument("args", nargs="*", help="arguments, each parsed as JSON if it can be")

    bench = commands.add_parser(
        "bench",
        help="compare pybinder with pipes, sockets and other IPC (benchmarks/bench.py)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="see pybinder bench --help")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``pybinder`` and ``python -m pybinder``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # everything after "bench" belongs to benchmarks/bench.py
        return _bench(argparse.Namespace(bench_args=argv[1:]))
    args = build_parser().parse_args(argv)
    handler = {
        "broker": _broker,
        "services": _services,
        "status": _status,
        "call": _call,
        "bench": _bench,
    }
    return handler[args.command](args)


def _broker(args: argparse.Namespace) -> int:
    from pybinder.broker import Broker, BrokerAlreadyRunningError
    from pybinder.broker.daemon import DEFAULT_MAX_REGION_SIZE, DEFAULT_SPIN_US
    from pybinder.broker.quotas import from_arguments
    from pybinder.paths import resolve_socket_path
    from pybinder.region import DEFAULT_REGION_SIZE

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s pybinder-broker %(levelname)s %(message)s"
    )
    path = resolve_socket_path(args.broker_socket or args.socket)
    try:
        quotas = from_arguments(args)
        group = None if args.group is None else _gid_of(args.group)
    except (ValueError, KeyError) as exc:
        print(f"pybinder broker: {exc}", file=sys.stderr)
        return 2
    try:
        broker = Broker(
            path,
            max_region_size=args.max_region_size or DEFAULT_MAX_REGION_SIZE,
            default_region_size=args.region_size or DEFAULT_REGION_SIZE,
            spin_us=DEFAULT_SPIN_US if args.spin_us is None else args.spin_us,
            quotas=quotas,
            socket_mode=args.socket_mode,
            socket_group=group,
            policy_path=args.policy,
        )
    except (ValueError, OSError) as exc:  # PolicyError is a ValueError
        print(f"pybinder broker: {exc}", file=sys.stderr)
        return 2
    try:
        broker.start()
    except BrokerAlreadyRunningError as exc:
        print(f"pybinder broker: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"pybinder broker: cannot listen on {path}: {exc}", file=sys.stderr)
        return 1
    broker.install_signal_handlers()
    print(f"pybinder broker listening on {path} (pid {_pid()})", flush=True)
    try:
        broker.serve_forever()
    finally:
        broker.close()
    return 0


def _gid_of(group: str) -> int:
    """A group's gid from its name or number.

    Raises:
        KeyError: no such group.
    """
    import grp

    return int(group) if group.isdigit() else grp.getgrnam(group).gr_gid


def _connect(args: argparse.Namespace) -> Any:
    import pybinder

    try:
        return pybinder.connect(args.socket, region_size=None)
    except pybinder.BrokerUnavailableError as exc:
        print(f"pybinder: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _services(args: argparse.Namespace) -> int:
    with _connect(args) as proc:
        for name in proc.list_services():
            print(name)
    return 0


def _status(args: argparse.Namespace) -> int:
    with _connect(args) as proc:
        status = proc.status()
    for process in status["processes"]:
        process["name"] = _process_name(process["pid"])
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        print()
    else:
        print(format_status(status))
    return 0


def _call(args: argparse.Namespace) -> int:
    import pybinder

    values = [_json_or_text(a) for a in args.args]
    with _connect(args) as proc:
        try:
            binder = proc.get_service(args.service, timeout=0)
            result = binder.transact(args.code, values, descriptor=args.descriptor)
        except pybinder.BinderError as exc:
            print(f"pybinder: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result, default=repr))
    return 0


def _bench(args: argparse.Namespace) -> int:
    """Run benchmarks/bench.py from the source checkout this package was installed from."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "bench.py").is_file():
        print(
            f"pybinder bench needs the source checkout: no benchmarks/ in {root}",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    from benchmarks.bench import main as bench_main

    return int(bench_main(args.bench_args))


def _streaming_line(broker: dict[str, Any]) -> str:
    """How the broker copies large parcels (see ``pybinder.broker.one_copy``)."""
    threshold = broker.get("stream_min", 0)
    if not threshold:
        return "large parcels copied with memmove (no streaming stores)"
    return (
        f"parcels of {threshold} bytes or more streamed to memory:"
        f" {broker.get('parcels_streamed', 0)} so far"
    )


def format_status(status: dict[str, Any]) -> str:
    """The human-readable ``pybinder status`` table (sizes in bytes)."""
    broker = status["broker"]
    lines = [
        f"broker pid {broker['pid']} on {broker['socket']}, up {broker['uptime_s']:.0f} s,"
        f" {'compiled (mypyc)' if broker.get('compiled') else 'pure Python'}",
        f"transactions {broker['transactions']}, bytes copied {broker['bytes_copied']}"
        f" (out-of-band payload {broker['buffer_bytes_copied']})",
        _streaming_line(broker),
        "",
        f"{'PID':>7} {'UID':>6} {'NAME':<16} {'REGION':>10} {'IN USE':>10} {'SENT':>8}"
        f" {'RECEIVED':>8} {'COPIED IN':>12} {'LOOPERS':>9} {'NODES':>6} {'REFS':>6}"
        f" {'PENDING':>7}  SERVICES",
    ]
    for p in status["processes"]:
        lines.append(
            f"{p['pid']:>7} {p['uid']:>6} {p.get('name', '')[:16]:<16} {p['region_size']:>10}"
            f" {p['region_in_use']:>10} {p['transactions_sent']:>8}"
            f" {p['transactions_received']:>8} {p['bytes_copied_in']:>12}"
            f" {_loopers_cell(p['loopers']):>9} {p['nodes_count']:>6} {p['refs_count']:>6}"
            f" {len(p['pending']):>7}  {', '.join(p['services'])}"
        )
    graph = [line for p in status["processes"] for line in _graph_lines(p)]
    if graph:
        lines += ["", "objects (per process: nodes it owns, handles it holds, calls to it):"]
        lines += graph
    return "\n".join(lines)


def _loopers_cell(loopers: dict[str, int]) -> str:
    """``busy/idle`` of a process's loopers, and its pool's max_threads if set."""
    cell = f"{loopers['busy']}/{loopers['idle']}"
    return f"{cell} <={loopers['max_threads']}" if loopers["max_threads"] else cell


def _graph_lines(process: dict[str, Any]) -> list[str]:
    """The object graph of one process's status entry, one line per object."""
    lines = []
    pid = process["pid"]
    for node in process["nodes"]:
        lines.append(
            f"  pid {pid} node {node['id']} {node['descriptor'] or '?'}:"
            f" {node['refs']} refs held by others"
        )
    for ref in process["refs"]:
        node = ref["node"]
        death = ", death link" if ref["death_link"] else ""
        lines.append(
            f"  pid {pid} handle {ref['handle']} -> pid {node['pid']} node {node['id']}"
            f" {node['descriptor'] or '?'} (x{ref['count']}{death})"
        )
    for txn in process["pending"]:
        kind = "oneway" if txn["oneway"] else "call"
        lines.append(
            f"  pid {pid} {txn['state']} {kind} code {txn['code']} to node {txn['node']}"
            f" {txn['descriptor'] or '?'} from pid {txn['from_pid']}, {txn['age_s']:.3f} s old"
        )
    return lines


def _process_name(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return "?"


def _pid() -> int:
    import os

    return os.getpid()


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
