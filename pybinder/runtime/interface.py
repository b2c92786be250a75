"""Interfaces: ``class ICalc(pybinder.Interface)`` with ``@method`` and ``@oneway``
declarations, from which a Stub base and a Proxy class are generated (what AIDL
generates in Android).

Transaction codes follow declaration order from FIRST_CALL_TRANSACTION (1), a
subinterface's methods after its base's; ``@method(code=N)`` pins a code, as an AIDL
method's ``= N`` does, so that methods can later be added anywhere without moving
the others. Each interface also gets a hash of its method table (AIDL's
``getInterfaceHash``), which :meth:`Interface.from_service` compares with the
server's (through INTERFACE_TRANSACTION) to refuse a server whose codes mean other
methods.

Parameter and return annotations naming an interface (``listener: IListener``,
``-> IListener | None``) are checked and converted when the call crosses a process:
a reference to a node arrives as that interface's Proxy, and a reference to a node of
another interface is refused with InterfaceMismatchError (the interface check AIDL's
generated ``asInterface`` and ``enforceInterface`` make).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import types
import typing
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, overload

from pybinder.errors import (
    DeadlineExceededError,
    InterfaceMismatchError,
    ProtocolError,
    SecurityError,
    UnknownTransactionError,
)
from pybinder.parcel import MAX_DESCRIPTOR
from pybinder.protocol import (
    FIRST_CALL_TRANSACTION,
    INTERFACE_TRANSACTION,
    LAST_CALL_TRANSACTION,
    TF_ONE_WAY,
)
from pybinder.runtime.binder import Binder, BinderProxy, ProxyBase

F = TypeVar("F", bound=Callable[..., Any])
I = TypeVar("I", bound="Interface")  # noqa: E741

_KIND = "__pybinder_kind__"
_CODE = "__pybinder_code__"

#: Attributes of a BinderProxy (set in its ``__dict__``) where interfaces keep state.
_PROXIES_ATTR = "_interface_proxies"  # {interface: its Proxy of this handle}, weakly
_CHECKED_ATTR = "_checked_interfaces"  # {interface: (server's descriptor, methods it lacks)}

_registry: dict[str, type[Interface]] = {}
_interface_of_type: dict[type, type[Interface] | None] = {}


# -- declaring methods -----------------------------------------------------------------


@overload
def method(function: F, /) -> F: ...
@overload
def method(*, code: int | None = None) -> Callable[[F], F]: ...
def method(function: Any = None, /, *, code: int | None = None) -> Any:
    """Declare a two-way method of an :class:`Interface`: the caller waits for its result.

    Use as ``@method`` (the code follows the previous method's) or ``@method(code=N)``
    (the code is N, as AIDL's ``int mul(int a, int b) = N;``).

    Args:
        function: the declaration (given when used without parentheses).
        code: the transaction code to pin, in [FIRST_CALL_TRANSACTION,
            LAST_CALL_TRANSACTION]; checked when the interface class is defined.

    Raises:
        TypeError: ``code`` is not an int.
    """
    return _declare("method", function, code)


@overload
def oneway(function: F, /) -> F: ...
@overload
def oneway(*, code: int | None = None) -> Callable[[F], F]: ...
def oneway(function: Any = None, /, *, code: int | None = None) -> Any:
    """Declare a oneway method (TF_ONE_WAY): the caller does not wait and gets None.

    Oneway calls to one object run one at a time, in the order they were sent. Use as
    ``@oneway`` or ``@oneway(code=N)``, like :func:`method`.

    Raises:
        TypeError: ``code`` is not an int.
    """
    return _declare("oneway", function, code)


def _declare(kind: str, function: Any, code: int | None) -> Any:
    if code is not None and (type(code) is not int):
        raise TypeError(f"@{kind}(code=...) needs an int, not {code!r}")

    def mark(declaration: F) -> F:
        if not callable(declaration):
            raise TypeError(f"@{kind} decorates a function, not {declaration!r}")
        setattr(declaration, _KIND, kind)
        setattr(declaration, _CODE, code)
        return declaration

    return mark if function is None else mark(function)


class MethodSpec:
    """One declared method: its name, transaction code, whether it is oneway, and the
    declaration (the function in the interface's class body)."""

    __slots__ = ("_typing", "code", "declaration", "name", "oneway")

    def __init__(self, name: str, code: int, oneway: bool, declaration: Callable[..., Any]) -> None:
        self.name = name
        self.code = code
        self.oneway = oneway
        self.declaration = declaration
        self._typing: _MethodTyping | bool | None = False  # False: not resolved yet

    def interface_typing(self) -> _MethodTyping | None:
        """Which parameters and whether the result are interface-typed, or None if
        none is (or the annotations cannot be resolved). Resolved on first use
        (annotations may name interfaces defined later in the module) and cached."""
        resolved = self._typing
        if resolved is False:
            resolved = self._typing = _resolve_typing(self.declaration)
        return resolved  # type: ignore[return-value]

    def __repr__(self) -> str:
        kind = "oneway" if self.oneway else "method"
        return f"<{kind} {self.name} code={self.code}>"


# -- interfaces -------------------------------------------------------------------------


class Interface:
    """Base of every pybinder interface.

    A subclass that sets ``DESCRIPTOR`` (a unique string, e.g. ``"example.ICalc"``)
    gets two generated classes:

    - ``ICalc.Stub``: subclass it and implement the methods to serve the interface;
    - ``ICalc.Proxy``: what ``get_service(name, ICalc)`` returns; each method call is
      a transaction.

    Such a class is registered under its DESCRIPTOR (see :func:`interface_for`).

    Attributes:
        METHODS: the declared methods, in transaction-code order.
        HASH: the first 16 hex digits of the sha256 of :meth:`method_table` (AIDL's
            interface hash); equal tables give equal hashes in every process.
    """

    DESCRIPTOR: ClassVar[str]
    METHODS: ClassVar[tuple[MethodSpec, ...]] = ()
    HASH: ClassVar[str] = ""
    if TYPE_CHECKING:
        # What a type checker sees of the generated classes. ``ICalc.Stub`` is made
        # when ICalc is defined (a subclass of ICalc and Binder), which a type checker
        # cannot follow; to it, every interface's Stub is this one class, whose unknown
        # base (Any) lets ``class Calc(ICalc.Stub)`` pass where an ICalc is expected
        # (for its methods checked against ICalc's, write ``class Calc(ICalc.Stub,
        # ICalc)``). A Proxy is what get_service(name, ICalc) returns, typed ICalc.

        class Stub(Interface, Binder, Any):  # type: ignore[misc]  # noqa: F821
            """Serve the interface: subclass and implement its methods."""

        class Proxy(Interface, ProxyBase, Any):  # type: ignore[misc]  # noqa: F821
            """Calls the interface in another process; one transaction per call."""

    else:
        Stub: ClassVar[type[Any]]
        Proxy: ClassVar[type[Any]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Collect the methods and generate Stub and Proxy for a class that sets DESCRIPTOR.

        Raises:
            TypeError: DESCRIPTOR is not a non-empty str of at most 255 UTF-8 bytes,
                two methods have one code, a code is outside [FIRST_CALL_TRANSACTION,
                LAST_CALL_TRANSACTION], or a method takes a reserved name.
        """
        super().__init_subclass__(**kwargs)
        if "DESCRIPTOR" not in cls.__dict__:
            return  # an implementation (Calc(ICalc.Stub)) or a generated class
        _check_descriptor(cls)
        cls.METHODS = _collect_methods(cls)
        cls.HASH = _table_hash(cls.method_table())
        cls.Stub = _make_stub(cls)  # type: ignore[misc]
        cls.Proxy = _make_proxy(cls)  # type: ignore[misc]
        _register(cls)

    @classmethod
    def method_table(cls) -> list[list[Any]]:
        """``[[code, name, oneway], ...]`` sorted by code: what INTERFACE_TRANSACTION
        answers for this interface, and what :attr:`HASH` hashes."""
        return [[spec.code, spec.name, spec.oneway] for spec in cls.METHODS]

    @classmethod
    def as_interface(cls: type[I], binder: Any) -> I:
        """View a binder object as this interface (libbinder's interface_cast), unchecked.

        A local object that implements the interface is returned as is (calls stay in
        process, as ``queryLocalInterface``); a :class:`BinderProxy` (or another
        interface's proxy of one) is wrapped in ``cls.Proxy``, one per handle.

        Raises:
            TypeError: ``binder`` is neither.
        """
        if isinstance(binder, cls):
            return binder
        if isinstance(binder, ProxyBase):
            binder = binder.binder
        if isinstance(binder, BinderProxy):
            return _proxy_for(binder, cls)
        raise TypeError(f"{binder!r} is not a binder object implementing {cls.DESCRIPTOR}")

    @classmethod
    def from_service(cls: type[I], binder: Any) -> I:
        """:meth:`as_interface` after checking that the node speaks this interface, as
        ``get_service(name, ICalc)`` returns it.

        A remote node is asked once per handle and interface for its interface
        (INTERFACE_TRANSACTION, as ``IBinder.getInterfaceDescriptor`` plus AIDL's
        ``getInterfaceHash``). Its descriptor must be this interface's or a registered
        subinterface's. If the hashes differ, every code both tables have must name
        the same method, oneway or not alike; methods only one side has are fine (a
        newer server's appended methods, or ones this caller has and the older server
        lacks: calling those raises UnknownTransactionError without a transaction).
        A node whose runtime does not answer INTERFACE_TRANSACTION is not checked.

        Raises:
            InterfaceMismatchError: the node implements another interface, or a code
                means another method there (methods were inserted or reordered).
            TypeError: ``binder`` is not a binder object implementing this interface.
            ProtocolError: the node's answer is malformed.
            DeadObjectError, BinderError: the check's transaction failed.
        """
        remote = binder.binder if isinstance(binder, ProxyBase) else binder
        if not isinstance(remote, BinderProxy):
            return cls.as_interface(binder)
        checked: dict[type[Interface], tuple[str, tuple[MethodSpec, ...]]]
        checked = remote.__dict__.setdefault(_CHECKED_ATTR, {})
        proxy = _proxy_for(remote, cls)
        if cls not in checked:
            server_descriptor, missing = _check_remote(cls, remote)
            checked[cls] = (server_descriptor, missing)
            _disable_missing(proxy, cls, missing, server_descriptor)
        return proxy


def check_successor(stale: BinderProxy, successor: BinderProxy) -> None:
    """Check ``successor`` (a service found again by name after a reconnect) against
    every interface ``stale`` was checked against (:meth:`Interface.from_service`):
    the server that came back may run another version.

    Raises:
        InterfaceMismatchError: it no longer agrees with one of them.
    """
    for interface in list(stale.__dict__.get(_CHECKED_ATTR, ())):
        interface.from_service(successor)


def interface_for(descriptor: str) -> type[Interface] | None:
    """The interface class registered under ``descriptor`` in this process, or None.

    Every :class:`Interface` subclass that sets DESCRIPTOR registers when it is
    defined, replacing an earlier class of that descriptor (as a module reloaded
    does), unless it extends that class: a subclass that keeps its base's
    DESCRIPTOR is a variant of the base's interface (say, as a newer client knows
    it), and the base stays the one references of that descriptor arrive as.
    """
    return _registry.get(descriptor) if type(descriptor) is str else None


def _register(cls: type[Interface]) -> None:
    registered = _registry.get(cls.DESCRIPTOR)
    if registered is None or not issubclass(cls, registered):
        _registry[cls.DESCRIPTOR] = cls


def typed(proxy: BinderProxy) -> Any:
    """``I.Proxy`` of ``proxy`` if its descriptor (the one the sender gave for the
    node) names a registered interface I, else ``proxy`` itself.

    One Proxy exists per handle and interface while it is referenced, so two
    deliveries of one node give the same object (as libbinder keeps one BpBinder and
    one interface per node). Not checked: the descriptor is the node's own.
    """
    interface = interface_for(getattr(proxy, "descriptor", "") or "")
    if interface is None:
        return proxy
    return _proxy_for(proxy, interface)


def _check_descriptor(cls: type[Interface]) -> None:
    descriptor = cls.__dict__["DESCRIPTOR"]
    if not isinstance(descriptor, str) or not descriptor:
        raise TypeError(f"{cls.__qualname__}.DESCRIPTOR must be a non-empty str")
    try:
        size = len(descriptor.encode())
    except UnicodeEncodeError:
        raise TypeError(f"{cls.__qualname__}.DESCRIPTOR is not valid UTF-8 text") from None
    if size > MAX_DESCRIPTOR:
        raise TypeError(
            f"{cls.__qualname__}.DESCRIPTOR is {size} UTF-8 bytes; at most {MAX_DESCRIPTOR}"
        )


@functools.cache
def _reserved_names() -> frozenset[str]:
    """Names a method may not take: the interface's own attributes, and those every
    call goes through (a Stub's dispatch and on_transact, a Proxy's binder). It may
    hide ProxyBase's lifetime methods (close...), which stay on the BinderProxy."""
    names = {"binder", "dispatch", "on_transact", *dir(Interface)}
    return frozenset(name for name in names if not name.startswith("__"))


def _collect_methods(cls: type[Interface]) -> tuple[MethodSpec, ...]:
    names: list[str] = []
    kinds: dict[str, str] = {}
    pins: dict[str, int] = {}
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
            pin = getattr(value, _CODE, None)
            if pin is not None:  # an unpinned override keeps its base's pin
                pins[name] = pin
    specs: list[MethodSpec] = []
    owners: dict[int, str] = {}
    code = FIRST_CALL_TRANSACTION - 1
    for name in names:
        where = f"{cls.__qualname__}.{name}"
        if name in _reserved_names():
            raise TypeError(f"{where}: {name!r} is reserved by the generated Stub and Proxy")
        code = pins.get(name, code + 1)
        if not FIRST_CALL_TRANSACTION <= code <= LAST_CALL_TRANSACTION:
            raise TypeError(
                f"{where}: transaction code {code} is outside "
                f"[{FIRST_CALL_TRANSACTION}, {LAST_CALL_TRANSACTION:#x}]"
            )
        if code in owners:
            raise TypeError(f"{where}: transaction code {code} is already {owners[code]}'s")
        owners[code] = name
        specs.append(MethodSpec(name, code, kinds[name] == "oneway", declarations[name]))
    specs.sort(key=lambda spec: spec.code)
    return tuple(specs)


def _table_hash(table: list[list[Any]]) -> str:
    text = json.dumps(sorted(table), separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# -- the remote check ---------------------------------------------------------------------


def _check_remote(
    interface: type[Interface], remote: BinderProxy
) -> tuple[str, tuple[MethodSpec, ...]]:
    """Compare ``interface`` with the node's; return the node's descriptor and the
    methods of ``interface`` it lacks. See :meth:`Interface.from_service`."""
    try:
        answer = remote.transact(INTERFACE_TRANSACTION)
    except UnknownTransactionError:
        return interface.DESCRIPTOR, ()  # a runtime that predates the check
    except SecurityError:
        return interface.DESCRIPTOR, ()  # found, not callable: every call is refused anyway
    try:
        descriptor, server_hash, table = answer
        server: dict[int, tuple[str, bool]] = {}
        for code, name, is_oneway in table:
            if type(code) is not int or type(name) is not str or type(is_oneway) is not bool:
                raise ValueError(f"bad method entry {[code, name, is_oneway]!r}")
            server[code] = (name, is_oneway)
        if type(descriptor) is not str or type(server_hash) is not str:
            raise ValueError("descriptor and hash must be str")
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed INTERFACE_TRANSACTION answer: {exc}") from None
    if descriptor != interface.DESCRIPTOR:
        sub = interface_for(descriptor)
        if sub is None or not issubclass(sub, interface):
            raise InterfaceMismatchError(
                f"the service implements {descriptor!r}, not {interface.DESCRIPTOR!r}"
            )
    if server_hash == interface.HASH:
        return descriptor, ()
    missing: list[MethodSpec] = []
    for spec in interface.METHODS:  # in code order: the first difference is named
        theirs = server.get(spec.code)
        if theirs is None:
            missing.append(spec)
            continue
        name, is_oneway = theirs
        where = f"{interface.DESCRIPTOR}.{spec.name} (code {spec.code})"
        if name != spec.name:
            raise InterfaceMismatchError(
                f"{where} is {name!r} in the server's {descriptor}: methods were inserted "
                "or reordered; pin codes with @method(code=N)"
            )
        if is_oneway != spec.oneway:
            mine, other = ("oneway", "two-way") if spec.oneway else ("two-way", "oneway")
            raise InterfaceMismatchError(
                f"{where} is {mine} here but {other} in the server's {descriptor}"
            )
    return descriptor, tuple(missing)


def _missing_message(interface: type[Interface], spec: MethodSpec, server: str) -> str:
    return (
        f"{interface.DESCRIPTOR}.{spec.name}: the server's {server} has no such method "
        f"(code {spec.code}); it is older than this client"
    )


def _disable_missing(
    proxy: Any, interface: type[Interface], missing: tuple[MethodSpec, ...], server: str
) -> None:
    """Make each of ``missing`` raise UnknownTransactionError on ``proxy`` without a
    transaction (an instance attribute hides the class's method: no cost elsewhere)."""
    for spec in missing:
        message = _missing_message(interface, spec, server)

        def absent(*args: Any, _message: str = message, **kwargs: Any) -> Any:
            raise UnknownTransactionError(_message)

        proxy.__dict__[spec.name] = functools.wraps(spec.declaration)(absent)


def _proxy_for(remote: BinderProxy, interface: type[I]) -> I:
    """The one ``interface.Proxy`` of ``remote`` (while referenced), with the methods
    :meth:`Interface.from_service` found missing disabled.

    Held weakly by the BinderProxy: a strong reference back would make a cycle, and
    the handle would be released only by the cycle collector.
    """
    proxies: weakref.WeakValueDictionary[type[Interface], Any] | None
    proxies = remote.__dict__.get(_PROXIES_ATTR)
    if proxies is None:
        proxies = remote.__dict__.setdefault(_PROXIES_ATTR, weakref.WeakValueDictionary())
    proxy = proxies.get(interface)
    if proxy is None:
        proxy = interface.Proxy(remote)
        checked = remote.__dict__.get(_CHECKED_ATTR, {}).get(interface)
        if checked is not None:
            _disable_missing(proxy, interface, checked[1], checked[0])
        proxy = proxies.setdefault(interface, proxy)
    return proxy  # type: ignore[no-any-return]


# -- interface-typed parameters and results ----------------------------------------------


class _MethodTyping:
    """A method's interface-typed parameters and result (see :func:`_resolve_typing`).

    Attributes:
        params: ``(position or -1, keyword name or "", interface, allows None)`` per
            interface-typed parameter (position: among the arguments after self).
        result: ``(interface, allows None)`` or None if the result is not one.
    """

    __slots__ = ("params", "result")

    def __init__(
        self,
        params: tuple[tuple[int, str, type[Interface], bool], ...],
        result: tuple[type[Interface], bool] | None,
    ) -> None:
        self.params = params
        self.result = result


def _resolve_typing(declaration: Callable[..., Any]) -> _MethodTyping | None:
    try:
        hints = typing.get_type_hints(declaration)
        parameters = list(inspect.signature(declaration).parameters.values())[1:]  # self
    except Exception:
        return None  # an annotation that does not resolve: annotations are ignored
    params = []
    for position, parameter in enumerate(parameters):
        kind = parameter.kind
        if kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        found = _interface_hint(hints.get(parameter.name))
        if found is None:
            continue
        index = -1 if kind == parameter.KEYWORD_ONLY else position
        keyword = "" if kind == parameter.POSITIONAL_ONLY else parameter.name
        params.append((index, keyword, found[0], found[1]))
    result = _interface_hint(hints.get("return"))
    if not params and result is None:
        return None
    return _MethodTyping(tuple(params), result)


def _interface_hint(hint: Any) -> tuple[type[Interface], bool] | None:
    """``(interface, allows None)`` for ``I``, ``I | None`` or ``Optional[I]``, else None."""
    if hint is None:
        return None
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        members = typing.get_args(hint)
        others = [member for member in members if member is not type(None)]
        if len(others) != 1:
            return None
        interface = _declared_interface(others[0])
        return None if interface is None else (interface, len(others) < len(members))
    interface = _declared_interface(hint)
    return None if interface is None else (interface, False)


def _declared_interface(kind: Any) -> type[Interface] | None:
    """The interface a class is or serves: the first Interface in its MRO that sets
    DESCRIPTOR (``ICalc`` for ICalc, ICalc.Stub, ICalc.Proxy or an implementation)."""
    if not isinstance(kind, type):
        return None
    try:
        return _interface_of_type[kind]
    except KeyError:
        pass
    found = None
    if issubclass(kind, Interface):
        for klass in kind.__mro__:
            if "DESCRIPTOR" in klass.__dict__ and issubclass(klass, Interface):
                found = klass
                break
    _interface_of_type[kind] = found
    return found


def _interface_of(obj: Any) -> type[Interface] | None:
    """The interface a binder object implements, if this process knows it: a Stub's
    or Proxy's interface, or the registered interface of a BinderProxy's descriptor."""
    if isinstance(obj, BinderProxy):
        return interface_for(getattr(obj, "descriptor", "") or "")
    return _declared_interface(type(obj))


def _implements(found: type[Interface], interface: type[Interface]) -> bool:
    return issubclass(found, interface) or found.DESCRIPTOR == interface.DESCRIPTOR


def _check_argument(value: Any, interface: type[Interface], where: str) -> None:
    """Caller side: refuse a binder object known to implement another interface.

    Raises:
        InterfaceMismatchError: it does.
    """
    if isinstance(value, (Binder, ProxyBase, BinderProxy)):
        found = _interface_of(value)
        if found is not None and not _implements(found, interface):
            raise InterfaceMismatchError(
                f"{where} must implement {interface.DESCRIPTOR}, not {found.DESCRIPTOR}"
            )


def _convert(value: Any, interface: type[Interface], where: str) -> Any:
    """A received binder object as ``interface``: a remote one as its Proxy (a node
    whose descriptor is unknown is taken to implement it), a local one as is.

    Raises:
        InterfaceMismatchError: the object implements another interface.
    """
    if isinstance(value, ProxyBase):
        if isinstance(value, interface):
            return value
        value = value.binder
    if isinstance(value, BinderProxy):
        descriptor = getattr(value, "descriptor", "") or ""
        if not descriptor or descriptor == interface.DESCRIPTOR:
            return _proxy_for(value, interface)
        found = interface_for(descriptor)
        if found is None:
            return _proxy_for(value, interface)  # a descriptor this process does not know
        if issubclass(found, interface):
            return _proxy_for(value, found)
        raise InterfaceMismatchError(
            f"{where} must implement {interface.DESCRIPTOR}, not {descriptor}"
        )
    if isinstance(value, Binder):
        _check_argument(value, interface, where)
    return value


def _convert_result(value: Any, interface: type[Interface], allows_none: bool, where: str) -> Any:
    """The caller's result of a method returning ``interface`` (see :func:`_convert`).

    Raises:
        InterfaceMismatchError: it implements another interface.
        TypeError: it is no binder object (None where the annotation allows it passes).
    """
    if value is None and allows_none:
        return None
    if not isinstance(value, (Binder, ProxyBase, BinderProxy)):
        kind = "None" if value is None else type(value).__qualname__
        raise TypeError(
            f"{where} returned {kind}, not a binder implementing {interface.DESCRIPTOR}"
        )
    return _convert(value, interface, where)


# -- generated classes ---------------------------------------------------------------------


def _make_stub(interface: type[Interface]) -> type[Any]:
    # code -> (spec, converter); the converter is None for a method without
    # interface-typed parameters, and a resolver until the first call.
    by_code: dict[int, tuple[MethodSpec, Any]] = {}
    for spec in interface.METHODS:
        by_code[spec.code] = (spec, _stub_resolver(interface, spec, by_code))

    def on_transact(self: Binder, code: int, args: list[Any], kwargs: dict[str, Any]) -> Any:
        entry = by_code.get(code)
        if entry is None:
            raise UnknownTransactionError(
                f"{interface.DESCRIPTOR} has no method with transaction code {code}"
            )
        spec, convert = entry
        implementation = getattr(self, spec.name)
        if getattr(implementation, "__func__", None) is spec.declaration:
            raise NotImplementedError(f"{type(self).__qualname__} does not implement {spec.name}")
        if convert is not None:
            convert(args, kwargs)
        return implementation(*args, **kwargs)

    namespace = {
        "__doc__": f"Serve {interface.DESCRIPTOR}: subclass and implement its methods.",
        "__module__": interface.__module__,
        "__qualname__": f"{interface.__qualname__}.Stub",
        "on_transact": on_transact,
    }
    return type("Stub", (interface, Binder), namespace)


def _stub_resolver(
    interface: type[Interface], spec: MethodSpec, by_code: dict[int, tuple[MethodSpec, Any]]
) -> Callable[[list[Any], dict[str, Any]], None]:
    """The first call's converter: resolves the annotations, installs the converter
    they need (or none) for later calls, and converts this call's arguments."""

    def resolve(args: list[Any], kwargs: dict[str, Any]) -> None:
        method_typing = spec.interface_typing()
        params = method_typing.params if method_typing is not None else ()
        convert = _stub_converter(interface, spec, params) if params else None
        by_code[spec.code] = (spec, convert)
        if convert is not None:
            convert(args, kwargs)

    return resolve


def _stub_converter(
    interface: type[Interface],
    spec: MethodSpec,
    params: tuple[tuple[int, str, type[Interface], bool], ...],
) -> Callable[[list[Any], dict[str, Any]], None]:
    def convert(args: list[Any], kwargs: dict[str, Any]) -> None:
        for index, keyword, expected, _ in params:
            where = f"{interface.DESCRIPTOR}.{spec.name}: argument {keyword or index!r}"
            if 0 <= index < len(args):
                args[index] = _convert(args[index], expected, where)
            elif keyword and keyword in kwargs:
                kwargs[keyword] = _convert(kwargs[keyword], expected, where)

    return convert


def _make_proxy(interface: type[Interface]) -> type[Any]:
    def __eq__(self: ProxyBase, other: object) -> bool:
        if isinstance(other, ProxyBase):
            return self.binder is other.binder
        if isinstance(other, BinderProxy):
            return self.binder is other
        return NotImplemented

    def __hash__(self: ProxyBase) -> int:
        return hash(self.binder)

    namespace: dict[str, Any] = {
        "__doc__": f"Calls {interface.DESCRIPTOR} in another process; one transaction per call.",
        "__module__": interface.__module__,
        "__qualname__": f"{interface.__qualname__}.Proxy",
        "__eq__": __eq__,
        "__hash__": __hash__,
    }
    for spec in interface.METHODS:
        namespace[spec.name] = _proxy_method(interface, spec)
    return type("Proxy", (interface, ProxyBase), namespace)


def _proxy_method(interface: type[Interface], spec: MethodSpec) -> Callable[..., Any]:
    """The Proxy's method for ``spec``: its first call resolves the annotations and
    puts the plain or the checking call in the Proxy class for later calls."""
    plain = _plain_call(interface, spec)

    @functools.wraps(spec.declaration)
    def first_call(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
        method_typing = spec.interface_typing()
        call = plain if method_typing is None else _checked_call(interface, spec, method_typing)
        setattr(interface.Proxy, spec.name, functools.wraps(spec.declaration)(call))
        return call(self, *args, **kwargs)

    return first_call


def _plain_call(interface: type[Interface], spec: MethodSpec) -> Callable[..., Any]:
    descriptor, code, flags = interface.DESCRIPTOR, spec.code, TF_ONE_WAY if spec.oneway else 0

    def call(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.binder.call(code, descriptor, list(args), kwargs, flags)
        except UnknownTransactionError as exc:
            server = getattr(self.binder, "descriptor", "") or descriptor
            raise UnknownTransactionError(_missing_message(interface, spec, server)) from exc
        except DeadlineExceededError as exc:  # name the method, not just its code
            raise DeadlineExceededError(f"{descriptor}.{spec.name}: {exc}") from None

    return call


def _checked_call(
    interface: type[Interface], spec: MethodSpec, method_typing: _MethodTyping
) -> Callable[..., Any]:
    plain = _plain_call(interface, spec)
    params = method_typing.params
    result = None if spec.oneway else method_typing.result
    name = f"{interface.DESCRIPTOR}.{spec.name}"

    def call(self: ProxyBase, *args: Any, **kwargs: Any) -> Any:
        for index, keyword, expected, _ in params:
            if 0 <= index < len(args):
                _check_argument(args[index], expected, f"{name}: argument {keyword or index!r}")
            elif keyword and keyword in kwargs:
                _check_argument(kwargs[keyword], expected, f"{name}: argument {keyword!r}")
        value = plain(self, *args, **kwargs)
        if result is None:
            return value
        return _convert_result(value, result[0], result[1], f"{name}()")

    return call
