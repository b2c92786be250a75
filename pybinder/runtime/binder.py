"""The local node base (Binder, libbinder's BBinder) and the remote handle
(BinderProxy, libbinder's BpBinder), plus the calling convention between them."""

from __future__ import annotations

import builtins
import traceback
from typing import TYPE_CHECKING, Any, ClassVar

from pybinder import parcel
from pybinder.errors import (
    CODE_OF_ERROR,
    BinderError,
    InterfaceMismatchError,
    ProtocolError,
    RemoteError,
    UnknownTransactionError,
    error_details,
    error_from_reply,
)
from pybinder.protocol import REPLY_BINDER_ERROR, REPLY_EXCEPTION, REPLY_OK, TF_ONE_WAY

if TYPE_CHECKING:
    from pybinder.runtime.process_state import ProcessState


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

        Raises:
            InterfaceMismatchError: ``descriptor`` is not this object's.
        """
        if descriptor != self.DESCRIPTOR:
            raise InterfaceMismatchError(
                f"caller speaks {descriptor!r} but {type(self).__qualname__} is {self.DESCRIPTOR!r}"
            )
        return self.on_transact(code, args, kwargs)


class BinderProxy:
    """A handle to a node in another process (BpBinder).

    One BinderProxy exists per handle per process state; when it is garbage
    collected its reference is released (BC_RELEASE), as a dropped ``sp<IBinder>``.
    Interface proxies (``ICalc.Proxy``) wrap one.
    """

    def __init__(self, process: ProcessState, handle: int) -> None:
        self.process = process
        self.handle = handle

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
            DeadObjectError: the node's process died.
            TransactionTooLargeError: the parcel does not fit the target's free space.
            RemoteError, or a builtin exception type: the remote method raised.
            BinderError: any other failure (see :mod:`pybinder.errors`).
        """
        return self.call(code, descriptor, list(args), kwargs or {}, TF_ONE_WAY if oneway else 0)

    def call(
        self, code: int, descriptor: str, args: list[Any], kwargs: dict[str, Any], flags: int
    ) -> Any:
        """:meth:`transact` with every argument given, as generated proxies call it."""
        process = self.process
        encoded = parcel.encode([descriptor, args, kwargs], process.encode_object)
        thread = process.thread_state()
        reply = thread.transact(self.handle, code, encoded, flags)
        if reply is None:
            return None
        offset, size = reply
        try:
            with process.region_view[offset : offset + size] as view:
                value, _ = parcel.decode(view, process.decode_object, copy_buffers=True)
        finally:
            thread.free_buffer(offset, size)
        return unpack_reply(value)

    def __repr__(self) -> str:
        return f"<BinderProxy handle={self.handle}>"


class ProxyBase:
    """Base of generated interface proxies: holds the :class:`BinderProxy`.

    Attributes:
        binder: the remote handle every method call goes through.
    """

    def __init__(self, binder: BinderProxy) -> None:
        self.binder = binder

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__} handle={self.binder.handle}>"


def run_call(target: Binder, code: int, body: Any) -> list[Any]:
    """Run a decoded call on ``target``; return the reply body (never raises)."""
    try:
        descriptor, args, kwargs = body
        if type(args) is not list or type(kwargs) is not dict:
            raise ProtocolError("a call's arguments must be a list and a dict")
        result = target.dispatch(code, descriptor, args, kwargs)
        return [REPLY_OK, result]
    except BinderError as exc:
        return binder_error_reply(exc)
    except Exception as exc:
        return exception_reply(exc, traceback.format_exc())


def binder_error_reply(exc: BinderError) -> list[Any]:
    return [REPLY_BINDER_ERROR, CODE_OF_ERROR.get(type(exc), 1), str(exc), *error_details(exc)]


def exception_reply(exc: BaseException, remote_traceback: str) -> list[Any]:
    kind = type(exc)
    return [REPLY_EXCEPTION, kind.__module__, kind.__qualname__, list(exc.args), remote_traceback]


def encode_reply(body: list[Any], process: ProcessState) -> parcel.EncodedParcel:
    """Encode a reply body; a result that cannot be sent becomes a TypeError reply."""
    try:
        return parcel.encode(body, process.encode_object)
    except Exception as exc:  # a result msgpack cannot carry, a released memoryview...
        fallback = exception_reply(exc, traceback.format_exc())
        if body[0] == REPLY_EXCEPTION:  # the exception's own args could not be sent
            fallback = [REPLY_EXCEPTION, body[1], body[2], [str(a) for a in body[3]], body[4]]
        return parcel.encode(fallback)


def unpack_reply(body: Any) -> Any:
    """Turn a reply body into the result, or raise what the remote side raised.

    Raises:
        RemoteError: a non-builtin exception in the remote method.
        Exception: the same builtin type as the remote one, with ``remote_traceback``.
        BinderError: a binder-level failure the target reported.
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
        _, module, qualname, args, remote_traceback = body
        raise rebuild_exception(module, qualname, args, remote_traceback)
    raise ProtocolError(f"unknown reply status {status!r}")


def rebuild_exception(module: str, qualname: str, args: list[Any], remote_tb: str) -> Exception:
    """The caller-side exception for a remote one: same builtin type, else RemoteError."""
    exc: Exception | None = None
    if module == "builtins":
        kind = getattr(builtins, qualname, None)
        if isinstance(kind, type) and issubclass(kind, Exception):
            try:
                exc = kind(*args)
            except Exception:
                exc = None
    if exc is None:
        message = str(args[0]) if len(args) == 1 else ", ".join(map(str, args))
        exc = RemoteError(message, f"{module}.{qualname}", remote_tb)
    exc.remote_traceback = remote_tb  # type: ignore[attr-defined]
    if remote_tb:
        exc.add_note("Remote traceback (most recent call last):\n" + remote_tb.rstrip())
    return exc
