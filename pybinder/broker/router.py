"""Routing, the one copy, object translation and oneway queues (binder_transaction).

The :class:`Router` is the driver's core. It receives each thread's BC_* commands
(already split by the daemon), and for a transaction it:

1. finds the target node from the sender's handle;
2. allocates a buffer in the target's receive region (best fit);
3. copies the parcel from the sender's send area into it: the one copy;
4. checks the copy (never the sender's live memory) and translates its object
   table: a node of the sender becomes a handle of the target, a handle becomes
   the target's own handle or, for the node's owner, the node itself;
5. hands it to a thread: the sender's peer in a nested call (binder's transaction
   stack), an idle looper, or the process's queue; oneway calls to one node go
   one at a time, in order.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from pybinder import protocol
from pybinder.broker.one_copy import copy_parcel, streams
from pybinder.broker.parts import PartsCopier
from pybinder.broker.process import Buffer, Node, ProcessRecord, Ref, ThreadRecord, count_down
from pybinder.broker.quotas import Quotas, error_fields
from pybinder.broker.records import ParcelSpan, Transaction
from pybinder.broker.translate import translate
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    DeadObjectError,
    ProtocolError,
    QuotaExceededError,
    SecurityError,
    TransactionTooLargeError,
)
from pybinder.parcel import (
    BUFFER_ENTRY,
    EncodedParcel,
    parse_header,
    read_objects,
)
from pybinder.parcel import encode as encode_parcel
from pybinder.protocol import (
    BC_CANCEL_TRANSACTION,
    BC_DEADLINE,
    BC_DETACH,
    BC_RELEASE,
    BC_REPLY,
    BC_REPLY_TO,
    BC_TRANSACTION,
    BR_CALL_CANCELLED,
    BR_CANCEL_DONE,
    BR_CANCELLED,
    BR_DEAD_BINDER,
    BR_DEAD_REPLY,
    BR_DEADLINE,
    BR_DETACHED,
    BR_ERROR,
    BR_FAILED_REPLY,
    BR_FDS,
    BR_OK,
    BR_RELEASE_NODE,
    BR_REPLY,
    BR_SPAWN_LOOPER,
    BR_TRANSACTION,
    BR_TRANSACTION_COMPLETE,
    MAX_BACKLOG,
    MAX_THREADS_LIMIT,
    SERVICE_MANAGER_HANDLE,
    TF_ONE_WAY,
    TF_PARTS,
    TF_RING,
    TF_WINDOW,
)

if TYPE_CHECKING:
    from pybinder.broker.service_manager import ServiceManager

log: Final = logging.getLogger("pybinder.broker")

_BR_TRANSACTION: Final = protocol.COMMAND_STRUCTS[BR_TRANSACTION]
_BR_REPLY: Final = protocol.COMMAND_STRUCTS[BR_REPLY]
_BR_DEADLINE: Final = protocol.COMMAND_STRUCTS[BR_DEADLINE]

#: The most queued oneway calls of one node's lane delivered to a looper in one
#: message (48 bytes each; a message holds at most MAX_MESSAGE): a stream's receiver
#: then wakes once per batch instead of once per call.
MAX_BATCH: Final = 32

_PARTS_FLAGS: Final = TF_PARTS | TF_RING
_PARTS_OR_ONEWAY: Final = TF_PARTS | TF_ONE_WAY

#: How long calls may queue while every looper of their process is busy before the
#: broker logs thread-pool starvation, in seconds.
STARVATION_S: Final = 1.0

#: Delivers one message to a connection (``ThreadRecord.conn``, ``ProcessRecord.conn``),
#: with descriptors to pass (SCM_RIGHTS) when a third argument is given.
Sender = Callable[..., None]


class Router:
    """The broker's transaction engine; owns every :class:`ProcessRecord`.

    Args:
        send: delivers one message to a thread's connection.
        quotas: the limits on nodes, handles, service-manager parcels and parts.
    """

    def __init__(self, send: Sender, quotas: Quotas | None = None) -> None:
        self._send = send
        self.quotas = quotas or Quotas()
        self.parts = PartsCopier(self)
        self.processes: dict[int, ProcessRecord] = {}
        self.processes_of_uid: dict[int, dict[ProcessRecord, None]] = {}
        self.service_manager: ServiceManager | None = None
        self.transactions = 0
        self.bytes_copied = 0
        self.buffer_bytes_copied = 0
        self.oneway_batched = 0  # oneway calls handed over in a batch behind another
        self.parcels_streamed = 0  # copied with streaming stores (one_copy.STREAM_MIN)
        self.fds_of_uid: dict[int, int] = {}  # descriptors the broker holds per sender uid

    def add_process(self, process: ProcessRecord) -> None:
        """Admit a process that said hello."""
        self.processes[process.key] = process
        self.processes_of_uid.setdefault(process.uid, {})[process] = None

    # -- messages out -------------------------------------------------------------

    def send(self, thread: ThreadRecord, message: bytes) -> None:
        """Send ``message`` to ``thread``, after any notifications its process owes."""
        if thread.alive:
            if thread.process.notifications:
                self.flush_notifications(thread)
            self._send(thread.conn, message)

    def send_with_fds(self, thread: ThreadRecord, message: bytes, buffers: list[Buffer]) -> None:
        """Send ``message`` to ``thread`` with the descriptors of ``buffers`` (their
        parcels are in it), then close the broker's copies: they are the receiver's."""
        fds: list[int] = []
        for buffer in buffers:
            if buffer.fds is not None:
                fds.extend(buffer.fds)
        if not fds:
            self.send(thread, message)
            return
        try:
            if thread.alive:
                if thread.process.notifications:
                    self.flush_notifications(thread)
                # A message of its own first, so the receiver reads the next one with
                # room for descriptors (recvmsg), and every other with a plain recv.
                self._send(thread.conn, protocol.encode(BR_FDS, len(fds)))
                self._send(thread.conn, message, fds)
        finally:
            for buffer in buffers:
                self.close_fds(buffer)

    def flush_notifications(self, thread: ThreadRecord) -> None:
        """Send ``thread`` the notifications queued for its process."""
        pending = thread.process.notifications
        if pending:
            thread.process.notifications = []
            for chunk in protocol.batch(pending):
                self._send(thread.conn, chunk)

    def acknowledge_oneway(self, thread: ThreadRecord) -> None:
        """Tell ``thread`` its oneway call is copied (binder's BR_TRANSACTION_COMPLETE),
        or count it as settled in its settle words if it came in a window."""
        if thread.window_call:
            thread.settle(False)
        else:
            self.send(thread, protocol.encode(BR_TRANSACTION_COMPLETE))

    def fail(self, thread: ThreadRecord, error: BinderError, size: int = 0, limit: int = 0) -> None:
        """Answer a transaction with BR_FAILED_REPLY carrying ``error``'s code (and
        count a windowed call as settled, failed)."""
        log.debug("transaction from pid %d failed: %s", thread.process.pid, error)
        self.send(thread, protocol.encode(BR_FAILED_REPLY, *error_fields(error, size, limit)))
        if thread.window_call:
            thread.settle(True)

    def dead_reply_to(self, thread: ThreadRecord, node: Node | None = None) -> None:
        """Tell ``thread`` its call's target ``node`` has died, naming the thread's
        handle to it (and count a windowed call as settled, failed)."""
        ref = None if node is None else thread.process.ref_of_node.get(node)
        self.send(thread, protocol.encode(BR_DEAD_REPLY, 0 if ref is None else ref.handle))
        if thread.window_call:
            thread.settle(True)

    def protocol_error(self, thread: ThreadRecord, error: ProtocolError) -> None:
        """Answer a bad command with BR_ERROR; the thread raises it in its caller."""
        log.warning("pid %d: %s", thread.process.pid, error)
        self.send(thread, protocol.encode(BR_ERROR, CODE_OF_ERROR[ProtocolError], 0, 0))

    def notify(self, process: ProcessRecord, message: bytes) -> None:
        """Deliver a process-wide return (BR_RELEASE_NODE, BR_DEAD_BINDER,
        BR_SPAWN_LOOPER) on the process connection, which a runtime thread reads;
        without one (records built in tests), to an idle looper now, or with the next
        message any of its threads receives."""
        if process.dead:
            return
        if process.conn is not None:
            self._send(process.conn, message)
            return
        looper = process.idle_looper()
        if looper is not None:
            self.send(looper, message)
        else:
            process.notifications.append(message)

    # -- BC_TRANSACTION -----------------------------------------------------------

    def transaction(
        self,
        thread: ThreadRecord,
        handle: int,
        code: int,
        flags: int,
        size: int,
        tail_offset: int = 0,
        tail_len: int = 0,
        head_offset: int = 0,
        prefilled: Buffer | None = None,
    ) -> None:
        """Start a transaction to ``handle`` whose parcel of ``size`` bytes is in
        ``thread``'s send area from ``head_offset`` (and its last ``tail_len`` bytes
        in its loan area).

        With TF_PARTS the parcel is still being written: see :meth:`PartsCopier.ready`.
        ``prefilled`` is the target's buffer that already holds the parcel's copy.
        """
        if flags & TF_PARTS:
            self.parts.begin_call(thread, handle, code, flags & ~_PARTS_FLAGS, size, tail_len)
            self.parts.choose_layout(thread, bool(flags & TF_RING))
            return
        span = ParcelSpan(size, tail_offset, tail_len, head_offset)
        thread.window_call = bool(flags & TF_WINDOW) and flags & _PARTS_OR_ONEWAY == TF_ONE_WAY
        if thread.fds:
            error = self._take_fds(thread, span)
            if error is not None:
                self.fail(thread, error)
                thread.window_call = False
                return
        try:  # while it is set, a failure also settles the windowed call
            process = thread.process
            process.transactions_sent += 1
            self.transactions += 1
            if handle == SERVICE_MANAGER_HANDLE:
                self._to_service_manager(thread, code, flags, span)
                return
            ref = process.refs.get(handle)
            if ref is None:
                self.fail(thread, ProtocolError(), handle, 0)
                return
            if ref.call_denied:
                self.fail(thread, SecurityError("the access policy denies calls to this service"))
                return
            if ref.node.dead:
                self.dead_reply_to(thread, ref.node)
                return
            if flags & TF_ONE_WAY and thread.parts is not None:
                # Its own unfinished parcel may hold the room this oneway call would
                # wait for, and its parts would be held behind it: refused at once.
                self.fail(
                    thread, ProtocolError("a oneway call while a parcel in parts is unfinished")
                )
                return
            parent = thread.incoming[-1] if thread.incoming else None
            txn = Transaction(ref.node, code, flags, span, thread, parent)
            txn.buffer = prefilled
            if thread.next_deadline:
                txn.deadline, thread.next_deadline = thread.next_deadline, 0
            if txn.oneway:
                self._start_oneway(txn)
            else:
                self._start_two_way(txn)
        finally:
            thread.window_call = False
            if span.fds and not _waits_with(thread, span):
                self.close_span_fds(span, thread.process.uid)

    # -- descriptors (SCM_RIGHTS) --------------------------------------------------

    def _take_fds(self, thread: ThreadRecord, span: ParcelSpan) -> QuotaExceededError | None:
        """Give ``span`` the descriptors that came with ``thread``'s message, within
        fds_per_transaction and fds_per_uid; if over, close them and return the error."""
        fds = thread.take_fds()
        quotas, uid = self.quotas, thread.process.uid
        held = self.fds_of_uid.get(uid, 0) + len(fds)
        error = None
        if quotas.fds_per_transaction and len(fds) > quotas.fds_per_transaction:
            error = quotas.error("fds_per_transaction", f"{len(fds)} descriptors in one call")
        elif quotas.over("fds_per_uid", uid, held):
            error = quotas.error("fds_per_uid", f"uid {uid}'s descriptors in flight")
        if error is not None:
            _close_all(fds)
            return error
        self.fds_of_uid[uid] = held
        span.fds = fds
        return None

    def close_span_fds(self, span: ParcelSpan, uid: int) -> None:
        """Close the descriptors of a parcel of ``uid``'s that will not be delivered."""
        fds, span.fds = span.fds, []
        if fds:
            count_down(self.fds_of_uid, uid, len(fds))
            _close_all(fds)

    def close_fds(self, buffer: Buffer) -> None:
        """Close a buffer's descriptors (sent with it, or never to be) and count them
        off their sender's uid."""
        fds, buffer.fds = buffer.fds, None
        if fds:
            count_down(self.fds_of_uid, buffer.fd_uid, len(fds))
            _close_all(fds)

    def _to_service_manager(
        self, thread: ThreadRecord, code: int, flags: int, span: ParcelSpan
    ) -> None:
        """Hand handle 0 a private copy of a transaction's parcel, once checked."""
        quotas = self.quotas
        if quotas.over("service_manager_parcel", thread.process.uid, span.size):
            self.fail(thread, quotas.error("service_manager_parcel"))
            return
        if not thread.holds(span):
            self.fail(thread, ProtocolError(), span.size, 0)
            return
        assert self.service_manager is not None
        self.service_manager.transact(thread, code, flags, thread.parcel_bytes(span))

    def _start_two_way(self, txn: Transaction) -> None:
        thread = txn.from_thread
        assert thread is not None
        target = txn.target
        try:
            txn.buffer = self._copy_transaction(txn, thread, False)
        except BinderError as exc:
            self.fail(thread, exc, txn.size, _limit_of(exc))
            return
        thread.outgoing = txn
        if thread.incoming:
            txn.to_thread = self._nested_target(thread, target)
        # Unlike binder, a call never overtakes the same thread's earlier oneway calls
        # to the same node: it queues in the node's oneway lane behind them.
        senders = txn.node.oneway_senders
        txn.in_async_lane = txn.to_thread is None and senders.get(thread, 0) > 0
        self._deliver(txn)

    def _start_oneway(self, txn: Transaction) -> None:
        thread = txn.from_thread
        assert thread is not None
        target = txn.target
        async_limit = target.async_space
        if txn.size > async_limit:
            error = TransactionTooLargeError(
                f"oneway parcel of {txn.size} bytes exceeds the target's async space"
                f" of {async_limit} bytes"
            )
            self.fail(thread, error, txn.size, async_limit)
            return
        # A parcel copied in parts already holds its space: it never waits.
        if (txn.buffer is not None or not target.space_waiters) and self._try_copy_oneway(txn):
            return
        # Backpressure: the sender waits (its send area still holds the parcel) until
        # the receiver frees enough of its async space.
        thread.waiting_oneway = txn
        target.space_waiters.append(txn)

    def _try_copy_oneway(self, txn: Transaction) -> bool:
        """Copy and deliver a oneway transaction if it fits now; ack the sender."""
        thread = txn.from_thread
        assert thread is not None
        try:
            buffer = self._copy_transaction(txn, thread, True)
        except TransactionTooLargeError:
            return False
        except BinderError as exc:
            self.fail(thread, exc, txn.size, 0)
            return True
        txn.buffer = buffer
        txn.from_thread = None  # nobody waits for a oneway reply
        self.acknowledge_oneway(thread)
        self._deliver(txn)
        return True

    def retry_space_waiters(self, process: ProcessRecord) -> None:
        """Copy queued oneway transactions, in order, while they fit. A waiter whose
        sending process holds its share of the region already waits on without
        holding up the other senders' waiters behind it (a thread has one waiter at
        a time, so each thread's calls keep their order)."""
        waiters = process.space_waiters
        index = 0
        while index < len(waiters):
            txn = waiters[index]
            sender = txn.from_thread
            if sender is None or not sender.alive:
                del waiters[index]
                continue
            if self.over_share(sender.process, process, txn.size):
                index += 1
                continue
            sender.window_call = bool(txn.flags & TF_WINDOW)
            try:
                copied = self._try_copy_oneway(txn)
            finally:
                sender.window_call = False
            if not copied:
                return
            del waiters[index]
            sender.waiting_oneway = None
            if sender.backlog:
                self.run_backlog(sender)

    # -- a thread's commands held behind its waiting oneway call -----------------------

    def hold(self, thread: ThreadRecord, command: tuple[int, ...]) -> None:
        """Keep a transaction command (or a BC_RELEASE) of a thread whose oneway call
        waits for room (``thread.waiting_oneway``), or which has commands kept
        already, to run in order once that call is copied: a sender with a window of
        oneway calls sends on before the broker acknowledges the first, its calls keep
        their order, and a handle one of them names is released only after it (the
        binder driver, too, runs a thread's commands in order).

        A thread that has :data:`~pybinder.protocol.MAX_BACKLOG` commands kept gets a
        protocol error for the next, which is dropped.
        """
        if len(thread.backlog) >= MAX_BACKLOG:
            self.protocol_error(thread, ProtocolError("too many commands behind a waiting call"))
            return
        fds = thread.take_fds() if command[0] in (BC_TRANSACTION, BC_REPLY) else []
        thread.backlog.append((command, fds))

    def run_backlog(self, thread: ThreadRecord) -> None:
        """Run the commands :meth:`hold` kept for ``thread``, in order, until one of
        them waits for room again."""
        backlog = thread.backlog
        while backlog and thread.waiting_oneway is None and thread.alive:
            command, fds = backlog.pop(0)
            thread.fds = fds
            try:
                self.run_command(thread, command)
            except (ProtocolError, QuotaExceededError) as error:
                # Refused as it would have been when it came, to its own thread. The
                # commands behind it run on, and so does whatever made room (another
                # process's free, whose other waiters must still be retried: found by
                # the fuzz, a held BC_DETACH without a call lost their wake-up).
                log.warning("pid %d: %s", thread.process.pid, error)
                self.send(thread, protocol.encode(BR_ERROR, *error_fields(error)))
            finally:
                _close_all(thread.take_fds())  # any the command did not take

    def run_command(self, thread: ThreadRecord, command: tuple[int, ...]) -> None:
        """Run a BC_TRANSACTION, BC_REPLY or BC_PARCEL_READY of ``thread`` (or a
        BC_RELEASE that :meth:`hold` kept), unpacked here: a call with ``*args``
        costs more."""
        op = command[0]
        if op == BC_TRANSACTION:
            _, handle, code, flags, size, tail_offset, tail_len, head_offset = command
            self.transaction(thread, handle, code, flags, size, tail_offset, tail_len, head_offset)
        elif op == BC_REPLY:
            _, flags, size, tail_offset, tail_len = command
            self.reply(thread, flags, size, tail_offset, tail_len)
        elif op == BC_RELEASE:
            self.release(thread, command[1], command[2])
        elif op == BC_DEADLINE:
            self.set_deadline(thread, command[1])
        elif op == BC_CANCEL_TRANSACTION:
            self.cancel(thread)
        elif op == BC_DETACH:
            self.detach(thread)
        elif op == BC_REPLY_TO:
            _, txn_id, flags, size, tail_offset, tail_len = command
            self.reply_to(thread, txn_id, flags, size, tail_offset, tail_len)
        else:
            self.parts.ready(thread, command[1])

    # -- the one copy and object translation ---------------------------------------

    def _copy_transaction(self, txn: Transaction, sender: ThreadRecord, is_async: bool) -> Buffer:
        """:meth:`_copy` for a transaction's parcel, counted against the sender's share
        of the target's region."""
        return self._copy(sender, txn.target, txn.span, is_async, txn.buffer, True)

    def over_share(self, sender: ProcessRecord, target: ProcessRecord, size: int) -> bool:
        """Whether ``size`` more bytes of ``sender``'s calls would pass its share of
        ``target``'s region (region_share_per_sender); one call always fits."""
        percent = self.quotas.region_share_per_sender
        if not percent or sender is target or not self.quotas.applies_to(sender.uid):
            return False
        held = target.held_by(sender)
        return held > 0 and held + size > target.region_size * percent // 100

    def _copy(
        self,
        sender: ThreadRecord,
        target: ProcessRecord,
        span: ParcelSpan,
        is_async: bool,
        filled: Buffer | None = None,
        is_call: bool = False,
    ) -> Buffer:
        """Copy the parcel at ``span`` in ``sender``'s areas into a new buffer of
        ``target`` (:func:`~pybinder.broker.one_copy.copy_parcel` checks the span
        against the areas as they are mapped then), and check and translate the copy.
        A ``filled`` buffer already holds the copy (a parcel sent in parts): it is
        only checked. A call's buffer (``is_call``) counts against its sender's share
        of the target's region.

        Raises:
            DeadObjectError: the target has died.
            TransactionTooLargeError: no free range of ``size`` bytes in the target.
            ProtocolError: the parcel does not lie in the sender's areas, or the copy
                is malformed or names unknown objects.
            QuotaExceededError: its objects would pass nodes_per_process of the
                sender or handles_per_process of the target.
        """
        if target.dead:
            raise DeadObjectError()
        region = target.region
        size = span.size
        buffer = filled
        if buffer is None:
            holder = sender.process if is_call else None
            if holder is not None and self.over_share(holder, target, size):
                if is_async:  # a oneway call waits for the sender's own calls to end
                    raise TransactionTooLargeError("the sender holds its share", size, 0)
                raise self.quotas.error("region_share_per_sender", f"pid {holder.pid}'s calls")
            buffer = target.allocate(size, is_async, holder)
            if buffer is None:
                raise _too_large(target, size, is_async)
            try:
                copy_parcel(sender, region, buffer.offset, span)
            except ProtocolError:
                self.free(target, buffer)
                raise
        start = buffer.offset
        dest = region.view[start : start + size]
        try:
            header = parse_header(dest)
            fds = span.fds
            if header.n_objects:
                objects = read_objects(dest, header)
                nodes = translate(
                    sender.process, target, dest, header, objects, self.quotas, len(fds)
                )
                if nodes:
                    self._pin(buffer, nodes)
            elif fds:
                raise ProtocolError(f"{len(fds)} descriptors came with a parcel naming none")
            if fds:
                buffer.fds, buffer.fd_uid, span.fds = fds, sender.process.uid, []
            self.bytes_copied += size
            if streams(size):
                self.parcels_streamed += 1
            target.bytes_copied_in += size
            if header.n_buffers:
                self._count_buffers(dest, header.n_buffers, header.buffer_table)
        except (ProtocolError, QuotaExceededError):
            self.free(target, buffer)
            raise
        finally:
            dest.release()
        return buffer

    @staticmethod
    def _pin(buffer: Buffer, nodes: list[Node]) -> None:
        """Hold ``nodes`` while ``buffer`` lives, as binder's transaction buffers hold
        their objects: a node on its way home cannot be released under its parcel."""
        for node in nodes:
            node.pinned += 1
        buffer.nodes = nodes

    def free(self, process: ProcessRecord, buffer: Buffer) -> None:
        """Free ``buffer`` of ``process``: unpin its nodes (one may then be released)
        and close any descriptors it still holds."""
        process.free(buffer)
        self.let_go(buffer)

    def let_go(self, buffer: Buffer) -> None:
        """Unpin ``buffer``'s nodes and close its descriptors (its region is gone or
        it is freed)."""
        if buffer.fds is not None:
            self.close_fds(buffer)
        nodes, buffer.nodes = buffer.nodes, None
        if nodes is not None:
            for node in nodes:
                node.pinned -= 1
                if not node.pinned:
                    self.maybe_release(node)

    def _count_buffers(self, dest: memoryview, n_buffers: int, table: int) -> None:
        for i in range(n_buffers):
            _, length = BUFFER_ENTRY.unpack_from(dest, table + BUFFER_ENTRY.size * i)
            self.buffer_bytes_copied += length

    # -- handing work to threads ------------------------------------------------------

    @staticmethod
    def _nested_target(thread: ThreadRecord, target: ProcessRecord) -> ThreadRecord | None:
        """The thread of ``target`` waiting on this call chain, if any (binder's
        transaction stack): calling back into a caller reuses its blocked thread."""
        txn = thread.incoming[-1] if thread.incoming else None
        while txn is not None and not txn.oneway:
            caller = txn.from_thread
            if caller is not None and caller.process is target and caller.alive:
                return caller
            txn = txn.parent
        return None

    def _deliver(self, txn: Transaction) -> None:
        node = txn.node
        node.active += 1
        if txn.oneway and txn.origin is not None:
            node.oneway_senders[txn.origin] = node.oneway_senders.get(txn.origin, 0) + 1
        if txn.to_thread is not None:
            self._start_on(txn.to_thread, txn)
        elif txn.in_async_lane and node.async_busy:
            node.async_todo.append(txn)
        else:
            if txn.in_async_lane:
                node.async_busy = 1
            target = node.owner
            looper = None if target.todo else target.idle_looper()
            if looper is not None:  # nothing queued ahead of it: skip the queue
                self._start_on(looper, txn)
            else:
                target.todo.append(txn)
                self.dispatch(target)

    def dispatch(self, process: ProcessRecord) -> None:
        """Give queued transactions to idle loopers, and flush notifications; if work
        still waits, ask for a looper (:meth:`_spawn_if_starved`)."""
        while process.todo:
            looper = process.idle_looper()
            if looper is None:
                self._spawn_if_starved(process)
                return
            self._start_on(looper, process.todo.popleft())
        process.starved_since = 0.0
        if process.notifications:
            looper = process.idle_looper()
            if looper is not None:
                self.flush_notifications(looper)

    def _start_on(self, thread: ThreadRecord, txn: Transaction) -> None:
        """Hand ``txn`` (and the batch of oneway calls behind it) to ``thread``."""
        batch = txn.batch
        if batch is None:
            message = self._handed(thread, txn)
            thread.incoming.append(txn)
            buffer = txn.buffer
            if buffer is not None and buffer.fds is not None:
                self.send_with_fds(thread, message, [buffer])
                return
        else:
            txn.batch = None
            self.oneway_batched += len(batch)
            handed = [txn, *batch]
            message = b"".join([self._handed(thread, one) for one in handed])
            # Answered first to last: each BC_REPLY finishes the innermost (last) one.
            thread.incoming.extend(reversed(batch))
            thread.incoming.append(txn)
            buffers = [one.buffer for one in handed if one.buffer is not None]
            if any(b.fds is not None for b in buffers):
                self.send_with_fds(thread, message, buffers)
                return
        self.send(thread, message)

    def _handed(self, thread: ThreadRecord, txn: Transaction) -> bytes:
        """Record ``txn`` as ``thread``'s; its BR_TRANSACTION (after its BR_DEADLINE)."""
        buffer = txn.buffer
        assert buffer is not None
        txn.to_thread = thread
        buffer.thread = thread
        txn.target.transactions_received += 1
        handed = _BR_TRANSACTION.pack(
            BR_TRANSACTION,
            txn.node.local_id,
            txn.code,
            txn.flags,
            buffer.offset,
            txn.size,
            txn.sender_pid,
            txn.sender_uid,
            txn.sender_gid,
        )
        if txn.deadline:
            return _BR_DEADLINE.pack(BR_DEADLINE, txn.deadline) + handed
        return handed

    # -- BC_REPLY ------------------------------------------------------------------

    def reply(
        self,
        thread: ThreadRecord,
        flags: int,
        size: int,
        tail_offset: int = 0,
        tail_len: int = 0,
        prefilled: Buffer | None = None,
    ) -> None:
        """Finish the transaction ``thread`` handles; copy the reply to its caller.

        With TF_PARTS the reply is still being written: see :meth:`PartsCopier.ready`.
        ``prefilled`` is the caller's buffer that already holds the reply's copy.
        """
        if flags & TF_PARTS:
            self.parts.begin_reply(thread, flags & ~_PARTS_FLAGS, size, tail_len)
            self.parts.choose_layout(thread, bool(flags & TF_RING))
            return
        if not thread.incoming:
            self.protocol_error(thread, ProtocolError("BC_REPLY with no transaction to answer"))
            return
        span = ParcelSpan(size, tail_offset, tail_len)
        error = self._take_fds(thread, span) if thread.fds else None
        txn = thread.incoming.pop()
        caller = txn.from_thread
        if not txn.oneway and caller is not None and caller.outgoing is txn:
            caller.outgoing = None
            if error is None:
                self._send_reply(thread, caller, span, prefilled)
            else:
                self.fail(caller, error)
                if prefilled is not None:
                    self.free(caller.process, prefilled)
        elif prefilled is not None:  # nobody waits for it any more (gone, or gave up)
            owner = caller if caller is not None else txn.origin
            if owner is not None and not owner.process.dead:
                self.free(owner.process, prefilled)
        if span.fds:
            self.close_span_fds(span, thread.process.uid)
        self.finish(txn)  # after the reply is on its way: the caller need not wait for it
        if thread.idle:
            thread.process.became_idle(thread)
            self.dispatch(thread.process)

    def _send_reply(
        self,
        thread: ThreadRecord,
        caller: ThreadRecord,
        span: ParcelSpan,
        prefilled: Buffer | None,
    ) -> None:
        size = span.size
        try:
            buffer = self._copy(thread, caller.process, span, False, prefilled)
        except BinderError as exc:
            self.fail(caller, exc, size, _limit_of(exc))
            return
        buffer.thread = caller
        message = _BR_REPLY.pack(BR_REPLY, buffer.offset, size)
        if buffer.fds is not None:
            self.send_with_fds(caller, message, [buffer])
        else:
            self.send(caller, message)
        if caller.is_looper and caller.idle:
            caller.process.became_idle(caller)

    def reply_from_broker(self, thread: ThreadRecord, body: object) -> None:
        """Answer ``thread`` with a parcel the broker built (service manager replies).

        Its object entries are already in the receiver's terms (ObjectRefs).
        """
        encoded = encode_parcel(body)
        process = thread.process
        buffer = self._write_own_parcel(process, encoded, is_async=False)
        if buffer is None:
            error = _too_large(process, encoded.size, is_async=False)
            self.fail(thread, error, encoded.size, error.limit)
            return
        buffer.thread = thread
        self.send(thread, protocol.encode(BR_REPLY, buffer.offset, encoded.size))

    def _write_own_parcel(
        self, process: ProcessRecord, encoded: EncodedParcel, is_async: bool
    ) -> Buffer | None:
        """Write a parcel the broker built into a new buffer of ``process`` and count
        the bytes; None if it does not fit now."""
        buffer = process.allocate(encoded.size, is_async)
        if buffer is None:
            return None
        dest = process.region.view[buffer.offset : buffer.offset + encoded.size]
        try:
            encoded.write_into(dest)
        finally:
            dest.release()
        self.bytes_copied += encoded.size
        process.bytes_copied_in += encoded.size
        return buffer

    def transact_from_broker(self, node: Node, code: int, body: object) -> bool:
        """Send ``node`` a oneway call the broker makes itself (service notifications),
        with the broker's credentials; its object entries are already in the
        owner's terms (ObjectRefs). False if it does not fit the owner's async space
        now (it is dropped)."""
        target = node.owner
        if target.dead:
            return False
        encoded = encode_parcel(body)
        buffer = self._write_own_parcel(target, encoded, is_async=True)
        if buffer is None:
            return False
        txn = Transaction(node, code, TF_ONE_WAY, ParcelSpan(encoded.size), None, None)
        txn.buffer = buffer
        self._deliver(txn)
        return True

    def finish(self, txn: Transaction) -> None:
        """Bookkeeping when a delivered transaction ends (answered or abandoned)."""
        node = txn.node
        node.active -= 1
        if txn.oneway and txn.origin is not None:
            count_down(node.oneway_senders, txn.origin)
        if txn.in_async_lane:
            node.async_busy -= 1
            if not node.async_busy:
                self._next_async(node)
        if not node.holders:
            self.maybe_release(node)

    def _next_async(self, node: Node) -> None:
        """The calls in ``node``'s oneway lane ended; queue the next one, and with a
        oneway call the oneway calls queued behind it (up to :data:`MAX_BATCH` in
        all), to go to one looper in one message and run there in order. Binder hands
        a node's async work over one transaction at a time; a batch keeps the same
        order and one-at-a-time execution, with one wake-up of the receiver."""
        todo = node.async_todo
        if not todo or node.dead:
            return
        txn = todo.popleft()
        if txn.oneway and todo and todo[0].oneway:
            batch: list[Transaction] = []
            while todo and todo[0].oneway and len(batch) < MAX_BATCH - 1:
                batch.append(todo.popleft())
            txn.batch = batch
        node.async_busy = 1 + (len(txn.batch) if txn.batch is not None else 0)
        txn.target.todo.append(txn)
        self.dispatch(txn.target)

    # -- BC_FREE_BUFFER, BC_RELEASE, BC_ENTER_LOOPER --------------------------------

    def free_buffer(self, thread: ThreadRecord, offset: int) -> None:
        """Free a buffer of ``thread``'s own process that was delivered to it."""
        process = thread.process
        buffer = process.buffers.get(offset)
        if buffer is None or buffer.thread is None:
            error = ProtocolError(f"BC_FREE_BUFFER of {offset}: not a buffer of this process")
            self.protocol_error(thread, error)
            return
        process.free(buffer)
        if buffer.nodes is not None or buffer.fds is not None:
            self.let_go(buffer)
        if process.space_waiters:
            self.retry_space_waiters(process)

    def release(self, thread: ThreadRecord, handle: int, count: int) -> None:
        """Drop ``count`` deliveries of ``handle``; at zero the handle goes away."""
        process = thread.process
        ref = process.refs.get(handle)
        if ref is None:
            return  # released twice or never held: nothing to undo
        ref.count -= count
        if ref.count <= 0:
            self.drop_ref(ref)

    def drop_ref(self, ref: Ref) -> None:
        """Remove a process's handle; the node may then lose its last holder."""
        process, node = ref.process, ref.node
        del process.refs[ref.handle]
        del process.ref_of_node[node]
        node.refs.pop(ref, None)
        node.holders -= 1
        self.maybe_release(node)

    def maybe_release(self, node: Node) -> None:
        """Tell the owner a node has no remote holders left (BR_RELEASE_NODE)."""
        owner = node.owner
        if node.holders or node.active or node.pinned or node.async_todo or owner.dead:
            return
        if owner.nodes.get(node.local_id) is node:
            del owner.nodes[node.local_id]
            self.notify(owner, protocol.encode(BR_RELEASE_NODE, node.local_id, node.received))

    def enter_looper(self, thread: ThreadRecord) -> None:
        """BC_ENTER_LOOPER: ``thread`` takes new work (one asked for, if any was)."""
        process = thread.process
        if not thread.is_looper:
            thread.is_looper = True
            process.loopers += 1
            if process.spawn_pending and thread.in_pool:
                process.spawn_pending -= 1
        process.became_idle(thread)
        self.dispatch(process)

    def register_looper(self, thread: ThreadRecord) -> None:
        """BC_REGISTER_LOOPER: a looper of the process's pool (counts toward
        max_threads), else as BC_ENTER_LOOPER."""
        if not thread.in_pool:
            thread.in_pool = True
            thread.process.pool_loopers += 1
        self.enter_looper(thread)

    def exit_looper(self, thread: ThreadRecord) -> None:
        """BC_EXIT_LOOPER (and a looper's exit): it takes no new work."""
        if thread.is_looper:
            thread.is_looper = False
            thread.process.loopers -= 1
        if thread.in_pool:
            thread.in_pool = False
            thread.process.pool_loopers -= 1

    # -- deadlines and cancellation (BC_DEADLINE, BC_CANCEL_TRANSACTION) ------------

    def set_deadline(self, thread: ThreadRecord, deadline_ns: int) -> None:
        """BC_DEADLINE: the deadline of ``thread``'s next BC_TRANSACTION."""
        thread.next_deadline = deadline_ns

    def cancel(self, thread: ThreadRecord) -> None:
        """BC_CANCEL_TRANSACTION: ``thread`` gives up the two-way call it waits on.

        A call still queued is taken out and its buffer freed; one being run is marked
        cancelled, and its reply will be dropped; the thread running it gets
        BR_CALL_CANCELLED (a coroutine serving a detached one, BR_CANCELLED). A
        wait_for_service the service manager holds for it is dropped.
        ``thread`` then gets BR_CANCEL_DONE(1) and nothing more for that call; if the
        call had ended already its outcome went first, and BR_CANCEL_DONE(0) follows.
        """
        txn = thread.outgoing
        if txn is None:
            found = self._cancel_service_wait(thread)
            self.send(thread, protocol.encode(BR_CANCEL_DONE, int(found)))
            return
        thread.outgoing = None
        txn.from_thread = None
        txn.cancelled = True
        if txn.detached_id:  # its server answers it later: tell it to stop
            self.notify(txn.target, protocol.encode(BR_CANCELLED, txn.detached_id))
        elif txn.to_thread is None:
            self._unqueue(txn)
        elif txn.buffer is not None:  # tell the thread running it (is_cancelled())
            self.send(txn.to_thread, protocol.encode(BR_CALL_CANCELLED, txn.buffer.offset))
        self.send(thread, protocol.encode(BR_CANCEL_DONE, 1))

    def _cancel_service_wait(self, thread: ThreadRecord) -> bool:
        """Drop the service-manager wait (wait_for_service) ``thread``'s call is, if
        any: otherwise its timer would answer the given-up call later, and the
        thread's next call would take that answer for its own."""
        if not thread.sm_waits or self.service_manager is None:
            return False
        self.service_manager.forget_thread(thread)
        return True

    def cancel_waiting_oneway(self, thread: ThreadRecord) -> bool:
        """BC_CANCEL_TRANSACTION from a thread whose oneway call, sent outside the
        window, waits for room (its deadline passed): take the call out of its
        target's waiters, uncopied and never to be delivered, and answer
        BR_CANCEL_DONE(1); then run what was held behind it. False (nothing done)
        when no such call waits: the cancel is then held in order like the
        thread's other commands (it names a call held behind a windowed one)."""
        waiting = thread.waiting_oneway
        if waiting is None or waiting.flags & TF_WINDOW:
            return False
        thread.waiting_oneway = None
        target = waiting.target
        if waiting in target.space_waiters:
            target.space_waiters.remove(waiting)
        self.close_span_fds(waiting.span, thread.process.uid)
        self.send(thread, protocol.encode(BR_CANCEL_DONE, 1))
        if thread.backlog:
            self.run_backlog(thread)
        self.retry_space_waiters(target)  # it may have held up waiters behind it
        return True

    # -- detached calls (BC_DETACH, BC_REPLY_TO): answered later, by any thread -------

    def detach(self, thread: ThreadRecord) -> None:
        """BC_DETACH: the two-way call ``thread`` runs will be answered later by
        BC_REPLY_TO (a coroutine's result); ``thread`` is free for other work and
        gets BR_DETACHED(id).

        Raises:
            ProtocolError: it runs no two-way call.
        """
        if not thread.incoming or thread.incoming[-1].oneway:
            raise ProtocolError("BC_DETACH with no two-way call to detach")
        txn = thread.incoming.pop()
        process = thread.process
        txn.detached_id = process.next_detached
        process.next_detached += 1
        process.detached[txn.detached_id] = txn
        self.send(thread, protocol.encode(BR_DETACHED, txn.detached_id))
        if thread.idle:
            process.became_idle(thread)
            self.dispatch(process)

    def reply_to(
        self,
        thread: ThreadRecord,
        txn_id: int,
        flags: int,
        size: int,
        tail_offset: int = 0,
        tail_len: int = 0,
    ) -> None:
        """BC_REPLY_TO: answer the detached call ``txn_id`` of ``thread``'s process
        with the parcel in ``thread``'s areas, as BC_REPLY would.

        Raises:
            ProtocolError: no such detached call, or a reply in parts.
        """
        txn = thread.process.detached.pop(txn_id, None)
        if txn is None or flags & TF_PARTS:
            raise ProtocolError(f"BC_REPLY_TO {txn_id}: no such detached call, or in parts")
        thread.incoming.append(txn)
        self.reply(thread, flags, size, tail_offset, tail_len)
        # Copied: its sender may write its send area again (it has no other way to
        # know, as a looper does from its next call).
        self.send(thread, protocol.encode(BR_OK))

    def _unqueue(self, txn: Transaction) -> None:
        """Take a given-up transaction not yet handed to a thread out of its queue,
        and free its buffer."""
        node = txn.node
        if txn in txn.target.todo:
            txn.target.todo.remove(txn)
            self.finish(txn)  # it held its node's oneway lane, if it was in it
        elif txn in node.async_todo:
            node.async_todo.remove(txn)  # it waited behind the lane: never held it
            node.active -= 1
            self.maybe_release(node)
        else:
            return
        buffer = txn.buffer
        if buffer is not None and not txn.target.dead and buffer.offset in txn.target.buffers:
            self.free(txn.target, buffer)

    # -- loopers on demand (BR_SPAWN_LOOPER) ---------------------------------------

    def set_max_threads(self, thread: ThreadRecord, count: int) -> None:
        """BC_SET_MAX_THREADS: the broker may ask ``thread``'s process for loopers up
        to ``count`` (at most MAX_THREADS_LIMIT) while work waits."""
        process = thread.process
        process.max_threads = min(count, MAX_THREADS_LIMIT)
        self.dispatch(process)

    def _spawn_if_starved(self, process: ProcessRecord) -> None:
        """Work waits and no looper is idle: ask for one more looper (one request at a
        time, as binder's requested_threads), up to its max_threads; note when the
        process began to starve."""
        if not process.starved_since:
            process.starved_since = time.monotonic()
        if process.spawn_pending or process.pool_loopers >= process.max_threads:
            return
        process.spawn_pending = 1
        self.notify(process, protocol.encode(BR_SPAWN_LOOPER))

    def starving(self, now: float) -> list[tuple[ProcessRecord, float]]:
        """Processes whose calls have queued for over STARVATION_S seconds while all
        of their loopers were busy (thread-pool starvation), with how long, once per
        episode. O(processes): the daemon's sweep timer asks once a second."""
        found = []
        for process in self.processes.values():
            since = process.starved_since
            if since > 0 and process.todo and now - since > STARVATION_S:
                found.append((process, now - since))
                process.starved_since = -1.0  # reported; reset once the queue drains
        return found

    # -- death notifications (BC_REQUEST_DEATH_NOTIFICATION) -------------------------

    def request_death_notification(self, thread: ThreadRecord, handle: int) -> None:
        """Note that ``thread``'s process links a death recipient to ``handle`` (every
        holder gets BR_DEAD_BINDER when the node dies); if it is dead already, send
        BR_DEAD_BINDER(handle) at once.

        Raises:
            ProtocolError: the process holds no such handle.
        """
        process = thread.process
        ref = process.refs.get(handle)
        if ref is None:
            raise ProtocolError(f"death notification for handle {handle}, which is not held")
        if ref.node.dead:
            self.notify(process, protocol.encode(BR_DEAD_BINDER, handle))
            return
        ref.death_linked = True

    def clear_death_notification(self, thread: ThreadRecord, handle: int) -> None:
        """Cancel a death notification (a handle not held or not linked is ignored:
        the runtime may clear after its ref went)."""
        ref = thread.process.refs.get(handle)
        if ref is not None:
            ref.death_linked = False

    def send_death_notices(self, node: Node) -> None:
        """``node``'s owner died: BR_DEAD_BINDER to every process holding a ref to it
        (O(its refs)); each marks its proxy dead and runs its recipients."""
        for ref in node.refs:
            self.notify(ref.process, protocol.encode(BR_DEAD_BINDER, ref.handle))


def _waits_with(thread: ThreadRecord, span: ParcelSpan) -> bool:
    """Whether ``thread``'s oneway call of ``span`` waits for room (and keeps its fds)."""
    waiting = thread.waiting_oneway
    return waiting is not None and waiting.span is span


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _too_large(target: ProcessRecord, size: int, is_async: bool) -> TransactionTooLargeError:
    """The error for a parcel of ``size`` bytes that ``target``'s region cannot take now."""
    free = target.allocator.largest_free()
    if is_async:
        free = min(free, target.async_free)
    message = f"parcel of {size} bytes does not fit the target's free space of {free} bytes"
    return TransactionTooLargeError(message, size, free)


def _limit_of(error: BinderError) -> int:
    return getattr(error, "limit", 0)
