"""The BinderError family: every failure pybinder reports to a caller.

The names follow libbinder's status codes (DEAD_OBJECT, FAILED_TRANSACTION,
UNKNOWN_TRANSACTION, BAD_TYPE, NAME_NOT_FOUND) and Android's Java exceptions
(DeadObjectException, TransactionTooLargeException, RemoteException).
"""

from __future__ import annotations


class BinderError(Exception):
    """Base class of every error pybinder raises on its own behalf."""


class BrokerUnavailableError(BinderError):
    """The broker cannot be reached: no socket, nobody listening, or it went away.

    Raised by :func:`pybinder.connect` when the socket cannot be connected, and by
    any call in flight when the broker's connection closes.
    """


class DeadObjectError(BinderError):
    """The process that owns the target node has died (binder's DEAD_OBJECT).

    Raised in the caller of a call that was pending or sent after the death.
    """


class TransactionTooLargeError(BinderError):
    """A parcel does not fit the space it needs (binder's FAILED_TRANSACTION / ENOSPC).

    Attributes:
        size: the parcel's size in bytes.
        limit: the space that was available, in bytes.
    """

    def __init__(self, message: str, size: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ServiceNotFoundError(BinderError):
    """No service is registered under the name (servicemanager's NAME_NOT_FOUND)."""


class UnknownTransactionError(BinderError):
    """The target has no method with this transaction code (binder's UNKNOWN_TRANSACTION)."""


class InterfaceMismatchError(BinderError):
    """The caller's interface descriptor is not the target's (enforceInterface failed)."""


class ProtocolError(BinderError):
    """A malformed frame or parcel: bad command, bad offset or length, bad header."""


class RemoteError(BinderError):
    """A non-builtin exception raised by the remote method (Android's RemoteException).

    Attributes:
        remote_type: dotted name of the exception's class in the remote process.
        remote_traceback: the remote traceback as text.
    """

    def __init__(self, message: str, remote_type: str = "", remote_traceback: str = "") -> None:
        super().__init__(f"{remote_type}: {message}" if remote_type else message)
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback


#: Errors a caller can receive by code from the broker (BR_FAILED_REPLY) or a stub.
ERROR_CODES: dict[int, type[BinderError]] = {
    1: BinderError,
    2: DeadObjectError,
    3: TransactionTooLargeError,
    4: ServiceNotFoundError,
    5: UnknownTransactionError,
    6: InterfaceMismatchError,
    7: ProtocolError,
    8: BrokerUnavailableError,
}
CODE_OF_ERROR: dict[type[BinderError], int] = {cls: code for code, cls in ERROR_CODES.items()}


class BrokerAlreadyRunningError(RuntimeError):
    """Another broker holds the socket path (raised by ``Broker.start``, not to callers).

    It lives here rather than in the broker daemon because mypyc, which compiles the
    daemon, cannot compile a subclass of a built-in exception other than Exception.
    """
