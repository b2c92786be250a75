"""pybinder comparison benchmark: CLI and orchestration.

Usage (from the repository root)::

    python -m benchmarks.bench --quick
    python benchmarks/bench.py --full --pin cross
    python -m benchmarks.bench --sizes 64,4096 --transports pipe,pybinder

Prints a markdown report on stdout and writes JSON, markdown and a PNG
figure under ``benchmarks/results/`` (see ``--out`` / ``--json``).  A
progress bar goes to stderr.  :func:`main` is what ``pybinder bench`` calls.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import registry, report, targets
from benchmarks.common import (
    KiB,
    MiB,
    close_quietly,
    deadline,
    fmt_size,
    parse_size_list,
    set_affinity,
)
from benchmarks.procs import READY_TIMEOUT_S, ClientPool, Placement, ServerHandle, placement
from benchmarks.rounds import merge_rounds, split_budget
from benchmarks.transports import RunEnv, Transport
from benchmarks.workloads import (
    FULL,
    QUICK,
    STANDARD,
    Budget,
    measure_echo,
    measure_memcpy,
    measure_memcpy_at,
    measure_stream,
)

SCHEMA = "pybinder-bench/1"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path(__file__).resolve().parent / "results"
ECHO_SIZES = [64, 4 * KiB, 64 * KiB, MiB, 16 * MiB]  # bytes
FULL_EXTRA_ECHO = [64 * MiB]  # bytes, added by --full
STREAM_SIZES = [64 * KiB, MiB, 16 * MiB]  # bytes
CLIENT_COUNTS = [1, 2, 4]
AGGREGATE_SIZE = 64  # bytes per aggregate-workload call
COPY_ACCOUNTING_MIN = 4 * KiB  # bytes: sizes counted in copies per byte
DEFAULT_PIN = "cross"
PIN_RATIONALE = (
    "default --pin cross: client(s) on the first CPU, server on the second (pybinder's "
    "broker unpinned), as two busy programs sit on any multi-core machine; every "
    "transport pays the cross-CPU wake-ups its design needs (tens of µs each on a VM). "
    "--pin same puts every process on one CPU (charges only CPU work and context "
    "switches, hides wake-up costs, serialises multi-process designs); --pin none "
    "leaves placement to the scheduler (what applications get, but it moves between runs)"
)


@dataclass
class RunConfig:
    """Everything chosen on the command line (sizes in bytes)."""

    mode: str
    echo_sizes: list[int]
    stream_sizes: list[int]
    clients: list[int]
    aggregate_size: int
    transports: list[str]
    pin: str
    pin_note: str
    budget: Budget
    rounds: int = 1


# --------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``pybinder bench --help``)."""
    p = argparse.ArgumentParser(
        prog="pybinder bench",
        description="Compare pybinder with pipes, sockets, multiprocessing, zmq, Pyro5, iceoryx2.",
    )
    speed = p.add_mutually_exclusive_group()
    speed.add_argument("--quick", action="store_true", help="short run (< 60 s)")
    speed.add_argument("--full", action="store_true", help="long run (< 10 min), adds 64 MiB echo")
    p.add_argument(
        "--sizes", help="echo payload sizes, e.g. 64,4k,1MiB (bytes; default 64 B..16 MiB)"
    )
    p.add_argument("--stream-sizes", help="streaming message sizes (default 64k,1M,16M)")
    p.add_argument(
        "--clients", help="client-process counts for aggregate calls (default 1,2,4; 0 = skip)"
    )
    p.add_argument(
        "--transports", help=f"comma list from: {','.join(registry.names())} (default all)"
    )
    p.add_argument(
        "--pin", choices=("same", "cross", "none"), default=DEFAULT_PIN, help=PIN_RATIONALE
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds: every transport is measured this many times in turn,"
        " each with 1/N of the time, and the median of the rounds is reported, so a"
        " slow spell of a shared machine falls on every transport alike (default: 3"
        " with --full, else 1)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output directory (default benchmarks/results)",
    )
    p.add_argument(
        "--json", type=Path, help="JSON output path (default OUT/bench-<mode>-<time>.json)"
    )
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG figure")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument(
        "--list", action="store_true", help="list transports and whether they can run, then exit"
    )
    return p


def _transport_names(text: str | None) -> list[str]:
    known = registry.names()
    if not text:
        return known
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise ValueError(
            f"unknown transport(s) {', '.join(unknown)}; choose from {', '.join(known)}"
        )
    return [n for n in known if n in chosen]


def _clients(text: str | None) -> list[int]:
    if not text:
        return CLIENT_COUNTS
    counts = sorted({int(x) for x in text.split(",") if x.strip()})
    if any(c < 0 or c > 16 for c in counts):
        raise ValueError("client counts must be between 0 and 16")
    return [c for c in counts if c > 0]


def make_config(args: argparse.Namespace) -> RunConfig:
    """Turn parsed arguments into a :class:`RunConfig` (raises ValueError)."""
    mode = "quick" if args.quick else "full" if args.full else "standard"
    budget = {"quick": QUICK, "full": FULL, "standard": STANDARD}[mode]
    echo = (
        parse_size_list(args.sizes)
        if args.sizes
        else ECHO_SIZES + (FULL_EXTRA_ECHO if args.full else [])
    )
    stream = parse_size_list(args.stream_sizes) if args.stream_sizes else STREAM_SIZES
    place = placement(args.pin)
    rounds = args.rounds if args.rounds is not None else (3 if mode == "full" else 1)
    if not 1 <= rounds <= 10:
        raise ValueError("--rounds must be between 1 and 10")
    return RunConfig(
        mode=mode,
        echo_sizes=echo,
        stream_sizes=stream,
        clients=_clients(args.clients),
        aggregate_size=AGGREGATE_SIZE,
        transports=_transport_names(args.transports),
        pin=place.mode,
        pin_note=place.note,
        budget=split_budget(budget, rounds),
        rounds=rounds,
    )


# --------------------------------------------------------------------------
# progress


class _NoProgress:
    """Stand-in when tqdm is absent or disabled."""

    def update(self, n: int = 1) -> None:
        """Ignore."""

    def set_description_str(self, text: str) -> None:
        """Ignore."""

    def close(self) -> None:
        """Ignore."""


def make_progress(total: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (no monitor thread), or a silent stand-in."""
    if not enabled:
        return _NoProgress()
    try:
        import tqdm
    except ImportError:
        return _NoProgress()
    tqdm.tqdm.monitor_interval = 0  # no background thread in the driver
    return tqdm.tqdm(total=total, file=sys.stderr, unit="step", dynamic_ncols=True, leave=False)


def steps_for(cfg: RunConfig) -> int:
    """Progress steps per transport."""
    return len(cfg.echo_sizes) + len(cfg.stream_sizes) + len(cfg.clients)


# --------------------------------------------------------------------------
# copy accounting


class CopyLedger:
    """Accumulates broker counter deltas against payload bytes sent."""

    def __init__(self) -> None:
        self.copied = 0  # buffer bytes the broker copied
        self.parcel = 0  # all bytes the broker copied (parcels and buffers)
        self.sent = 0  # payload bytes the client sent
        self.by_size: dict[int, list[int]] = {}
        self.unavailable: str | None = None

    def record(
        self, size: int, before: dict[str, int] | None, after: dict[str, int] | None, sent: int
    ) -> None:
        """Add one measurement's delta (sizes below 4 KiB are ignored)."""
        if size < COPY_ACCOUNTING_MIN:
            return
        key = "buffer_bytes_copied"
        if not before or not after or key not in before or key not in after:
            self.unavailable = "broker status() has no buffer_bytes_copied"
            return
        delta = after[key] - before[key]
        self.copied += delta
        self.parcel += after.get("bytes_copied", 0) - before.get("bytes_copied", 0)
        self.sent += sent
        acc = self.by_size.setdefault(size, [0, 0])
        acc[0] += delta
        acc[1] += sent

    def summary(self, transport: Transport) -> dict[str, Any]:
        """The ``copies`` JSON object for a measured transport."""
        out: dict[str, Any] = {"kind": "measured", "note": transport.copies_note}
        out["per_byte"] = self.copied / self.sent if self.sent else None
        out["by_size"] = {str(s): c / n for s, (c, n) in sorted(self.by_size.items()) if n}
        out["buffer_bytes_copied"] = self.copied
        out["bytes_copied"] = self.parcel
        out["payload_bytes_sent"] = self.sent
        if self.unavailable:
            out["note"] += f" ({self.unavailable})"
        return out


def derived_copies(transport: Transport, cfg: RunConfig) -> dict[str, Any]:
    """The ``copies`` JSON object for a derived (first-principles) transport."""
    sizes = sorted({s for s in cfg.echo_sizes + cfg.stream_sizes if s >= COPY_ACCOUNTING_MIN})
    large = max([s for s in sizes if s >= 64 * KiB], default=64 * KiB)
    return {
        "kind": "derived",
        "per_byte": transport.derived_copies(large),
        "by_size": {str(s): transport.derived_copies(s) for s in sizes},
        "note": transport.copies_note,
    }


# --------------------------------------------------------------------------
# one transport


def _run_env(transport: Transport, cfg: RunConfig, workdir: Path) -> RunEnv:
    child_env = dict(os.environ)
    child_env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])
    )
    return RunEnv(
        workdir=workdir,
        max_payload=max(cfg.echo_sizes + cfg.stream_sizes + [cfg.aggregate_size]),
        n_endpoints=1 + max(cfg.clients, default=0),
        tag=f"pbb{os.getpid()}",
        env=child_env,
    )


class TransportRun:
    """Runs every workload against one transport and always cleans up."""

    def __init__(
        self, transport: Transport, cfg: RunConfig, place: Placement, progress: Any
    ) -> None:
        self.t = transport
        self.cfg = cfg
        self.place = place
        self.progress = progress
        self.row: dict[str, Any] = {
            "name": transport.name,
            "status": "ok",
            "received": transport.received,
            "echo": [],
            "stream": [],
            "aggregate": [],
        }
        self.ledger = CopyLedger()
        self.phase = "setup"
        self.steps_done = 0

    def _step(self, label: str) -> None:
        self.phase = label
        self.progress.set_description_str(f"{self.t.name}: {label}")

    def _done(self) -> None:
        self.steps_done += 1
        self.progress.update(1)

    def _driver_workloads(self, client: Any) -> None:
        """Echo and streaming, with the driver process as the client."""
        budget = self.cfg.budget
        workloads = (
            ("echo", self.cfg.echo_sizes, measure_echo),
            ("stream", self.cfg.stream_sizes, measure_stream),
        )
        for kind, sizes, measure in workloads:
            for size in sizes:
                self._step(f"{kind} {fmt_size(size)}")
                before = client.counters()
                m = measure(client, size, budget)
                self.ledger.record(size, before, client.counters(), m["payload_bytes_sent"])
                self.row[kind].append(m)
                self._done()

    def _aggregate(self, endpoints: list[Any], env: RunEnv) -> None:
        """Aggregate calls/s from 1, 2, 4 client processes."""
        if not self.cfg.clients:
            return
        self._step("starting clients")
        pool = ClientPool(self.t.name, endpoints, env, self.place.client)
        try:
            pool.wait_ready()
            budget = self.cfg.budget
            for n in self.cfg.clients:
                self._step(f"{n} client{'s' if n > 1 else ''}")
                res = pool.run(n, self.cfg.aggregate_size, max(budget.warm_s, 0.05), budget.agg_s)
                self.row["aggregate"].append(res)
                self._done()
        finally:
            pool.close()

    def run(self) -> dict[str, Any]:
        """Measure everything; on failure record status "error" and the reason."""
        workdir = Path(tempfile.mkdtemp(prefix=f"pybinder-bench-{self.t.name}-"))
        env = _run_env(self.t, self.cfg, workdir)
        original = os.sched_getaffinity(0)
        aux: list[Any] = []
        server = client = endpoints = None
        try:
            aux = self.t.start_aux(env, self.place.aux)
            endpoints = self.t.prepare(env)
            server = ServerHandle(self.t.name, endpoints.server, env, self.place.server)
            close_quietly(endpoints.server_side)
            server.wait_ready()
            with deadline(READY_TIMEOUT_S):
                client = self.t.connect(endpoints.clients[0], env)
            set_affinity(0, self.place.client)
            self._driver_workloads(client)
            set_affinity(0, frozenset(original))
            self._aggregate(endpoints.clients[1:], env)
        except Exception as exc:
            self.row["status"] = "error"
            self.row["reason"] = f"{self.phase}: {exc.__class__.__name__}: {exc}"
        finally:
            set_affinity(0, frozenset(original))
            self._teardown(client, server, aux, endpoints, env)
            self.progress.update(steps_for(self.cfg) - self.steps_done)
        self.row["copies"] = (
            self.ledger.summary(self.t) if self.t.copies_kind == "measured" else None
        )
        if self.row["copies"] is None:
            self.row["copies"] = derived_copies(self.t, self.cfg)
        return self.row

    def _teardown(
        self, client: Any, server: Any, aux: list[Any], endpoints: Any, env: RunEnv
    ) -> None:
        """Close, stop, join and delete everything this run created."""
        from benchmarks.pybinder_transport import stop_process

        try:
            if client is not None:
                client.close()
        except Exception as exc:
            self.row.setdefault("warnings", []).append(f"client close: {exc}")
        if server is not None:
            server.stop()
        for proc in aux:
            stop_process(proc)
        if endpoints is not None:
            close_quietly(endpoints.clients)
            close_quietly(endpoints.server_side)
        self.t.cleanup(env)
        shutil.rmtree(env.workdir, ignore_errors=True)


def skipped_row(transport: Transport, reason: str) -> dict[str, Any]:
    """The JSON row for a transport that cannot run here."""
    return {
        "name": transport.name,
        "status": "skipped",
        "reason": reason,
        "received": transport.received,
        "copies": None,
        "echo": [],
        "stream": [],
        "aggregate": [],
    }


# --------------------------------------------------------------------------
# whole run


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so children and temp dirs get cleaned up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(cfg: RunConfig, show_progress: bool, argv: list[str]) -> dict[str, Any]:
    """Measure memcpy and every selected transport; return the result dict."""
    place = placement(cfg.pin)
    transports = [registry.get(name) for name in cfg.transports]
    reasons = {t.name: t.unavailable() for t in transports}
    runnable = [t for t in transports if not reasons[t.name]]
    progress = make_progress(2 + steps_for(cfg) * len(runnable) * cfg.rounds, show_progress)
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "created": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "argv": argv,
        "config": _config_json(cfg),
        "units": {
            "size": "bytes",
            "latency": "µs",
            "throughput": "MB/s (1 MB = 10^6 bytes)",
            "aggregate": "calls/s",
            "vs_pipe / vs_socketpair": "speed-up, >1 = better than that baseline in the same run",
        },
        "machine": report.machine_info(),
        "notes": [PIN_RATIONALE],
        "transports": [],
    }
    try:
        progress.set_description_str("memcpy")
        first = measure_memcpy(cfg.budget)
        progress.update(1)
        rounds: dict[str, list[dict[str, Any]]] = {t.name: [] for t in runnable}
        for _ in range(cfg.rounds):  # interleaved: a slow spell hits every transport
            for t in runnable:
                rounds[t.name].append(TransportRun(t, cfg, place, progress).run())
        for t in transports:
            if reasons[t.name]:
                result["transports"].append(skipped_row(t, reasons[t.name] or ""))
            else:
                result["transports"].append(merge_rounds(rounds[t.name]))
        progress.set_description_str("memcpy")
        result["memcpy"] = memcpy_summary(first, measure_memcpy(cfg.budget), cfg)
        progress.update(1)
    finally:
        progress.close()
    report.add_ratios(result["transports"], result["memcpy"])
    result["targets"] = targets.evaluate(result)
    return result


def memcpy_summary(first: dict[str, Any], last: dict[str, Any], cfg: RunConfig) -> dict[str, Any]:
    """Best memcpy MB/s of the runs before and after the transports, plus per-size figures."""
    best = max(first, last, key=lambda m: m["best_MBps"])
    out = dict(best)
    out["before_MBps"] = first["best_MBps"]
    out["after_MBps"] = last["best_MBps"]
    out["by_size_MBps"] = {str(s): measure_memcpy_at(s, cfg.budget) for s in cfg.stream_sizes}
    return out


def _config_json(cfg: RunConfig) -> dict[str, Any]:
    out = asdict(cfg)
    out["budget"] = asdict(cfg.budget)
    return out


def write_outputs(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Write JSON, markdown and PNG; return notes about what was written."""
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    json_path: Path = args.json or args.out / f"bench-{result['config']['mode']}-{stamp}.json"
    report.write_json(result, json_path)
    written = [f"json: {json_path}"]
    md_path = json_path.with_suffix(".md")
    md_path.write_text(report.markdown(result))
    written.append(f"markdown: {md_path}")
    if not args.no_plot:
        png_path = json_path.with_suffix(".png")
        problem = report.write_plot(result, png_path)
        written.append(problem or f"figure: {png_path}")
    return written


def list_transports() -> str:
    """One line per transport: name and availability."""
    lines = []
    for name in registry.names():
        reason = registry.get(name).unavailable()
        lines.append(f"{name:12s} {'available' if not reason else 'skipped: ' + reason}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (``argv`` without the program name).

    Returns 0 if every selected transport ran or was skipped, 1 if one
    failed, 2 on bad arguments, 130 when interrupted.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.list:
        print(list_transports())
        return 0
    try:
        cfg = make_config(args)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        with _sigterm_as_exit():
            argv_used = sys.argv[1:] if argv is None else list(argv)
            result = run_all(cfg, not args.no_progress, argv_used)
    except KeyboardInterrupt:
        print("interrupted; every benchmark process was stopped", file=sys.stderr)
        return 130
    written = write_outputs(result, args)
    print(report.markdown(result))
    for line in written:
        print(line, file=sys.stderr)
    failed = [t["name"] for t in result["transports"] if t["status"] == "error"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
