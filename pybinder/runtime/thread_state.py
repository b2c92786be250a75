"""One thread's channel to the broker (libbinder's IPCThreadState).

Each thread that calls or serves gets its own SOCK_SEQPACKET connection and its own
send area. A thread waiting for a reply also serves transactions the broker routes
back to it (a nested call from the process it is waiting on), so a single-threaded
client can take callbacks without deadlocking.
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Container
from types import CoroutineType
from typing import TYPE_CHECKING, Any

from pybinder import parcel, protocol
from pybinder.errors import (
    ERROR_CODES,
    BinderError,
    BrokerUnavailableError,
    DeadlineExceededError,
    DeadObjectError,
    ProtocolError,
    QuotaExceededError,
    SecurityError,
    TransactionTooLargeError,
    quota_error,
)
from pybinder.protocol import (
    BC_CANCEL_TRANSACTION,
    BC_DEADLINE,
    BC_DETACH,
    BC_ENTER_LOOPER,
    BC_FREE_BUFFER,
    BC_HELLO_THREAD,
    BC_PARCEL_READY,
    BC_REGISTER_LOOPER,
    BC_REPLY,
    BC_REPLY_TO,
    BC_SET_SEND_AREA,
    BC_TRANSACTION,
    BR_CALL_CANCELLED,
    BR_CANCEL_DONE,
    BR_DEAD_BINDER,
    BR_DEAD_REPLY,
    BR_DEADLINE,
    BR_DETACHED,
    BR_ERROR,
    BR_FAILED_REPLY,
    BR_FDS,
    BR_HELLO_THREAD,
    BR_OK,
    BR_RELEASE_NODE,
    BR_REPLY,
    BR_SPAWN_LOOPER,
    BR_TRANSACTION,
    BR_TRANSACTION_COMPLETE,
    END_WORDS,
    FAILED_WORD,
    MAX_MESSAGE,
    PARTS_RING,
    PROGRESS_WORD,
    PROTOCOL_VERSION,
    REPLY_EXCEPTION,
    REPLY_OK,
    SERVICE_MANAGER_HANDLE,
    SETTLED_WORD,
    TF_ONE_WAY,
    TF_PARTS,
    TF_RING,
    TF_WINDOW,
    WINDOW_RING,
)
from pybinder.region import buffer_address, create_send_area
from pybinder.runtime.binder import binder_error_reply, encode_reply, run_call
from pybinder.runtime.deadline import ASYNC_CALL, pop_serving, push_serving, set_cancel_probe

if TYPE_CHECKING:
    from pybinder.runtime.process_state import ProcessState

log = logging.getLogger("pybinder")

#: A thread waiting for a reply polls at least this long (unless spinning is off), s.
MIN_SPIN = 50e-6

#: A caller whose typical wait exceeds this many times ``spin_seconds`` is waiting on
#: slow work (a slow method, a long queue), not on hops, and polls only MIN_SPIN.
SLOW_REPLY_FACTOR = 4

#: A new send area is at least this large, in bytes.
MIN_SEND_AREA = 64 * 1024

#: Reply buffers up to this size are freed with the thread's next message instead of
#: by a message of their own (libbinder queues BC_FREE_BUFFER the same way), bytes.
DEFERRED_FREE_LIMIT = 64 * 1024

_ONEWAY_DONE = protocol.encode(BC_REPLY, TF_ONE_WAY, 0, 0, 0)
_pack_transaction = protocol.COMMAND_STRUCTS[BC_TRANSACTION].pack
_pack_reply = protocol.COMMAND_STRUCTS[BC_REPLY].pack
_pack_free = protocol.COMMAND_STRUCTS[BC_FREE_BUFFER].pack
_pack_ready = protocol.COMMAND_STRUCTS[BC_PARCEL_READY].pack
_pack_deadline = protocol.COMMAND_STRUCTS[BC_DEADLINE].pack
_pack_reply_to = protocol.COMMAND_STRUCTS[BC_REPLY_TO].pack
_CANCEL = protocol.encode(BC_CANCEL_TRANSACTION)
_DETACH = protocol.encode(BC_DETACH)


class AsyncCall:
    """A call whose method returned a coroutine, run on an event loop (see
    ProcessState.run_async) and answered by :meth:`ThreadState.reply_detached`.

    Attributes:
        coroutine: what the method returned.
        offset: its buffer in this process's region, freed once it has ended.
        views: the arguments' in-place views, released once it has ended.
        caller: (pid, uid, gid) of the caller.
        deadline_ns: the caller's deadline (CLOCK_MONOTONIC ns; 0: none).
        txn_id: the broker's id for it once detached (0: a oneway call).
        cancelled: its caller gave up (BR_CANCELLED).
    """

    def __init__(
        self,
        coroutine: Any,
        offset: int,
        views: list[memoryview],
        caller: tuple[int, int, int],
        deadline_ns: int,
    ) -> None:
        self.coroutine = coroutine
        self.offset = offset
        self.views = views
        self.caller = caller
        self.deadline_ns = deadline_ns
        self.txn_id = 0
        self.cancelled = False

    def release_views(self) -> None:
        for view in self.views:
            _release(view)
        self.views = []


class CallCancelledError(BinderError):
    """The call was given up from another thread (:meth:`ThreadState.cancel_call`)."""


class _Expired(Exception):
    """A call's deadline passed while its thread waited (see ThreadState._wait_for)."""


#: A ``sched_yield`` that takes longer than this (s) ran another busy thread on this
#: CPU: likely the broker, which this thread's polling would then only delay.
SHARED_CPU_YIELD = 10e-6

#: The most calls a looper lets pass without polling after its polls kept missing.
MAX_LOOPER_SKIP = 64

#: Bytes at the end of a send area that hold its words (protocol.END_WORDS).
_END_BYTES = END_WORDS * 8

#: Parcels of at least this many bytes (without a loan) are sent in parts (TF_PARTS).
PARTS_MIN = 2 * 1024 * 1024

#: Bytes written (and announced to the broker) at a time when sending in parts; the
#: ring (PARTS_RING) holds two, so this thread writes one while the broker copies the
#: other.
PART_SIZE = PARTS_RING // 2

#: A thread waiting for the broker to copy a part out of its ring checks, after this
#: long (s), that the broker is still there, and from then on sleeps between checks.
RING_PATIENCE = 1e-3

#: How long (s) a closing thread waits for the broker to copy its windowed calls.
WINDOW_DRAIN_TIMEOUT = 5.0

_OUTCOMES = frozenset({BR_REPLY, BR_TRANSACTION_COMPLETE, BR_DEAD_REPLY, BR_FAILED_REPLY})
#: What ends a call's wait: its outcome, or a cancel from another thread (cancel_call).
_CALL_ENDS = _OUTCOMES | {BR_CANCEL_DONE}
_PROCESS_RETURNS = frozenset({BR_RELEASE_NODE, BR_DEAD_BINDER, BR_SPAWN_LOOPER})

#: Room for the most descriptors one message can carry (the kernel's SCM_MAX_FD).
_ANCILLARY = socket.CMSG_SPACE(253 * 4)

#: How a BR_FDS message starts: the broker sends one before each message that
#: carries descriptors, so only that one is read with recvmsg (a plain recv costs
#: a sixth less, and would drop descriptors).
_FDS_FOLLOW = struct.pack("<I", BR_FDS)
_CALL_CANCELLED = struct.pack("<I", BR_CALL_CANCELLED)

_identity = threading.local()


def _serving_cancelled() -> bool:
    """Whether the caller of the call this thread runs gave up (is_cancelled())."""
    stack: list[Any] | None = getattr(_identity, "stack", None)
    if not stack:
        return False
    return bool(stack[-1][3].serving_cancelled())


set_cancel_probe(_serving_cancelled)


def get_calling_pid() -> int:
    """The pid of the process whose call this thread is running (binder's
    getCallingPid); this process's own pid outside a call."""
    stack = getattr(_identity, "stack", None)
    if stack:
        return int(stack[-1][0])
    call = ASYNC_CALL.get()
    return int(call.caller[0]) if call is not None else os.getpid()


def get_calling_uid() -> int:
    """The uid of the calling process, from the kernel (SO_PEERCRED); own uid outside a call."""
    stack = getattr(_identity, "stack", None)
    if stack:
        return int(stack[-1][1])
    call = ASYNC_CALL.get()
    return int(call.caller[1]) if call is not None else os.getuid()


def get_calling_gid() -> int:
    """The gid of the calling process, from the kernel (SO_PEERCRED); own gid outside a call."""
    stack = getattr(_identity, "stack", None)
    if stack:
        return int(stack[-1][2])
    call = ASYNC_CALL.get()
    return int(call.caller[2]) if call is not None else os.getgid()


class ThreadState:
    """A thread's connection, send area and wait loop.

    Raises:
        BrokerUnavailableError: from the constructor, if the broker cannot be reached.
    """

    def __init__(self, process: ProcessState) -> None:
        self._process = process
        self._sock = process.open_connection()
        self._poller = select.poll()  # for recv_polling
        self._poller.register(self._sock.fileno(), select.POLLIN)
        self._send_map: mmap.mmap | None = None
        self._send_view: memoryview | None = None
        self._send_words: memoryview | None = None  # its END_WORDS i64s (see protocol)
        self._loan_map: mmap.mmap | None = None
        self._loan_view: memoryview | None = None
        self._loan_address = 0
        self._typical_wait = process.spin_seconds / 4  # seconds; see _observe_wait
        self._spin = max(min(MIN_SPIN, process.spin_seconds), process.spin_seconds / 2)  # s
        self._deferred = b""
        self._outbox = b""  # answers to the oneway calls of the message being served
        self._serving = False  # a looper is running the commands of one message
        self._poll_timed_out = False  # whether the last poll in _recv ran its whole spin
        self._looper_polls = LooperPolls()
        self._window = process.oneway_window  # windowed oneway calls at most in flight
        # The window ring: WINDOW_RING, or less if the broker allows smaller parcels.
        # Oneway parcels of up to a quarter of it (without a loan) go in the window;
        # larger ones stream fast enough one at a time (their copy dominates).
        self._window_ring = min(WINDOW_RING, (process.max_parcel - _END_BYTES) & ~63)
        # (start, end) in the ring, and the handle called, of each call in flight
        self._in_window: deque[tuple[int, int, int]] = deque()
        self._window_head = 0  # where in the window ring the next call may start
        self._settled = 0  # this thread's windowed calls the broker has settled, seen
        self._failed = 0  # how many of those failed, seen
        self._late_error: BinderError | None = None  # the first failed windowed call's
        self._fds: deque[int] = deque()  # descriptors received, not yet taken by a parcel
        self._next_deadline = 0  # BR_DEADLINE for the next BR_TRANSACTION (ns; 0: none)
        self._reply: parcel.EncodedParcel | None = None  # the reply being sent, if it has fds
        self._serving_offsets: list[int] = []  # the buffers of the calls this thread runs
        self._cancelled_offsets: set[int] = set()  # those whose callers gave up
        self._closed = False
        try:
            self._sock.send(protocol.encode(BC_HELLO_THREAD, PROTOCOL_VERSION, process.key))
            self._wait_for((BR_HELLO_THREAD,))
        except BaseException:
            self._sock.close()
            raise

    def serving_cancelled(self) -> bool:
        """Whether the caller of the call this thread runs (the innermost) gave up:
        takes in the BR_CALL_CANCELLED the broker sent meanwhile without waiting.
        While a thread runs a method (and makes no call) nothing else can come on
        its connection, so only these are taken."""
        offsets = self._serving_offsets
        if not offsets:
            return False
        while True:
            try:
                message = self._sock.recv(MAX_MESSAGE, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except OSError:  # nothing there (EAGAIN), or the broker went
                break
            if not message.startswith(_CALL_CANCELLED):
                break
            commands = protocol.decode(message)
            if any(command[0] != BR_CALL_CANCELLED for command in commands):
                break  # not only cancels: left for the thread's next wait
            self._sock.recv(MAX_MESSAGE)
            for command in commands:
                self._handle(command)
        return offsets[-1] in self._cancelled_offsets

    # -- calling ------------------------------------------------------------------------

    def transact(
        self,
        handle: int,
        code: int,
        encoded: parcel.EncodedParcel,
        flags: int,
        deadline_ns: int = 0,
    ) -> tuple[int, int] | None:
        """Send a transaction; wait for its reply ``(offset, size)`` in this process's
        region, or for the oneway acknowledgement (None).

        A oneway call goes in the window (see :meth:`_send_in_window`) when the
        process has one, the parcel is at most a quarter of the window ring (256 KiB)
        and has no loaned tail, and this thread is not running a call; any other call
        first waits until the broker has copied the windowed calls before it
        (:meth:`flush_oneway`).

        A two-way call with ``deadline_ns`` (CLOCK_MONOTONIC ns; 0: none) tells the
        broker its deadline (BC_DEADLINE; the server reads it) and waits until then;
        unanswered, it is cancelled (BC_CANCEL_TRANSACTION): a reply that crossed the
        cancel is dropped, and the thread's next call gets its own. So is a call whose
        wait an exception interrupts (KeyboardInterrupt, a signal handler's). A oneway
        call with ``deadline_ns`` skips the window and waits for its copy until then;
        one still waiting for room in its target is cancelled the same way and never
        delivered.

        Raises:
            DeadlineExceededError: no answer before ``deadline_ns``.
            DeadObjectError, TransactionTooLargeError, ProtocolError, BrokerUnavailableError;
            also for an earlier windowed oneway call (see :meth:`flush_oneway`).
        """
        prefix = b""
        if deadline_ns:
            if time.monotonic_ns() >= deadline_ns:
                raise DeadlineExceededError("its deadline passed before it was sent")
            if not flags & TF_ONE_WAY:
                prefix = _pack_deadline(BC_DEADLINE, deadline_ns)
        tail_offset, tail_len = self._find_loaned(encoded)
        fds = encoded.fds
        if (
            flags & TF_ONE_WAY
            and not fds
            and not deadline_ns
            and self._window > 1
            and not tail_len
            and encoded.size <= self._window_ring // 4
            and handle != SERVICE_MANAGER_HANDLE
            and not getattr(_identity, "stack", None)
        ):
            self._send_in_window(handle, code, encoded, flags)
            return None
        if self._in_window or self._late_error is not None:
            self.flush_oneway()
        if _goes_in_parts(encoded, tail_len):
            self._send_in_parts(
                encoded,
                lambda size, parts_flags: (
                    prefix
                    + _pack_transaction(
                        BC_TRANSACTION, handle, code, flags | parts_flags, size, 0, 0, 0
                    )
                ),
            )
        else:
            placed = self._write(encoded, tail_offset, tail_len)  # (size, tail_offset, tail_len)
            message = _pack_transaction(BC_TRANSACTION, handle, code, flags, *placed, 0)
            self._send(prefix + message if prefix else message, encoded if fds else None)
        started = time.perf_counter()
        try:
            outcome = self._wait_for(_CALL_ENDS, self._spin, deadline_ns)
            while outcome[0] == BR_CANCEL_DONE and not outcome[1]:  # a stale cancel's answer
                outcome = self._wait_for(_CALL_ENDS, self._spin, deadline_ns)
        except _Expired:
            if self._give_up() == BR_TRANSACTION_COMPLETE:
                return None  # a oneway call copied just as its deadline passed
            waited = time.perf_counter() - started
            if flags & TF_ONE_WAY:
                raise DeadlineExceededError(
                    f"a oneway call not copied into its target's region within its deadline"
                    f" ({waited:.3f} s; no room there); it will not be delivered"
                ) from None
            raise DeadlineExceededError(f"no answer within its deadline ({waited:.3f} s)") from None
        except BinderError:
            raise
        except BaseException:  # KeyboardInterrupt, a signal handler's: the call is given up
            self._give_up()
            raise
        self._observe_wait(time.perf_counter() - started)
        op = outcome[0]
        if op == BR_REPLY:
            return outcome[1], outcome[2]
        if op == BR_CANCEL_DONE:  # given up from another thread (cancel_call)
            raise CallCancelledError("the call was cancelled")
        if op == BR_TRANSACTION_COMPLETE:
            return None
        if op == BR_DEAD_REPLY:
            raise DeadObjectError(f"{self._process.describe_handle(handle)} has died")
        raise _failure(outcome[1], outcome[2], outcome[3])

    # -- the oneway window ------------------------------------------------------------

    def _send_in_window(
        self, handle: int, code: int, encoded: parcel.EncodedParcel, flags: int
    ) -> None:
        """Send a oneway call without waiting for the broker to copy it (TF_WINDOW).

        The call is written in the window ring (the first :data:`WINDOW_RING` bytes of
        the send area) after the calls still in flight, and BC_TRANSACTION's
        head_offset says where. The broker acknowledges it not by a message but in the
        send area's settle words; this thread writes over a call, or sends more than
        ``oneway_window`` at once, only once the words say the broker has copied it.
        So a stream of oneway calls costs one message per call, and the broker hands
        the calls queued meanwhile to the receiver in batches. The broker keeps them
        in order, and behind one that waits for room in the receiver.

        Raises:
            BinderError: the first failure of an earlier windowed call, not yet
                raised (this call is then not sent).
        """
        area = self._send_view
        ring = self._window_ring
        if area is None or len(area) < ring + _END_BYTES:
            self._settle_all()  # a new area replaces the one the broker copies from
            area = self._send_area(ring + _END_BYTES)
        size = encoded.size
        at = self._window_start(size)
        self._raise_late_error()
        if not self._in_window:
            # Nothing in flight, so the broker is not writing the settle words; a
            # parcel sent whole since may have overwritten them.
            words = self._send_words
            assert words is not None
            words[FAILED_WORD] = self._failed
            words[SETTLED_WORD] = self._settled
        encoded.write_into(area[at : at + size])
        self._send(
            _pack_transaction(BC_TRANSACTION, handle, code, flags | TF_WINDOW, size, 0, 0, at)
        )
        end = at + size
        self._in_window.append((at, end, handle))
        self._window_head = (end + 63) & ~63

    def _window_start(self, size: int) -> int:
        """Where a windowed call of ``size`` bytes goes: after the calls in flight,
        or at the ring's start if it does not fit before the end. Waits until the
        bytes are free and fewer than ``oneway_window`` calls are in flight."""
        pending = self._in_window
        while True:
            if not pending:
                return 0
            if len(pending) < self._window:
                head, tail = self._window_head, pending[0][0]
                if head > tail:  # in flight: [tail, head); free: the rest
                    if head + size <= self._window_ring:
                        return head
                    if size <= tail:
                        return 0
                elif head + size <= tail:  # wrapped: free [head, tail) only
                    return head
            self._settle_oldest()

    def flush_oneway(self) -> None:
        """Wait until the broker has copied every oneway call this thread sent in the
        window (into its target's region, or into the queue for room there), and
        raise the first failure among them.

        A windowed call's failure (its target died, it cannot fit the target's
        async space, it was malformed) comes after the call returned; it is raised
        by the thread's next call, or here.

        Raises:
            DeadObjectError, TransactionTooLargeError, ProtocolError: the earliest
                windowed call that failed.
            BrokerUnavailableError: the broker went away.
        """
        self._settle_all()
        self._raise_late_error()

    def _settle_all(self) -> None:
        while self._in_window:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        """Wait until the broker has settled the oldest windowed call in flight; keep
        a failure among those settled meanwhile for :meth:`_raise_late_error`."""
        words = self._send_words
        assert words is not None
        settled = self._wait_for_word(SETTLED_WORD, self._settled + 1)
        failed = words[FAILED_WORD]  # written before the settled word
        targets: set[int] = set()
        for _ in range(min(settled - self._settled, len(self._in_window))):
            targets.add(self._in_window.popleft()[2])
        self._settled = settled
        if not self._in_window:
            self._window_head = 0
        while self._failed < failed:  # each failure's message came before the words
            self._failed += 1
            self._keep_late_error(self._wait_for(_OUTCOMES, self._spin), targets)

    def _keep_late_error(self, outcome: tuple[int, ...], targets: set[int]) -> None:
        """Keep the first failure of a windowed call (one of those to the handles
        ``targets``) for the thread's next call, naming its target."""
        op = outcome[0]
        if op == BR_REPLY:  # not an answer to a oneway call: the broker is confused
            self._drop_reply(outcome[1], outcome[2])
            error: BinderError = ProtocolError("a reply to a oneway call")
        elif op == BR_DEAD_REPLY:
            error = DeadObjectError("its target has died")
        elif op == BR_TRANSACTION_COMPLETE:
            error = ProtocolError("an acknowledgement of a windowed oneway call")
        else:
            error = _failure(outcome[1], outcome[2], outcome[3])
        if self._late_error is None:
            handle = outcome[1] if op == BR_DEAD_REPLY and outcome[1] else min(targets, default=0)
            if op == BR_DEAD_REPLY or len(targets) == 1:
                where = f" to {self._process.describe_handle(handle)}"
            else:
                where = f" to one of handles {sorted(targets)}"
            error.args = (f"an earlier oneway call{where} on this thread failed: {error}",)
            self._late_error = error

    def _raise_late_error(self) -> None:
        error, self._late_error = self._late_error, None
        if error is not None:
            raise error

    def _drop_reply(self, offset: int, size: int) -> None:
        """Free a reply nobody will read, and close the descriptors that came with it."""
        if self._fds:
            with self._process.region_view[offset : offset + size] as view:
                for fd in self.take_parcel_fds(view) or ():
                    os.close(fd)
        self.free_buffer(offset, size)

    def take_parcel_fds(self, parcel_view: memoryview) -> list[int] | None:
        """The descriptors that came with the parcel in ``parcel_view`` (as many as
        its object table has OBJ_FD entries, taken in order from those received),
        for :func:`pybinder.parcel.decode`; None when none came."""
        if not self._fds:
            return None
        count = parcel.count_fds(parcel_view)
        fds = self._fds
        return [fds.popleft() for _ in range(min(count, len(fds)))]

    def send_command(self, message: bytes) -> None:
        """Send encoded commands (BC_RELEASE, BC_REQUEST_DEATH_NOTIFICATION, ...) on
        this thread's connection, after whatever this thread sent before.

        Raises:
            BrokerUnavailableError: the broker went away.
        """
        self._send(message)

    def free_buffer(self, offset: int, size: int) -> None:
        """Give a reply buffer of ``size`` bytes back to the broker (BC_FREE_BUFFER).

        A small one goes with this thread's next message, saving the broker a wake-up.
        """
        command = _pack_free(BC_FREE_BUFFER, offset)
        if size <= DEFERRED_FREE_LIMIT and not self._deferred:
            self._deferred = command
        else:
            self._send(command)

    # -- serving ------------------------------------------------------------------------

    def join_looper(self, pool: bool = False) -> None:
        """Serve incoming transactions on this thread until the process state closes;
        ``pool``: as a thread of the process's pool (BC_REGISTER_LOOPER, counted
        toward its max_threads), not one that joined it itself (BC_ENTER_LOOPER).

        A looper that has just answered a two-way call polls for the next one for up
        to ``spin_us`` if no other looper of this process is polling (see
        :func:`recv_polling`): callers tend to call again at once, and with the
        broker on another CPU the next call then costs no cross-CPU wake-up. One
        poller per process at most, because several starve the broker when they share
        its CPU; none after oneway calls, which come in streams that keep the broker
        busy copying.

        The broker may hand over several queued oneway calls in one message (a
        batch); they run in order, and one message answers them all.
        """
        self._send(protocol.encode(BC_REGISTER_LOOPER if pool else BC_ENTER_LOOPER))
        process = self._process
        answered_call = False
        while True:
            try:
                message = self._next_work(answered_call)
            except BrokerUnavailableError:
                if process.closed:
                    return
                raise
            answered_call = False
            self._serving = True
            try:
                for command in protocol.decode(message):
                    self._handle(command)
                    if command[0] == BR_TRANSACTION and not command[3] & TF_ONE_WAY:
                        answered_call = True
            except BinderError as exc:
                log.error("looper %s: %s", threading.current_thread().name, exc)
            finally:
                self._serving = False
            if self._outbox:
                self._send(b"")

    def _next_work(self, answered_call: bool) -> bytes:
        """A looper's next message: polled for after a two-way call (see
        :meth:`join_looper`), unless another looper polls or :class:`LooperPolls`
        says to skip polling (recent polls missed).
        """
        process = self._process
        if not answered_call or process.looper_polling or not process.spin_seconds:
            return self._recv()
        if not self._looper_polls.should_poll():
            return self._recv()
        process.looper_polling = True
        try:
            message = self._recv(process.spin_seconds)
        finally:
            process.looper_polling = False
        self._looper_polls.polled(self._poll_timed_out)
        return message

    def _handle(self, command: tuple[int, ...]) -> None:
        """Handle a return that is not the outcome a caller waits for."""
        op = command[0]
        if op == BR_TRANSACTION:
            self._execute(command)
        elif op == BR_DEADLINE:
            self._next_deadline = command[1]
        elif op == BR_CANCEL_DONE:
            pass  # the answer to a cancel that came after its call had ended
        elif op == BR_CALL_CANCELLED:
            if command[1] in self._serving_offsets:  # else its call has ended: stale
                self._cancelled_offsets.add(command[1])
        elif op in _PROCESS_RETURNS:
            self._process.on_process_return(command)
        elif op == BR_ERROR:
            raise _rejected(command)
        else:
            raise ProtocolError(f"unexpected {protocol.COMMAND_NAMES.get(op, hex(op))}")

    def _execute(self, transaction: tuple[int, ...]) -> None:
        """Run one incoming BR_TRANSACTION in place and answer it (BC_REPLY, BC_FREE_BUFFER).

        The arguments' in-place views stay valid until the reply is in the send area
        (a method may return them), and are released before the buffer is freed.
        """
        _, node, code, flags, offset, size, pid, uid, gid = transaction
        process = self._process
        oneway = flags & TF_ONE_WAY
        stack = _identity.__dict__.setdefault("stack", [])
        stack.append((pid, uid, gid, self))  # the caller; self for is_cancelled()
        deadline_ns, self._next_deadline = self._next_deadline, 0
        if deadline_ns:
            push_serving(deadline_ns)
        self._serving_offsets.append(offset)
        views: list[memoryview] = []
        try:
            with process.region_view[offset : offset + size] as data:
                fds = self.take_parcel_fds(data) if self._fds else None
                try:
                    target = process.local_node(node)
                    body, views = parcel.decode(data, process.decode_object, fds=fds)
                    reply = run_call(target, code, body)
                    if type(reply[1]) is CoroutineType and reply[0] == REPLY_OK:
                        caller = (pid, uid, gid)
                        call = AsyncCall(reply[1], offset, views, caller, deadline_ns)
                        self._hand_over(call, bool(oneway))
                        return  # its views stay valid, and its buffer held, until it ends
                except BinderError as exc:
                    reply = binder_error_reply(exc)
                    for fd in fds or ():  # decode closes those it got; these it did not
                        with contextlib.suppress(OSError):
                            os.close(fd)
                placed = (0, 0, 0) if oneway else self._write_reply(reply)  # None: in parts
                for view in views:
                    _release(view)
        finally:
            stack.pop()
            if deadline_ns:
                pop_serving()
            self._serving_offsets.pop()
            if self._cancelled_offsets:
                self._cancelled_offsets.discard(offset)
        free = _pack_free(BC_FREE_BUFFER, offset)
        with_fds, self._reply = self._reply, None
        if with_fds is not None and placed is not None:  # it goes with its descriptors
            self._send(_pack_reply(BC_REPLY, 0, *placed) + free, with_fds)
            return
        if oneway:
            if reply[0] == REPLY_EXCEPTION:
                log.error("oneway call %d raised %s.%s%s\n%s", code, *reply[1:])
            done = free + _ONEWAY_DONE
            if self._serving:  # a batch: one message answers all its calls
                self._outbox += done
            else:
                self._send(done)
        elif placed is None:  # the reply has gone in parts
            self._send(free)
        elif size <= DEFERRED_FREE_LIMIT:
            # The reply first, so the caller waits for nothing else; freeing a small
            # buffer later changes no one's room (unless the caller shares the region).
            self._send(_pack_reply(BC_REPLY, 0, *placed) + free)
        else:
            self._send(free + _pack_reply(BC_REPLY, 0, *placed))

    def _hand_over(self, call: AsyncCall, oneway: bool) -> None:
        """A method returned a coroutine: run it on the process's event loop and let
        this thread serve on. A two-way call is detached first (BC_DETACH; the
        broker answers BR_DETACHED(id)), to be answered by :meth:`reply_detached`; a
        oneway call is done for the broker at once (its node's next oneway call may
        start), and its buffer is freed when the coroutine ends."""
        if oneway:
            self._send(_ONEWAY_DONE)
        else:
            self._send(_DETACH)
            call.txn_id = self._wait_for((BR_DETACHED,))[1]
        self._process.run_async(call)

    def reply_detached(self, call: AsyncCall, body: list[Any]) -> None:
        """Answer a detached call with ``body`` from this thread (BC_REPLY_TO; a
        oneway call gets no answer), and free its buffer (BC_FREE_BUFFER)."""
        free = _pack_free(BC_FREE_BUFFER, call.offset)
        if not call.txn_id:
            self._send(free)
            return
        try:
            encoded = encode_reply(body, self._process)
            tail_offset, tail_len = self._find_loaned(encoded)
            placed = self._write(encoded, tail_offset, tail_len)
        except TransactionTooLargeError as exc:
            encoded = parcel.encode(binder_error_reply(exc))
            placed = self._write(encoded, 0, 0)
        message = _pack_reply_to(BC_REPLY_TO, call.txn_id, 0, *placed) + free
        self._send(message, encoded if encoded.fds else None)
        self._wait_for((BR_OK,))  # copied: the send area may be written again

    def cancel_call(self) -> None:
        """Give up the two-way call this thread waits on, from another thread (an
        asyncio task cancelled while a worker waits for it): the waiting thread's
        call raises CallCancelledError once the broker confirms. Only sends."""
        with contextlib.suppress(OSError):
            self._sock.send(_CANCEL)

    def _write_reply(self, reply: list[Any]) -> tuple[int, int, int] | None:
        """Encode a reply body into the send area; see :meth:`_write`. A large reply
        without a loan is sent in parts at once (BC_REPLY with TF_PARTS, as a large
        call is), and None is returned."""
        try:
            encoded = encode_reply(reply, self._process)
            tail_offset, tail_len = self._find_loaned(encoded)
            if _goes_in_parts(encoded, tail_len):
                self._send_in_parts(encoded, _reply_in_parts)
                return None
            if encoded.fds:  # kept (with the objects that own them) until it is sent
                self._reply = encoded
            return self._write(encoded, tail_offset, tail_len)
        except TransactionTooLargeError as exc:  # raised before any part was sent
            return self._write(parcel.encode(binder_error_reply(exc)), 0, 0)

    # -- the send area and the loan area ------------------------------------------------

    def _write(
        self, encoded: parcel.EncodedParcel, tail_offset: int, tail_len: int
    ) -> tuple[int, int, int]:
        """Write a parcel into the send area, growing it if needed, all but the tail
        that :meth:`_find_loaned` found in the loan area (the broker copies that
        straight from there). Returns ``(size, tail_offset, tail_len)`` for
        BC_TRANSACTION / BC_REPLY.
        """
        encoded.write_into(self._send_area(encoded.head_size))
        return encoded.size, tail_offset, tail_len

    def _send_in_parts(
        self, encoded: parcel.EncodedParcel, opening: Callable[[int, int], bytes]
    ) -> None:
        """Send a large parcel while writing it (TF_PARTS): its largest buffer goes
        last, written :data:`PART_SIZE` bytes at a time, and each part is announced
        (BC_PARCEL_READY) as soon as it is written, so the broker copies one part
        while this thread writes the next instead of after the whole parcel.

        The parts go through a ring of :data:`~pybinder.protocol.PARTS_RING` bytes
        (TF_RING): a part is written over one the broker has reported copied, so the
        bytes in flight stay in the caches (a 16 MiB call took a third less time
        than with the parcel written whole, here). The parcel is written whole when
        the broker answers WRITE_WHOLE, when its head alone nearly fills the ring,
        and when the send area would have no room for the progress word under the
        broker's limit.
        ``opening(size, flags)`` is the command that opens the parcel (BC_TRANSACTION
        or BC_REPLY with ``flags``); it goes with the first part.

        Raises:
            TransactionTooLargeError: before anything is sent, if the parcel exceeds
                the broker's limit.
            BrokerUnavailableError: the broker went away while this thread waited
                for it to copy a part.
        """
        buffers = encoded.buffers
        largest = max(range(len(buffers)), key=lambda i: buffers[i].nbytes)
        encoded.set_tail(largest)
        size, tail = encoded.size, buffers[largest]
        ring = (
            encoded.head_size + PART_SIZE <= PARTS_RING
            and size + _END_BYTES <= self._process.max_parcel
        )
        area = self._send_area(size + _END_BYTES if ring else size)
        if ring:
            words = self._send_words
            assert words is not None
            words[PROGRESS_WORD] = 0  # the broker reports from here on
        written = head = encoded.write_into(area)
        command = opening(size, TF_PARTS | TF_RING if ring else TF_PARTS)
        while written < size:
            end = min(size, (written // PART_SIZE + 1) * PART_SIZE)
            if ring and end > PARTS_RING:
                ring = self._wait_for_word(PROGRESS_WORD, end - PARTS_RING) >= 0
            at = written % PARTS_RING if ring else written
            area[at : at + end - written] = tail[written - head : end - head]
            written = end
            self._send(command + _pack_ready(BC_PARCEL_READY, written))
            command = b""

    def _wait_for_word(self, word: int, needed: int) -> int:
        """Wait until the send area's ``word`` (PROGRESS_WORD: bytes of the parcel in
        parts the broker has copied; SETTLED_WORD: windowed calls it has settled) is
        at least ``needed``, or negative (WRITE_WHOLE: write the parcel whole), and
        return it.

        Polls the word and yields the CPU between polls: the broker may share this
        CPU, and then must run for the word to change (with every process on one CPU,
        spinning first cost a 16 MiB call a fifth more time). After
        :data:`RING_PATIENCE` it sleeps between polls and checks the broker's
        connection.

        Raises:
            BrokerUnavailableError: the broker closed the connection.
        """
        words = self._send_words
        assert words is not None
        started = time.perf_counter()
        while True:
            value = words[word]
            if value >= needed or value < 0:
                return value
            waited = time.perf_counter() - started
            if waited > RING_PATIENCE:
                self._check_broker(RING_PATIENCE / 4)
            else:
                os.sched_yield()

    def _check_broker(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for a message; raise if the broker is gone.

        The message, if any, stays queued for whoever waits for it next.

        Raises:
            BrokerUnavailableError: the broker closed the connection.
        """
        readable, _, _ = select.select([self._sock], [], [], timeout)
        if not readable:
            return
        try:
            if self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT):
                time.sleep(timeout)  # a message for later: do not spin on it
                return
        except BlockingIOError:
            return
        except OSError as exc:
            raise BrokerUnavailableError(f"lost the broker: {exc}") from None
        raise BrokerUnavailableError("the broker closed the connection")

    def _send_area(self, size: int) -> memoryview:
        """The send area, grown to at least ``size`` bytes."""
        if self._send_view is None or size > len(self._send_view):
            if self._send_words is not None:
                self._send_words.release()
                self._send_words = None
            self._send_map, self._send_view = self._new_area(
                protocol.SEND_AREA, size, self._send_view, self._send_map
            )
            end = len(self._send_view)
            self._send_words = self._send_view[end - _END_BYTES : end].cast("q")
        return self._send_view

    def _find_loaned(self, encoded: parcel.EncodedParcel) -> tuple[int, int]:
        """Make the first buffer that lies in the loan area the tail; return where."""
        if self._loan_view is None:
            return 0, 0
        base, end = self._loan_address, self._loan_address + len(self._loan_view)
        for index, view in enumerate(encoded.buffers):
            if view.readonly or not view.nbytes:
                continue
            address = buffer_address(view)
            if base <= address and address + view.nbytes <= end:
                encoded.set_tail(index)
                return address - base, view.nbytes
        return 0, 0

    def loan(self, size: int) -> memoryview:
        """A writable buffer of ``size`` bytes in this thread's loan area.

        Fill it in place and pass it (or a slice of it) to a call: the broker copies
        it into the receiver's region, and nothing copies it on this side. It stays
        valid until this thread's next loan() that needs a larger area.

        Raises:
            TransactionTooLargeError: ``size`` exceeds the broker's largest parcel.
        """
        if self._loan_view is None or size > len(self._loan_view):
            old = self._loan_view
            self._loan_map, self._loan_view = self._new_area(protocol.LOAN_AREA, size, None, None)
            self._loan_address = buffer_address(self._loan_view)
            if old is not None:
                _release(old)  # the old area unmaps once the last loaned view is gone
        return self._loan_view[:size]

    def _new_area(
        self, which: int, needed: int, old_view: memoryview | None, old_map: mmap.mmap | None
    ) -> tuple[mmap.mmap, memoryview]:
        """Create, register (BC_SET_SEND_AREA) and map a larger send or loan area."""
        limit = self._process.max_parcel
        if needed > limit:
            raise TransactionTooLargeError(
                f"parcel of {needed} bytes exceeds the broker's limit of {limit} bytes",
                needed,
                limit,
            )
        current = 0 if old_view is None else len(old_view)
        size = min(limit, max(needed, 2 * current, MIN_SEND_AREA))
        size = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
        fd, mapping = create_send_area(size)
        try:
            message = protocol.encode(BC_SET_SEND_AREA, size, which)
            socket.send_fds(self._sock, [message], [fd])
        except OSError as exc:
            mapping.close()
            raise BrokerUnavailableError(f"lost the broker: {exc}") from None
        finally:
            os.close(fd)
        self._wait_for((BR_OK,))
        if old_view is not None and old_map is not None:
            old_view.release()
            old_map.close()
        return mapping, memoryview(mapping)

    def _let_window_drain(self) -> None:
        """Before the connection closes, give the broker up to
        :data:`WINDOW_DRAIN_TIMEOUT` seconds to copy the windowed calls still in
        flight: one it has not yet read (or one waiting for room in its target) would
        be dropped with the connection. Failures among them are no longer raised."""
        words = self._send_words
        if not self._in_window or words is None:
            return
        wanted = self._settled + len(self._in_window)
        give_up = time.monotonic() + WINDOW_DRAIN_TIMEOUT
        with contextlib.suppress(BrokerUnavailableError):
            while words[SETTLED_WORD] < wanted and time.monotonic() < give_up:
                self._check_broker(RING_PATIENCE)
        self._in_window.clear()

    # -- the socket --------------------------------------------------------------------------

    def _send(self, message: bytes, with_fds: parcel.EncodedParcel | None = None) -> None:
        """Send ``message`` (after this thread's pending answers, before its deferred
        frees), with the descriptors of ``with_fds`` (SCM_RIGHTS); then any releases
        dropped proxies queued.

        Raises:
            BrokerUnavailableError: the broker went away.
        """
        if self._outbox:  # earlier transactions' dones first
            message = self._outbox + message
            self._outbox = b""
        if self._deferred:  # after the message: the broker acts on the message first
            message += self._deferred
            self._deferred = b""
        try:
            if with_fds is not None:
                socket.send_fds(self._sock, [message], with_fds.fds)
                # Only now may the objects that own them go (compiled code drops a
                # local after its last use, which would close them before the send).
                with_fds.fd_owners.clear()
            else:
                self._sock.send(message)
            # After the message: a handle it names may be one a dropped proxy released.
            if self._process.releases:
                for batch in self._process.take_releases():
                    self._sock.send(batch)
        except OSError as exc:
            raise BrokerUnavailableError(f"lost the broker: {exc}") from None

    def _recv(self, spin: float = 0.0) -> bytes:
        """The next message from the broker; polls ``spin`` seconds before sleeping
        (:func:`recv_polling`) and sets ``_poll_timed_out``."""
        try:
            if spin:
                message, self._poll_timed_out = recv_polling(self._sock, self._poller, spin)
            else:
                message = self._sock.recv(MAX_MESSAGE)
            if message.startswith(_FDS_FOLLOW):  # BR_FDS: the next message has descriptors
                message = receive(self._sock, self._fds)
        except OSError as exc:
            raise BrokerUnavailableError(f"lost the broker: {exc}") from None
        if not message:
            raise BrokerUnavailableError("the broker closed the connection")
        return message

    def _observe_wait(self, elapsed: float) -> None:
        """Fold one reply's wait (seconds) into the moving typical wait (EWMA, 1/8), and
        set how long to poll for the next reply: twice the typical wait, between
        :data:`MIN_SPIN` and ``spin_seconds``; only :data:`MIN_SPIN` once the typical
        wait exceeds :data:`SLOW_REPLY_FACTOR` times ``spin_seconds`` (a slow method,
        where a long poll would only burn CPU).

        Replies that take somewhat longer than the limit still get the whole limit:
        they are often slow *because* the threads they wait for sleep (each wake-up
        on another CPU of a busy VM costs 40-60 µs), and a caller that stopped polling
        for them made them slower still; on such a host that feedback once held 64 B
        calls at 260-340 µs where polling kept them at 100-170 µs.
        Even a short poll pays: it keeps this CPU awake for the broker, whose copy of
        a large parcel uses a second thread (measured: a 16 MiB call took about
        300 µs longer when the caller slept at once).
        """
        limit = self._process.spin_seconds
        slow = SLOW_REPLY_FACTOR * limit
        typical = self._typical_wait + (min(elapsed, 2 * slow) - self._typical_wait) / 8
        self._typical_wait = typical
        floor = min(MIN_SPIN, limit)
        self._spin = floor if typical > slow else max(floor, min(limit, 2 * typical))

    def _give_up(self) -> int:
        """Cancel the call this thread waits on (BC_CANCEL_TRANSACTION: a two-way
        call, or a oneway call waiting for room) and take in what the broker sends
        until it confirms (BR_CANCEL_DONE): an outcome that crossed the cancel is
        dropped (a reply's buffer freed), and calls routed to this thread meanwhile
        are served. Returns the crossing outcome's code (0: none)."""
        self._send(_CANCEL)
        crossed = 0
        while True:
            done = False
            for command in protocol.decode(self._recv()):
                op = command[0]
                if op == BR_CANCEL_DONE:
                    done = True
                elif op == BR_REPLY:
                    self._drop_reply(command[1], command[2])
                    crossed = op
                elif op in _OUTCOMES or op == BR_ERROR:
                    crossed = op  # the given-up call's outcome, or its refusal
                else:
                    self._handle(command)
            if done:
                return crossed

    def _ready_by(self, deadline_ns: int) -> bool:
        """Wait until a message is ready or ``deadline_ns`` passes; whether one is."""
        remaining_ms = -(-(deadline_ns - time.monotonic_ns()) // 1_000_000)
        return bool(self._poller.poll(max(0, remaining_ms)))

    def _wait_for(
        self, wanted: Container[int], spin: float = 0.0, deadline_ns: int = 0
    ) -> tuple[int, ...]:
        """Receive until a command whose code is in ``wanted`` arrives, serving
        everything else meanwhile; polls ``spin`` seconds before sleeping. With
        ``deadline_ns``, raises _Expired if nothing wanted came by then.

        A BR_ERROR that arrives first is raised after the outcome, so the outcome is
        never left behind in the socket for the next call to misread.
        """
        error: BinderError | None = None
        while True:
            outcome: tuple[int, ...] | None = None
            if deadline_ns and not self._ready_by(deadline_ns):
                raise _Expired()
            commands = protocol.decode(self._recv(spin))
            if len(commands) == 1 and commands[0][0] in wanted:  # the usual answer
                return commands[0]
            for command in commands:
                if command[0] in wanted:
                    outcome = command
                elif command[0] == BR_ERROR:
                    error = _rejected(command)
                    if BR_OK in wanted or BR_HELLO_THREAD in wanted:
                        raise error
                else:
                    self._handle(command)
            if outcome is not None:
                if error is not None:
                    if outcome[0] == BR_REPLY:
                        self._drop_reply(outcome[1], outcome[2])
                    raise error
                return outcome

    def close(self) -> None:
        """Close the connection (waking a thread blocked on it) and both areas."""
        if self._closed:
            return
        self._closed = True
        self._let_window_drain()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        while self._fds:  # received for parcels nobody will read now
            with contextlib.suppress(OSError):
                os.close(self._fds.popleft())
        if self._send_words is not None:
            self._send_words.release()
        for view, mapping in ((self._send_view, self._send_map), (self._loan_view, self._loan_map)):
            if view is not None and mapping is not None:
                _release(view)
                with contextlib.suppress(BufferError):  # a loaned view is still out there
                    mapping.close()


class LooperPolls:
    """When a looper polls for its next call: after a poll that runs out without a
    message (no call came in time) it skips polling for the next 1, 2, 4, ... up to
    :data:`MAX_LOOPER_SKIP` calls, so a process called only now and then does not
    poll in vain after every call.

    A poll that finds its message resets that, and so does one that gave way to a
    busy thread on this CPU (it cost one ``sched_yield``, and the wake-up it leads to
    is a cheap one on this CPU). Backing off after those too once kept a server's
    loopers asleep for good on a busy host: every call then paid a cross-CPU
    wake-up, which made the next gap longer still.
    """

    def __init__(self) -> None:
        self.backoff = 0  # calls to skip polling after the next poll that runs out
        self.skip = 0  # calls left before the looper polls again

    def should_poll(self) -> bool:
        """Whether to poll for this call's message (or to block at once); counts it."""
        if self.skip:
            self.skip -= 1
            return False
        return True

    def polled(self, timed_out: bool) -> None:
        """Record a poll: whether it ran its whole spin without the message."""
        if not timed_out:
            self.backoff = 0
        else:
            self.backoff = min(MAX_LOOPER_SKIP, 2 * self.backoff or 1)
            self.skip = self.backoff


def receive(sock: socket.socket, fds: deque[int]) -> bytes:
    """The next message on ``sock``; descriptors that came with it (SCM_RIGHTS) are
    appended to ``fds``.

    Raises:
        OSError: from the socket.
    """
    message, ancillary, _, _ = sock.recvmsg(MAX_MESSAGE, _ANCILLARY)
    if ancillary:
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(data) - len(data) % 4
                fds.extend(array.array("i", data[:usable]))
    return message


def recv_polling(sock: socket.socket, poller: select.poll, spin: float) -> tuple[bytes, bool]:
    """Poll ``sock`` for ``spin`` seconds, yielding the CPU between polls, then block;
    return the message and whether the poll ran for all of ``spin`` without it.
    ``poller`` has ``sock`` registered for POLLIN.

    A thread waiting for a reply polls (see :meth:`ThreadState._observe_wait`), and so
    does one looper per process after a two-way call (see
    :meth:`ThreadState.join_looper`): the message usually comes within tens of
    microseconds and then costs no wake-up (on virtual machines a wake-up on another
    CPU costs tens of µs, more than a pybinder hop). Yielding keeps the poll from
    starving a thread that shares this CPU; once a yield has run another busy thread
    here (most likely the broker, which must run for the message to come), polling
    only delays it, so the thread blocks at once. Each look is a ``poll(2)`` with no
    timeout: a non-blocking ``recv`` that finds nothing costs four times as much here
    (Python raises BlockingIOError for it).

    Raises:
        OSError: from the socket.
    """
    deadline = time.perf_counter() + spin
    while True:
        if poller.poll(0):
            return sock.recv(MAX_MESSAGE), False
        before = time.perf_counter()
        if before >= deadline:
            return sock.recv(MAX_MESSAGE), True
        os.sched_yield()
        if time.perf_counter() - before > SHARED_CPU_YIELD:
            return sock.recv(MAX_MESSAGE), False


def _goes_in_parts(encoded: parcel.EncodedParcel, tail_len: int) -> bool:
    """Whether a parcel is sent in parts: large, with buffers, nothing loaned and no
    descriptors (those go with the one message that carries a whole parcel)."""
    return not tail_len and encoded.size >= PARTS_MIN and bool(encoded.buffers) and not encoded.fds


def _reply_in_parts(size: int, parts_flags: int) -> bytes:
    return _pack_reply(BC_REPLY, parts_flags, size, 0, 0)


def _rejected(command: tuple[int, ...]) -> BinderError:
    """The error a BR_ERROR (code, size, limit) stands for: the broker refused a command."""
    error_type = ERROR_CODES.get(command[1], BinderError)
    if error_type is QuotaExceededError:
        return quota_error(command[2], command[3])
    if error_type is ProtocolError:
        return ProtocolError(f"the broker rejected a command (error {command[1]})")
    return _failure(command[1], command[2], command[3])


def _failure(code: int, size: int, limit: int) -> BinderError:
    error_type = ERROR_CODES.get(code, BinderError)
    if error_type is QuotaExceededError:
        return quota_error(size, limit)
    if error_type is TransactionTooLargeError:
        return TransactionTooLargeError(
            f"parcel of {size} bytes does not fit: the target has {limit} bytes free", size, limit
        )
    if error_type is ProtocolError:
        return ProtocolError(f"the broker rejected the transaction (size {size}, detail {limit})")
    if error_type is SecurityError:
        return SecurityError("the broker's access policy denies calls to this service")
    return error_type(f"transaction failed (size {size}, limit {limit})")


def _release(view: memoryview) -> None:
    """Invalidate a memoryview handed to user code; one still exported stays valid."""
    with contextlib.suppress(BufferError):
        view.release()
