"""pybinder: Android Binder's one-copy IPC, rebuilt for Linux in Python.

A broker daemon plays the binder driver: it copies each message once into a buffer
in the target process's read-only shared-memory region, and the target reads it in
place. On top: Proxy/Stub RPC, a service manager, typed object references, death
recipients, file descriptors, loopers on demand and caller credentials.

Quick use::

    import pybinder

    class ICalc(pybinder.Interface):
        DESCRIPTOR = "example.ICalc"

        @pybinder.method
        def add(self, a: int, b: int) -> int: ...

    class Calc(ICalc.Stub):
        def add(self, a, b):
            return a + b

    pybinder.serve("calc", Calc())  # until SIGTERM; comes back after a broker restart
"""

from pybinder.compiled import use_compiled_or_source

use_compiled_or_source()  # before any compiled module is imported

from pybinder.errors import (
    BinderError,
    BrokerUnavailableError,
    DeadlineExceededError,
    DeadObjectError,
    InterfaceMismatchError,
    ProtocolError,
    ProxyClosedError,
    QuotaExceededError,
    RemoteError,
    SecurityError,
    ServiceNotFoundError,
    TransactionTooLargeError,
    UnknownTransactionError,
)
from pybinder.runtime.binder import Binder, BinderProxy, ProxyBase
from pybinder.runtime.deadline import deadline, get_deadline, is_cancelled, time_remaining
from pybinder.runtime.file_descriptor import ParcelFileDescriptor
from pybinder.runtime.interface import Interface, method, oneway
from pybinder.runtime.process_state import ProcessState, connect
from pybinder.runtime.serve import serve
from pybinder.runtime.thread_state import get_calling_gid, get_calling_pid, get_calling_uid
from pybinder.values import parcelable, remote_exception

__version__ = "0.1.0"

__all__ = [
    "Binder",
    "BinderError",
    "BinderProxy",
    "BrokerUnavailableError",
    "DeadObjectError",
    "DeadlineExceededError",
    "Interface",
    "InterfaceMismatchError",
    "ParcelFileDescriptor",
    "ProcessState",
    "ProtocolError",
    "ProxyBase",
    "ProxyClosedError",
    "QuotaExceededError",
    "RemoteError",
    "SecurityError",
    "ServiceNotFoundError",
    "TransactionTooLargeError",
    "UnknownTransactionError",
    "__version__",
    "connect",
    "deadline",
    "get_calling_gid",
    "get_calling_pid",
    "get_calling_uid",
    "get_deadline",
    "is_cancelled",
    "method",
    "oneway",
    "parcelable",
    "remote_exception",
    "serve",
    "time_remaining",
]
