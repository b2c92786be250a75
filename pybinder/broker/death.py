"""Deaths: a thread's or a process's connection closed (binder_thread_release,
binder_deferred_release).

Whatever the dead one was doing is abandoned: callers waiting on it get
BR_DEAD_REPLY (DeadObjectError in the runtime), every process linked to one of its
nodes gets BR_DEAD_BINDER, its queued and waiting calls are answered or dropped, and
every buffer, descriptor, handle, node, name and region it held is released. The
cost is O(what it held), not O(every process).
"""

from __future__ import annotations

import contextlib
import os

from pybinder import protocol
from pybinder.broker.process import ProcessRecord, ThreadRecord
from pybinder.broker.records import Transaction
from pybinder.broker.router import Router
from pybinder.protocol import BR_DEAD_REPLY, TF_WINDOW


def thread_exited(router: Router, thread: ThreadRecord) -> None:
    """A thread's connection closed: abandon what it was doing, free what it held."""
    if not thread.alive:
        return
    thread.alive = False
    router.parts.drop(thread)
    process = thread.process
    router.exit_looper(thread)
    if thread in process.threads:
        process.threads.remove(thread)
    while thread.incoming:
        _abandon(router, thread.incoming.pop())
    if thread.outgoing is not None:
        thread.outgoing.from_thread = None
        thread.outgoing = None
    for _, fds in thread.backlog:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    thread.backlog.clear()
    if thread.waiting_oneway is not None:
        waiting = thread.waiting_oneway
        thread.waiting_oneway = None
        target = waiting.target
        if waiting in target.space_waiters:
            target.space_waiters.remove(waiting)
        router.close_span_fds(waiting.span, process.uid)
    for buffer in [b for b in process.buffers.values() if b.thread is thread]:
        router.free(process, buffer)
    thread.drop_areas()
    if router.service_manager is not None:
        router.service_manager.forget_thread(thread)
    if not process.dead:
        router.retry_space_waiters(process)


def _abandon(router: Router, txn: Transaction) -> None:
    """A delivered transaction will never be answered: tell its caller."""
    router.finish(txn)
    _dead_reply(router, txn)


def _dead_reply(router: Router, txn: Transaction) -> None:
    caller = txn.from_thread
    if caller is not None and caller.outgoing is txn:
        caller.outgoing = None
        ref = caller.process.ref_of_node.get(txn.node)
        router.send(caller, protocol.encode(BR_DEAD_REPLY, 0 if ref is None else ref.handle))


def process_died(router: Router, process: ProcessRecord) -> None:
    """A process's connection closed: callers waiting on it get BR_DEAD_REPLY,
    and everything it held is released."""
    if process.dead:
        return
    process.dead = True
    router.processes.pop(process.key, None)
    same_uid = router.processes_of_uid.get(process.uid)
    if same_uid is not None:
        same_uid.pop(process, None)
        if not same_uid:
            del router.processes_of_uid[process.uid]
    for thread in list(process.threads):
        thread_exited(router, thread)
    while process.todo:
        _dead_reply(router, process.todo.popleft())
    for txn in list(process.detached.values()):  # answers it will never send
        _abandon(router, txn)
    process.detached.clear()
    for node in process.nodes.values():
        router.send_death_notices(node)
        while node.async_todo:  # a two-way call queued behind oneway ones waits here too
            _dead_reply(router, node.async_todo.popleft())
    while process.space_waiters:
        txn = process.space_waiters.popleft()
        sender = txn.from_thread
        if sender is not None:
            router.close_span_fds(txn.span, sender.process.uid)
        if sender is not None and sender.waiting_oneway is txn:
            sender.waiting_oneway = None
            sender.window_call = bool(txn.flags & TF_WINDOW)
            router.dead_reply_to(sender, txn.node)
            sender.window_call = False
            if sender.backlog:
                router.run_backlog(sender)
    if router.service_manager is not None:
        router.service_manager.forget_process(process)
    for ref in list(process.refs.values()):
        router.drop_ref(ref)
    buffers = list(process.buffers.values())
    process.buffers.clear()
    for buffer in buffers:  # queued calls' descriptors, and the nodes they pinned
        router.let_go(buffer)
    process.region.close()
