"""File descriptors that travel in parcels (Android's ParcelFileDescriptor).

Any object with a ``fileno()`` method (a file, a socket, a pipe end, or a
:class:`ParcelFileDescriptor`) passed as an argument or a result goes with the
parcel: the sender's descriptor is passed to the broker with SCM_RIGHTS, the broker
passes it on to the receiver the same way, and the receiver gets a
:class:`ParcelFileDescriptor` that owns a new descriptor for the same open file
description (shared offset and flags, as after ``dup``), as binder's BINDER_TYPE_FD
objects do. At most 64 go in one call or reply (the broker's
``fds_per_transaction`` quota).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any


class ParcelFileDescriptor:
    """An owned file descriptor, received in a parcel or made to send one.

    Args:
        fd: the descriptor; this object owns it and closes it in :meth:`close`
            (or when garbage collected).

    Use :meth:`dup` to send a descriptor you keep using, ``fileno()`` to use it in
    place, :meth:`detach` to take it over, and ``with pfd:`` to close it after use.
    Wrap it with ``os.fdopen(pfd.detach(), "rb")`` or
    ``socket.socket(fileno=pfd.detach())`` to get a file or socket object.

    Raises:
        ValueError: ``fd`` is negative.
    """

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        if fd < 0:
            raise ValueError(f"not a file descriptor: {fd}")
        self._fd = fd

    @classmethod
    def dup(cls, source: Any) -> ParcelFileDescriptor:
        """A ParcelFileDescriptor owning a duplicate of ``source`` (an int
        descriptor, or anything with ``fileno()``), which stays the caller's.

        Raises:
            OSError: ``source`` is not an open descriptor.
        """
        fd = source if isinstance(source, int) else source.fileno()
        return cls(os.dup(fd))

    @property
    def closed(self) -> bool:
        """Whether the descriptor was closed or detached."""
        return self._fd < 0

    def fileno(self) -> int:
        """The descriptor (still owned by this object).

        Raises:
            ValueError: it was closed or detached.
        """
        if self._fd < 0:
            raise ValueError("I/O operation on a closed ParcelFileDescriptor")
        return self._fd

    def detach(self) -> int:
        """Give up ownership: return the descriptor, which the caller must close.

        Raises:
            ValueError: it was closed or detached already.
        """
        fd = self.fileno()
        self._fd = -1
        return fd

    def close(self) -> None:
        """Close the descriptor (again: nothing happens)."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> ParcelFileDescriptor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)

    def __repr__(self) -> str:
        return f"<ParcelFileDescriptor fd={self._fd if self._fd >= 0 else 'closed'}>"
