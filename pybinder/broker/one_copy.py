"""The one copy: a parcel's bytes from the sender's areas into the target's region.

Binder's driver copies a parcel once, from the sender's memory into a buffer of the
target's mapping (``binder_transaction`` → ``copy_from_user``); here the broker
copies it from the sender's send area (or loan area, or the ring of a parcel in
parts) with these functions. Addresses are plain ints into the broker's mappings,
checked by the caller; sizes are in bytes.

Two things make a large copy faster:

- ``ctypes.memmove`` releases the GIL, so a copy of :data:`PARALLEL_COPY_MIN` bytes
  or more is split with a helper thread and runs on two CPUs when the broker has
  them (about 1.8x faster for 16 MiB here);
- a parcel of :data:`STREAM_MIN` bytes or more is copied with streaming
  (non-temporal) stores (:mod:`pybinder.broker._stream`, a C extension): its
  destination would not fit in the last-level cache next to its source anyway, so
  writing it straight to memory saves reading each destination line first and
  keeps the sender's ring and payload in the cache. A 16 MiB call took 6-19% less
  time in ten side-by-side pairs of 150 calls; at 8 MiB, where source and destination
  fit in the cache together, it was a tie, and streaming every copy cost 4 MiB calls
  a fifth (see docs/performance.md, step 22).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Final

from pybinder.broker.process import ThreadRecord
from pybinder.broker.records import ParcelSpan
from pybinder.compiled import pure_requested
from pybinder.errors import ProtocolError
from pybinder.protocol import PARTS_RING
from pybinder.region import BrokerRegion

#: Parcels smaller than this many bytes (without a loaned tail) are copied by slice
#: assignment, which costs a third of a ``ctypes.memmove`` call.
SMALL_COPY: Final = 2048

#: Copies of at least this many bytes are split over two threads.
PARALLEL_COPY_MIN: Final = 2 * 1024 * 1024

#: The environment variable that overrides :data:`STREAM_MIN` (bytes; 0 never streams).
STREAM_MIN_ENV: Final = "PYBINDER_STREAM_MIN"

#: Where Linux describes the first CPU's caches.
CACHE_INFO: Final = Path("/sys/devices/system/cpu/cpu0/cache")

#: The unit suffixes of a size in ``CACHE_INFO`` ("32K", "32768K", "1M").
_SIZE_UNITS: Final = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}

Copy = Callable[[int, int, int], object]


def last_level_cache_bytes(cache_info: Path = CACHE_INFO) -> int:
    """The size in bytes of the first CPU's largest cache (its L3 on most machines),
    from ``cache_info/index*/size``; 0 when Linux does not say."""
    largest = 0
    for index in cache_info.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        unit = text[-1:].upper()
        scale = _SIZE_UNITS.get(unit, 1)
        digits = text[:-1] if unit in _SIZE_UNITS else text
        if digits.isdigit():
            largest = max(largest, int(digits) * scale)
    return largest


def stream_threshold(cache_info: Path = CACHE_INFO) -> int:
    """The parcel size in bytes from which the one copy streams (0: never).

    0 when this build or machine has no streaming copy; else ``$PYBINDER_STREAM_MIN``
    if set; else three eighths of the last-level cache (a parcel that size and its
    source take three quarters of it, the share glibc's memmove allows one copy
    before it streams), or 0 when Linux does not give the cache's size.
    """
    if _load_stream_copy() is None:
        return 0
    configured = os.environ.get(STREAM_MIN_ENV, "").strip()
    if configured:
        return max(0, int(configured))
    return last_level_cache_bytes(cache_info) * 3 // 8


@functools.cache
def _load_stream_copy() -> Copy | None:
    """The C extension's streaming copy, or None (not built, ``PYBINDER_PURE``, or a
    machine without streaming stores, where it would only be a memmove)."""
    if pure_requested():
        return None
    try:
        from pybinder.broker import _stream
    except ImportError:
        return None
    return _stream.copy if _stream.STREAMING else None


#: Parcels of at least this many bytes are copied with streaming stores (0: none).
STREAM_MIN: Final = stream_threshold()


def streams(parcel_size: int) -> bool:
    """Whether the one copy of a parcel of ``parcel_size`` bytes streams."""
    return 0 < STREAM_MIN <= parcel_size


def copy_bytes(destination: int, source: int, size: int, stream: bool = False) -> None:
    """Copy ``size`` bytes between two checked, non-overlapping addresses: the one copy
    (or a piece of it). ``stream``: with streaming stores (see :func:`streams`).

    A copy of :data:`PARALLEL_COPY_MIN` bytes or more is split with a helper thread;
    on one CPU the split costs one thread hand-off.
    """
    copy = _load_stream_copy() if stream else None
    if copy is None:
        copy = ctypes.memmove
    if size < PARALLEL_COPY_MIN:
        copy(destination, source, size)
        return
    half = (size // 2 + 63) & ~63
    other = _copier().submit(copy, destination + half, source + half, size - half)
    copy(destination, source, half)
    other.result()


def copy_parcel(sender: ThreadRecord, region: BrokerRegion, start: int, span: ParcelSpan) -> None:
    """The one copy: the parcel at ``span`` in ``sender``'s areas to ``region`` at
    ``start``, after checking the span against the areas as they are mapped now
    (the check when the command came may be stale: bounds are checked when bytes
    move). The caller checked that ``region`` has ``span.size`` bytes at ``start``.

    Raises:
        ProtocolError: the span does not lie in the sender's areas now.
    """
    send, loan = sender.areas
    if send is None or not span.lies_in(send, loan):
        raise ProtocolError(f"a parcel of {span.size} bytes outside the sender's areas")
    size, at = span.size, span.head_offset
    if size < SMALL_COPY and not span.tail_len:
        region.view[start : start + size] = send.view[at : at + size]
        return
    head = span.head_len
    stream = streams(size)
    copy_bytes(region.address + start, send.address + at, head, stream)
    if span.tail_len:
        assert loan is not None
        tail = region.address + start + head
        copy_bytes(tail, loan.address + span.tail_offset, span.tail_len, stream)


def copy_from_ring(destination: int, ring: int, start: int, end: int, stream: bool) -> None:
    """Copy bytes ``start`` to ``end`` of a parcel from the sender's ring at ``ring``
    (byte p at ``p % PARTS_RING``, see protocol.TF_RING) to the parcel's buffer at
    ``destination``."""
    while start < end:
        at = start % PARTS_RING
        size = min(end - start, PARTS_RING - at)
        copy_bytes(destination + start, ring + at, size, stream)
        start += size


@functools.cache
def _copier() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="pybinder-copy")
