"""Nodes and the references to them (binder_node, binder_ref).

A node is a local object (Stub) of its owner that other processes can reach; a ref
is one process's handle to it. A node also carries its oneway lane: the oneway
calls to it run in order, one at a time (binder's async_todo).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pybinder.broker.process import ProcessRecord, ThreadRecord
    from pybinder.broker.records import Transaction


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
    """

    owner: ProcessRecord
    local_id: int
    holders: int = 0
    received: int = 0
    active: int = 0
    async_todo: deque[Transaction] = field(default_factory=deque)
    async_busy: int = 0
    oneway_senders: dict[ThreadRecord, int] = field(default_factory=dict)

    @property
    def dead(self) -> bool:
        return self.owner.dead


@dataclass(eq=False, slots=True)
class Ref:
    """One process's handle to a node (binder_ref); ``count`` is the deliveries not released.

    ``call_denied``: the process got it by a name lookup the access policy lets it
    make but whose calls it denies; a delivery of the node in a parcel (a
    capability, as in Binder) clears it.
    """

    process: ProcessRecord
    handle: int
    node: Node
    count: int = 0
    call_denied: bool = False
