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
from pybinder.broker.process import Node, ProcessRecord, ThreadRecord
from pybinder.broker.transaction import Router, check_entry
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    InterfaceMismatchError,
    ProtocolError,
    ServiceNotFoundError,
    UnknownTransactionError,
)
from pybinder.protocol import (
    REPLY_BINDER_ERROR,
    REPLY_EXCEPTION,
    REPLY_OK,
    TF_ONE_WAY,
)

log = logging.getLogger("pybinder.broker")

MAX_NAME_LENGTH = 255

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
class Waiter:
    """A thread blocked in wait_for_service until the name appears or time runs out."""

    thread: ThreadRecord
    timer: Timer | None


class ServiceManager:
    """Serves transactions to handle 0.

    Args:
        router: the broker's router (for refs, nodes and replies).
        call_later: ``call_later(seconds, callback)`` on the broker's event loop.
        status: returns the broker's status dict for SM_STATUS.
    """

    def __init__(
        self, router: Router, call_later: Scheduler, status: Callable[[], dict[str, Any]]
    ) -> None:
        self._router = router
        self._call_later = call_later
        self._status = status
        self.services: dict[str, Service] = {}
        self._waiters: dict[str, list[Waiter]] = {}
        self._handlers: dict[int, Callable[..., Any]] = {
            protocol.SM_CHECK_SERVICE: self._check_service,
            protocol.SM_WAIT_FOR_SERVICE: self._wait_for_service,
            protocol.SM_ADD_SERVICE: self._add_service,
            protocol.SM_LIST_SERVICES: self._list_services,
            protocol.SM_STATUS: self._status_call,
        }

    # -- entry point ----------------------------------------------------------------

    def transact(self, thread: ThreadRecord, code: int, flags: int, data: bytes) -> None:
        """Handle one transaction to handle 0 whose parcel is ``data`` (a private copy)."""
        oneway = bool(flags & TF_ONE_WAY)
        if oneway:
            self._router.acknowledge_oneway(thread)
        try:
            result = self._call(thread, code, data)
            body: list[Any] = [REPLY_OK, result]
        except BinderError as exc:
            body = [REPLY_BINDER_ERROR, CODE_OF_ERROR.get(type(exc), 1), str(exc)]
        except (TypeError, ValueError, PermissionError) as exc:
            body = [REPLY_EXCEPTION, "builtins", type(exc).__name__, str(exc), ""]
        if not oneway and body[1] is not _DEFERRED:
            self.reply(thread, body)

    def _call(self, thread: ThreadRecord, code: int, data: bytes) -> Any:
        try:
            (descriptor, args, kwargs), _ = parcel.decode(data)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(
                f"a service manager call is [descriptor, args, kwargs]: {exc}"
            ) from None
        if descriptor != protocol.SERVICE_MANAGER_DESCRIPTOR:
            raise InterfaceMismatchError(
                f"handle 0 is {protocol.SERVICE_MANAGER_DESCRIPTOR!r}, not {descriptor!r}"
            )
        handler = self._handlers.get(code)
        if handler is None:
            raise UnknownTransactionError(f"the service manager has no method with code {code}")
        return handler(thread, *args, **kwargs)

    def reply(self, thread: ThreadRecord, body: list[Any]) -> None:
        """Write a reply parcel straight into the caller's region."""
        self._router.reply_from_broker(thread, body)

    # -- methods --------------------------------------------------------------------

    def _check_service(self, thread: ThreadRecord, name: str) -> parcel.ObjectRef | None:
        service = self.services.get(_checked_name(name))
        return None if service is None else self._ref_for(thread.process, service.node)

    def _wait_for_service(
        self, thread: ThreadRecord, name: str, timeout: float | None = None
    ) -> Any:
        found = self._check_service(thread, name)
        if found is not None:
            return found
        if timeout is not None and timeout <= 0:
            raise ServiceNotFoundError(f"no service named {name!r}")
        waiter = Waiter(thread, None)
        if timeout is not None:
            waiter.timer = self._call_later(float(timeout), lambda: self._time_out(name, waiter))
        self._waiters.setdefault(name, []).append(waiter)
        return _DEFERRED

    def _time_out(self, name: str, waiter: Waiter) -> None:
        waiters = self._waiters.get(name, [])
        if waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiters[name]
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
        if existing is not None and process.uid not in (0, existing.uid):
            raise PermissionError(f"service {name!r} belongs to uid {existing.uid}")
        node = self._router.node_for_entry(process, binder.kind, binder.value)
        node.holders += 1
        self.services[name] = Service(node, process.uid, process.pid)
        log.info("service %r added by pid %d", name, process.pid)
        if existing is not None:
            self._drop(existing)
        for waiter in self._waiters.pop(name, []):
            if waiter.timer is not None:
                waiter.timer.cancel()
            if waiter.thread.alive:
                self.reply(waiter.thread, [REPLY_OK, self._ref_for(waiter.thread.process, node)])

    def _list_services(self, thread: ThreadRecord) -> list[str]:
        return sorted(self.services)

    def _status_call(self, thread: ThreadRecord) -> dict[str, Any]:
        return self._status()

    # -- deaths -----------------------------------------------------------------------

    def forget_thread(self, thread: ThreadRecord) -> None:
        """Drop the waits of a thread that has gone."""
        for name, waiters in list(self._waiters.items()):
            for waiter in [w for w in waiters if w.thread is thread]:
                if waiter.timer is not None:
                    waiter.timer.cancel()
                waiters.remove(waiter)
            if not waiters:
                del self._waiters[name]

    def forget_process(self, process: ProcessRecord) -> None:
        """Unregister every service whose node lived in ``process``."""
        for name, service in list(self.services.items()):
            if service.node.owner is process:
                del self.services[name]
                self._drop(service)
                log.info("service %r removed: pid %d died", name, process.pid)

    def services_of(self, process: ProcessRecord) -> list[str]:
        """Names registered to nodes owned by ``process``."""
        return sorted(n for n, s in self.services.items() if s.node.owner is process)

    # -- helpers ------------------------------------------------------------------------

    def _ref_for(self, process: ProcessRecord, node: Node) -> parcel.ObjectRef:
        return parcel.ObjectRef(*self._router.entry_for_node(process, node))

    def _drop(self, service: Service) -> None:
        service.node.holders -= 1
        self._router.maybe_release(service.node)


def _checked_name(name: Any) -> str:
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LENGTH:
        raise ValueError(f"a service name is a non-empty str of at most {MAX_NAME_LENGTH} chars")
    return name
