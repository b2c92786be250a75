"""Values beyond msgpack's own: parcelables, remote exceptions and numpy.

:mod:`pybinder.parcel` carries these through msgpack extensions; this module holds
what it needs to know about them, and imports numpy only when a numpy value is sent
or arrives.

Parcelables (AIDL's ``parcelable``) are dataclasses registered with
:func:`parcelable` under a stable name; they travel as that name and their field
values, and arrive as the same class in any process that registered the name.

Remote exceptions are exception classes registered with :func:`remote_exception`:
raised by a Stub's method, they arrive in the caller as the same class, with their
``args`` and their instance attributes. Only registered classes and builtin
exceptions are rebuilt as themselves: the receiver never imports a module, nor looks
up a class, that the remote side names (that would let a peer run any module's import
code, or make any class in the receiver). Others arrive as
:class:`pybinder.RemoteError`.

A registration name is the contract between the two sides: by default
``module.qualname`` of the class, which differs when the class is defined in a script
run as ``__main__``; pass ``name=`` to choose a stable one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar, overload

from pybinder.errors import ProtocolError

T = TypeVar("T", bound=type)

#: The most dimensions an arriving numpy array may have (numpy's own limit is 64).
MAX_DIMENSIONS = 64

#: The longest numpy dtype string a parcel may name, in characters.
MAX_DTYPE = 32

_parcelables: dict[str, type] = {}  # name -> class (every name a class was registered by)
_parcelable_names: dict[type, str] = {}  # class -> the name it is sent by
#: class -> (names of its __init__ fields, names of its other fields)
_parcelable_fields: dict[type, tuple[tuple[str, ...], tuple[str, ...]]] = {}
_exceptions: dict[str, type[Exception]] = {}
_exception_names: dict[type, str] = {}


def _register(registry: dict[str, Any], key: str, cls: type, what: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"a {what} name must be a non-empty str, not {key!r}")
    existing = registry.get(key)
    if existing is not None and existing is not cls:
        same = (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
        if not same:  # the same class defined again (a reload) takes the name over
            raise ValueError(f"{what} name {key!r} is already registered for {existing!r}")
    registry[key] = cls


@overload
def parcelable(cls: T, /) -> T: ...
@overload
def parcelable(*, name: str | None = None) -> Callable[[T], T]: ...
def parcelable(cls: Any = None, /, *, name: str | None = None) -> Any:
    """Register a dataclass as a parcelable: instances can be sent, and arrive as the
    same class in every process that registered it under the same name.

    Use it above ``@dataclass``::

        @pybinder.parcelable(name="example.Point")
        @dataclasses.dataclass(frozen=True)
        class Point:
            x: float
            y: float

    A parcelable travels as its name and ``{field: value}`` for every field (each
    value any sendable value); the receiver calls the class with the ``init`` fields
    it knows (so ``__post_init__`` runs), then sets the others. Fields the receiver's
    class lacks are left out, and fields the sender's lacks take their defaults, so
    a field may be added to one side first, as with AIDL's stable parcelables.
    Subclasses are not covered: register each class that is sent.

    Args:
        name: the name it travels by; default ``module.qualname``. Choose one when
            the class lives in a script (``__main__``) or may move between modules.

    Raises:
        TypeError: ``cls`` is not a dataclass (put ``@parcelable`` above ``@dataclass``).
        ValueError: another class has that name.
    """

    def register(cls: Any) -> Any:
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise TypeError(f"@parcelable needs a dataclass (put it above @dataclass): {cls!r}")
        key = name if name is not None else f"{cls.__module__}.{cls.__qualname__}"
        _register(_parcelables, key, cls, "parcelable")
        fields = dataclasses.fields(cls)
        _parcelable_fields[cls] = (
            tuple(f.name for f in fields if f.init),
            tuple(f.name for f in fields if not f.init),
        )
        _parcelable_names[cls] = key
        return cls

    return register if cls is None else register(cls)


@overload
def remote_exception(cls: T, /) -> T: ...
@overload
def remote_exception(*, name: str | None = None) -> Callable[[T], T]: ...
def remote_exception(cls: Any = None, /, *, name: str | None = None) -> Any:
    """Register an exception class so that, raised in a Stub's method, it arrives in
    the caller as the same class rather than as :class:`pybinder.RemoteError`::

        @pybinder.remote_exception(name="example.QuotaError")
        class QuotaError(Exception):
            def __init__(self, message: str, limit: int) -> None:
                super().__init__(message)
                self.limit = limit

    The caller's side must register it under the same name. The exception arrives
    with its ``args`` and its instance attributes (``__dict__`` entries, except
    dunder names), each one that can be sent (the others are left out). It is
    rebuilt by calling the class with ``args``; if that raises, without calling
    ``__init__``, and the attributes are then set. ``remote_traceback`` and a note
    with the remote traceback are added, as for builtin exceptions.

    Classes are only ever rebuilt from this registry and builtins: the receiver
    does not import modules named by the remote side (see the module docstring).

    Args:
        name: the name it travels by; default ``module.qualname``.

    Raises:
        TypeError: ``cls`` is not an Exception subclass.
        ValueError: another class has that name, or the name starts with "builtins.".
    """

    def register(cls: Any) -> Any:
        if not isinstance(cls, type) or not issubclass(cls, Exception):
            raise TypeError(f"@remote_exception needs an Exception subclass: {cls!r}")
        key = name if name is not None else f"{cls.__module__}.{cls.__qualname__}"
        if isinstance(key, str) and key.startswith("builtins."):
            raise ValueError(f"{key!r}: builtin exceptions arrive as themselves already")
        _register(_exceptions, key, cls, "remote exception")
        _exception_names[cls] = key
        return cls

    return register if cls is None else register(cls)


def parcelable_name(cls: type) -> str | None:
    """The name ``cls`` is sent by, or None if it is not a registered parcelable."""
    return _parcelable_names.get(cls)


def parcelable_state(obj: Any, name: str) -> list[Any]:
    """``[name, {field: value}]``: what a parcelable travels as."""
    init, other = _parcelable_fields[type(obj)]
    fields = {key: getattr(obj, key) for key in init}
    for key in other:
        fields[key] = getattr(obj, key)
    return [name, fields]


def parcelable_fields(obj: Any) -> list[tuple[str, Any]]:
    """``[(field name, value), ...]`` of a registered parcelable."""
    init, other = _parcelable_fields[type(obj)]
    return [(key, getattr(obj, key)) for key in (*init, *other)]


def build_parcelable(state: Any) -> Any:
    """The parcelable an arriving ``[name, {field: value}]`` stands for.

    Raises:
        ProtocolError: the state is malformed, no class is registered by the name
            here, or the class refused the fields.
    """
    if type(state) is not list or len(state) != 2 or type(state[1]) is not dict:
        raise ProtocolError("malformed parcelable in parcel body")
    name, fields = state
    cls = _parcelables.get(name) if type(name) is str else None
    if cls is None:
        raise ProtocolError(
            f"parcel holds parcelable {name!r}, which this process has not registered"
            " (import the module that defines it)"
        )
    init, other = _parcelable_fields[cls]
    try:
        obj = cls(**{key: fields[key] for key in init if key in fields})
        for key in other:
            if key in fields:
                object.__setattr__(obj, key, fields[key])  # frozen dataclasses too
    except Exception as exc:
        raise ProtocolError(f"parcelable {name!r} could not be rebuilt: {exc}") from None
    return obj


def exception_name(cls: type) -> str | None:
    """The name a registered exception class is sent by, or None."""
    return _exception_names.get(cls)


def exception_class(name: str) -> type[Exception] | None:
    """The exception class registered here by ``name``, or None."""
    return _exceptions.get(name)


# -- numpy -------------------------------------------------------------------------------


def is_numpy(cls: type) -> bool:
    """Whether ``cls`` comes from numpy (without importing numpy)."""
    module = cls.__module__
    return module == "numpy" or module.startswith("numpy.")


def numpy_parts(obj: Any) -> tuple[bool, str, list[int], memoryview]:
    """``(is_array, dtype.str, shape, data)`` of a numpy array or scalar to send,
    ``data`` a flat byte view of its elements in C order (an array that is not
    C-contiguous is copied first; a scalar's shape is ``[]``).

    Raises:
        TypeError: not an ndarray (subclasses such as masked arrays are not) or a
            numpy scalar, or a dtype that does not travel: object, structured (a
            dtype whose ``dtype.str`` does not give it back) or of zero item size.
    """
    import numpy as np

    array: Any
    if type(obj) is np.ndarray:
        array = obj if obj.flags.c_contiguous else np.ascontiguousarray(obj)
        shape = list(obj.shape)
    elif isinstance(obj, np.generic):
        array = np.asarray(obj)
        shape = []
    else:
        raise TypeError(f"cannot send a {type(obj).__qualname__}")
    dtype = array.dtype
    if dtype.hasobject or dtype.itemsize == 0 or np.dtype(dtype.str) != dtype:
        what = "array" if shape or type(obj) is np.ndarray else type(obj).__name__
        raise TypeError(f"cannot send a numpy {what} of dtype {dtype}")
    return type(obj) is np.ndarray, dtype.str, shape, memoryview(array.reshape(-1).view(np.uint8))


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        raise ProtocolError("parcel holds a numpy value, but numpy is not installed") from None
    return numpy


def _dtype(np: Any, name: Any) -> Any:
    if type(name) is not str or len(name) > MAX_DTYPE:
        raise ProtocolError("malformed numpy dtype in parcel body")
    try:
        dtype = np.dtype(name)
    except Exception:
        raise ProtocolError(f"parcel holds a numpy value of unknown dtype {name!r}") from None
    if dtype.hasobject or dtype.itemsize == 0 or dtype.str != name:
        raise ProtocolError(f"parcel holds a numpy value of unsupported dtype {name!r}")
    return dtype


def build_ndarray(parts: Any, copy: bool) -> Any:
    """The read-only ndarray an arriving ``[dtype.str, shape, data]`` stands for.

    ``data`` is ``bytes`` (a small array, inline in the body) or a memoryview of the
    parcel (out of band). Without ``copy`` the array is a view of ``data``, no copy
    made; with ``copy`` it owns a copy of it (``arr.flags.owndata``), so the parcel
    may be freed. Either way it is marked read-only (an owning copy may be made
    writable again with ``arr.flags.writeable = True``).

    Raises:
        ProtocolError: malformed parts, an unsupported dtype, a size that does not
            match, or numpy is not installed.
    """
    if type(parts) is not list or len(parts) != 3:
        raise ProtocolError("malformed numpy array in parcel body")
    name, shape, data = parts
    np = _numpy()
    dtype = _dtype(np, name)
    if (
        type(shape) is not list
        or len(shape) > MAX_DIMENSIONS
        or not all(type(n) is int and n >= 0 for n in shape)
        or not isinstance(data, (bytes, memoryview))
    ):
        raise ProtocolError("malformed numpy array in parcel body")
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise ProtocolError(
            f"numpy array of shape {tuple(shape)} and dtype {name} in parcel body has"
            f" {len(data)} bytes"
        )
    try:
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
        if copy:
            array = array.copy()
    except Exception as exc:
        raise ProtocolError(f"malformed numpy array in parcel body: {exc}") from None
    array.flags.writeable = False
    return array


def build_numpy_scalar(parts: Any) -> Any:
    """The numpy scalar an arriving ``[dtype.str, bytes]`` stands for.

    Raises:
        ProtocolError: malformed parts, an unsupported dtype, or numpy is not installed.
    """
    if type(parts) is not list or len(parts) != 2:
        raise ProtocolError("malformed numpy scalar in parcel body")
    name, data = parts
    np = _numpy()
    dtype = _dtype(np, name)
    if not isinstance(data, (bytes, memoryview)) or len(data) != dtype.itemsize:
        raise ProtocolError("malformed numpy scalar in parcel body")
    return np.frombuffer(data, dtype=dtype)[0]
