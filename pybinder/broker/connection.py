"""One client socket as the broker sees it (a process or thread connection, or one
not yet introduced): the kernel's word on who is at the other end (SO_PEERCRED),
messages in with any descriptors they carry (SCM_RIGHTS), and a bounded queue of
messages out for a peer whose socket is full.

This is the edge: bytes arrive here, and no byte of a frame is trusted past it
without a check (protocol.decode splits and sizes commands; the handlers check
every field). A peer that lets more than its outbox limit pile up does not read,
and the daemon disconnects it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections import deque
from typing import Any, Final

from pybinder import protocol
from pybinder.broker.process import ProcessRecord, ThreadRecord
from pybinder.broker.quotas import error_fields
from pybinder.errors import BinderError
from pybinder.protocol import MAX_MESSAGE

#: SO_PEERCRED's (pid, uid, gid).
PEERCRED: Final = struct.Struct("3i")
#: The most descriptors one message may carry (SCM_RIGHTS): the kernel's SCM_MAX_FD.
#: More cut it short (the kernel closes the rest); the fds_per_transaction quota is
#: lower.
MAX_FDS: Final = 253
ANCILLARY: Final = socket.CMSG_SPACE(MAX_FDS * 4)
TRUNCATED: Final = int(socket.MSG_TRUNC | socket.MSG_CTRUNC)

#: What :meth:`Connection.send` did with a message.
SENT: Final = 0  # on its way
QUEUED: Final = 1  # kept until the peer's socket has room (watch for EPOLLOUT)
BROKEN: Final = 2  # the socket failed: close the connection
OVERFULL: Final = 3  # the peer does not read: disconnect it


class Connection:
    """One accepted socket: a process connection, a thread connection, or not yet
    introduced. Outgoing messages queue when the peer's receive buffer is full."""

    __slots__ = (
        "fd",
        "gid",
        "hello_timer",
        "offences",
        "offences_since",
        "outbox",
        "outbox_bytes",
        "outbox_limit",
        "pid",
        "process",
        "sock",
        "thread",
        "uid",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size)
        )
        self.process: ProcessRecord | None = None
        self.thread: ThreadRecord | None = None
        self.outbox: deque[tuple[bytes, list[int]]] = deque()
        self.outbox_bytes = 0
        self.hello_timer: Any = None  # the daemon's timer for the hello deadline
        self.outbox_limit = 0  # bytes the outbox may hold (0: no limit)
        self.offences = 0
        self.offences_since = 0.0

    @property
    def owner(self) -> ProcessRecord | None:
        """The process this connection belongs to, once it said hello."""
        if self.process is not None:
            return self.process
        return self.thread.process if self.thread is not None else None

    def receive(self) -> tuple[bytes, list[int], bool] | None:
        """The next message, the descriptors it carried and whether it was cut short
        (longer than MAX_MESSAGE, or more descriptors than MAX_FDS); ``b""`` once the
        peer has gone; None when nothing waits. The caller closes the descriptors."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(MAX_MESSAGE, ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            return b"", [], False
        fds = received_fds(ancillary) if ancillary else []
        return data, fds, bool(flags & TRUNCATED)

    def send(self, message: bytes, fds: list[int] | None = None) -> int:
        """Send ``message`` (with ``fds``, duplicated if it must wait) now, or queue it
        behind the ones waiting; returns SENT, QUEUED, BROKEN or OVERFULL."""
        if not self.outbox:
            try:
                self._transmit(message, fds)
            except BlockingIOError:
                pass
            except OSError:
                return BROKEN
            else:
                return SENT
        self.outbox_bytes += len(message)
        if self.outbox_limit and self.outbox_bytes > self.outbox_limit:
            return OVERFULL
        self.outbox.append((message, [os.dup(fd) for fd in fds or []]))
        return QUEUED

    def flush(self) -> int:
        """Send what waits in the outbox; returns SENT once it is empty, QUEUED while
        the peer's socket is still full, BROKEN if it failed."""
        outbox = self.outbox
        while outbox:
            message, fds = outbox[0]
            try:
                self._transmit(message, fds)
            except BlockingIOError:
                return QUEUED
            except OSError:
                return BROKEN
            outbox.popleft()
            self.outbox_bytes -= len(message)
            for fd in fds:
                os.close(fd)
        return SENT

    def _transmit(self, message: bytes, fds: list[int] | None) -> None:
        if fds:
            socket.send_fds(self.sock, [message], fds)
        else:
            self.sock.send(message)

    def close(self) -> None:
        """Close the socket and every descriptor still queued."""
        self.sock.close()
        for _, fds in self.outbox:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.outbox.clear()
        self.outbox_bytes = 0


def error_message(error: BinderError) -> bytes:
    """BR_ERROR for ``error`` (see quotas.error_fields)."""
    size, limit = getattr(error, "size", 0), getattr(error, "limit", 0)
    return protocol.encode(protocol.BR_ERROR, *error_fields(error, size, limit))


def received_fds(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % 4
            fds.extend(struct.unpack(f"{usable // 4}i", data[:usable]))
    return fds
