"""What the broker knows about each connected process (binder_proc, binder_thread,
binder_node, binder_ref, binder_buffer).

Node, Ref and Buffer live here, beside the process and thread records they point
to: mypyc builds a compiled dataclass with the classes of its fields at hand, so
they cannot refer to classes of a module imported only for type checking.
"""

from __future__ import annotations

import itertools
import mmap
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pybinder.broker.allocator import BufferAllocator
from pybinder.protocol import END_WORDS, FAILED_WORD, PROGRESS_WORD, SEND_AREA, SETTLED_WORD
from pybinder.region import BrokerRegion, buffer_address

if TYPE_CHECKING:
    from pybinder.broker.parts import Parts
    from pybinder.broker.records import ParcelSpan, Transaction


def count_down(counts: dict[Any, int], key: Any, amount: int = 1) -> None:
    """Take ``amount`` off ``counts[key]``, dropping the key at zero, so a table of
    counts per uid, process or sender holds only the keys that have something."""
    left = counts.get(key, amount) - amount
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


@dataclass(eq=False, slots=True)
class Node:
    """A local object (Stub) in its owner that others can reach (binder_node).

    Attributes:
        owner: the process that owns the object.
        local_id: the owner's id for it, as the owner wrote it in a parcel.
        holders: references held: one per process that has a handle, one per
            service-manager entry.
        received: how many times the owner has sent this node; returned to the owner
            with BR_RELEASE_NODE so it can tell stale releases from new sends.
        active: transactions to this node that have not finished.
        async_todo: oneway transactions waiting for the one in flight to finish.
        async_busy: how many transactions of this node's oneway lane are delivered and
            not yet done (a batch of oneway calls goes to one looper at once).
        oneway_senders: per sending thread, its oneway calls to this node not yet done.
        descriptor: its interface descriptor, as the owner's first parcel with it
            named it ("" if unknown).
        pinned: buffers that carry it and are not yet freed: each holds it, as
            binder's transaction buffers hold their objects.
        refs: every process's ref to it; each gets BR_DEAD_BINDER when it dies.
    """

    owner: ProcessRecord
    local_id: int
    descriptor: str = ""
    holders: int = 0
    pinned: int = 0
    received: int = 0
    active: int = 0
    async_todo: deque[Transaction] = field(default_factory=deque)
    async_busy: int = 0
    oneway_senders: dict[ThreadRecord, int] = field(default_factory=dict)
    refs: dict[Ref, None] = field(default_factory=dict)

    @property
    def dead(self) -> bool:
        return self.owner.dead


@dataclass(eq=False, slots=True)
class Ref:
    """One process's handle to a node (binder_ref); ``count`` is the deliveries not released.

    ``call_denied``: the process got it by a name lookup the access policy lets it
    make but whose calls it denies; a delivery of the node in a parcel (a
    capability, as in Binder) clears it. ``death_linked``: the process linked a death
    recipient (BC_REQUEST_DEATH_NOTIFICATION; every holder gets BR_DEAD_BINDER when
    the node dies, and a link to a node dead already gets it at once).
    """

    process: ProcessRecord
    handle: int
    node: Node
    count: int = 0
    call_denied: bool = False
    death_linked: bool = False


@dataclass(eq=False, slots=True)
class Buffer:
    """A live allocation in a receive region (binder_buffer).

    Attributes:
        offset, size: where it is and how many bytes the parcel takes.
        is_async: it holds a oneway transaction (counts against the async space).
        thread: the thread it was delivered to, which must free it; None while queued.
        sender: the process whose call it holds, counted against its share of the
            region (None for replies and the broker's own parcels).
        nodes: the nodes its parcel carries, each pinned until it is freed.
        fds: the descriptors that go with its parcel, the broker's until it is
            delivered (sent with its BR_TRANSACTION or BR_REPLY) or freed.
        fd_uid: the uid whose fds_per_uid quota counts ``fds``.
    """

    offset: int
    size: int
    is_async: bool
    thread: ThreadRecord | None = None
    sender: ProcessRecord | None = None
    nodes: list[Node] | None = None
    fds: list[int] | None = None
    fd_uid: int = 0


class SharedArea:
    """One of a thread's memfds as the broker maps it: its send area or loan area.

    Attributes:
        size: bytes mapped.
        view: a memoryview of the whole area.
        address: where the mapping starts (valid until :meth:`close`).
    """

    def __init__(self, mapping: mmap.mmap) -> None:
        self._map = mapping
        self.size = len(mapping)
        self.view = memoryview(mapping)
        self.address = buffer_address(mapping)
        # The settle words and the progress word, each written by one 8-byte store
        # (struct.pack_into zeroes the bytes first: a poller could read 0 meanwhile).
        words = self.size - END_WORDS * 8
        self._words = self.view[words:].cast("q") if words >= 0 else None

    def report_progress(self, value: int) -> None:
        """Write the progress word in the area's last bytes (see protocol.TF_RING)."""
        if self._words is not None:
            self._words[PROGRESS_WORD] = value

    def report_settled(self, failed: int, settled: int) -> None:
        """Write the settle words (see protocol.TF_WINDOW) before the progress word:
        ``failed`` first, so a sender that sees ``settled`` also sees the failures."""
        if self._words is not None:
            self._words[FAILED_WORD] = failed
            self._words[SETTLED_WORD] = settled

    def close(self) -> None:
        self.address = 0
        if self._words is not None:
            self._words.release()
        self.view.release()
        self._map.close()


class ThreadRecord:
    """One thread's connection to the broker (binder_thread).

    Attributes:
        conn: the daemon's Connection of this thread; the router only hands it back
            to the sender it was given (a fake in tests/test_router.py).
        incoming: transactions this thread is handling, innermost last (the
            transaction stack).
        outgoing: the two-way transaction it waits on, if any.
        is_looper: it entered the looper (BC_ENTER_LOOPER) and takes new work.
        areas: its send area and loan area (indexed by SEND_AREA, LOAN_AREA).
        parts: the parcel it is sending in parts, if any.
        waiting_oneway: its oneway transaction that waits for room in its target.
        backlog: transaction commands it sent meanwhile, run in order once that one
            is copied (its later calls never overtake it).
        settled, settle_failures: its TF_WINDOW calls settled so far, and how many
            of them failed (the numbers in its send area's settle words).
        window_call: the command being run is a TF_WINDOW call (its failure is
            counted as settled).
        sm_waits: its get_service calls waiting in the service manager.
    """

    def __init__(self, process: ProcessRecord, conn: Any) -> None:
        self.process = process
        self.conn = conn
        self.incoming: list[Transaction] = []
        self.outgoing: Transaction | None = None
        self.waiting_oneway: Transaction | None = None
        self.is_looper = False
        self.in_pool = False
        self.alive = True
        self.areas: list[SharedArea | None] = [None, None]
        self.parts: Parts | None = None
        self.backlog: list[tuple[tuple[int, ...], list[int]]] = []  # (command, its fds)
        self.settled = 0
        self.settle_failures = 0
        self.window_call = False
        self.sm_waits = 0  # its get_service calls waiting in the service manager
        self.fds: list[int] = []  # descriptors of the message being handled, not yet taken
        self.next_deadline = 0  # BC_DEADLINE for its next BC_TRANSACTION (ns; 0: none)

    def take_fds(self) -> list[int]:
        """The descriptors that came with the message being handled, now the caller's
        (the daemon closes those nobody takes)."""
        fds = self.fds
        if not fds:
            return []
        taken = list(fds)
        fds.clear()
        return taken

    @property
    def idle(self) -> bool:
        """A looper with nothing to do."""
        return (
            self.alive
            and self.is_looper
            and not self.incoming
            and self.outgoing is None
            and self.waiting_oneway is None
        )

    @property
    def held(self) -> bool:
        """Whether its next transaction command must wait (see ``Router.hold``)."""
        return self.waiting_oneway is not None or bool(self.backlog)

    def settle(self, failed: bool) -> None:
        """Count a TF_WINDOW call of this thread as settled (copied, or ``failed``)
        in its send area's settle words: its sender waits for them, not for a
        BR_TRANSACTION_COMPLETE."""
        self.settled += 1
        self.settle_failures += failed
        send = self.areas[SEND_AREA]
        if send is not None:
            send.report_settled(self.settle_failures, self.settled)

    def set_area(self, which: int, mapping: mmap.mmap) -> None:
        """Replace this thread's send area or loan area."""
        old = self.areas[which]
        self.areas[which] = SharedArea(mapping)
        if old is not None:
            old.close()

    def drop_areas(self) -> None:
        for area in self.areas:
            if area is not None:
                area.close()
        self.areas = [None, None]

    def holds(self, span: ParcelSpan) -> bool:
        """Whether ``span`` lies inside this thread's areas as they are now."""
        send, loan = self.areas
        return span.lies_in(send, loan)

    def parcel_bytes(self, span: ParcelSpan) -> bytes:
        """A private copy of a parcel whose span :meth:`holds` accepted."""
        send, loan = self.areas
        assert send is not None
        start = span.head_offset
        head = bytes(send.view[start : start + span.head_len])
        if not span.tail_len:
            return head
        assert loan is not None
        return head + bytes(loan.view[span.tail_offset : span.tail_offset + span.tail_len])


class ProcessRecord:
    """One connected process state (binder_proc): its region, threads, nodes and refs.

    Attributes:
        key: the secret a thread presents to join this process (BC_HELLO_THREAD).
        pid, uid, gid: the kernel-checked credentials of its connection (SO_PEERCRED).
        async_space: bytes of the region oneway transactions may use: half of it, as
            binder's async space.
        async_free: the part of ``async_space`` not in use now.
        conn: the daemon's Connection for the process connection, where process-wide
            returns go (BR_RELEASE_NODE, BR_DEAD_BINDER, BR_SPAWN_LOOPER); None in
            tests that build records directly.
        loopers: its threads that entered the looper.
        pool_loopers: those of its thread pool (BC_REGISTER_LOOPER): a thread that
            joins the pool itself (``join_thread_pool``) does not count.
        max_threads: the most pool loopers it asked for (BC_SET_MAX_THREADS); the
            broker asks for one more (BR_SPAWN_LOOPER) while work waits and all are busy.
        spawn_pending: loopers asked for and not yet entered (at most one at a time).
        starved_since: when calls began to queue with every looper busy (0: not now).
    """

    def __init__(self, key: int, pid: int, uid: int, gid: int, region_size: int) -> None:
        self.key = key
        self.pid = pid
        self.uid = uid
        self.gid = gid
        self.region = BrokerRegion(region_size)
        self.allocator = BufferAllocator(region_size)
        self.async_space = self.allocator.capacity // 2
        self.async_free = self.async_space
        self.buffers: dict[int, Buffer] = {}
        self.detached: dict[int, Transaction] = {}  # id -> a call answered by BC_REPLY_TO
        self.next_detached = 1
        self.held: dict[ProcessRecord, int] = {}  # sender -> bytes its calls' buffers hold
        self.threads: list[ThreadRecord] = []
        self.idle_stack: list[ThreadRecord] = []
        self.todo: deque[Transaction] = deque()
        self.space_waiters: deque[Transaction] = deque()
        self.nodes: dict[int, Node] = {}
        self.refs: dict[int, Ref] = {}
        self.ref_of_node: dict[Node, Ref] = {}
        self.next_handle = 1
        self.notifications: list[bytes] = []
        self.conn: Any = None
        self.loopers = 0
        self.pool_loopers = 0
        self.max_threads = 0
        self.spawn_pending = 0
        self.starved_since = 0.0
        self.dead = False
        self.transactions_sent = 0
        self.transactions_received = 0
        self.bytes_copied_in = 0

    @property
    def region_size(self) -> int:
        return self.region.size

    def idle_looper(self) -> ThreadRecord | None:
        """The looper that most recently became free, if any: it is the likeliest to
        have warm caches. Threads are stacked as they become idle (:meth:`became_idle`);
        entries that have since taken work are dropped on the way."""
        stack = self.idle_stack
        while stack:
            thread = stack[-1]
            if thread.idle:
                return thread
            stack.pop()
        for thread in self.threads:  # one freed by a path that did not stack it
            if thread.idle:
                return thread
        return None

    def became_idle(self, thread: ThreadRecord) -> None:
        """Note that ``thread`` (a looper with nothing to do) can take work.

        Loopers that take turns leave stale entries below the top (only the top is
        dropped when taken); once the stack is twice the threads, it keeps only each
        idle thread's latest entry, so it stays bounded over any number of calls.
        """
        stack = self.idle_stack
        if not stack or stack[-1] is not thread:
            stack.append(thread)
            if len(stack) > 2 * len(self.threads) + 8:
                self._compact_idle_stack()

    def _compact_idle_stack(self) -> None:
        seen: set[ThreadRecord] = set()
        kept: list[ThreadRecord] = []
        for thread in reversed(self.idle_stack):
            if thread.idle and thread not in seen:
                seen.add(thread)
                kept.append(thread)
        kept.reverse()
        self.idle_stack = kept

    def ref_for(self, node: Node) -> Ref:
        """This process's ref to ``node``, created (with a new handle) if it has none."""
        ref = self.ref_of_node.get(node)
        if ref is None:
            ref = Ref(self, self.next_handle, node)
            self.next_handle += 1
            self.refs[ref.handle] = ref
            self.ref_of_node[node] = ref
            node.refs[ref] = None
            node.holders += 1
        return ref

    def allocate(
        self, size: int, is_async: bool, sender: ProcessRecord | None = None
    ) -> Buffer | None:
        """Allocate a buffer of ``size`` bytes, or None if it does not fit now; a
        ``sender``'s call counts against its share (see :meth:`held_by`)."""
        if is_async and BufferAllocator.rounded(size) > self.async_free:
            return None
        offset = self.allocator.allocate(size)
        if offset is None:
            return None
        if is_async:
            self.async_free -= self.allocator.size_of(offset)
        buffer = Buffer(offset, size, is_async, None, sender)
        self.buffers[offset] = buffer
        if sender is not None:
            self.held[sender] = self.held.get(sender, 0) + size
        return buffer

    def held_by(self, sender: ProcessRecord) -> int:
        """Bytes of this region that buffers of ``sender``'s calls hold now."""
        return self.held.get(sender, 0)

    def free(self, buffer: Buffer) -> None:
        """Return a buffer to the region's free space."""
        del self.buffers[buffer.offset]
        freed = self.allocator.free(buffer.offset)
        if buffer.is_async:
            self.async_free += freed
        sender = buffer.sender
        if sender is not None:
            count_down(self.held, sender, buffer.size)

    def status(self, now: float) -> dict[str, Any]:
        """Counters and the object graph for ``pybinder status`` (sizes in bytes,
        ages in seconds since ``now``, a time.monotonic()). The lists show at most
        :data:`STATUS_LIST_LIMIT` entries each; ``*_count`` give the totals."""
        busy = sum(1 for t in self.threads if t.is_looper and not t.idle)
        return {
            "pid": self.pid,
            "uid": self.uid,
            "gid": self.gid,
            "region_size": self.region_size,
            "region_in_use": self.allocator.in_use,
            "threads": len(self.threads),
            "loopers": {
                "busy": busy,
                "idle": self.loopers - busy,
                "max_threads": self.max_threads,
            },
            "nodes": [_node_status(n) for n in _first(self.nodes.values())],
            "nodes_count": len(self.nodes),
            "refs": [_ref_status(r) for r in _first(self.refs.values())],
            "refs_count": len(self.refs),
            "death_links": [r.handle for r in _first(self.refs.values()) if r.death_linked],
            "pending": self._pending(now),
            "transactions_sent": self.transactions_sent,
            "transactions_received": self.transactions_received,
            "bytes_copied_in": self.bytes_copied_in,
        }

    def _pending(self, now: float) -> list[dict[str, Any]]:
        """Transactions to this process not yet answered: queued, then running."""
        queued = list(_first(self.todo))
        for node in _first(self.nodes.values()):
            queued.extend(_first(node.async_todo))
        running = [txn for thread in self.threads for txn in thread.incoming]
        running.extend(_first(self.detached.values()))
        return [
            _transaction_status(txn, state, now)
            for state, txns in (("queued", queued), ("running", running))
            for txn in _first(txns)
        ]


#: The most entries each list in a process's status shows.
STATUS_LIST_LIMIT = 256


def _first(items: Any) -> list[Any]:
    return list(itertools.islice(items, STATUS_LIST_LIMIT))


def _node_status(node: Node) -> dict[str, Any]:
    return {"id": node.local_id, "descriptor": node.descriptor, "refs": node.holders}


def _ref_status(ref: Ref) -> dict[str, Any]:
    node = ref.node
    return {
        "handle": ref.handle,
        "node": {"pid": node.owner.pid, "id": node.local_id, "descriptor": node.descriptor},
        "count": ref.count,
        "death_link": ref.death_linked,
    }


def _transaction_status(txn: Transaction, state: str, now: float) -> dict[str, Any]:
    return {
        "state": state,
        "node": txn.node.local_id,
        "descriptor": txn.node.descriptor,
        "code": txn.code,
        "oneway": txn.oneway,
        "from_pid": txn.sender_pid,
        "age_s": round(now - txn.started, 3),
    }
