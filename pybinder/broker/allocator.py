"""Best-fit buffer allocator with coalescing, one per receive region (binder_alloc).

The broker alone allocates in a region; the owner only frees (BC_FREE_BUFFER), and
only buffers the broker handed it. Every size is in bytes and rounded up to
:data:`ALIGNMENT` so parcels (and the 64-byte-aligned buffers in them) start on a
cache line.

Unlike binder_alloc, a freed small block (at most :data:`REUSE_MAX` bytes) is kept
aside for the next allocation of the same rounded size instead of being merged
back at once, up to 1/64 of the region: calls allocate and free the same few small
sizes over and over, and a kept block costs a list pop instead of two sorted-list
updates. Kept blocks are merged back whenever an allocation finds no free range.
"""

from __future__ import annotations

import bisect
from typing import Final

#: Every buffer starts on this boundary, in bytes.
ALIGNMENT: Final = 64

#: Freed blocks of at most this many bytes are kept for reuse (see the module doc).
REUSE_MAX: Final = 1024


class BufferAllocator:
    """Hands out ``[offset, offset + size)`` ranges of a region of ``capacity`` bytes.

    Free ranges are kept three ways: by size (for best fit), by start and by end (to
    merge a freed range with its free neighbours at once).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity - capacity % ALIGNMENT
        self._by_size: list[tuple[int, int]] = [(self.capacity, 0)]
        self._free_at: dict[int, int] = {0: self.capacity}
        self._free_ending: dict[int, int] = {self.capacity: 0}
        self._allocated: dict[int, int] = {}
        self._kept: dict[int, list[int]] = {}  # rounded size -> freed offsets kept aside
        self._kept_bytes = 0
        self._kept_limit = self.capacity // 64
        self.in_use = 0

    @staticmethod
    def rounded(size: int) -> int:
        """The bytes an allocation of ``size`` really takes."""
        return max(ALIGNMENT, (size + ALIGNMENT - 1) & ~(ALIGNMENT - 1))

    def largest_free(self) -> int:
        """The largest single allocation that would succeed now, in bytes."""
        self._merge_kept()
        return self._by_size[-1][0] if self._by_size else 0

    def allocate(self, size: int) -> int | None:
        """Allocate ``size`` bytes in the smallest free range that holds them.

        Returns the offset, or None when no free range is large enough.
        """
        size = max(ALIGNMENT, (size + ALIGNMENT - 1) & ~(ALIGNMENT - 1))  # rounded(), inlined
        kept = self._kept.get(size)
        start: int | None
        if kept:
            start = kept.pop()
            self._kept_bytes -= size
        else:
            start = self._take_range(size)
            if start is None:
                return None
        self._allocated[start] = size
        self.in_use += size
        return start

    def _take_range(self, size: int) -> int | None:
        """Carve ``size`` bytes out of the smallest free range that holds them."""
        by_size = self._by_size
        index = bisect.bisect_left(by_size, (size, -1))
        if index == len(by_size):
            if not self._kept_bytes:
                return None
            self._merge_kept()
            return self._take_range(size)
        free_size, start = by_size.pop(index)
        del self._free_at[start]
        end = start + free_size
        if free_size > size:  # the rest stays free: it keeps its end, gets a new start
            rest = start + size
            bisect.insort(by_size, (free_size - size, rest))
            self._free_at[rest] = free_size - size
            self._free_ending[end] = rest
        else:
            del self._free_ending[end]
        return start

    def size_of(self, offset: int) -> int:
        """The rounded size of the live allocation at ``offset``."""
        return self._allocated[offset]

    def free(self, offset: int) -> int:
        """Free the allocation at ``offset``: keep it aside for reuse if it is small,
        else merge it with its free neighbours.

        Returns the bytes freed.

        Raises:
            KeyError: ``offset`` is not the start of a live allocation.
        """
        size = self._allocated.pop(offset)
        self.in_use -= size
        if size <= REUSE_MAX and self._kept_bytes + size <= self._kept_limit:
            self._kept.setdefault(size, []).append(offset)
            self._kept_bytes += size
        else:
            self._release_range(offset, size)
        return size

    def _merge_kept(self) -> None:
        """Merge every kept block back into the free ranges."""
        if self._kept_bytes:
            for size, offsets in self._kept.items():
                for offset in offsets:
                    self._release_range(offset, size)
            self._kept.clear()
            self._kept_bytes = 0

    def _release_range(self, offset: int, size: int) -> None:
        """Return ``[offset, offset + size)`` to the free ranges, merged with its
        free neighbours."""
        start, end = offset, offset + size
        free_at, free_ending = self._free_at, self._free_ending
        after = free_at.get(end)
        if after is not None:
            self._remove_free(end, after)
            end += after
        before = free_ending.get(start)
        if before is not None:
            self._remove_free(before, start - before)
            start = before
        bisect.insort(self._by_size, (end - start, start))
        free_at[start] = end - start
        free_ending[end] = start

    def _remove_free(self, start: int, size: int) -> None:
        index = bisect.bisect_left(self._by_size, (size, start))
        del self._by_size[index]
        del self._free_at[start]
        del self._free_ending[start + size]
