"""The service manager: handle 0 in every process, a name -> node registry.

In Android it is a process of its own that makes itself the driver's context
manager; here it lives inside the broker, which saves a hop per lookup and lets it see
process deaths directly. It speaks the ordinary calling convention (a parcel whose
body is ``[descriptor, args, kwargs]``), so clients reach it through a plain proxy.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from pybinder import parcel, protocol
from pybinder.broker.policy import Caller, Policy
from pybinder.broker.process import Node, ProcessRecord, ThreadRecord, count_down
from pybinder.broker.router import Router
from pybinder.broker.translate import (
    check_entry,
    check_object_quotas,
    entry_for_node,
    node_for_entry,
)
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    InterfaceMismatchError,
    ProtocolError,
    QuotaExceededError,
    SecurityError,
    ServiceNotFoundError,
    UnknownTransactionError,
    error_details,
)
from pybinder.parcel import OBJ_HANDLE
from pybinder.protocol import (
    REPLY_BINDER_ERROR,
    REPLY_EXCEPTION,
    REPLY_OK,
    TF_ONE_WAY,
)

log = logging.getLogger("pybinder.broker")

MAX_NAME_LENGTH = 255

#: The longest a get_service may wait for its name, in seconds: one day.
MAX_WAIT_S = 86400.0

#: The most bytes of names one list_services reply carries (a page); the runtime
#: asks for pages until it has them all.
LIST_PAGE_BYTES = 192 * 1024

_DEFERRED = object()


class Timer(Protocol):
    def cancel(self) -> None: ...


Scheduler = Callable[[float, Callable[[], None]], Timer]


@dataclass(eq=False)
class Service:
    """A registered name: the node it points to and who registered it."""

    node: Node
    uid: int
    pid: int


@dataclass(eq=False)
class Watch:
    """A registration for notifications (registerForNotifications): ``process``'s
    callback node, called when ``name`` is added (held: the entry counts as a holder)."""

    name: str
    node: Node
    process: ProcessRecord


@dataclass(eq=False)
class Waiter:
    """A thread blocked in wait_for_service until the name appears or time runs out."""

    thread: ThreadRecord
    timer: Timer | None


class ServiceManager:
    """Serves transactions to handle 0.

    Args:
        router: the broker's router (for refs, nodes and replies).
        call_later: ``call_later(seconds, callback)`` on the broker's event loop.
        status: returns the broker's status dict for SM_STATUS as ``caller`` may see it.
        policy: who may add, find and call which names (None: the default policy).

    The identity checked is the one the kernel gave when the process connected
    (SO_PEERCRED, with its supplementary groups read from /proc then): a process
    that changes its uid afterwards keeps the old identity here, and must connect
    again to act as the new one.
    """

    def __init__(
        self,
        router: Router,
        call_later: Scheduler,
        status: Callable[[ProcessRecord | None], dict[str, Any]],
        policy: Policy | None = None,
    ) -> None:
        self.policy = policy or Policy.default()
        self._callers: dict[ProcessRecord, Caller] = {}
        self._router = router
        self._call_later = call_later
        self._status = status
        self.services: dict[str, Service] = {}
        self._names_of: dict[ProcessRecord, set[str]] = {}  # owner -> its names
        self._names_of_uid: dict[int, int] = {}  # uid -> how many names it holds
        self._sorted: list[str] | None = None  # the names, sorted; None once stale
        self._waiters: dict[str, list[Waiter]] = {}
        self._waiters_of: dict[ProcessRecord, int] = {}
        self._watches: dict[str, list[Watch]] = {}
        self._watches_of: dict[ProcessRecord, list[Watch]] = {}
        self._handlers: dict[int, Callable[..., Any]] = {
            protocol.SM_CHECK_SERVICE: self._check_service,
            protocol.SM_WAIT_FOR_SERVICE: self._wait_for_service,
            protocol.SM_ADD_SERVICE: self._add_service,
            protocol.SM_LIST_SERVICES: self._list_services,
            protocol.SM_STATUS: self._status_call,
            protocol.SM_REGISTER_FOR_NOTIFICATIONS: self._register_for_notifications,
            protocol.SM_UNREGISTER_FOR_NOTIFICATIONS: self._unregister_for_notifications,
        }

    # -- entry point ----------------------------------------------------------------

    def transact(self, thread: ThreadRecord, code: int, flags: int, data: bytes) -> None:
        """Handle one transaction to handle 0 whose parcel is ``data`` (a private copy).

        A oneway call can carry no answer, so only add_service runs oneway; a lookup,
        a wait or a listing would make a handle or a reply that nobody receives.
        """
        oneway = bool(flags & TF_ONE_WAY)
        if oneway:
            self._router.acknowledge_oneway(thread)
            if code != protocol.SM_ADD_SERVICE:
                return
        try:
            result = self._call(thread, code, data)
            body: list[Any] = [REPLY_OK, result]
        except BinderError as exc:
            if isinstance(exc, SecurityError | QuotaExceededError):
                log.warning("pid %d (uid %d): %s", thread.process.pid, thread.process.uid, exc)
            body = _binder_error(exc)
        except (TypeError, ValueError) as exc:
            body = [REPLY_EXCEPTION, "builtins", type(exc).__name__, [str(exc)], ""]
        if not oneway and body[1] is not _DEFERRED:
            self.reply(thread, body)

    def _call(self, thread: ThreadRecord, code: int, data: bytes) -> Any:
        try:
            (descriptor, args, kwargs), _ = parcel.decode(data)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"a service manager call is [descriptor, args, kwargs]: {exc}"
            ) from None
        if descriptor != protocol.SERVICE_MANAGER_DESCRIPTOR:  # never repr'd: it may nest deep
            given = repr(descriptor[:200]) if isinstance(descriptor, str) else "a non-str"
            raise InterfaceMismatchError(
                f"handle 0 is {protocol.SERVICE_MANAGER_DESCRIPTOR!r}, not {given}"
            )
        handler = self._handlers.get(code)
        if handler is None:
            raise UnknownTransactionError(f"the service manager has no method with code {code}")
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ProtocolError("a service manager call is [descriptor, args, kwargs]")
        if "thread" in kwargs:
            raise TypeError("unexpected keyword argument 'thread'")
        return handler(thread, *args, **kwargs)

    def reply(self, thread: ThreadRecord, body: list[Any]) -> None:
        """Write a reply parcel straight into the caller's region."""
        self._router.reply_from_broker(thread, body)

    # -- methods --------------------------------------------------------------------

    def _check_service(self, thread: ThreadRecord, name: str) -> parcel.ObjectRef | None:
        name = _checked_name(name)
        service = self.services.get(name)
        self._check_allowed("find", name, thread.process, service)
        return None if service is None else self._handle_for(thread.process, name, service)

    def _handle_for(self, process: ProcessRecord, name: str, service: Service) -> parcel.ObjectRef:
        """The entry naming ``name``'s node in ``process``, a lookup it may make. If
        the policy denies it calls there, a handle it did not hold already is marked
        so (a handle it holds as a capability stays callable)."""
        node = service.node
        held = process.ref_of_node.get(node)
        capability = held is not None and not held.call_denied
        entry = self._ref_for(process, node)
        if node.owner is not process and not capability:
            caller = self.caller_of(process)
            may_call = self.policy.allows("call", name, caller, service.uid)
            process.ref_of_node[node].call_denied = not may_call
        return entry

    def caller_of(self, process: ProcessRecord) -> Caller:
        """Who ``process`` is to the policy: its uid and gid from SO_PEERCRED and its
        supplementary groups from /proc, read once when first needed."""
        caller = self._callers.get(process)
        if caller is None:
            caller = self._callers[process] = Caller.of_pid(process.pid, process.uid, process.gid)
        return caller

    def _check_allowed(
        self, action: str, name: str, process: ProcessRecord, service: Service | None
    ) -> None:
        """Raise SecurityError unless the policy lets ``process`` ``action`` ``name``."""
        caller = self.caller_of(process)
        owner = None if service is None else service.uid
        if not self.policy.allows(action, name, caller, owner):
            raise SecurityError(self.policy.describe_denial(action, name, caller, owner))

    def _wait_for_service(
        self, thread: ThreadRecord, name: str, timeout: float | None = None
    ) -> Any:
        timeout = _checked_timeout(timeout)
        found = self._check_service(thread, name)
        if found is not None:
            return found
        if timeout is not None and timeout <= 0:
            raise ServiceNotFoundError(f"no service named {name!r}")
        process = thread.process
        waiting = self._waiters_of.get(process, 0) + 1
        quotas = self._router.quotas
        if quotas.over("waiters_per_process", process.uid, waiting):
            raise quotas.error("waiters_per_process", f"waiting for {name!r}")
        self._waiters_of[process] = waiting
        waiter = Waiter(thread, None)
        if timeout is not None:
            waiter.timer = self._call_later(timeout, lambda: self._time_out(name, waiter))
        self._waiters.setdefault(name, []).append(waiter)
        thread.sm_waits += 1
        return _DEFERRED

    def _stop_waiting(self, name: str, waiter: Waiter) -> bool:
        """Take ``waiter`` off ``name``'s list (and its timer off the loop); False if
        it was not there."""
        waiters = self._waiters.get(name)
        if not waiters or waiter not in waiters:
            return False
        waiters.remove(waiter)
        if not waiters:
            del self._waiters[name]
        self._waited(waiter)
        return True

    def _waited(self, waiter: Waiter) -> None:
        """A wait ended: count it off its process, cancel its timer."""
        if waiter.timer is not None:
            waiter.timer.cancel()
            waiter.timer = None
        thread = waiter.thread
        thread.sm_waits -= 1
        process = thread.process
        count_down(self._waiters_of, process)

    def _time_out(self, name: str, waiter: Waiter) -> None:
        waiter.timer = None
        if self._stop_waiting(name, waiter):
            error = ServiceNotFoundError(f"no service named {name!r} appeared in time")
            code = CODE_OF_ERROR[ServiceNotFoundError]
            self.reply(waiter.thread, [REPLY_BINDER_ERROR, code, str(error)])

    def _add_service(self, thread: ThreadRecord, name: str, binder: Any) -> None:
        name = _checked_name(name)
        if not isinstance(binder, parcel.ObjectRef):
            raise TypeError(f"add_service({name!r}) needs a binder object, not {type(binder)}")
        process = thread.process
        check_entry(process, binder.kind, binder.value)
        existing = self.services.get(name)
        self._check_allowed("add", name, process, existing)
        self._check_names_quota(process, existing)
        check_object_quotas(process, process, [(binder.kind, binder.value)], self._router.quotas)
        node = node_for_entry(process, binder.kind, binder.value, binder.descriptor)
        node.holders += 1
        if existing is not None:
            self._remove(name, existing)
        self.services[name] = Service(node, process.uid, process.pid)
        self._names_of.setdefault(node.owner, set()).add(name)
        self._names_of_uid[process.uid] = self._names_of_uid.get(process.uid, 0) + 1
        self._sorted = None
        log.info("service %r added by pid %d", name, process.pid)
        service = self.services[name]
        for waiter in self._waiters.pop(name, []):
            self._waited(waiter)
            if waiter.thread.alive:
                self.reply(waiter.thread, self._found(waiter.thread.process, name, service))
        for watch in list(self._watches.get(name, ())):
            self._notify(watch, service)

    # -- notifications (registerForNotifications) ------------------------------------

    def _register_for_notifications(self, thread: ThreadRecord, name: str, callback: Any) -> None:
        """Call ``callback`` (a pybinder.IServiceCallback node) with (name, binder)
        each time ``name`` is added, and now if it exists. Registrations count
        against waiters_per_process.

        Raises:
            SecurityError: the caller may not find ``name``.
            QuotaExceededError: waiters_per_process.
        """
        name = _checked_name(name)
        process = thread.process
        node = self._callback_node(process, callback)
        self._check_allowed("find", name, process, self.services.get(name))
        watches = self._watches_of.get(process, [])
        waiting = self._waiters_of.get(process, 0) + len(watches) + 1
        quotas = self._router.quotas
        if quotas.over("waiters_per_process", process.uid, waiting):
            raise quotas.error("waiters_per_process", f"notifications for {name!r}")
        node.holders += 1
        watch = Watch(name, node, process)
        self._watches.setdefault(name, []).append(watch)
        self._watches_of.setdefault(process, []).append(watch)
        service = self.services.get(name)
        if service is not None:
            self._notify(watch, service)

    def _unregister_for_notifications(self, thread: ThreadRecord, name: str, callback: Any) -> None:
        """Undo a registration of ``callback`` for ``name`` (none: nothing happens)."""
        name = _checked_name(name)
        process = thread.process
        node = self._callback_node(process, callback)
        for watch in self._watches.get(name, ()):
            if watch.node is node and watch.process is process:
                self._drop_watch(watch)
                return

    def _callback_node(self, process: ProcessRecord, callback: Any) -> Node:
        if not isinstance(callback, parcel.ObjectRef):
            raise TypeError(f"a notification callback is a binder object, not {type(callback)}")
        check_entry(process, callback.kind, callback.value)
        entry = [(callback.kind, callback.value)]
        check_object_quotas(process, process, entry, self._router.quotas)
        return node_for_entry(process, callback.kind, callback.value, callback.descriptor)

    def _drop_watch(self, watch: Watch) -> None:
        watches = self._watches.get(watch.name)
        if watches is not None and watch in watches:
            watches.remove(watch)
            if not watches:
                del self._watches[watch.name]
        mine = self._watches_of.get(watch.process)
        if mine is not None and watch in mine:
            mine.remove(watch)
            if not mine:
                del self._watches_of[watch.process]
        watch.node.holders -= 1
        self._router.maybe_release(watch.node)

    def _notify(self, watch: Watch, service: Service) -> None:
        """Call ``watch``'s callback with the service (a oneway call from the broker)."""
        owner = watch.node.owner
        if owner.dead:
            return
        try:
            self._check_allowed("find", watch.name, watch.process, service)
            entry = self._handle_for(watch.process, watch.name, service)
        except (SecurityError, QuotaExceededError) as exc:
            log.warning("notification of %r to pid %d dropped: %s", watch.name, owner.pid, exc)
            return
        entry.descriptor = service.node.descriptor
        body = [protocol.SERVICE_CALLBACK_DESCRIPTOR, [watch.name, entry], {}]
        router = self._router
        if not router.transact_from_broker(watch.node, protocol.FIRST_CALL_TRANSACTION, body):
            log.warning("notification of %r to pid %d dropped: no room", watch.name, owner.pid)
            ref = watch.process.refs.get(entry.value)
            if entry.kind == OBJ_HANDLE and ref is not None:
                ref.count -= 1  # the delivery counted for it never went
                if ref.count <= 0:
                    router.drop_ref(ref)

    def _found(self, process: ProcessRecord, name: str, service: Service) -> list[Any]:
        """The reply to a waiter whose name has just been added."""
        try:
            self._check_allowed("find", name, process, service)
            return [REPLY_OK, self._handle_for(process, name, service)]
        except (SecurityError, QuotaExceededError) as exc:
            return _binder_error(exc)

    def _check_names_quota(self, process: ProcessRecord, existing: Service | None) -> None:
        quotas = self._router.quotas
        held = self._names_of_uid.get(process.uid, 0)
        if existing is not None and existing.uid == process.uid:
            held -= 1  # a re-add replaces its own name
        if quotas.over("services_per_uid", process.uid, held + 1):
            raise quotas.error("services_per_uid", f"uid {process.uid}'s names")

    def _list_services(self, thread: ThreadRecord, start: int = 0) -> list[str]:
        """A page of the sorted names from index ``start``: at most
        :data:`LIST_PAGE_BYTES` of names, and at most a quarter of the caller's region;
        an empty page when ``start`` is past the end."""
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError("list_services(start) needs an int >= 0")
        if self._sorted is None:
            self._sorted = sorted(self.services)
        names = self._sorted
        if thread.process.uid != 0:
            names = [n for n in names if self._may_find(thread.process, n, self.services[n])]
        budget = min(LIST_PAGE_BYTES, thread.process.region_size // 4)
        page: list[str] = []
        for name in names[start:]:
            budget -= len(name.encode()) + 3  # msgpack's str header
            if budget < 0 and page:
                break
            page.append(name)
        return page

    def _status_call(self, thread: ThreadRecord) -> dict[str, Any]:
        return self._status(thread.process)

    # -- deaths -----------------------------------------------------------------------

    def forget_thread(self, thread: ThreadRecord) -> None:
        """Drop the waits of a thread that has gone (none: nothing to look at)."""
        if not thread.sm_waits:
            return
        for name, waiters in list(self._waiters.items()):
            for waiter in [w for w in waiters if w.thread is thread]:
                self._stop_waiting(name, waiter)

    def forget_process(self, process: ProcessRecord) -> None:
        """Unregister every service whose node lived in ``process``: O(its names)."""
        for name in sorted(self._names_of.get(process, ())):
            service = self.services.get(name)
            if service is not None:
                self._remove(name, service)
                log.info("service %r removed: pid %d died", name, process.pid)
        self._names_of.pop(process, None)
        self._waiters_of.pop(process, None)
        self._callers.pop(process, None)
        for watch in list(self._watches_of.get(process, ())):
            self._drop_watch(watch)

    def services_of(self, process: ProcessRecord) -> list[str]:
        """Names registered to nodes owned by ``process``."""
        return sorted(self._names_of.get(process, ()))

    def visible_services(self, caller: ProcessRecord | None) -> dict[str, int]:
        """{name: owner pid} of the services ``caller`` may find (None: root's view)."""
        return {
            name: service.pid
            for name, service in sorted(self.services.items())
            if caller is None or self._may_find(caller, name, service)
        }

    def _may_find(self, process: ProcessRecord, name: str, service: Service) -> bool:
        return self.policy.allows("find", name, self.caller_of(process), service.uid)

    # -- helpers ------------------------------------------------------------------------

    def _ref_for(self, process: ProcessRecord, node: Node) -> parcel.ObjectRef:
        """The entry naming ``node`` in ``process``, counted as a delivery.

        Raises:
            QuotaExceededError: it would be a new handle past handles_per_process.
        """
        quotas = self._router.quotas
        if (
            node.owner is not process
            and node not in process.ref_of_node
            and quotas.over("handles_per_process", process.uid, len(process.refs) + 1)
        ):
            raise quotas.error("handles_per_process", f"pid {process.pid}'s handles")
        kind, value = entry_for_node(process, node)
        extra = node.owner.pid if kind == OBJ_HANDLE else 0
        return parcel.ObjectRef(kind, value, node.descriptor, extra)

    def _remove(self, name: str, service: Service) -> None:
        """Unregister ``name`` and drop the node reference its entry held."""
        del self.services[name]
        names = self._names_of.get(service.node.owner)
        if names is not None:
            names.discard(name)
            if not names:
                del self._names_of[service.node.owner]
        count_down(self._names_of_uid, service.uid)
        self._sorted = None
        service.node.holders -= 1
        self._router.maybe_release(service.node)


def _binder_error(error: BinderError) -> list[Any]:
    """The reply body for ``error``: REPLY_BINDER_ERROR, its code, message, details."""
    code = CODE_OF_ERROR.get(type(error), 1)
    return [REPLY_BINDER_ERROR, code, str(error), *error_details(error)]


def _checked_timeout(timeout: Any) -> float | None:
    """A get_service timeout in seconds: None (wait on), or a number within
    [0, MAX_WAIT_S].

    Raises:
        ValueError: not a number, NaN, negative or longer than a day.
    """
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int | float):
        raise ValueError(f"a timeout is a number of seconds or None, not {type(timeout).__name__}")
    if not 0 <= timeout <= MAX_WAIT_S:  # NaN fails too
        raise ValueError(f"a timeout is None or within [0, {MAX_WAIT_S:.0f}] s, not {timeout}")
    return float(timeout)


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a service name is a non-empty str of at most {MAX_NAME_LENGTH} chars")
    return name
