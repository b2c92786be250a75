"""The value objects a transaction is made of: where its parcel lies (ParcelSpan),
and the transaction itself (binder_transaction). Slotted, so the router passes one
object, not loose integers.
"""

from __future__ import annotations

import os
import time

from pybinder.broker.process import Buffer, Node, ProcessRecord, SharedArea, ThreadRecord
from pybinder.parcel import HEADER
from pybinder.protocol import TF_ONE_WAY


class ParcelSpan:
    """Where a parcel of ``size`` bytes lies in its sender's areas: its first
    ``size - tail_len`` bytes in the send area from ``head_offset``, its last
    ``tail_len`` in the loan area from ``tail_offset`` (0: no tail). All in bytes.

    A span comes from a client, so nothing about it is trusted: :meth:`lies_in`
    checks it against the areas as they are mapped at the moment it is asked.

    ``fds`` are the descriptors that came with the parcel (SCM_RIGHTS), the
    broker's to close until its copy takes them into a buffer.
    """

    __slots__ = ("fds", "head_offset", "size", "tail_len", "tail_offset")

    def __init__(
        self, size: int, tail_offset: int = 0, tail_len: int = 0, head_offset: int = 0
    ) -> None:
        self.size = size
        self.tail_offset = tail_offset
        self.tail_len = tail_len
        self.head_offset = head_offset
        self.fds: list[int] = _NO_FDS

    @property
    def head_len(self) -> int:
        """Bytes of the parcel in the send area."""
        return self.size - self.tail_len

    def lies_in(self, send: SharedArea | None, loan: SharedArea | None) -> bool:
        """Whether the span lies inside ``send`` (and ``loan`` for a tail), and its
        head holds at least a parcel header."""
        head = self.size - self.tail_len
        if send is None or not HEADER.size <= head or self.head_offset + head > send.size:
            return False
        tail = self.tail_len
        return not tail or (loan is not None and self.tail_offset + tail <= loan.size)

    def __repr__(self) -> str:
        return (
            f"ParcelSpan(size={self.size}, head_offset={self.head_offset},"
            f" tail_offset={self.tail_offset}, tail_len={self.tail_len})"
        )


_NO_FDS: list[int] = []  # shared by every span without descriptors; never changed


class Transaction:
    """One call on its way (binder_transaction).

    Attributes:
        node, code, flags: the target node, method code and TF_* flags.
        span: where the parcel lies in the sender's areas (its size, in bytes).
        from_thread: the caller; None once it has gone (its reply is then dropped).
        sender_pid, sender_uid, sender_gid: the caller's credentials (SO_PEERCRED).
        parent: the transaction ``from_thread`` was handling when it called, for
            routing nested calls back along the chain.
        origin: the sending thread, kept for ordering after ``from_thread`` is cleared.
        oneway: TF_ONE_WAY is set.
        buffer: the target's copy, once made.
        to_thread: the thread handling it, once delivered.
        in_async_lane: it runs in its node's one-at-a-time oneway lane: every oneway
            call, and a two-way call sent behind oneway calls of the same thread.
        batch: the oneway calls of its lane handed to the same looper with it.
        started: when it was sent (time.monotonic(), seconds), for its age in status
            and the starvation warning.
        deadline: when its caller gives up (CLOCK_MONOTONIC, ns; 0: never), passed
            to the thread that runs it (BR_DEADLINE).
        cancelled: its caller gave up (BC_CANCEL_TRANSACTION); a reply is dropped.
        detached_id: its id once its server detached it (BC_DETACH; 0: not detached).
    """

    __slots__ = (
        "batch",
        "buffer",
        "cancelled",
        "code",
        "deadline",
        "detached_id",
        "flags",
        "from_thread",
        "in_async_lane",
        "node",
        "oneway",
        "origin",
        "parent",
        "sender_gid",
        "sender_pid",
        "sender_uid",
        "span",
        "started",
        "to_thread",
    )

    def __init__(
        self,
        node: Node,
        code: int,
        flags: int,
        span: ParcelSpan,
        from_thread: ThreadRecord | None,
        parent: Transaction | None,
    ) -> None:
        self.node = node
        self.code = code
        self.flags = flags
        self.span = span
        self.from_thread: ThreadRecord | None = from_thread
        self.origin: ThreadRecord | None = from_thread
        if from_thread is None:  # a call the broker makes itself
            self.sender_pid, self.sender_uid = os.getpid(), os.getuid()
            self.sender_gid = os.getgid()
        else:
            process = from_thread.process
            self.sender_pid = process.pid
            self.sender_uid = process.uid
            self.sender_gid = process.gid
        self.parent = parent
        self.oneway = bool(flags & TF_ONE_WAY)
        self.in_async_lane = self.oneway
        self.buffer: Buffer | None = None
        self.to_thread: ThreadRecord | None = None
        self.batch: list[Transaction] | None = None
        self.started = time.monotonic()
        self.deadline = 0
        self.cancelled = False
        self.detached_id = 0

    @property
    def target(self) -> ProcessRecord:
        return self.node.owner

    @property
    def size(self) -> int:
        """The parcel's size in bytes."""
        return self.span.size
