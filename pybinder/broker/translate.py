"""Object translation: a parcel's object table, from its sender's terms into its
receiver's (binder_translate_binder, binder_translate_handle).

A sender names its own objects by local node id (OBJ_NODE) and other processes'
objects by its handles (OBJ_HANDLE). In the receiver's copy, a node becomes the
receiver's handle to it (made on first delivery, counted on every one; the entry's
extra word carries the node owner's pid), or the node itself when it comes home to
its owner. A descriptor (OBJ_FD) names the i-th of the descriptors that came with
the parcel, and keeps its index. Entries are checked, and the quotas on nodes and
handles applied, before anything changes.
"""

from __future__ import annotations

from pybinder.broker.process import Node, ProcessRecord
from pybinder.broker.quotas import Quotas
from pybinder.errors import ProtocolError
from pybinder.parcel import (
    OBJ_FD,
    OBJ_HANDLE,
    OBJ_NODE,
    ParcelHeader,
    object_descriptors,
    write_object,
)

#: A new node's descriptor is read from the body only when the body is at most this
#: long (bytes): a longer one would cost the broker a long parse for a label.
DESCRIPTOR_BODY_LIMIT = 64 * 1024


def translate(
    source: ProcessRecord,
    target: ProcessRecord,
    dest: memoryview,
    header: ParcelHeader,
    objects: list[tuple[int, int]],
    quotas: Quotas,
    n_fds: int = 0,
) -> list[Node]:
    """Rewrite the object table in ``dest`` (the receiver's copy) from ``source``'s
    terms to ``target``'s; return the nodes it names, for its buffer to pin.

    Every entry is checked before any is changed, so a bad entry changes nothing.
    ``n_fds`` descriptors came with the parcel: its OBJ_FD entries must name each
    of them once, in order.

    Raises:
        ProtocolError: an entry of an unknown kind, a handle ``source`` lacks, or
            OBJ_FD entries that do not match the descriptors sent.
        QuotaExceededError: ``source`` would pass nodes_per_process, or ``target``
            handles_per_process.
    """
    fds_named = 0
    for kind, value in objects:
        if kind == OBJ_FD:
            if value != fds_named:
                raise ProtocolError(f"parcel descriptor entry {fds_named} names {value}")
            fds_named += 1
        else:
            check_entry(source, kind, value)
    if fds_named != n_fds:
        raise ProtocolError(f"parcel names {fds_named} descriptors; {n_fds} came with it")
    check_object_quotas(source, target, objects, quotas)
    descriptors = _new_node_descriptors(source, dest, header, objects)
    nodes: list[Node] = []
    for index, (kind, value) in enumerate(objects):
        if kind == OBJ_FD:
            continue
        node = node_for_entry(source, kind, value, descriptors.get(index, ""))
        nodes.append(node)
        kind, value = entry_for_node(target, node)
        write_object(dest, index, kind, value, node.owner.pid if kind == OBJ_HANDLE else 0)
    return nodes


def _new_node_descriptors(
    source: ProcessRecord, dest: memoryview, header: ParcelHeader, objects: list[tuple[int, int]]
) -> dict[int, str]:
    """The descriptors the body gives its objects, read only when one of them is a
    node the broker has not seen (and the body is short)."""
    for kind, value in objects:
        if kind == OBJ_NODE and value not in source.nodes:
            if header.body_len <= DESCRIPTOR_BODY_LIMIT:
                return object_descriptors(dest, header)
            break
    return {}


def check_entry(source: ProcessRecord, kind: int, value: int) -> None:
    """Check an object-table entry written by ``source`` (a node or a handle).

    Raises:
        ProtocolError: another kind, or a handle ``source`` does not hold.
    """
    if kind == OBJ_HANDLE and value not in source.refs:
        raise ProtocolError(f"parcel names handle {value}, which its sender does not hold")
    if kind not in (OBJ_NODE, OBJ_HANDLE):
        raise ProtocolError(f"parcel object of unknown kind {kind}")


def check_object_quotas(
    source: ProcessRecord, target: ProcessRecord, objects: list[tuple[int, int]], quotas: Quotas
) -> None:
    """Raise QuotaExceededError if translating ``objects`` (checked entries of
    ``source``) would give ``source`` more nodes than nodes_per_process, or
    ``target`` more handles than handles_per_process; nothing is changed first."""
    limit = quotas.nodes_per_process
    if limit and len(source.nodes) + len(objects) > limit and quotas.applies_to(source.uid):
        new = {v for k, v in objects if k == OBJ_NODE and v not in source.nodes}
        if len(source.nodes) + len(new) > limit:
            raise quotas.error("nodes_per_process", f"pid {source.pid}'s objects")
    limit = quotas.handles_per_process
    held = len(target.refs)
    if (
        limit
        and held + len(objects) > limit
        and quotas.applies_to(target.uid)
        and held + _new_refs(source, target, objects) > limit
    ):
        raise quotas.error("handles_per_process", f"pid {target.pid}'s handles")


def _new_refs(source: ProcessRecord, target: ProcessRecord, objects: list[tuple[int, int]]) -> int:
    """How many handles ``target`` would gain by receiving ``objects``."""
    fresh: set[int] = set()  # local ids of nodes sent for the first time
    known: set[Node] = set()
    for kind, value in objects:
        if kind == OBJ_FD:
            continue
        node = source.nodes.get(value) if kind == OBJ_NODE else source.refs[value].node
        if node is None:
            if source is not target:
                fresh.add(value)
        elif node.owner is not target and node not in target.ref_of_node:
            known.add(node)
    return len(fresh) + len(known)


def node_for_entry(source: ProcessRecord, kind: int, value: int, descriptor: str = "") -> Node:
    """The node a checked object-table entry written by ``source`` names.

    A node entry the owner sends for the first time creates the node (labelled
    ``descriptor``); each one counts as a send (returned to the owner with
    BR_RELEASE_NODE).
    """
    if kind == OBJ_NODE:
        node = source.nodes.get(value)
        if node is None:
            node = source.nodes[value] = Node(source, value, descriptor)
        node.received += 1
        return node
    return source.refs[value].node


def entry_for_node(target: ProcessRecord, node: Node) -> tuple[int, int]:
    """The object-table entry that names ``node`` in ``target``; counts a delivery."""
    if node.owner is target:
        return OBJ_NODE, node.local_id
    ref = target.ref_for(node)
    ref.count += 1
    ref.call_denied = False
    return OBJ_HANDLE, ref.handle
