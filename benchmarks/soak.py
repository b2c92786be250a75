"""Soak test: many calls through one broker, watching the broker's memory and descriptors.

::

    python benchmarks/soak.py --calls N --clients M [--payload BYTES] [--report-every CALLS]
        [--large-payload BYTES] [--oneway-every K] [--large-every K]
        [--max-rss-growth-mib MIB] [--socket PATH] [--timeout SECONDS]
        [--stall-timeout SECONDS]

Starts its own broker (``python -m pybinder broker``, by default on ``broker.sock`` in a
private temporary directory), one server process and M client processes (spawned with
``multiprocessing``, never forked). The clients share N calls between them; of each
client's calls, by index i (counted from 1):

* every ``--large-every``-th (default 100th) is a two-way ``echo`` of
  ``--large-payload`` bytes (default 256 KiB; 4 KiB or more travel out of band);
* else every ``--oneway-every``-th (default 10th) is a oneway ``push`` of
  ``--payload`` bytes;
* every other call is a two-way ``echo`` of ``--payload`` bytes (default 64 B).

Each echo answer is compared with what was sent, and at the end the server's count of
pushes is compared with the pushes sent. Clients tell the driver their progress through
a pipe every few hundred calls. Every ``--report-every`` calls (over all clients) the
driver prints one ``report`` line, after a header::

    report  CALLS  CALLS_PER_S  BROKER_RSS_MIB  BROKER_FDS  ERRORS

CALLS is the calls done so far (over all clients), CALLS_PER_S the rate over the
interval since the previous report, BROKER_RSS_MIB the broker's resident set size in
MiB (2**20 bytes), BROKER_FDS its open file descriptors, and ERRORS the calls that
raised (or answered wrongly) so far. The first report is the baseline (warm-up done);
when N is not a multiple of ``--report-every`` one more report follows the last call.
Then ``summary:`` lines give the RSS growth after warm-up (MiB), the descriptor growth,
and the total errors, and a last line says ``PASS`` or ``FAIL: reasons``.

Exit status: 0 on PASS; 1 if any call raised or answered wrongly, a push was lost, the
broker or a client died, a wait timed out, or the RSS growth exceeded
``--max-rss-growth-mib``; 2 on bad arguments. Every process started is stopped (SIGTERM,
then SIGKILL) and reaped whatever happens, and no ``/dev/shm/pybinder-*`` entry of the
broker's is left behind.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import psutil

if __package__ in (None, ""):  # run as a script: make "benchmarks" importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pybinder
from benchmarks.procs import stop_child
from benchmarks.pybinder_transport import stop_process
from pybinder.cli import parse_size

MiB = 1 << 20  # bytes
CTX = multiprocessing.get_context("spawn")
SERVICE = "soak"

BROKER_READY_S = 20.0  # s for the broker to print its "listening" line
PROCESS_READY_S = 30.0  # s for the server or a client to connect and say "ready"
CONNECT_TIMEOUT_S = 10.0  # s a client's get_service waits for the service
STOP_TIMEOUT_S = 5.0  # s a process gets to exit after a polite request, then SIGTERM, SIGKILL
PUSH_COUNT_TIMEOUT_S = 10.0  # s for the server's push count to reach the pushes sent
QUIT_WAIT_S = 60.0  # s a client that is done waits for "quit" before it leaves anyway
SETTLE_S = 0.5  # s the broker gets to drop the clients' connections before it is measured
POLL_S = 0.5  # s the driver waits for client messages before checking the broker
MAX_ERROR_MESSAGES = 5  # error messages each client forwards to the driver (the rest: counted)
MAX_CLIENT_ERRORS = 100  # errors after which a client gives up on its remaining calls


class ISoak(pybinder.Interface):
    """The soak service."""

    DESCRIPTOR = "bench.ISoak"

    @pybinder.method
    def echo(self, payload: Any) -> Any:
        """Answer ``payload`` itself (bytes; sent back in full)."""

    @pybinder.oneway
    def push(self, payload: Any) -> None:
        """Count one oneway delivery of ``payload`` (bytes)."""


class SoakService(ISoak.Stub):
    """Echoes payloads and counts pushes; runs in the server's looper threads."""

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self.pushes = 0  # push() calls received

    def echo(self, payload: Any) -> Any:
        return payload

    def push(self, payload: Any) -> None:
        with self._lock:
            self.pushes += 1


@dataclass(frozen=True)
class Mix:
    """What one client sends: sizes in bytes, frequencies as "every k-th call"."""

    payload: int  # bytes of a small echo or push
    large_payload: int  # bytes of a large echo
    oneway_every: int  # every k-th call is a push (0: never)
    large_every: int  # every k-th call is a large echo (0: never); wins over oneway_every
    batch: int  # calls between two progress messages to the driver
    region: int  # bytes of the client's receive region


# --------------------------------------------------------------------------
# code that runs inside the spawned children


def die_with_parent() -> None:
    """Ask the kernel to SIGTERM this process when its parent exits (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind with SystemExit so ``with`` and ``finally`` blocks run."""
    raise SystemExit(128 + signum)


def child_setup() -> None:
    """Common start of the server and client processes."""
    die_with_parent()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle


def server_main(socket_path: str, region: int, threads: int, ctl: Connection) -> None:
    """Serve ISoak as ``SERVICE`` with ``threads`` loopers and a ``region``-byte region.

    Driver commands on ``ctl``: ``"count"`` (answered with ``("count", pushes)``) and
    ``"stop"``; the server also stops when the driver goes away.
    """
    child_setup()
    try:
        with pybinder.connect(socket_path, region_size=region) as proc:
            service = SoakService()
            proc.add_service(SERVICE, service)
            proc.start_thread_pool(threads)
            ctl.send(("ready", os.getpid()))
            while True:
                try:
                    command = ctl.recv()
                except (EOFError, OSError):
                    break
                if command == "count":
                    ctl.send(("count", service.pushes))
                elif command == "stop":
                    break
    except Exception as exc:
        with contextlib.suppress(OSError):
            ctl.send(("fatal", f"server: {type(exc).__name__}: {exc}"))


def client_main(socket_path: str, index: int, calls: int, mix: Mix, ctl: Connection) -> None:
    """Connect, say ``("ready", pid)``, wait for ``"go"``, make ``calls`` calls.

    Sends ``("progress", calls, errors, pushes)`` every ``mix.batch`` calls (counts
    since the previous message; pushes: oneway calls sent without an error),
    ``("error", text)`` for the first few errors, and finally ``("done", calls, errors,
    pushes)``; ``("fatal", text)`` if it cannot start.
    After "done" it stays connected until the driver says ``"quit"`` (or QUIT_WAIT_S
    seconds pass), so that the last report sees the same processes as the first.
    """
    child_setup()
    try:
        proc = pybinder.connect(socket_path, region_size=mix.region)
    except Exception as exc:
        ctl.send(("fatal", f"client {index} connect: {type(exc).__name__}: {exc}"))
        return
    with proc:
        try:
            service = proc.get_service(SERVICE, ISoak, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            ctl.send(("fatal", f"client {index} get_service: {type(exc).__name__}: {exc}"))
            return
        ctl.send(("ready", os.getpid()))
        if not ctl.poll(PROCESS_READY_S * 2) or ctl.recv() != "go":
            return
        _call_loop(proc, service, index, calls, mix, ctl)
        ctl.poll(QUIT_WAIT_S)


def _call_loop(
    proc: pybinder.ProcessState,
    service: Any,
    index: int,
    calls: int,
    mix: Mix,
    ctl: Connection,
) -> None:
    """The client's calls (see :func:`client_main` for the messages)."""
    small_tail = os.urandom(max(0, mix.payload - 8))
    large = bytearray(os.urandom(mix.large_payload))
    n_stamp = min(8, mix.large_payload)  # bytes of the large payload that vary per call
    fatal = (pybinder.BrokerUnavailableError, pybinder.DeadObjectError)
    done = errors = messages = pushes = 0
    reported_calls = reported_errors = reported_pushes = 0
    for i in range(1, calls + 1):
        # Vary the first 8 bytes so that a crossed or stale answer cannot match.
        stamp = (index << 40 | i).to_bytes(8, "little")
        try:
            if mix.large_every and i % mix.large_every == 0:
                large[:n_stamp] = stamp[:n_stamp]
                answer = service.echo(large)
                if answer != large:
                    raise AssertionError(f"large echo answered {len(answer)} wrong bytes")
            elif mix.oneway_every and i % mix.oneway_every == 0:
                service.push((stamp + small_tail)[: mix.payload])
                pushes += 1
            else:
                payload = (stamp + small_tail)[: mix.payload]
                answer = service.echo(payload)
                if answer != payload:
                    raise AssertionError(f"echo answered {answer[:16]!r}... not the payload")
        except Exception as exc:
            errors += 1
            if messages < MAX_ERROR_MESSAGES:
                messages += 1
                ctl.send(("error", f"client {index} call {i}: {type(exc).__name__}: {exc}"))
            if isinstance(exc, fatal) or errors >= MAX_CLIENT_ERRORS:
                done = i
                break
        done = i
        if i % mix.batch == 0:
            ctl.send(
                (
                    "progress",
                    done - reported_calls,
                    errors - reported_errors,
                    pushes - reported_pushes,
                )
            )
            reported_calls, reported_errors, reported_pushes = done, errors, pushes
    try:
        proc.flush_oneway()  # a oneway call's failure is raised by the next call or here
    except Exception as exc:
        errors += 1
        if messages < MAX_ERROR_MESSAGES:
            messages += 1
            ctl.send(("error", f"client {index} flush_oneway: {type(exc).__name__}: {exc}"))
    ctl.send(("done", done - reported_calls, errors - reported_errors, pushes - reported_pushes))


# --------------------------------------------------------------------------
# the driver


class SoakError(RuntimeError):
    """The soak run could not go on (a process died, a wait timed out)."""


def _raise_system_exit(signum: int, frame: Any) -> None:
    """SIGTERM handler of the driver: unwind so that every process gets stopped."""
    raise SystemExit(128 + signum)


def start_broker(socket_path: str, log: Path, max_region: int) -> subprocess.Popen[bytes]:
    """Start ``python -m pybinder broker`` logging to ``log``; wait for "listening".

    Raises:
        SoakError: the broker exited or stayed silent for BROKER_READY_S seconds.
    """
    cmd = [sys.executable, "-m", "pybinder", "broker", "--socket", socket_path]
    cmd += ["--max-region-size", str(max_region)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,  # safe: the driver has started no threads
        )
    try:
        give_up = time.monotonic() + BROKER_READY_S
        while "listening" not in log.read_text(errors="replace"):
            if proc.poll() is not None:
                raise SoakError(f"broker exited with {proc.returncode}: {log_tail(log)}")
            if time.monotonic() > give_up:
                raise SoakError(f"broker not listening within {BROKER_READY_S:.0f} s")
            time.sleep(0.02)
    except BaseException:
        stop_process(proc, STOP_TIMEOUT_S)
        raise
    return proc


def log_tail(log: Path, chars: int = 1000) -> str:
    """The last ``chars`` characters of ``log`` (empty if it cannot be read)."""
    try:
        return log.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return ""


def expect_ready(ctl: Connection, what: str) -> None:
    """Wait up to PROCESS_READY_S seconds for ``("ready", pid)`` on ``ctl``.

    Raises:
        SoakError: the process said something else, exited, or stayed silent.
    """
    if not ctl.poll(PROCESS_READY_S):
        raise SoakError(f"{what} not ready within {PROCESS_READY_S:.0f} s")
    try:
        message = ctl.recv()
    except EOFError:
        raise SoakError(f"{what} exited before it was ready") from None
    if message[0] != "ready":
        raise SoakError(f"{what} failed: {message[1]}")


@dataclass
class Sample:
    """One report: calls done, time (s, monotonic), broker RSS (bytes), fds, errors."""

    calls: int
    at: float
    rss: int
    fds: int
    errors: int


@dataclass
class Run:
    """What the driver has learned so far."""

    calls: int = 0  # calls done, over all clients
    errors: int = 0  # calls that raised or answered wrongly (plus lost pushes)
    pushes_sent: int = 0  # oneway calls the clients made without an error
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # reasons for FAIL
    after_clients: Sample | None = None  # the broker once the clients had left
    clients_lost: int = 0  # clients that died before "done" (their last counts are lost)


def sample(broker: psutil.Process, run: Run) -> Sample:
    """Measure the broker now (raises psutil.Error if it is gone)."""
    with broker.oneshot():
        rss, fds = broker.memory_info().rss, broker.num_fds()
    return Sample(run.calls, time.monotonic(), rss, fds, run.errors)


def print_report(new: Sample, previous: Sample, first: bool) -> None:
    """Print one ``report`` line (rate over the interval since ``previous``)."""
    seconds = new.at - previous.at
    rate = (new.calls - previous.calls) / seconds if seconds > 0 else 0.0
    note = "  (baseline)" if first else ""
    print(
        f"report {new.calls:>11} {rate:>11.1f} {new.rss / MiB:>14.2f}"
        f" {new.fds:>10} {new.errors:>7}{note}",
        flush=True,
    )


def drive(
    args: argparse.Namespace, broker: subprocess.Popen[bytes], clients: list[Any], run: Run
) -> None:
    """Release the clients, collect their progress, print reports until all are done."""
    broker_ps = psutil.Process(broker.pid)
    live = {ctl: i for i, (_, ctl) in enumerate(clients)}
    start = Sample(0, time.monotonic(), 0, 0, 0)
    for ctl in live:
        ctl.send("go")
    header = ("#", "calls", "calls/s", "broker_rss_MiB", "broker_fds", "errors")
    print("{:<6} {:>11} {:>11} {:>14} {:>10} {:>7}".format(*header), flush=True)
    previous = start
    next_report = args.report_every
    give_up = start.at + args.timeout
    last_progress = start.at
    while live:
        now = time.monotonic()
        if now > give_up:
            raise SoakError(f"run not finished within --timeout {args.timeout:.0f} s")
        if now - last_progress > args.stall_timeout:
            raise SoakError(f"no progress for --stall-timeout {args.stall_timeout:.0f} s")
        for ctl in wait(list(live), timeout=POLL_S):
            assert isinstance(ctl, Connection)
            index = live[ctl]
            try:
                message = ctl.recv()
            except (EOFError, OSError):
                del live[ctl]
                run.failures.append(f"client {index} exited before it was done")
                run.clients_lost += 1
                continue
            kind = message[0]
            if kind in ("progress", "done"):
                run.calls += message[1]
                run.errors += message[2]
                run.pushes_sent += message[3]
                last_progress = time.monotonic()
                if kind == "done":
                    del live[ctl]
            elif kind == "error":
                print(f"error: {message[1]}", file=sys.stderr, flush=True)
            else:
                raise SoakError(f"client {index}: {message[1]}")
        if broker.poll() is not None:
            raise SoakError(f"broker died (exit status {broker.returncode})")
        while run.calls >= next_report or (not live and run.calls > previous.calls):
            try:
                new = sample(broker_ps, run)
            except psutil.Error as exc:
                raise SoakError(f"cannot measure the broker: {exc!r}") from None
            if broker.poll() is not None or new.rss == 0:  # exiting: its memory is gone
                with contextlib.suppress(subprocess.TimeoutExpired):
                    broker.wait(STOP_TIMEOUT_S)
                raise SoakError(f"broker died (exit status {broker.returncode})")
            print_report(new, previous, not run.samples)
            run.samples.append(new)
            previous = new
            while next_report <= run.calls:
                next_report += args.report_every


def check_pushes(server_ctl: Connection, run: Run) -> int:
    """Wait until the server has received every push sent; return its count."""
    give_up = time.monotonic() + PUSH_COUNT_TIMEOUT_S
    while True:
        server_ctl.send("count")
        if not server_ctl.poll(STOP_TIMEOUT_S):
            raise SoakError("server did not answer a count request")
        kind, count = server_ctl.recv()
        if kind != "count":
            raise SoakError(f"server: {count}")
        if count >= run.pushes_sent or time.monotonic() > give_up:
            return int(count)
        time.sleep(0.05)


def summarize(args: argparse.Namespace, run: Run, pushes_received: int | None) -> None:
    """Print the ``summary:`` lines and add FAIL reasons to ``run.failures``."""
    if run.samples:
        base, last = run.samples[0], run.samples[-1]
        seconds = last.at - base.at
        growth = (last.rss - base.rss) / MiB
        after = last.calls - base.calls
        rate = f", {after / seconds:.1f} calls/s after warm-up" if seconds > 0 else ""
        print(f"summary: {run.calls} calls{rate}, {run.errors} errors")
        print(
            f"summary: broker RSS {base.rss / MiB:.2f} MiB at baseline, {last.rss / MiB:.2f} MiB"
            f" at end: growth after warm-up {growth:+.2f} MiB"
        )
        print(
            f"summary: broker fds {base.fds} at baseline, {last.fds} at end:"
            f" growth after warm-up {last.fds - base.fds:+d}"
        )
        if run.after_clients is not None:
            gone = run.after_clients
            print(
                f"summary: broker after the clients left: RSS {gone.rss / MiB:.2f} MiB,"
                f" {gone.fds} fds"
            )
        if args.max_rss_growth_mib is not None and growth > args.max_rss_growth_mib:
            run.failures.append(
                f"broker RSS grew {growth:.2f} MiB > --max-rss-growth-mib {args.max_rss_growth_mib}"
            )
        if len(run.samples) == 1:
            print("summary: only one report (the baseline): no growth measured")
    else:
        print(f"summary: {run.calls} calls, {run.errors} errors (no report)")
    if pushes_received is not None:
        print(
            f"summary: oneway pushes received by the server {pushes_received} of {run.pushes_sent}"
        )
    if run.errors:
        run.failures.append(f"{run.errors} calls raised or answered wrongly")
    if run.calls < args.calls and not run.failures:
        run.failures.append(f"only {run.calls} of {args.calls} calls were made")


def remove_leftover_shm(broker_pid: int) -> list[str]:
    """Remove /dev/shm entries the broker (``broker_pid``) created and left; return them."""
    prefix = f"pybinder-{broker_pid}-"
    left = []
    with contextlib.suppress(OSError):
        for name in os.listdir("/dev/shm"):
            if name.startswith(prefix):
                left.append(name)
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join("/dev/shm", name))
    return left


@contextlib.contextmanager
def socket_location(path: str | None) -> Iterator[tuple[str, Path]]:
    """(socket path, directory for the broker log): ``path`` or a private temp dir."""
    with tempfile.TemporaryDirectory(prefix="pb-soak-") as tmp:
        yield (path or str(Path(tmp) / "broker.sock")), Path(tmp)


def describe(args: argparse.Namespace) -> str:
    """One line on what the clients will do."""
    text = f"{args.clients} clients, {args.calls} calls: echo {args.payload} B"
    if args.oneway_every:
        text += f"; 1 call in {args.oneway_every} a oneway push of {args.payload} B"
    if args.large_every:
        text += f"; 1 call in {args.large_every} an echo of {args.large_payload} B"
    return text + f"; a report every {args.report_every} calls"


def round_up_mib(n: int) -> int:
    """``n`` bytes rounded up to whole MiB."""
    return -(-n // MiB) * MiB


def soak(args: argparse.Namespace) -> int:
    """Run the whole soak test; return the exit status."""
    clients_per = [
        args.calls // args.clients + (1 if i < args.calls % args.clients else 0)
        for i in range(args.clients)
    ]
    batch = max(1, min(1000, args.report_every // (4 * args.clients)))
    large = args.large_payload if args.large_every else 0
    # Replies are copied out of a client's region at once; room for a few of them.
    client_region = max(MiB, round_up_mib(4 * max(large, args.payload)))
    # Every client may have a large echo and a window of pushes in the server's region.
    server_region = max(8 * MiB, round_up_mib(4 * args.clients * (large + 16 * args.payload)))
    mix = Mix(args.payload, large, args.oneway_every, args.large_every, batch, client_region)
    run = Run()
    pushes_received: int | None = None
    broker: subprocess.Popen[bytes] | None = None
    server: tuple[Any, Connection] | None = None
    clients: list[tuple[Any, Connection]] = []
    with socket_location(args.socket) as (socket_path, tmp):
        try:
            broker = start_broker(socket_path, tmp / "broker.log", max(256 * MiB, server_region))
            print(f"soak: broker pid {broker.pid} on {socket_path}; {describe(args)}", flush=True)
            ctl, child_end = CTX.Pipe()
            server = (
                CTX.Process(
                    target=server_main,
                    args=(socket_path, server_region, args.clients + 1, child_end),
                    name="soak-server",
                ),
                ctl,
            )
            server[0].start()
            child_end.close()
            expect_ready(ctl, "server")
            for i, n in enumerate(clients_per):
                ctl, child_end = CTX.Pipe()
                proc = CTX.Process(
                    target=client_main,
                    args=(socket_path, i, n, mix, child_end),
                    name=f"soak-client-{i}",
                )
                clients.append((proc, ctl))
                proc.start()
                child_end.close()
            for i, (_, ctl) in enumerate(clients):
                expect_ready(ctl, f"client {i}")
            drive(args, broker, clients, run)
            for proc, ctl in clients:
                stop_child(proc, ctl, "quit", STOP_TIMEOUT_S)
                if proc.exitcode != 0:
                    run.failures.append(f"{proc.name} exited with {proc.exitcode}")
            time.sleep(SETTLE_S)
            with contextlib.suppress(psutil.Error):
                run.after_clients = sample(psutil.Process(broker.pid), run)
            if not run.clients_lost:  # else the pushes sent are not known exactly
                pushes_received = check_pushes(server[1], run)
                if pushes_received != run.pushes_sent:
                    run.failures.append(
                        f"server received {pushes_received} pushes, {run.pushes_sent} were sent"
                    )
        except SoakError as exc:
            run.failures.append(str(exc))
        except (KeyboardInterrupt, SystemExit):
            run.failures.append("interrupted")
        finally:
            for proc, ctl in clients:
                stop_child(proc, ctl, "quit", STOP_TIMEOUT_S)
            if server is not None:
                stop_child(server[0], server[1], "stop", STOP_TIMEOUT_S)
            if broker is not None:
                died = broker.poll()
                stop_process(broker, STOP_TIMEOUT_S)
                if died is not None and not any("broker" in f for f in run.failures):
                    run.failures.append(f"broker died (exit status {died})")
                if died is not None:
                    print(f"broker log: {log_tail(tmp / 'broker.log')}", file=sys.stderr)
                left = remove_leftover_shm(broker.pid)
                if left:
                    print(f"note: removed /dev/shm entries the broker left: {left}")
    summarize(args, run, pushes_received)
    if run.failures:
        print("FAIL: " + "; ".join(run.failures), flush=True)
        return 1
    print("PASS", flush=True)
    return 0


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0: {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        description="Soak test: a broker, a server and M clients making N calls, watching "
        "the broker's RSS and descriptors.",
    )
    parser.add_argument(
        "--calls", metavar="N", type=positive, required=True, help="total calls, all clients"
    )
    parser.add_argument(
        "--clients", metavar="M", type=positive, required=True, help="client processes"
    )
    parser.add_argument(
        "--payload",
        metavar="BYTES",
        type=parse_size,
        default=64,
        help="bytes of a small echo or push (64)",
    )
    parser.add_argument(
        "--large-payload",
        metavar="BYTES",
        type=parse_size,
        default=256 * 1024,
        help="bytes of an occasional large echo (256KiB)",
    )
    parser.add_argument(
        "--oneway-every",
        metavar="K",
        type=non_negative,
        default=10,
        help="every k-th call is oneway (10; 0: none)",
    )
    parser.add_argument(
        "--large-every",
        metavar="K",
        type=non_negative,
        default=100,
        help="every k-th call is a large echo (100; 0: none)",
    )
    parser.add_argument(
        "--report-every",
        metavar="CALLS",
        type=positive,
        default=100_000,
        help="calls between reports (100000)",
    )
    parser.add_argument(
        "--max-rss-growth-mib",
        metavar="MIB",
        type=float,
        default=None,
        help="fail if the broker's RSS grows more than this after warm-up, MiB",
    )
    parser.add_argument(
        "--socket",
        metavar="PATH",
        default=None,
        help="socket path for the broker this script starts (default: in a private temp dir)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=3600.0,
        help="seconds the calls may take in all (3600)",
    )
    parser.add_argument(
        "--stall-timeout",
        metavar="SECONDS",
        type=float,
        default=60.0,
        help="seconds without progress from any client before giving up (60)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run; the exit status (0 PASS, 1 FAIL, 2 bad arguments)."""
    args = build_parser().parse_args(argv)
    if args.payload < 1:
        build_parser().error("--payload must be at least 1 byte")
    signal.signal(signal.SIGTERM, _raise_system_exit)
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
