"""Load clients for tests/test_kill_matrix.py.

``python tests/kill_peers.py load SOCKET MODE SEED STOP_FILE MAX_SECONDS``

Connects, gets the service "test" (tests/peers.py's server), prints ``ready PID``
and calls it from two threads until STOP_FILE exists, MAX_SECONDS pass, the broker
goes (BrokerUnavailableError) or the server dies (DeadObjectError). Each answer is
checked against the bytes it must be. MODE chooses the calls:

* ``mixed``: echo and blob of 0 B to 4 MiB, some oneway record() calls;
* ``large``: echo and blob of 1 to 4 MiB;
* ``small``: oneway record() calls and small two-way echo/add calls;
* ``wait``: prints ``waiting PID`` first and waits for "test" to appear (the test
  starts the server later), then does what ``mixed`` does, while a second thread
  keeps waiting for a service nobody registers ("late-PID", short timeouts).

After the server died it checks that a new get_service("test") with a short timeout
raises ServiceNotFoundError. Last it prints one line ``summary JSON``:
``ok`` (calls that returned the right value, oneway calls sent), ``wrong`` (calls
that returned something else), ``errors`` (BinderError subclass name -> count),
``waits`` (get_service of "late-PID" that timed out, as they must),
``probe`` (what the get_service after the server's death raised, or null),
``unexpected`` (descriptions of anything that is not a BinderError, or a hang) and
``reason`` (why it stopped: stop, deadline, broker, server). A call that takes far
longer than it may is a hang: the watchdog prints the summary with it and exits 3.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
from collections import Counter
from typing import Any

from peers import ITest, pattern

import pybinder

MiB = 1 << 20
CALL_LIMIT_S = 5.0  # the longest any call may take before it counts as a hang
SERVICE_WAIT_S = 15.0  # how long "wait" mode waits for the server's service
LATE_WAIT_S = (0.05, 0.4)  # timeouts of the waits for a service nobody registers
PROBE_WAIT_S = 0.3  # the get_service after the server's death
CLIENT_REGION = 16 * MiB

PAYLOAD = random.Random(0).randbytes(4 * MiB)
PATTERNS: dict[int, bytes] = {}


def expected_blob(size: int) -> bytes:
    if size not in PATTERNS:
        PATTERNS[size] = pattern(size)
    return PATTERNS[size]


class Load:
    def __init__(self, mode: str, seed: int, stop_file: str, max_seconds: float) -> None:
        self.mode = mode
        self.seed = seed
        self.stop_file = stop_file
        self.deadline = time.monotonic() + max_seconds
        self.lock = threading.Lock()
        self.ok = 0
        self.wrong = 0
        self.waits = 0
        self.errors: Counter[str] = Counter()
        self.unexpected: list[str] = []
        self.probe: str | None = None
        self.reason = ""
        self.done = threading.Event()  # the load should stop
        self.exiting = threading.Event()  # the calls are over: the watchdog may go
        # thread name -> (what, started, limit) of the call in progress
        self.in_call: dict[str, tuple[str, float, float]] = {}

    # -- bookkeeping -------------------------------------------------------------------

    def finish(self, reason: str) -> None:
        with self.lock:
            if not self.reason:
                self.reason = reason
        self.done.set()

    def should_stop(self) -> bool:
        if self.done.is_set():
            return True
        if os.path.exists(self.stop_file):
            self.finish("stop")
        elif time.monotonic() > self.deadline:
            self.finish("deadline")
        return self.done.is_set()

    def call(
        self,
        what: str,
        function: Any,
        *args: Any,
        limit: float = CALL_LIMIT_S,
        expect: type[BaseException] | None = None,
    ) -> Any:
        """``function(*args)``, watched by the watchdog. A BinderError other than
        ``expect`` is counted; every exception is re-raised (one that is no
        BinderError is recorded as unexpected where it is caught: see :meth:`oops`)."""
        name = threading.current_thread().name
        self.in_call[name] = (what, time.monotonic(), limit)
        try:
            return function(*args)
        except pybinder.BinderError as exc:
            if expect is None or not isinstance(exc, expect):
                with self.lock:
                    self.errors[type(exc).__name__] += 1
            raise
        finally:
            self.in_call.pop(name, None)

    def oops(self, where: str, exc: BaseException) -> None:
        """Record an exception that is not a BinderError, and stop the load."""
        with self.lock:
            self.unexpected.append(f"unexpected {type(exc).__name__} in {where}: {exc!r}")
        self.finish("unexpected")

    def check(self, what: str, got: Any, want: Any) -> None:
        with self.lock:
            if got == want:
                self.ok += 1
            else:
                self.wrong += 1
                if len(self.unexpected) < 10:
                    self.unexpected.append(f"wrong answer to {what}: {_short(got)}")

    def summary(self) -> str:
        with self.lock:
            return "summary " + json.dumps(
                {
                    "ok": self.ok,
                    "wrong": self.wrong,
                    "errors": dict(self.errors),
                    "waits": self.waits,
                    "probe": self.probe,
                    "unexpected": self.unexpected,
                    "reason": self.reason,
                }
            )

    def watchdog(self) -> None:
        while not self.exiting.wait(0.2):
            now = time.monotonic()
            for name, (what, started, limit) in list(self.in_call.items()):
                if now - started > limit:
                    with self.lock:
                        self.unexpected.append(
                            f"unexpected hang: {what} in {name} for {now - started:.1f} s"
                        )
                    self.finish("hang")
                    print(self.summary(), flush=True)
                    os._exit(3)

    # -- the load ----------------------------------------------------------------------

    def sizes(self, rng: random.Random) -> int:
        if self.mode == "large":
            return rng.randint(1 * MiB, 4 * MiB)
        return rng.choice(
            (
                rng.randint(0, 64),
                rng.randint(0, 64),
                rng.randint(4096, 64 * 1024),
                rng.randint(64 * 1024, MiB),
                rng.randint(1 * MiB, 4 * MiB),
            )
        )

    def one_call(self, service: Any, rng: random.Random, i: int) -> None:
        if self.mode == "small":
            kind = rng.random()
            if kind < 0.5:
                self.call("record", service.record, i)
                with self.lock:
                    self.ok += 1
            elif kind < 0.75:
                value = ["small", i, rng.random()]
                self.check("echo small", self.call("echo small", service.echo, value), value)
            else:
                self.check("add", self.call("add", service.add, i, 7), i + 7)
            return
        size = self.sizes(rng)
        if rng.random() < 0.5:
            start = rng.randint(0, len(PAYLOAD) - size)
            data = PAYLOAD[start : start + size]
            self.check(f"echo {size}", self.call(f"echo {size}", service.echo, data), data)
        else:
            got = self.call(f"blob {size}", service.blob, size)
            self.check(f"blob {size}", got, expected_blob(size))
        if self.mode != "large" and rng.random() < 0.1:
            self.call("record", service.record, i)
            with self.lock:
                self.ok += 1

    def load_thread(self, service: Any, index: int) -> None:
        rng = random.Random(self.seed * 100 + index)
        i = 0
        try:
            while not self.should_stop():
                self.one_call(service, rng, i)
                i += 1
        except pybinder.BrokerUnavailableError:
            self.finish("broker")
        except pybinder.DeadObjectError:
            self.finish("server")
        except pybinder.BinderError:
            self.finish("binder error")
        except BaseException as exc:
            self.oops(threading.current_thread().name, exc)

    def late_waiter(self, proc: pybinder.ProcessState, rng: random.Random) -> None:
        name = f"late-{os.getpid()}"
        try:
            while not self.should_stop():
                timeout = rng.uniform(*LATE_WAIT_S)
                try:
                    self.call(
                        "get_service late",
                        proc.get_service,
                        name,
                        ITest,
                        timeout,
                        limit=5.0,
                        expect=pybinder.ServiceNotFoundError,
                    )
                except pybinder.ServiceNotFoundError:
                    with self.lock:
                        self.waits += 1
                else:
                    with self.lock:
                        self.unexpected.append(f"unexpected: found {name}")
                    self.finish("unexpected")
        except pybinder.BrokerUnavailableError:
            self.finish("broker")
        except pybinder.BinderError:
            self.finish("binder error")
        except BaseException as exc:
            self.oops("late waiter", exc)

    def probe_after_server_death(self, proc: pybinder.ProcessState) -> None:
        try:
            self.call(
                "probe",
                proc.get_service,
                "test",
                ITest,
                PROBE_WAIT_S,
                limit=5.0,
                expect=pybinder.BinderError,
            )
        except pybinder.BinderError as exc:
            self.probe = type(exc).__name__
        except BaseException as exc:
            self.probe = "unexpected"
            self.oops("probe", exc)
        else:
            self.probe = "found"

    def run(self, socket_path: str) -> None:
        threading.Thread(target=self.watchdog, name="watchdog", daemon=True).start()
        try:
            proc = self.call("connect", _connect, socket_path)
        except pybinder.BrokerUnavailableError:
            self.finish("broker")
            return
        except pybinder.BinderError:
            self.finish("connect")
            return
        except BaseException as exc:
            self.oops("connect", exc)
            return
        try:
            self.serve_and_load(proc)
        finally:
            try:
                self.call("close", proc.close)
            except pybinder.BinderError:
                pass  # counted
            except BaseException as exc:
                self.oops("close", exc)
            self.done.set()
            self.exiting.set()

    def serve_and_load(self, proc: pybinder.ProcessState) -> None:
        rng = random.Random(self.seed)
        wait = SERVICE_WAIT_S if self.mode == "wait" else 5.0
        if self.mode == "wait":
            print(f"waiting {os.getpid()}", flush=True)
        try:
            service = self.call(
                "get_service", proc.get_service, "test", ITest, wait, limit=wait + 5
            )
        except pybinder.BrokerUnavailableError:
            self.finish("broker")
            return
        except pybinder.BinderError:
            self.finish("get_service")
            return
        except BaseException as exc:
            self.oops("get_service", exc)
            return
        print(f"ready {os.getpid()}", flush=True)
        threads = [
            threading.Thread(target=self.load_thread, args=(service, k), name=f"load-{k}")
            for k in range(2)
        ]
        if self.mode == "wait":
            threads.append(threading.Thread(target=self.late_waiter, args=(proc, rng), name="late"))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if self.reason == "server":
            self.probe_after_server_death(proc)


def _connect(socket_path: str) -> pybinder.ProcessState:
    return pybinder.connect(socket_path, region_size=CLIENT_REGION)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else f"{text[:60]}... ({len(value)} long)"


def main(argv: list[str]) -> None:
    role, socket_path, mode, seed, stop_file, max_seconds = argv
    if role != "load" or mode not in ("mixed", "large", "small", "wait"):
        raise SystemExit(
            f"usage: load SOCKET mixed|large|small|wait SEED STOP_FILE SECONDS ({argv})"
        )
    load = Load(mode, int(seed), stop_file, float(max_seconds))
    load.run(socket_path)
    print(load.summary(), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
