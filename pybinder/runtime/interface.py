"""Interfaces: ``class ICalc(pybinder.Interface)`` with ``@method`` and ``@oneway``
declarations, from which a Stub base and a Proxy class are generated (what AIDL
generates in Android).

Transaction codes are given in declaration order from FIRST_CALL_TRANSACTION (1);
a subinterface's methods follow its base's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from pybinder.errors import UnknownTransactionError
from pybinder.protocol import FIRST_CALL_TRANSACTION, TF_ONE_WAY
from pybinder.runtime.binder import Binder, BinderProxy, ProxyBase

F = TypeVar("F", bound=Callable[..., Any])
I = TypeVar("I", bound="Interface")  # noqa: E741

_KIND = "__pybinder_kind__"


def method(function: F) -> F:
    """Declare a two-way method of an :class:`Interface`: the caller waits for its result."""
    setattr(function, _KIND, "method")
    return function


def oneway(function: F) -> F:
    """Declare a oneway method (TF_ONE_WAY): the caller does not wait and gets None.

    Oneway calls to one object run one at a time, in the order they were sent.
    """
    setattr(function, _KIND, "oneway")
    return function


class MethodSpec:
    """One declared method: its name, transaction code and whether it is oneway."""

    __slots__ = ("code", "declaration", "name", "oneway")

    def __init__(self, name: str, code: int, oneway: bool, declaration: Callable[..., Any]) -> None:
        self.name = name
        self.code = code
        self.oneway = oneway
        self.declaration = declaration

    def __repr__(self) -> str:
        kind = "oneway" if self.oneway else "method"
        return f"<{kind} {self.name} code={self.code}>"


class Interface:
    """Base of every pybinder interface.

    A subclass that sets ``DESCRIPTOR`` (a unique string, e.g. ``"example.ICalc"``)
    gets two generated classes:

    - ``ICalc.Stub``: subclass it and implement the methods to serve the interface;
    - ``ICalc.Proxy``: what ``get_service(name, ICalc)`` returns; each method call is
      a transaction.

    Attributes:
        METHODS: the declared methods, in transaction-code order.
    """

    DESCRIPTOR: ClassVar[str]
    METHODS: ClassVar[tuple[MethodSpec, ...]] = ()
    Stub: ClassVar[type[Any]]
    Proxy: ClassVar[type[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "DESCRIPTOR" not in cls.__dict__:
            return  # an implementation (Calc(ICalc.Stub)) or a generated class
        if not isinstance(cls.DESCRIPTOR, str) or not cls.DESCRIPTOR:
            raise TypeError(f"{cls.__qualname__}.DESCRIPTOR must be a non-empty str")
        cls.METHODS = _collect_methods(cls)
        cls.Stub = _make_stub(cls)
        cls.Proxy = _make_proxy(cls)

    @classmethod
    def as_interface(cls: type[I], binder: Any) -> I:
        """View a binder object as this interface (libbinder's interface_cast).

        A local object that implements the interface is returned as is (calls stay in
        process, as ``queryLocalInterface``); a :class:`BinderProxy` is wrapped in
        ``cls.Proxy``.

        Raises:
            TypeError: ``binder`` is neither.
        """
        if isinstance(binder, cls):
            return binder
        if isinstance(binder, ProxyBase):
            binder = binder.binder
        if isinstance(binder, BinderProxy):
            return cls.Proxy(binder)  # type: ignore[no-any-return]
        raise TypeError(f"{binder!r} is not a binder object implementing {cls.DESCRIPTOR}")


def _collect_methods(cls: type[Interface]) -> tuple[MethodSpec, ...]:
    names: list[str] = []
    kinds: dict[str, str] = {}
    declarations: dict[str, Callable[..., Any]] = {}
    for klass in reversed(cls.__mro__):
        for name, value in vars(klass).items():
            kind = getattr(value, _KIND, None)
            if kind is None:
                continue
            if name not in kinds:
                names.append(name)
            kinds[name] = kind
            declarations[name] = value
    return tuple(
        MethodSpec(name, FIRST_CALL_TRANSACTION + i, kinds[name] == "oneway", declarations[name])
        for i, name in enumerate(names)
    )


def _make_stub(interface: type[Interface]) -> type[Any]:
    by_code = {spec.code: spec for spec in interface.METHODS}

    def on_transact(self: Binder, code: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        spec = by_code.get(code)
        if spec is None:
            raise UnknownTransactionError(
                f"{interface.DESCRIPTOR} has no method with transaction code {code}"
            )
        implementation = getattr(self, spec.name)
        if getattr(implementation, "__func__", None) is spec.declaration:
            raise NotImplementedError(f"{type(self).__qualname__} does not implement {spec.name}")
        return implementation(*args, **kwargs)

    namespace = {
        "__doc__": f"Serve {interface.DESCRIPTOR}: subclass and implement its methods.",
        "__module__": interface.__module__,
        "__qualname__": f"{interface.__qualname__}.Stub",
        "on_transact": on_transact,
    }
    return type("Stub", (interface, Binder), namespace)


def _make_proxy(interface: type[Interface]) -> type[Any]:
    namespace: dict[str, Any] = {
        "__doc__": f"Calls {interface.DESCRIPTOR} in another process; one transaction per call.",
        "__module__": interface.__module__,
        "__qualname__": f"{interface.__qualname__}.Proxy",
    }
    for spec in interface.METHODS:
        namespace[spec.name] = _proxy_method(interface.DESCRIPTOR, spec)
    return type("Proxy", (interface, ProxyBase), namespace)


def _proxy_method(descriptor: str, spec: MethodSpec) -> Callable[..., Any]:
    code, flags = spec.code, TF_ONE_WAY if spec.oneway else 0

    @functools.wraps(spec.declaration)
    def call(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
        return self.binder.call(code, descriptor, list(args), kwargs, flags)

    return call
