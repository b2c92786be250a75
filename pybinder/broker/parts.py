"""Parcels sent in parts (TF_PARTS): the broker copies each part as the sender
announces it (BC_PARCEL_READY), so the sender's writing and the one copy overlap;
a parcel written through a ring (TF_RING) reuses the ring as the broker reports its
progress. A sender that stops between parts for longer than ``parts_timeout_s``
fails, and the space its early copy holds in the target is freed (:meth:`expire`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pybinder.broker.one_copy import copy_bytes, copy_from_ring, streams
from pybinder.broker.process import Buffer, ProcessRecord, ThreadRecord
from pybinder.broker.records import ParcelSpan
from pybinder.errors import ProtocolError
from pybinder.protocol import (
    PARTS_RING,
    PROGRESS,
    RING_IS_ORDERED,
    SEND_AREA,
    TF_ONE_WAY,
    WRITE_WHOLE,
)

if TYPE_CHECKING:
    from pybinder.broker.router import Router


class Parts:
    """A parcel a thread is sending in parts (TF_PARTS), as its transaction's fields
    (a reply's: ``is_reply``, with no handle or code).

    Attributes:
        copied: bytes of the parcel announced by BC_PARCEL_READY and handled so far.
        target, buffer: where the parts are copied as they come, if the transaction
            (or the reply) could go at once; None to send it the ordinary way once
            complete.
        ring: the sender writes through a ring (TF_RING) and is told of each copy.
    """

    __slots__ = (
        "buffer",
        "code",
        "copied",
        "flags",
        "handle",
        "is_reply",
        "last_part",
        "ring",
        "size",
        "target",
    )

    def __init__(
        self, handle: int, code: int, flags: int, size: int, is_reply: bool = False
    ) -> None:
        self.handle = handle
        self.code = code
        self.flags = flags
        self.size = size
        self.is_reply = is_reply
        self.copied = 0
        self.last_part = 0.0  # when the last part (or the first command) came, monotonic s
        self.ring = False
        self.target: ProcessRecord | None = None
        self.buffer: Buffer | None = None


class PartsCopier:
    """The router's part for parcels in parts; one per router.

    Attributes:
        senders: the threads sending a parcel in parts now (for :meth:`expire`).
        parcels_in_parts: parcels copied part by part while their senders wrote them.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self.senders: dict[ThreadRecord, None] = {}
        self.parcels_in_parts = 0

    def begin_call(
        self, thread: ThreadRecord, handle: int, code: int, flags: int, size: int, tail_len: int
    ) -> None:
        """Note a transaction whose parcel arrives in parts. If its target is known and
        has room now, allocate the buffer, so each part is copied as it is announced
        while the sender writes the next; otherwise the transaction runs the ordinary
        way (and reports any failure) once the parcel is complete."""
        if thread.parts is not None or tail_len:
            self.drop(thread)
            self._router.protocol_error(thread, ProtocolError("TF_PARTS with a tail or mid-parcel"))
            return
        parts = thread.parts = Parts(handle, code, flags, size)
        self._started(thread, parts)
        ref = thread.process.refs.get(handle)
        if ref is None or ref.node.dead or not thread.holds(ParcelSpan(size)):
            return
        target = ref.node.owner
        oneway = bool(flags & TF_ONE_WAY)
        if oneway and (target.space_waiters or size > target.async_space):
            return  # backpressure or too large: decided when complete
        if self._router.over_share(thread.process, target, size):
            return  # decided (and refused) when complete
        parts.buffer = target.allocate(size, oneway, thread.process)
        if parts.buffer is not None:
            parts.target = target

    def begin_reply(self, thread: ThreadRecord, flags: int, size: int, tail_len: int) -> None:
        """Note a reply whose parcel arrives in parts (as :meth:`begin_call` does a
        call's): if its caller still waits and has room, allocate the buffer now."""
        if thread.parts is not None or tail_len or not thread.incoming:
            self.drop(thread)
            self._router.protocol_error(thread, ProtocolError("a reply in parts out of place"))
            return
        parts = thread.parts = Parts(0, 0, flags, size, is_reply=True)
        self._started(thread, parts)
        caller = waiting_caller(thread)
        if caller is None or not thread.holds(ParcelSpan(size)):
            return
        parts.buffer = caller.process.allocate(size, is_async=False)
        if parts.buffer is not None:
            parts.target = caller.process

    @staticmethod
    def choose_layout(thread: ThreadRecord, ring_asked: bool) -> None:
        """Answer a sender that asked to write its parcel through a ring (TF_RING): use
        the ring only when each part is copied as it comes, this CPU orders the
        progress report after the copy, and the progress word lies past the parcel;
        otherwise tell the sender to write the parcel whole (WRITE_WHOLE)."""
        parts, send = thread.parts, thread.areas[SEND_AREA]
        if not ring_asked or parts is None or send is None:
            return
        parts.ring = (
            RING_IS_ORDERED
            and parts.buffer is not None
            and send.size >= max(parts.size, PARTS_RING) + PROGRESS.size
        )
        send.report_progress(0 if parts.ring else WRITE_WHOLE)

    def ready(self, thread: ThreadRecord, ready: int) -> None:
        """BC_PARCEL_READY: the first ``ready`` bytes of the parcel in parts are written.

        Copies the new part; when the parcel is complete, starts its transaction (or
        sends the reply).
        """
        parts = thread.parts
        send = thread.areas[SEND_AREA]
        if parts is None or not parts.copied <= ready <= parts.size:
            self.drop(thread)
            self._router.protocol_error(thread, ProtocolError("BC_PARCEL_READY out of order"))
            return
        target, buffer = parts.target, parts.buffer
        if target is not None and buffer is not None and not target.dead:
            if send is None or ready > send.size - (PROGRESS.size if parts.ring else 0):
                self.drop(thread)
                self._router.protocol_error(
                    thread, ProtocolError("a parcel part outside the send area")
                )
                return
            dest = target.region.address + buffer.offset
            stream = streams(parts.size)
            if parts.ring:
                copy_from_ring(dest, send.address, parts.copied, ready, stream)
            else:
                source = send.address + parts.copied
                copy_bytes(dest + parts.copied, source, ready - parts.copied, stream)
        parts.copied = ready
        parts.last_part = time.monotonic()
        if parts.ring and send is not None:
            send.report_progress(ready)
        if ready < parts.size:
            return
        thread.parts = None
        self.senders.pop(thread, None)
        if buffer is not None:
            if self._still_prefilled(thread, parts):
                self.parcels_in_parts += 1
            else:
                buffer = None
        handle, code, flags, size = parts.handle, parts.code, parts.flags, parts.size
        # Without its early copy, a parcel sent through a ring (which holds only its
        # last bytes) goes the ordinary way only when its target died, its handle was
        # released or its caller stopped waiting: each fails or is dropped there
        # before the send area is read.
        if parts.is_reply:
            self._router.reply(thread, flags, size, prefilled=buffer)
        else:
            self._router.transaction(thread, handle, code, flags, size, prefilled=buffer)

    def _still_prefilled(self, thread: ThreadRecord, parts: Parts) -> bool:
        """Whether a complete parcel's early copy can be used: its target is alive and
        its handle still names it (a reply's caller still waits). Frees the copy when
        it cannot."""
        target, buffer = parts.target, parts.buffer
        assert target is not None and buffer is not None
        if target.dead:
            return False
        if parts.is_reply:
            caller = waiting_caller(thread)
            if caller is not None and caller.process is target:
                return True
        else:
            ref = thread.process.refs.get(parts.handle)
            if ref is not None and ref.node.owner is target:
                return True
        target.free(buffer)
        return False

    def _started(self, thread: ThreadRecord, parts: Parts) -> None:
        parts.last_part = time.monotonic()
        self.senders[thread] = None

    def expire(self, before: float) -> None:
        """Fail every parcel in parts whose last part came before ``before``
        (monotonic seconds): its sender stopped, and the space its copy holds in the
        target is freed. A reply's caller gets the failure too."""
        stale = [t for t in self.senders if t.parts is not None and t.parts.last_part < before]
        error = self._router.quotas.error("parts_timeout_s", "a parcel in parts")
        for thread in stale:
            is_reply = thread.parts is not None and thread.parts.is_reply
            caller = waiting_caller(thread) if is_reply else None
            self.drop(thread)
            if caller is not None:
                txn = thread.incoming.pop()
                caller.outgoing = None
                self._router.fail(caller, error)
                self._router.finish(txn)
            self._router.fail(thread, error)

    def drop(self, thread: ThreadRecord) -> None:
        """Forget the parcel ``thread`` was sending in parts, and free its early copy;
        a sender writing through a ring is told to stop waiting for the broker."""
        parts, thread.parts = thread.parts, None
        self.senders.pop(thread, None)
        send = thread.areas[SEND_AREA]
        if parts is not None and parts.ring and send is not None and thread.alive:
            send.report_progress(WRITE_WHOLE)
        if parts is not None and parts.buffer is not None:
            assert parts.target is not None
            if not parts.target.dead:
                parts.target.free(parts.buffer)


def waiting_caller(thread: ThreadRecord) -> ThreadRecord | None:
    """The thread waiting for the reply to ``thread``'s innermost transaction."""
    txn = thread.incoming[-1] if thread.incoming else None
    if txn is None or txn.oneway:
        return None
    caller = txn.from_thread
    if caller is None or not caller.alive or caller.outgoing is not txn:
        return None
    return caller
