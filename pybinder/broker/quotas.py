"""Every limit the broker sets on what a client can make it hold, in one place.

The broker is the one process every other trusts (as the binder driver, or
dbus-broker), so each resource a client can make it keep has a bound here, with a
default, a ``pybinder broker`` option (``--connections-per-uid 64``, ...) and a clear
error when it is hit: :class:`~pybinder.errors.QuotaExceededError` naming the quota,
in the client that hit it. Quotas apply per uid, process or connection; root's
processes are exempt unless ``--no-exempt-root`` is given. dbus-broker's quotas and
binder's limits (async space, ``max_threads``) are the models.

The log is bounded too (:class:`LogBudget`): a flood of one kind of line costs a
counter, not disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final

from pybinder.errors import CODE_OF_ERROR, BinderError, QuotaExceededError, error_details

#: Where POSIX shared memory lives; the default total of region bytes is a share of
#: its free space when the broker starts.
SHM_DIR: Final = "/dev/shm"

MIB: Final = 1024 * 1024


def _quota(default: float, help_text: str) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass(frozen=True, slots=True)
class Quotas:
    """The broker's limits. Counts are plain numbers, sizes bytes, times seconds.

    A limit of 0 disables a count or size quota (not a time one).
    """

    connections_per_uid: int = _quota(256, "connections (process and thread) one uid may hold open")
    hello_timeout_s: float = _quota(
        5.0, "seconds a new connection has to say hello before it is closed"
    )
    nodes_per_process: int = _quota(
        65536, "local objects (nodes) one process may have announced to the broker"
    )
    handles_per_process: int = _quota(65536, "handles (refs) one process may hold")
    region_share_per_sender: int = _quota(
        50,
        "percent of a target's region the calls of one sending process may hold at once"
        " (binder's async space, for every call): one that never finishes cannot starve others",
    )
    region_bytes_per_uid: int = _quota(
        4096 * MIB, "bytes of receive regions the processes of one uid may hold together"
    )
    region_bytes_total: int = _quota(
        0, "bytes of receive regions in all (0: half of /dev/shm's free space at start)"
    )
    outbox_bytes: int = _quota(
        4 * MIB,
        "bytes queued for a connection that does not read before its process is disconnected",
    )
    parts_timeout_s: float = _quota(
        10.0, "seconds allowed between two parts of a parcel sent in parts before it fails"
    )
    waiters_per_process: int = _quota(
        1024, "get_service calls of one process waiting for a name at once"
    )
    services_per_uid: int = _quota(1024, "service names one uid may hold")
    service_manager_parcel: int = _quota(
        64 * 1024, "largest parcel a process may send to the service manager, bytes"
    )
    fds_per_transaction: int = _quota(
        64, "file descriptors one call or reply may carry (applies to root too; at most 253)"
    )
    fds_per_uid: int = _quota(
        4096, "file descriptors of one uid's calls the broker may hold, sent and not yet delivered"
    )
    exempt_root: bool = True

    def applies_to(self, uid: int) -> bool:
        """Whether quotas bind a process of ``uid`` (root's are exempt by default)."""
        return uid != 0 or not self.exempt_root

    def over(self, name: str, uid: int, count: int) -> bool:
        """Whether ``count`` (after the new item) exceeds quota ``name`` for ``uid``."""
        limit = getattr(self, name)
        return bool(limit) and count > limit and self.applies_to(uid)

    def error(self, name: str, what: str = "") -> QuotaExceededError:
        """The error for quota ``name``; ``what`` says what was refused."""
        limit = int(getattr(self, name))
        reason = f"{what}: " if what else ""
        return QuotaExceededError(
            f"{reason}the broker's quota {name} ({limit}) is reached", name, limit
        )

    def with_total_from_shm(self, shm_dir: str = SHM_DIR) -> Quotas:
        """These quotas with ``region_bytes_total`` set from /dev/shm's free space
        (half of it) when it is 0."""
        if self.region_bytes_total:
            return self
        try:
            stats = os.statvfs(shm_dir)
        except OSError:
            return self
        return replace(self, region_bytes_total=stats.f_bavail * stats.f_frsize // 2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one ``--name`` option per quota to ``pybinder broker``'s parser."""
    group = parser.add_argument_group("quotas (per uid unless said; root is exempt)")
    for item in fields(Quotas):
        if item.name == "exempt_root":
            continue
        option = "--" + item.name.replace("_", "-")
        kind = float if item.type in (float, "float") else int
        group.add_argument(
            option,
            type=kind,
            default=None,
            dest=f"quota_{item.name}",
            metavar="SECONDS" if kind is float else "N",
            help=f"{item.metadata['help']} (default {item.default})",
        )
    group.add_argument(
        "--no-exempt-root",
        action="store_true",
        help="apply the quotas to root's processes too",
    )


def from_arguments(args: argparse.Namespace) -> Quotas:
    """The :class:`Quotas` the parsed options ask for (defaults for those not given).

    Raises:
        ValueError: a negative limit, or a time limit that is not positive and finite.
    """
    chosen: dict[str, Any] = {}
    for item in fields(Quotas):
        value = getattr(args, f"quota_{item.name}", None)
        if value is not None:
            chosen[item.name] = value
    quotas = replace(Quotas(), **chosen, exempt_root=not getattr(args, "no_exempt_root", False))
    check(quotas)
    return quotas


def check(quotas: Quotas) -> None:
    """Raise ValueError unless every limit is usable."""
    for item in fields(Quotas):
        value = getattr(quotas, item.name)
        if item.name.endswith("_s") and not 0 < value < float("inf"):
            raise ValueError(f"{item.name} must be a positive number of seconds, not {value}")
        if value < 0:
            raise ValueError(f"{item.name} must not be negative, not {value}")


class LogBudget(logging.Filter):
    """A filter that lets each kind of log line (its format string) through at most
    ``burst`` times, then ``per_second`` times a second; the next line that passes
    says how many like it were dropped meanwhile. A flood costs a counter, not disk.
    """

    def __init__(self, burst: int = 20, per_second: float = 1.0) -> None:
        super().__init__()
        self.burst = burst
        self.per_second = per_second
        self._buckets: dict[str, list[float]] = {}  # format -> [tokens, last refill, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg)
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) > 4096:  # formats are the code's own; this never grows far
                self._buckets.clear()
            bucket = self._buckets[key] = [float(self.burst), now, 0.0]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            bucket[2] += 1
            return False
        bucket[0] = tokens - 1
        if bucket[2]:
            record.msg = f"{record.msg} ({int(bucket[2])} similar lines dropped)"
            bucket[2] = 0
        return True


def error_fields(error: BinderError, size: int = 0, limit: int = 0) -> tuple[int, int, int]:
    """The (code, size, limit) fields of BR_ERROR or BR_FAILED_REPLY for ``error``: a
    quota's number and limit for QuotaExceededError (the client names the quota from
    them), else ``size`` and ``limit`` as given."""
    code = CODE_OF_ERROR.get(type(error), 1)
    if isinstance(error, QuotaExceededError):
        index, quota_limit = error_details(error)
        return code, index, quota_limit
    return code, size, limit
