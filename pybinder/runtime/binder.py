"""The local node base (Binder, libbinder's BBinder) and the remote handle
(BinderProxy, libbinder's BpBinder), plus the calling convention between them."""

from __future__ import annotations

import builtins
import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from pybinder import parcel, values
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    DeadlineExceededError,
    DeadObjectError,
    InterfaceMismatchError,
    ProtocolError,
    ProxyClosedError,
    RemoteError,
    UnknownTransactionError,
    error_details,
    error_from_reply,
)
from pybinder.protocol import (
    INTERFACE_TRANSACTION,
    LAST_CALL_TRANSACTION,
    PING_TRANSACTION,
    REPLY_BINDER_ERROR,
    REPLY_EXCEPTION,
    REPLY_OK,
    TF_ONE_WAY,
)
from pybinder.runtime import deadline as deadlines

if TYPE_CHECKING:
    from pybinder.runtime.process_state import ProcessState

log = logging.getLogger("pybinder")


class Binder:
    """Base class of every local object other processes can call (a node's Stub).

    Subclasses either come from :class:`pybinder.Interface` (``ICalc.Stub``), which
    routes each transaction code to a method, or override :meth:`on_transact`.
    """

    DESCRIPTOR: ClassVar[str] = ""

    def on_transact(self, code: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Handle transaction ``code`` with decoded ``args``/``kwargs``; return the result.

        Raises:
            UnknownTransactionError: this object has no method with that code.
        """
        raise UnknownTransactionError(f"{type(self).__qualname__} has no transaction {code}")

    def dispatch(self, code: int, descriptor: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """Check the caller's interface descriptor (enforceInterface), then handle the call.

        A subinterface's object also accepts the descriptor of each interface it
        extends (its classes' DESCRIPTORs), so a base interface's proxy can call it.

        Raises:
            InterfaceMismatchError: ``descriptor`` is not this object's.
        """
        if descriptor != self.DESCRIPTOR and not speaks(self, descriptor):
            raise InterfaceMismatchError(
                f"caller speaks {descriptor!r} but {type(self).__qualname__} is {self.DESCRIPTOR!r}"
            )
        return self.on_transact(code, args, kwargs)


class BinderProxy:
    """A handle to a node in another process (BpBinder).

    One BinderProxy exists per handle per process state, so two deliveries of one
    node give the same object. It releases its reference (BC_RELEASE) on
    :meth:`close`, at the end of a ``with`` block, or when garbage collected, as a
    dropped ``sp<IBinder>``. Interface proxies (``ICalc.Proxy``) wrap one.

    Attributes:
        process: the :class:`ProcessState` it belongs to.
        handle: this process's handle for the node (the broker's binder_ref).
        descriptor: the node's interface descriptor as the reference arrived with it
            ("" when unknown): the sender's word, checked by the node on every call.
        owner_pid: the pid of the process that owns the node (0 when unknown).
        service_name: the name it was found by in the service manager, if any.
        generation: the process's broker connection the handle belongs to; after a
            reconnect (``connect(reconnect=True)``) a proxy found by name calls
            through :attr:`successor`, the service of that name found again.
    """

    def __init__(
        self, process: ProcessState, handle: int, descriptor: str = "", owner_pid: int = 0
    ) -> None:
        self.process = process
        self.handle = handle
        self.descriptor = descriptor
        self.owner_pid = owner_pid
        self.service_name: str | None = None
        self.closed = False
        self.dead = False
        self.generation = process.generation
        self.successor: BinderProxy | None = None
        self._recipients: list[tuple[Callable[[Any], None], Any]] = []

    def transact(
        self,
        code: int,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        descriptor: str = "",
        oneway: bool = False,
    ) -> Any:
        """Call transaction ``code`` on the remote node and return its result.

        Args:
            code: the transaction code (methods start at FIRST_CALL_TRANSACTION = 1).
            args, kwargs: the call's arguments (see :func:`pybinder.parcel.encode`).
            descriptor: the interface the caller believes the node implements.
            oneway: do not wait for the call to run (TF_ONE_WAY); returns None once
                the parcel is in the target's region.

        Raises:
            DeadObjectError: the node's process died (the message names the node).
            ProxyClosedError: this proxy was closed.
            TransactionTooLargeError: the parcel does not fit the target's free space.
            RemoteError, or a builtin or registered (pybinder.remote_exception) exception
                type: the remote method raised.
            BinderError: any other failure (see :mod:`pybinder.errors`).
        """
        return self.call(code, descriptor, list(args), kwargs or {}, TF_ONE_WAY if oneway else 0)

    def call(
        self, code: int, descriptor: str, args: list[Any], kwargs: dict[str, Any], flags: int
    ) -> Any:
        """:meth:`transact` with every argument given, as generated proxies call it."""
        if self.closed:
            raise ProxyClosedError(f"{self.describe()} was closed")
        process = self.process
        if self.generation != process.generation:
            return process.rebind(self).call(code, descriptor, args, kwargs, flags)
        encoded = parcel.encode([descriptor, args, kwargs], process.encode_object)
        thread = process.thread_state()
        if deadlines.use.active or process.call_timeout is not None:
            deadline_ns = (
                deadlines.oneway_deadline_ns()
                if flags & TF_ONE_WAY
                else deadlines.call_deadline_ns(process.call_timeout)
            )
            try:
                reply = thread.transact(self.handle, code, encoded, flags, deadline_ns)
            except DeadlineExceededError as exc:
                raise DeadlineExceededError(f"call {code} to {self.describe()}: {exc}") from None
        else:
            reply = thread.transact(self.handle, code, encoded, flags)
        if reply is None:
            return None
        offset, size = reply
        try:
            with process.region_view[offset : offset + size] as view:
                fds = thread.take_parcel_fds(view)
                value, _ = parcel.decode(view, process.decode_object, copy_buffers=True, fds=fds)
        finally:
            thread.free_buffer(offset, size)
        return unpack_reply(value)

    # -- death recipients (linkToDeath) ----------------------------------------------

    def link_to_death(self, recipient: Callable[[Any], None], proxy: Any = None) -> None:
        """Call ``recipient(proxy)`` once when the node's process dies (or the broker
        goes), on a runtime thread, never on a thread blocked in a call (binder's
        linkToDeath / BR_DEAD_BINDER). Linking to a node already known dead calls it
        at once (on this thread). Keep recipients short: they run one after another.

        ``proxy`` is what the recipient gets (default: this BinderProxy; an
        interface proxy passes itself).

        Raises:
            ProxyClosedError: this proxy was closed.
        """
        if self.closed:
            raise ProxyClosedError(f"{self.describe()} was closed")
        if self.generation != self.process.generation and self.service_name is not None:
            try:
                successor = self.process.rebind(self)
            except BinderError:
                successor = None  # not back: it is dead, and the recipient fires below
            if successor is not None:
                successor.link_to_death(recipient, self if proxy is None else proxy)
                return
        if self.dead:
            recipient(self if proxy is None else proxy)
            return
        first = not self._recipients
        self._recipients.append((recipient, self if proxy is None else proxy))
        if first:
            self.process.request_death_notification(self)

    def unlink_to_death(self, recipient: Callable[[Any], None]) -> bool:
        """Forget ``recipient`` (unlinkToDeath); False if it was not linked."""
        successor = self.successor
        if successor is not None and successor.generation == self.process.generation:
            return successor.unlink_to_death(recipient)
        for index, (linked, _) in enumerate(self._recipients):
            if linked is recipient or linked == recipient:
                del self._recipients[index]
                if not self._recipients and not self.dead and not self.closed:
                    self.process.clear_death_notification(self)
                return True
        return False

    def died(self) -> None:
        """The node's process died (BR_DEAD_BINDER, or the broker went): mark this
        proxy dead and call its recipients, each once."""
        self.dead = True
        recipients, self._recipients = self._recipients, []
        for recipient, proxy in recipients:
            try:
                recipient(proxy)
            except Exception:
                log.exception("death recipient %r raised", recipient)

    def is_binder_alive(self) -> bool:
        """Whether the node's process is alive (isBinderAlive): False once its death
        is known; with no death recipient linked it asks (:meth:`ping_binder`)."""
        if self.closed:
            return False
        if self.generation != self.process.generation:
            try:
                return self.process.rebind(self, wait=False).is_binder_alive()
            except BinderError:
                return False
        if self.dead:
            return False
        if self._recipients:
            return True
        return self.ping_binder()

    def ping_binder(self) -> bool:
        """Ask the node's process whether it is alive (binder's PING_TRANSACTION,
        answered by its runtime, not its Stub): True if it answers, False once it
        is dead.

        Raises:
            ProxyClosedError: this proxy was closed.
            BrokerUnavailableError: the broker went away.
        """
        try:
            return bool(self.call(PING_TRANSACTION, "", [], {}, 0))
        except DeadObjectError:
            self.dead = True
            return False

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Release this process's reference to the node now (BC_RELEASE) instead of
        at garbage collection; later calls raise ProxyClosedError. Closing again does
        nothing. Another delivery of the node makes a new proxy."""
        if not self.closed:
            self.closed = True
            self._recipients = []
            self.successor = None  # shared with other proxies found by the name since
            self.process.release_proxy(self)

    def __enter__(self) -> BinderProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def with_timeout(self, seconds: float) -> Any:
        """A view of this proxy whose calls each get ``seconds`` (or the deadline in
        force, if earlier); see :func:`pybinder.deadline`."""
        return TimeoutView(self, seconds)

    def describe(self) -> str:
        """Names the node for messages: its descriptor, owner pid and service name."""
        parts = [self.descriptor or "a node of unknown interface"]
        if self.owner_pid:
            parts.append(f"in pid {self.owner_pid}")
        if self.service_name is not None:
            parts.append(f"(service {self.service_name!r})")
        return " ".join(parts) + f", handle {self.handle}"

    def __repr__(self) -> str:
        state = " closed" if self.closed else " dead" if self.dead else ""
        return f"<BinderProxy {self.describe()}{state}>"


class ProxyBase:
    """Base of generated interface proxies: holds the :class:`BinderProxy` and offers
    its lifetime methods (which an interface method of the same name hides).

    Attributes:
        binder: the remote handle every method call goes through.
    """

    def __init__(self, binder: BinderProxy) -> None:
        self.binder = binder

    def link_to_death(self, recipient: Callable[[Any], None]) -> None:
        """See :meth:`BinderProxy.link_to_death`; ``recipient`` gets this proxy."""
        self.binder.link_to_death(recipient, self)

    def unlink_to_death(self, recipient: Callable[[Any], None]) -> bool:
        """See :meth:`BinderProxy.unlink_to_death`."""
        return self.binder.unlink_to_death(recipient)

    def is_binder_alive(self) -> bool:
        """See :meth:`BinderProxy.is_binder_alive`."""
        return self.binder.is_binder_alive()

    def ping_binder(self) -> bool:
        """See :meth:`BinderProxy.ping_binder`."""
        return self.binder.ping_binder()

    def close(self) -> None:
        """See :meth:`BinderProxy.close` (closes the handle for every view of it)."""
        self.binder.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.binder.close()

    def with_timeout(self, seconds: float) -> Any:
        """A view of this proxy whose calls each get ``seconds`` (or the deadline in
        force, if earlier), typed as the proxy; see :func:`pybinder.deadline`."""
        return TimeoutView(self, seconds)

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} {self.binder.describe()}>"


class TimeoutView:
    """A proxy seen with a timeout of its own: each method call made through it runs
    inside ``deadline(seconds)`` (``proxy.with_timeout(seconds)``).

    Args:
        proxy: a BinderProxy or an interface proxy.
        seconds: the time each call may take.
    """

    def __init__(self, proxy: Any, seconds: float) -> None:
        self._proxy = proxy
        self._seconds = seconds

    def __getattr__(self, name: str) -> Any:
        found = getattr(self._proxy, name)
        if not callable(found):
            return found
        seconds = self._seconds

        def bounded(*args: Any, **kwargs: Any) -> Any:
            with deadlines.deadline(seconds):
                return found(*args, **kwargs)

        return bounded

    def __repr__(self) -> str:
        return f"<{self._proxy!r} with a timeout of {self._seconds} s>"


def run_call(target: Binder, code: int, body: Any) -> list[Any]:
    """Run a decoded call on ``target``; return the reply body (never raises).

    Codes above LAST_CALL_TRANSACTION are the runtime's own and never reach
    ``target.dispatch`` (see :func:`runtime_transaction`), as libbinder's BBinder
    answers PING_TRANSACTION and INTERFACE_TRANSACTION itself.
    """
    try:
        descriptor, args, kwargs = body
        if type(args) is not list or type(kwargs) is not dict:
            raise ProtocolError("a call's arguments must be a list and a dict")
        if code > LAST_CALL_TRANSACTION:
            return [REPLY_OK, runtime_transaction(target, code)]
        result = target.dispatch(code, descriptor, args, kwargs)
        return [REPLY_OK, result]
    except BinderError as exc:
        return binder_error_reply(exc)
    except Exception as exc:
        return exception_reply(exc, traceback.format_exc())


def binder_error_reply(exc: BinderError) -> list[Any]:
    return [REPLY_BINDER_ERROR, CODE_OF_ERROR.get(type(exc), 1), str(exc), *error_details(exc)]


def exception_reply(exc: BaseException, remote_traceback: str) -> list[Any]:
    """The reply body for an exception a method raised:
    ``[REPLY_EXCEPTION, module, qualname, args, traceback]``.

    ``module`` and ``qualname`` name its class; a :func:`pybinder.remote_exception`
    class goes by its registered name, split at the last dot (``module`` is "" for
    a name without one). ``args`` is ``list(exc.args)``; for a registered or builtin
    exception with instance attributes (``__dict__`` entries but dunder names and
    ``remote_traceback``) it is ``{"args": [...], "attrs": {name: value}}``, with
    each attribute that can be sent (the others are left out).
    """
    kind = type(exc)
    name = _exception_name(kind)
    if name is not None:
        module, _, qualname = name.rpartition(".")
    else:
        module, qualname = kind.__module__, kind.__qualname__
    args: Any = list(exc.args)
    if name is not None or module == "builtins":
        attrs = _sendable_attributes(exc)
        if attrs:
            args = {"args": args, "attrs": attrs}
    return [REPLY_EXCEPTION, module, qualname, args, remote_traceback]


def encode_reply(body: list[Any], process: ProcessState) -> parcel.EncodedParcel:
    """Encode a reply body; a result that cannot be sent becomes a TypeError reply
    whose message names the part that could not, as ``result['frames'][3]: cannot
    send a Foo``. An exception whose args cannot be sent goes with ``str`` of each
    arg instead (and without its attributes)."""
    try:
        return parcel.encode(body, process.encode_object, names=_REPLY_NAMES)
    except Exception as exc:  # a result msgpack cannot carry, a released memoryview...
        fallback = exception_reply(exc, traceback.format_exc())
        if body[0] == REPLY_EXCEPTION:  # the exception's own args could not be sent
            args = body[3]["args"] if isinstance(body[3], dict) else body[3]
            fallback = [REPLY_EXCEPTION, body[1], body[2], [str(a) for a in args], body[4]]
        return parcel.encode(fallback)


def unpack_reply(body: Any) -> Any:
    """Turn a reply body into the result, or raise what the remote side raised.

    Raises:
        RemoteError: an exception in the remote method whose class is neither
            builtin nor registered here with :func:`pybinder.remote_exception`.
        Exception: the same builtin or registered type as the remote one, with its
            args, its attributes and ``remote_traceback`` (see :func:`rebuild_exception`).
        BinderError: a binder-level failure the target reported.
        ProtocolError: a malformed reply body.
    """
    if not isinstance(body, list) or not body:
        raise ProtocolError(f"malformed reply body {body!r}")
    status = body[0]
    if status == REPLY_OK:
        return body[1]
    if status == REPLY_BINDER_ERROR:
        _, code, message, *details = body
        raise error_from_reply(code, message, details)
    if status == REPLY_EXCEPTION:
        module, qualname, args, attrs, remote_traceback = _exception_parts(body)
        raise rebuild_exception(module, qualname, args, remote_traceback, attrs)
    raise ProtocolError(f"unknown reply status {status!r}")


def rebuild_exception(
    module: str,
    qualname: str,
    args: list[Any],
    remote_tb: str,
    attrs: dict[str, Any] | None = None,
) -> Exception:
    """The caller-side exception for a remote one.

    A builtin exception (``module`` "builtins") is rebuilt as its type, and a class
    registered here with :func:`pybinder.remote_exception` by the name
    ``module.qualname`` as that class: called with ``args`` or, if that raises,
    made without calling ``__init__``; ``attrs`` are then set on it (dunder names
    excepted). Anything else becomes :class:`RemoteError` naming the remote type:
    no module the remote side names is ever imported, and no other class looked up.
    Each gets ``remote_traceback`` and a note with the remote traceback.
    """
    exc: Exception | None = None
    if module == "builtins":
        kind = getattr(builtins, qualname, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                exc = kind(*args)
            except Exception:
                exc = None
    else:
        registered = _exception_class(f"{module}.{qualname}" if module else qualname)
        if registered is not None:
            exc = _make_exception(registered, args)
    if exc is not None and attrs:
        _set_attributes(exc, attrs)
    if exc is None:
        message = str(args[0]) if len(args) == 1 else ", ".join(map(str, args))
        exc = RemoteError(message, f"{module}.{qualname}" if module else qualname, remote_tb)
    exc.remote_traceback = remote_tb  # type: ignore[attr-defined]
    if remote_tb:
        exc.add_note("Remote traceback (most recent call last):\n" + remote_tb.rstrip())
    return exc


def runtime_transaction(target: Binder, code: int) -> Any:
    """Answer a reserved transaction (a code above LAST_CALL_TRANSACTION) for
    ``target``, whatever descriptor the caller gave (binder's BBinder::transact).

    PING_TRANSACTION answers True; INTERFACE_TRANSACTION answers
    ``[descriptor, hash, [[code, name, oneway], ...]]`` (IBinder's
    getInterfaceDescriptor, with AIDL's getInterfaceHash and the method table):
    the Interface's for a Stub, ``[DESCRIPTOR, "", []]`` for a plain Binder.

    Raises:
        UnknownTransactionError: any other reserved code.
    """
    if code == PING_TRANSACTION:
        return True
    if code == INTERFACE_TRANSACTION:
        from pybinder.runtime.interface import _interface_of  # imports this module

        interface = _interface_of(target)
        if interface is None:
            return [target.DESCRIPTOR, "", []]
        return [interface.DESCRIPTOR, interface.HASH, interface.method_table()]
    name = target.DESCRIPTOR or type(target).__qualname__
    raise UnknownTransactionError(f"{name} has no runtime transaction {code:#x}")


def speaks(target: Binder, descriptor: str) -> bool:
    """Whether a class of ``target`` declares ``descriptor`` (a non-empty one): its
    own interface's or one it extends."""
    if not descriptor:
        return False
    return any(klass.__dict__.get("DESCRIPTOR") == descriptor for klass in type(target).__mro__)


# -- values of exception replies (exception_reply, unpack_reply) -------------------------

#: What a TypeError calls the items of a reply body (see ``parcel.encode``'s ``names``).
_REPLY_NAMES = ("status", "result", "exception name", "exception args", "traceback")


def _exception_name(kind: type) -> str | None:
    return values.exception_name(kind)


def _exception_class(name: str) -> type[Exception] | None:
    return values.exception_class(name)


def _sendable_attributes(exc: BaseException) -> dict[str, Any]:
    """The instance attributes of ``exc`` that go with it: ``__dict__`` entries but
    dunder names (``__notes__``...) and ``remote_traceback``, each that can be sent
    on its own (binder objects cannot: an exception carries data)."""
    found: dict[str, Any] = {}
    for key, value in getattr(exc, "__dict__", {}).items():
        if type(key) is not str or _is_dunder(key) or key == "remote_traceback":
            continue
        try:
            parcel.encode(value)
        except Exception:
            continue
        found[key] = value
    return found


def _is_dunder(name: str) -> bool:
    return name.startswith("__") and name.endswith("__")


def _exception_parts(body: list[Any]) -> tuple[str, str, list[Any], dict[str, Any] | None, str]:
    """``(module, qualname, args, attrs, traceback)`` of an exception reply body.

    Raises:
        ProtocolError: the body is malformed.
    """
    if len(body) != 5:
        raise ProtocolError(f"malformed exception reply {body!r}"[:500])
    _, module, qualname, args, remote_traceback = body
    attrs = None
    if type(args) is dict:
        attrs = args.get("attrs")
        args = args.get("args", [])
    if (
        type(module) is not str
        or type(qualname) is not str
        or type(args) not in (list, tuple)
        or (attrs is not None and type(attrs) is not dict)
    ):
        raise ProtocolError(f"malformed exception reply {body!r}"[:500])
    return module, qualname, list(args), attrs, str(remote_traceback)


def _make_exception(kind: type[Exception], args: list[Any]) -> Exception | None:
    """``kind(*args)``, or if that raises, an instance made without ``__init__``
    (as an exception whose ``__init__`` takes other arguments than its ``args``)."""
    try:
        return kind(*args)
    except Exception:
        pass
    try:
        exc = kind.__new__(kind, *args)
        exc.args = tuple(args)
    except Exception:
        return None
    return exc


def _set_attributes(exc: BaseException, attrs: dict[str, Any]) -> None:
    """Set the arriving instance attributes on ``exc`` (not dunder names)."""
    namespace = getattr(exc, "__dict__", None)
    if namespace is None:
        return
    for key, value in attrs.items():
        if type(key) is str and not _is_dunder(key):
            namespace[key] = value
