"""Interfaces: pinned transaction codes, the interface hash and registry, the
runtime's reserved transactions, the compatibility check of ``from_service``, and
interface-typed parameters and results.

Most tests need no broker: :class:`FakeProxy` carries calls to a local Stub through
:func:`run_call` as a process would, turning binder objects into handles on the way.
The last ones run a server process with another version of an interface."""

from __future__ import annotations

from typing import Any, Optional

import pytest
from peers import calc_interface, calc_stub, start_calc

import pybinder
from pybinder import protocol
from pybinder.errors import InterfaceMismatchError, UnknownTransactionError
from pybinder.protocol import (
    FIRST_CALL_TRANSACTION,
    INTERFACE_TRANSACTION,
    LAST_CALL_TRANSACTION,
    PING_TRANSACTION,
    REPLY_BINDER_ERROR,
    REPLY_OK,
)
from pybinder.runtime.binder import Binder, BinderProxy, ProxyBase, run_call, unpack_reply
from pybinder.runtime.interface import (
    Interface,
    _convert_result,
    _interface_of,
    interface_for,
    method,
    oneway,
    typed,
)

# -- interfaces of these tests ------------------------------------------------------------


class IListener(Interface):
    DESCRIPTOR = "tests.interfaces.IListener"

    @method
    def on_event(self, value: int) -> int: ...


class ILoudListener(IListener):
    DESCRIPTOR = "tests.interfaces.ILoudListener"

    @method
    def shout(self) -> str: ...


class IOther(Interface):
    DESCRIPTOR = "tests.interfaces.IOther"

    @method
    def other(self) -> None: ...


class IHub(Interface):
    """Interface-typed parameters and results; the annotations are strings here."""

    DESCRIPTOR = "tests.interfaces.IHub"

    @method
    def register(self, listener: IListener) -> int: ...

    @method
    def maybe(self, listener: IListener | None = None) -> bool: ...

    @method
    def optional(self, listener: Optional[IListener]) -> bool: ...  # noqa: UP045

    @method
    def keyword(self, *, listener: IListener) -> bool: ...

    @method
    def listener(self, which: str) -> IListener: ...

    @method
    def maybe_listener(self, which: str) -> IListener | None: ...

    @method
    def plain(self, value: Any) -> Any: ...

    @method
    def unresolvable(self, listener: NoSuchName) -> IListener: ...  # type: ignore[name-defined]  # noqa: F821

    @oneway
    def notify(self, listener: IListener) -> None: ...


class Listener(IListener.Stub):
    def on_event(self, value: int) -> int:
        return value + 1


class LoudListener(ILoudListener.Stub):
    def on_event(self, value: int) -> int:
        return -value

    def shout(self) -> str:
        return "HEY"


class Other(IOther.Stub):
    def other(self) -> None:
        return None


class Hub(IHub.Stub):
    """Records what each argument arrived as."""

    def __init__(self) -> None:
        self.received: list[Any] = []
        self.listeners: dict[str, Any] = {}

    def register(self, listener: Any) -> int:
        self.received.append(listener)
        return int(listener.on_event(41))

    def maybe(self, listener: Any = None) -> bool:
        self.received.append(listener)
        return listener is None

    def optional(self, listener: Any) -> bool:
        self.received.append(listener)
        return listener is None

    def keyword(self, *, listener: Any) -> bool:
        self.received.append(listener)
        return True

    def listener(self, which: str) -> Any:
        return self.listeners[which]

    def maybe_listener(self, which: str) -> Any:
        return self.listeners.get(which)

    def plain(self, value: Any) -> Any:
        self.received.append(value)
        return value

    def unresolvable(self, listener: Any) -> Any:
        self.received.append(listener)
        return listener

    def notify(self, listener: Any) -> None:
        self.received.append(listener)


# -- a process boundary without a broker ----------------------------------------------------


class FakeProxy(BinderProxy):
    """A BinderProxy whose node is a local object: each call goes through run_call as
    in the node's process, and binder objects cross as they would between processes
    (a local object becomes a handle with its DESCRIPTOR, a handle stays one; both
    are decoded with typed())."""

    def __init__(self, target: Binder, descriptor: str | None = None) -> None:  # no super()
        self.process: Any = None
        self.handle = id(target)
        self.target = target
        self.descriptor = target.DESCRIPTOR if descriptor is None else descriptor
        self.codes: list[int] = []

    def call(
        self, code: int, descriptor: str, args: list[Any], kwargs: dict[str, Any], flags: int
    ) -> Any:
        self.codes.append(code)
        reply = run_call(self.target, code, cross([descriptor, args, kwargs]))
        if flags & protocol.TF_ONE_WAY:
            return None
        return unpack_reply(cross(reply))


_handles: dict[int, FakeProxy] = {}


def handle_of(binder: Binder, descriptor: str | None = None) -> FakeProxy:
    """The one FakeProxy of ``binder`` (one handle per node, as a process has)."""
    key = id(binder) if descriptor is None else hash((id(binder), descriptor))
    if key not in _handles:
        _handles[key] = FakeProxy(binder, descriptor)
    return _handles[key]


def cross(value: Any) -> Any:
    """``value`` as the other process decodes it (typed() for every handle)."""
    if isinstance(value, Binder):
        return typed(handle_of(value))
    if isinstance(value, ProxyBase):
        value = value.binder
    if isinstance(value, FakeProxy):  # to a process other than the node's
        return typed(value)
    if isinstance(value, list):
        return [cross(item) for item in value]
    if isinstance(value, dict):
        return {key: cross(item) for key, item in value.items()}
    return value


@pytest.fixture
def hub() -> Hub:
    return Hub()


@pytest.fixture
def remote_hub(hub: Hub) -> Any:
    return IHub.Proxy(handle_of(hub))


# -- transaction codes -----------------------------------------------------------------------


def test_plain_decorators_number_methods_in_definition_order_base_first():
    assert [(m.name, m.code, m.oneway) for m in ILoudListener.METHODS] == [
        ("on_event", FIRST_CALL_TRANSACTION, False),
        ("shout", FIRST_CALL_TRANSACTION + 1, False),
    ]
    assert IHub.METHODS[-1].name == "notify" and IHub.METHODS[-1].oneway


def test_pinned_codes_and_the_unpinned_methods_after_them():
    class IPinned(Interface):
        DESCRIPTOR = "tests.interfaces.IPinned"

        @method
        def a(self) -> None: ...

        @method(code=10)
        def b(self) -> None: ...

        @oneway
        def c(self) -> None: ...

        @oneway(code=5)
        def d(self) -> None: ...

        @method()
        def e(self) -> None: ...

    assert [(m.name, m.code, m.oneway) for m in IPinned.METHODS] == [
        ("a", 1, False),
        ("d", 5, True),
        ("e", 6, False),
        ("b", 10, False),
        ("c", 11, True),
    ]
    assert IPinned.method_table() == [
        [1, "a", False],
        [5, "d", True],
        [6, "e", False],
        [10, "b", False],
        [11, "c", True],
    ]
    assert [m.declaration.__name__ for m in IPinned.METHODS] == ["a", "d", "e", "b", "c"]


def test_a_subinterface_keeps_its_bases_pins():
    class IBase(Interface):
        DESCRIPTOR = "tests.interfaces.IBase"

        @method(code=7)
        def first(self) -> None: ...

    class ISub(IBase):
        DESCRIPTOR = "tests.interfaces.ISub"

        @method
        def first(self) -> None: ...  # redeclared unpinned: still 7

        @method
        def second(self) -> None: ...

    assert [(m.name, m.code) for m in ISub.METHODS] == [("first", 7), ("second", 8)]


def test_duplicate_codes_are_refused_when_the_class_is_defined():
    with pytest.raises(TypeError, match=r"IDup\.b: transaction code 1 is already a's"):

        class IDup(Interface):
            DESCRIPTOR = "tests.interfaces.IDup"

            @method
            def a(self) -> None: ...

            @method(code=1)
            def b(self) -> None: ...

    with pytest.raises(TypeError, match="transaction code 3"):

        class IDup2(Interface):
            DESCRIPTOR = "tests.interfaces.IDup2"

            @method(code=3)
            def a(self) -> None: ...

            @method(code=2)
            def b(self) -> None: ...

            @method
            def c(self) -> None: ...  # 3 again


@pytest.mark.parametrize("code", [0, -1, LAST_CALL_TRANSACTION + 1, PING_TRANSACTION])
def test_codes_outside_the_call_range_are_refused(code):
    with pytest.raises(TypeError, match="outside"):

        class IOut(Interface):
            DESCRIPTOR = "tests.interfaces.IOut"

            @method(code=code)
            def a(self) -> None: ...


def test_an_unpinned_method_after_the_last_code_is_refused():
    with pytest.raises(TypeError, match="outside"):

        class IFull(Interface):
            DESCRIPTOR = "tests.interfaces.IFull"

            @method(code=LAST_CALL_TRANSACTION)
            def last(self) -> None: ...

            @method
            def one_more(self) -> None: ...


def test_a_code_must_be_an_int():
    with pytest.raises(TypeError, match="int"):
        method(code="1")  # type: ignore[call-overload]
    with pytest.raises(TypeError, match="int"):
        oneway(code=True)


@pytest.mark.parametrize("name", ["binder", "method_table", "from_service", "on_transact"])
def test_names_the_generated_classes_use_are_refused(name):
    def declaration(self: Any) -> None: ...

    with pytest.raises(TypeError, match="reserved"):
        type("IClash", (Interface,), {"DESCRIPTOR": "tests.IClash", name: method(declaration)})


def test_a_method_may_hide_a_proxys_lifetime_method():
    class IClosable(Interface):
        DESCRIPTOR = "tests.interfaces.IClosable"

        @method
        def close(self) -> str: ...

    class Closable(IClosable.Stub):
        def close(self) -> str:
            return "closed remotely"

    assert IClosable.Proxy(FakeProxy(Closable())).close() == "closed remotely"


@pytest.mark.parametrize("descriptor", ["", 7, None, "x" * 256, "é" * 128, "\udc80"])
def test_bad_descriptors_are_type_errors(descriptor):
    with pytest.raises(TypeError, match="DESCRIPTOR"):

        class IBad(Interface):
            DESCRIPTOR = descriptor


def test_a_descriptor_of_255_utf8_bytes_is_fine():
    class ILong(Interface):
        DESCRIPTOR = "é" * 127 + "x"

    assert interface_for("é" * 127 + "x") is ILong


# -- hash and registry ------------------------------------------------------------------------


def _interface(descriptor: str, *entries: tuple[str, int | None, bool]) -> type[Interface]:
    namespace: dict[str, Any] = {"DESCRIPTOR": descriptor}
    for name, code, is_oneway in entries:

        def declaration(self: Any) -> None: ...

        declaration.__name__ = name
        decorate = oneway if is_oneway else method
        namespace[name] = (
            decorate(declaration) if code is None else decorate(code=code)(declaration)
        )
    return type("I", (Interface,), namespace)


def test_the_hash_is_the_tables_and_stable():
    one = _interface("tests.interfaces.H1", ("a", None, False), ("b", None, True))
    same = _interface("tests.interfaces.H2", ("a", 1, False), ("b", 2, True))
    assert one.HASH == same.HASH
    assert len(one.HASH) == 16 and int(one.HASH, 16) >= 0
    # It travels between processes and versions: it must never change for a table.
    assert one.HASH == "b075a6062939a7a5"  # sha256(b'[[1,"a",false],[2,"b",true]]')
    renamed = _interface("tests.interfaces.H3", ("a", None, False), ("c", None, True))
    two_way = _interface("tests.interfaces.H4", ("a", None, False), ("b", None, False))
    moved = _interface("tests.interfaces.H5", ("a", None, False), ("b", 3, True))
    appended = _interface(
        "tests.interfaces.H6", ("a", None, False), ("b", None, True), ("c", None, False)
    )
    hashes = {one.HASH, renamed.HASH, two_way.HASH, moved.HASH, appended.HASH}
    assert len(hashes) == 5


def test_interfaces_register_by_descriptor():
    assert interface_for(IListener.DESCRIPTOR) is IListener
    assert interface_for(ILoudListener.DESCRIPTOR) is ILoudListener
    assert interface_for("tests.interfaces.nothing") is None
    assert interface_for(42) is None  # type: ignore[arg-type]
    assert interface_for(IListener.Stub.DESCRIPTOR) is IListener  # Stubs do not register


def test_a_redefinition_replaces_but_a_variant_of_the_same_descriptor_does_not():
    first = _interface("tests.interfaces.Redefined", ("a", None, False))
    assert interface_for("tests.interfaces.Redefined") is first

    class IVariant(first):  # type: ignore[valid-type,misc]
        DESCRIPTOR = "tests.interfaces.Redefined"

        @method
        def b(self) -> None: ...

    assert interface_for("tests.interfaces.Redefined") is first
    again = _interface("tests.interfaces.Redefined", ("a", None, False))
    assert interface_for("tests.interfaces.Redefined") is again


def test_interface_of_binder_objects():
    assert _interface_of(Listener()) is IListener
    assert _interface_of(LoudListener()) is ILoudListener
    assert _interface_of(IListener.Proxy(handle_of(Listener()))) is IListener
    assert _interface_of(handle_of(Listener())) is IListener
    assert _interface_of(handle_of(Listener(), "")) is None
    assert _interface_of(object()) is None


# -- reserved transactions ---------------------------------------------------------------------


def test_ping_and_interface_are_answered_whatever_the_callers_descriptor():
    hub = Hub()
    for descriptor in ("", "tests.somebody.else", IHub.DESCRIPTOR):
        assert run_call(hub, PING_TRANSACTION, [descriptor, [], {}]) == [REPLY_OK, True]
        reply = run_call(hub, INTERFACE_TRANSACTION, [descriptor, [], {}])
        assert reply == [REPLY_OK, [IHub.DESCRIPTOR, IHub.HASH, IHub.method_table()]]
    assert hub.received == []


def test_interface_of_a_plain_binder_has_no_hash_or_table():
    class Plain(Binder):
        DESCRIPTOR = "tests.interfaces.Plain"

    assert run_call(Plain(), INTERFACE_TRANSACTION, ["", [], {}]) == [
        REPLY_OK,
        ["tests.interfaces.Plain", "", []],
    ]
    assert run_call(Plain(), PING_TRANSACTION, ["", [], {}]) == [REPLY_OK, True]


def test_other_reserved_codes_are_unknown_transactions():
    reply = run_call(Hub(), LAST_CALL_TRANSACTION + 1, ["", [], {}])
    assert reply[0] == REPLY_BINDER_ERROR
    with pytest.raises(UnknownTransactionError):
        unpack_reply(reply)


def test_ordinary_calls_still_need_the_descriptor():
    reply = run_call(Hub(), FIRST_CALL_TRANSACTION, ["", [None], {}])
    with pytest.raises(InterfaceMismatchError):
        unpack_reply(reply)


def test_a_base_interfaces_proxy_can_call_a_subinterfaces_object():
    loud = IListener.Proxy(handle_of(LoudListener()))
    assert loud.on_event(5) == -5


# -- from_service ------------------------------------------------------------------------------


def test_from_service_returns_a_local_object_as_is():
    listener = Listener()
    assert IListener.from_service(listener) is listener
    with pytest.raises(TypeError):
        IListener.from_service(Other())


def test_from_service_checks_once_per_handle_and_interface():
    remote = FakeProxy(Listener())
    proxy = IListener.from_service(remote)
    assert isinstance(proxy, IListener.Proxy) and proxy.binder is remote
    assert remote.codes == [INTERFACE_TRANSACTION]
    assert IListener.from_service(remote) is proxy
    assert IListener.from_service(proxy) is proxy
    assert remote.codes == [INTERFACE_TRANSACTION]
    assert proxy.on_event(1) == 2


def test_from_service_accepts_a_subinterface_and_refuses_another_interface():
    proxy = IListener.from_service(FakeProxy(LoudListener()))
    assert proxy.on_event(3) == -3
    with pytest.raises(InterfaceMismatchError, match=r"IOther.*IListener"):
        IListener.from_service(FakeProxy(Other()))
    with pytest.raises(InterfaceMismatchError):
        ILoudListener.from_service(FakeProxy(Listener()))  # a base is not enough


def test_an_older_client_and_a_newer_server_interoperate():
    old, new = calc_interface("old"), calc_interface("new")
    calc = old.from_service(FakeProxy(calc_stub(new)))
    assert (calc.add(2, 3), calc.sub(2, 3)) == (5, -1)


def test_a_newer_client_learns_which_methods_an_older_server_lacks():
    old, new = calc_interface("old"), calc_interface("new")
    remote = FakeProxy(calc_stub(old))
    calc = new.from_service(remote)
    assert calc.add(2, 3) == 5
    message = (
        "tests.ICalc.mul: the server's tests.ICalc has no such method (code 3); "
        "it is older than this client"
    )
    with pytest.raises(UnknownTransactionError) as caught:
        calc.mul(2, 3)
    assert str(caught.value) == message
    assert remote.codes == [INTERFACE_TRANSACTION, 1]  # mul was never sent
    # Unchecked (as_interface), the server's answer is reworded alike.
    unchecked = new.Proxy(FakeProxy(calc_stub(old)))
    with pytest.raises(UnknownTransactionError, match="has no such method"):
        unchecked.mul(2, 3)


def test_a_method_inserted_in_the_middle_is_a_mismatch_naming_the_callers_method():
    old, inserted = calc_interface("old"), calc_interface("inserted")
    with pytest.raises(InterfaceMismatchError) as caught:
        old.from_service(FakeProxy(calc_stub(inserted)))
    assert str(caught.value) == (
        "tests.ICalc.sub (code 2) is 'mul' in the server's tests.ICalc: methods were "
        "inserted or reordered; pin codes with @method(code=N)"
    )


def test_a_method_that_became_oneway_is_a_mismatch():
    two_way = _interface("tests.interfaces.Flip", ("a", None, False))
    flipped = _interface("tests.interfaces.Flip", ("a", None, True))

    class Server(flipped.Stub):  # type: ignore[name-defined,misc]
        def a(self) -> None:
            return None

    with pytest.raises(InterfaceMismatchError, match="two-way here but oneway"):
        two_way.from_service(FakeProxy(Server()))


def test_an_older_runtime_without_interface_transaction_is_not_checked():
    class OldRuntime(IListener.Stub):
        def on_event(self, value: int) -> int:
            return value

    remote = FakeProxy(OldRuntime())
    real_call = remote.call

    def call(code: int, *rest: Any) -> Any:
        if code == INTERFACE_TRANSACTION:
            raise UnknownTransactionError("no such transaction")
        return real_call(code, *rest)

    remote.call = call  # type: ignore[method-assign]
    assert IListener.from_service(remote).on_event(7) == 7


# -- typed references -------------------------------------------------------------------------


def test_typed_wraps_a_handle_of_a_registered_interface_once():
    remote = FakeProxy(Listener())
    first = typed(remote)
    assert isinstance(first, IListener.Proxy)
    assert typed(remote) is first
    assert IListener.as_interface(remote) is first
    assert first.on_event(1) == 2


def test_typed_leaves_unknown_handles_alone():
    unknown = FakeProxy(Listener(), "")
    assert typed(unknown) is unknown
    unregistered = FakeProxy(Listener(), "tests.interfaces.nobody")
    assert typed(unregistered) is unregistered


def test_proxies_compare_and_hash_as_their_handle():
    remote = FakeProxy(Listener())
    a, b = IListener.Proxy(remote), IListener.Proxy(remote)
    assert a == b and hash(a) == hash(b)
    assert a == remote and remote == a and hash(a) == hash(remote)
    assert len({a, b, remote}) == 1
    assert a != IListener.Proxy(FakeProxy(Listener()))
    assert a != "handle"


# -- interface-typed parameters and results --------------------------------------------------


def test_a_local_listener_arrives_as_its_proxy(hub, remote_hub):
    listener = Listener()
    assert remote_hub.register(listener) == 42
    (received,) = hub.received
    assert isinstance(received, IListener.Proxy) and received.binder.target is listener


def test_a_subinterfaces_object_is_a_fine_argument(hub, remote_hub):
    assert remote_hub.register(LoudListener()) == -41
    assert isinstance(hub.received[0], ILoudListener.Proxy)


def test_the_caller_refuses_another_interface_and_sends_nothing(remote_hub):
    for wrong in (Other(), IOther.Proxy(handle_of(Other())), handle_of(Other())):
        with pytest.raises(InterfaceMismatchError, match=r"IHub\.register: argument 'listener'"):
            remote_hub.register(wrong)
        with pytest.raises(InterfaceMismatchError, match="IOther"):
            remote_hub.maybe(listener=wrong)
        with pytest.raises(InterfaceMismatchError):
            remote_hub.optional(wrong)
        with pytest.raises(InterfaceMismatchError):
            remote_hub.keyword(listener=wrong)
        with pytest.raises(InterfaceMismatchError):
            remote_hub.notify(wrong)
    assert remote_hub.binder.codes == []


def test_none_and_plain_values_are_not_checked(hub, remote_hub):
    assert remote_hub.maybe() is True
    assert remote_hub.maybe(None) is True
    assert remote_hub.optional(None) is True
    assert remote_hub.plain(Other()) is not None  # not interface-typed: anything goes


def test_the_stub_converts_an_unknown_handle_and_refuses_a_known_other_one(hub):
    listener = Listener()
    call = IHub.METHODS[[m.name for m in IHub.METHODS].index("register")].code
    anonymous = FakeProxy(listener, "")
    assert run_call(hub, call, [IHub.DESCRIPTOR, [anonymous], {}]) == [REPLY_OK, 42]
    assert isinstance(hub.received[-1], IListener.Proxy)
    assert hub.received[-1].binder is anonymous
    reply = run_call(hub, call, [IHub.DESCRIPTOR, [FakeProxy(Other())], {}])
    with pytest.raises(
        InterfaceMismatchError, match=r"must implement tests\.interfaces\.IListener"
    ):
        unpack_reply(reply)
    keyword = IHub.METHODS[[m.name for m in IHub.METHODS].index("keyword")].code
    reply = run_call(hub, keyword, [IHub.DESCRIPTOR, [], {"listener": anonymous}])
    assert reply == [REPLY_OK, True]
    assert isinstance(hub.received[-1], IListener.Proxy)
    # A proxy of another interface of a node without a descriptor is converted too.
    other_view = IOther.Proxy(FakeProxy(listener, ""))
    assert run_call(hub, call, [IHub.DESCRIPTOR, [other_view], {}]) == [REPLY_OK, 42]


def test_results_are_converted_to_the_annotated_interface(hub, remote_hub):
    listener = Listener()
    hub.listeners = {
        "typed": listener,
        "anonymous": FakeProxy(listener, ""),
        "unregistered": FakeProxy(listener, "tests.interfaces.nobody"),
        "loud": LoudListener(),
        "other": Other(),
        "none": None,
        "int": 5,
    }
    got = remote_hub.listener("typed")
    assert isinstance(got, IListener.Proxy) and got.binder.target is listener
    assert remote_hub.listener("typed") is got
    anonymous = remote_hub.listener("anonymous")
    assert isinstance(anonymous, IListener.Proxy) and anonymous.on_event(0) == 1
    assert anonymous.binder is hub.listeners["anonymous"]
    assert isinstance(remote_hub.listener("unregistered"), IListener.Proxy)
    assert isinstance(remote_hub.listener("loud"), ILoudListener.Proxy)
    with pytest.raises(InterfaceMismatchError, match=r"IHub\.listener\(\).*IOther"):
        remote_hub.listener("other")
    assert remote_hub.maybe_listener("none") is None
    with pytest.raises(TypeError, match=r"IHub\.listener\(\) returned None"):
        remote_hub.listener("none")
    with pytest.raises(TypeError, match="returned int"):
        remote_hub.listener("int")


def test_a_local_object_result_is_returned_as_is():
    listener = Listener()
    assert _convert_result(listener, IListener, False, "r") is listener
    loud = LoudListener()
    assert _convert_result(loud, IListener, False, "r") is loud
    with pytest.raises(InterfaceMismatchError):
        _convert_result(Other(), IListener, False, "r")


def test_unresolvable_annotations_are_ignored(hub, remote_hub):
    assert remote_hub.unresolvable(Other()) is not None  # neither checked nor converted
    assert isinstance(hub.received[-1], IOther.Proxy)


def test_methods_without_interface_types_get_the_plain_call(remote_hub):
    plain_spec = next(m for m in IHub.METHODS if m.name == "plain")
    assert plain_spec.interface_typing() is None
    typed_spec = next(m for m in IHub.METHODS if m.name == "register")
    hints = typed_spec.interface_typing()
    assert hints is not None and hints.params == ((0, "listener", IListener, False),)
    optional = next(m for m in IHub.METHODS if m.name == "maybe_listener").interface_typing()
    assert optional is not None and optional.result == (IListener, True)
    remote_hub.plain(1)
    installed = IHub.Proxy.__dict__["plain"]
    assert installed.__name__ == "plain" and installed.__code__.co_name == "call"


# -- between processes --------------------------------------------------------------------------


def test_an_old_client_uses_a_server_with_an_appended_method(cluster, proc):
    start_calc(cluster, "new")
    calc = proc.get_service("calc", calc_interface("old"), timeout=10)
    assert (calc.add(2, 3), calc.sub(2, 3)) == (5, -1)


def test_a_new_client_of_an_old_server_gets_unknown_transaction_naming_the_method(cluster, proc):
    start_calc(cluster, "old")
    calc = proc.get_service("calc", calc_interface("new"), timeout=10)
    assert calc.add(2, 3) == 5
    with pytest.raises(UnknownTransactionError, match=r"^tests\.ICalc\.mul: the server's"):
        calc.mul(2, 3)


def test_a_method_inserted_in_the_middle_fails_at_get_service(cluster, proc):
    start_calc(cluster, "inserted")
    with pytest.raises(InterfaceMismatchError, match=r"tests\.ICalc\.sub \(code 2\) is 'mul'"):
        proc.get_service("calc", calc_interface("old"), timeout=10)


def test_from_service_checks_a_real_handle(cluster, proc):
    start_calc(cluster, "inserted")
    service = proc.get_service("calc", timeout=10)  # typed(): a tests.ICalc Proxy
    binder = service.binder if isinstance(service, ProxyBase) else service
    assert binder.transact(PING_TRANSACTION) is True
    descriptor, hash_, table = binder.transact(INTERFACE_TRANSACTION)
    inserted = calc_interface("inserted")
    assert (descriptor, hash_, table) == ("tests.ICalc", inserted.HASH, inserted.method_table())
    with pytest.raises(InterfaceMismatchError, match="inserted or reordered"):
        calc_interface("old").from_service(binder)
    assert inserted.from_service(binder).mul(6, 7) == 42


def test_pybinder_exports_still_work():
    assert pybinder.method is method and pybinder.oneway is oneway
