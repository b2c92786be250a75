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


class DeadlineExceededError(BinderError, TimeoutError):
    """A call was not answered before its deadline (gRPC's DEADLINE_EXCEEDED): the
    broker has cancelled it, a late reply is dropped, and the thread goes on."""


class ProxyClosedError(BinderError, ValueError):
    """A call on a proxy after its ``close()`` (as I/O on a closed file): this process
    released its reference, so it can no longer reach the node through it."""


class ProtocolError(BinderError):
    """A malformed frame or parcel: bad command, bad offset or length, bad header."""


class QuotaExceededError(BinderError):
    """A limit the broker sets per uid, process or connection was reached
    (``pybinder broker --help`` lists them; ``pybinder.broker.quotas`` defines them).

    Binder's driver answers such a transaction with BR_FAILED_REPLY (ENOMEM, ENOSPC);
    here the caller learns which limit it hit.

    Attributes:
        quota: the quota's name, one of :data:`QUOTA_NAMES` (e.g. ``"nodes_per_process"``).
        limit: the limit in force, in the quota's unit (a count, bytes or seconds).
    """

    def __init__(self, message: str = "", quota: str = "", limit: int = 0) -> None:
        super().__init__(message or f"quota {quota} of {limit} reached")
        self.quota = quota
        self.limit = limit


class SecurityError(BinderError, PermissionError):
    """The broker's access policy denies this caller the action (Android's
    SecurityException): adding, finding or calling a service name, or a broker whose
    uid the client does not trust."""


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
    9: QuotaExceededError,
    10: SecurityError,
    11: ProxyClosedError,
    12: DeadlineExceededError,
}
CODE_OF_ERROR: dict[type[BinderError], int] = {cls: code for code, cls in ERROR_CODES.items()}

#: Every quota the broker enforces, by index: a BR_FAILED_REPLY or BR_ERROR with the
#: code of QuotaExceededError carries the quota's index here in its size field and
#: the limit in its limit field (see ``pybinder.broker.quotas`` for each meaning).
QUOTA_NAMES: tuple[str, ...] = (
    "connections_per_uid",
    "hello_timeout_s",
    "region_share_per_sender",
    "nodes_per_process",
    "handles_per_process",
    "region_bytes_per_uid",
    "region_bytes_total",
    "outbox_bytes",
    "parts_timeout_s",
    "waiters_per_process",
    "services_per_uid",
    "service_manager_parcel",
    "fds_per_transaction",
    "fds_per_uid",
)


def error_details(error: BinderError) -> list[int]:
    """The numbers a reply body carries after an error's code and message: the quota's
    index and limit for QuotaExceededError, size and limit for
    TransactionTooLargeError, none for the rest (see :func:`error_from_reply`)."""
    if isinstance(error, QuotaExceededError):
        name = error.quota
        return [QUOTA_NAMES.index(name) if name in QUOTA_NAMES else -1, error.limit]
    if isinstance(error, TransactionTooLargeError):
        return [error.size, error.limit]
    return []


def error_from_reply(code: int, message: str, details: list[int]) -> BinderError:
    """The caller-side error of a ``[REPLY_BINDER_ERROR, code, message, *details]`` body."""
    error_type = ERROR_CODES.get(code, BinderError)
    if error_type is QuotaExceededError and len(details) == 2:
        error = quota_error(details[0], details[1])
        return QuotaExceededError(message, error.quota, error.limit)
    if error_type is TransactionTooLargeError and len(details) == 2:
        return TransactionTooLargeError(message, details[0], details[1])
    return error_type(message)


def quota_error(index: int, limit: int) -> QuotaExceededError:
    """The caller-side error for quota number ``index`` (see :data:`QUOTA_NAMES`)."""
    name = QUOTA_NAMES[index] if 0 <= index < len(QUOTA_NAMES) else f"quota #{index}"
    return QuotaExceededError(f"the broker's quota {name} ({limit}) is reached", name, limit)


class RegionUnavailableError(Exception):
    """The broker cannot back a new receive region (raised in the broker, where the
    client then gets BrokerUnavailableError saying so): /dev/shm is full.

    Attributes:
        size: the region's size in bytes.
        free: the bytes /dev/shm had free.

    It lives here, not in ``pybinder.region``, for the reason given below.
    """

    def __init__(self, message: str, size: int = 0, free: int = 0) -> None:
        super().__init__(message)
        self.size = size
        self.free = free


class BrokerAlreadyRunningError(RuntimeError):
    """Another broker holds the socket path (raised by ``Broker.start``, not to callers).

    It lives here rather than in the broker daemon because mypyc, which compiles the
    daemon, cannot compile a subclass of a built-in exception other than Exception.
    """
