"""Values that arrive as they were sent (issue 17, item 4): tuples, ints of any size,
numpy arrays and scalars, parcelables and registered exceptions; everything else is
a TypeError naming where in the call it sits.

Unit tests encode and decode parcels in this process; the rest go through a real
broker to a server (tests/peers.py ``values_server``) that imports the same classes.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import hashlib
import sys
import threading
from pathlib import Path
from typing import Any

import msgpack
import pytest
from peers import Frame, ITest, IValues, QuotaError

import pybinder
from pybinder import parcel, values
from pybinder.compiled import is_compiled
from pybinder.errors import ProtocolError, RemoteError
from pybinder.parcel import (
    EXT_BIGINT,
    EXT_PARCELABLE,
    EXT_TUPLE,
    MAX_NESTING,
    OBJ_NODE,
    OUT_OF_BAND_THRESHOLD,
    ObjectRef,
)
from pybinder.protocol import REPLY_EXCEPTION, REPLY_OK
from pybinder.runtime.binder import exception_reply, unpack_reply

np = pytest.importorskip("numpy")

TESTS = Path(__file__).parent


def parcel_bytes(value: Any, **options: Any) -> bytearray:
    encoded = parcel.encode(value, **options)
    data = bytearray(encoded.size)
    encoded.write_into(data)
    return data


def round_trip(value: Any, copy_buffers: bool = False) -> Any:
    """``value`` encoded and decoded, read from a read-only copy of the parcel."""
    data = bytes(parcel_bytes(value))
    decoded, _ = parcel.decode(data, copy_buffers=copy_buffers)
    return decoded


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (numpy values compared whole)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if dataclasses.is_dataclass(a):
        return same(dataclasses.asdict(a), dataclasses.asdict(b))  # type: ignore[arg-type]
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return bool(a == b)


# -- tuples and ints ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        (),
        (1,),
        (1, (2, 3)),
        [1, (2, [3, (4,)]), {"t": (5, "six")}],
        {(1, 2): "tuple key", 3: [()]},
        ((((((((("deep",),),),),),),),),),
        ("big", bytes(OUT_OF_BAND_THRESHOLD)),
    ],
)
def test_tuples_arrive_as_tuples_and_lists_as_lists(value):
    decoded = round_trip(value)
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], bytes):
        assert type(decoded) is tuple and decoded[0] == "big"
        assert isinstance(decoded[1], memoryview)  # still out of band inside a tuple
        assert decoded[1].tobytes() == value[1]
    else:
        assert same(decoded, value)


@pytest.mark.parametrize(
    "number",
    [0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 2**200, -(2**100), 10**400],
)
def test_ints_of_any_size_round_trip(number):
    assert round_trip([number, (number,)]) == [number, (number,)]


def test_big_ints_use_the_bigint_extension():
    body = parcel.encode(2**200).body
    assert msgpack.unpackb(body).code == EXT_BIGINT
    assert msgpack.unpackb(parcel.encode(2**64 - 1).body) == 2**64 - 1  # still plain


def test_subclasses_of_builtin_types_travel_as_their_base_type():
    class Color(enum.IntEnum):
        RED = 1

    class Big(enum.IntEnum):
        HUGE = 2**70

    class Mode(str, enum.Enum):  # noqa: UP042 (str() of it is "Mode.READ", not "r")
        READ = "r"

    point = collections.namedtuple("point", "x y")
    value = [Color.RED, Big.HUGE, Mode.READ, collections.OrderedDict(a=(1,)), point(1, 2)]
    decoded = round_trip(value)
    assert same(decoded, [1, 2**70, "r", {"a": (1,)}, (1, 2)])


# -- numpy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array",
    [
        np.arange(24, dtype=np.float32).reshape(2, 3, 4),
        np.arange(5000, dtype=">i2"),  # big-endian, out of band
        np.array([True, False]),
        np.array([1 + 2j], dtype=np.complex128),
        np.array(["ab", "cde"]),
        np.array(["2024-01-02"], dtype="datetime64[s]"),
        np.array(3.5),  # 0-d
        np.zeros((0, 3), dtype=np.int8),
        np.arange(100).reshape(10, 10)[::2, 1::3],  # not contiguous
        np.asfortranarray(np.arange(6000, dtype=np.uint8).reshape(60, 100)),
    ],
)
def test_numpy_arrays_keep_dtype_shape_and_bytes(array):
    for copy_buffers in (False, True):
        decoded = round_trip(["x", [array], {}], copy_buffers)[1][0]
        assert type(decoded) is np.ndarray
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        assert np.array_equal(decoded, array)
        assert not decoded.flags.writeable


def test_a_large_array_is_a_view_of_the_parcel_without_copy_buffers():
    array = np.arange(480 * 640 * 3, dtype=np.float32).reshape(480, 640, 3)
    data = parcel_bytes(["x", [array], {}])
    (_, [decoded], _), views = parcel.decode(data)
    assert np.shares_memory(decoded, np.frombuffer(data, np.uint8))
    assert not decoded.flags.writeable and not decoded.flags.owndata
    assert len(views) == 1  # released by the receiver when the buffer is freed


def test_a_copied_array_owns_its_memory_and_may_be_made_writable():
    array = np.arange(10_000, dtype=np.float64)
    data = parcel_bytes([REPLY_OK, array])
    (_, decoded), views = parcel.decode(data, copy_buffers=True)
    assert views == []
    assert decoded.flags.owndata and not decoded.flags.writeable
    assert not np.shares_memory(decoded, np.frombuffer(data, np.uint8))
    decoded.flags.writeable = True
    decoded[0] = 7.0
    assert decoded[0] == 7.0
    data.extend(b"x")  # BufferError if any view of the parcel were left


@pytest.mark.parametrize(
    "scalar",
    [
        np.int64(3),
        np.float32(1.5),
        np.bool_(True),
        np.float64(2.25),
        np.uint8(255),
        np.complex64(1j),
        np.str_("hé"),
        np.datetime64("2024-01-02T03:04:05"),
    ],
)
def test_numpy_scalars_arrive_as_the_same_numpy_type(scalar):
    decoded = round_trip([scalar, (scalar,)])
    assert type(decoded[0]) is type(scalar) and decoded[0] == scalar
    assert type(decoded[1][0]) is type(scalar)


def test_numpy_values_that_cannot_travel_are_type_errors_naming_the_path():
    objects = np.array([object()])
    structured = np.zeros(2, dtype=[("a", "i4"), ("b", "f8")])
    with pytest.raises(TypeError, match=r"^args\[0\]: cannot send a numpy array of dtype object"):
        parcel.encode(["d", [objects], {}])
    with pytest.raises(TypeError, match=r"^args\[1\]\[0\]: cannot send a numpy array of dtype"):
        parcel.encode(["d", [1, (structured,)], {}])
    with pytest.raises(TypeError, match=r"^kwargs\['m'\]: cannot send a MaskedArray"):
        parcel.encode(["d", [], {"m": np.ma.masked_array([1, 2])}])


def test_decoding_rejects_bad_numpy_parts():
    def ext(code: int, value: Any) -> bytes:
        return bytes(parcel_bytes(msgpack.ExtType(code, msgpack.packb(value))))

    for bad in (
        ["|O", [1], b"\0" * 8],  # object dtype
        ["<f4", [3], b"\0" * 8],  # size does not match
        ["<f4", [-1], b""],
        ["nonsense", [1], b"\0"],
        ["<f4", [1]],
    ):
        with pytest.raises(ProtocolError):
            parcel.decode(ext(parcel.EXT_NDARRAY, bad))
    with pytest.raises(ProtocolError):
        parcel.decode(ext(parcel.EXT_NUMPY_SCALAR, ["<f4", b"\0"]))


# -- parcelables -------------------------------------------------------------------------


def test_a_parcelable_round_trips_as_its_class():
    frame = Frame(3, (640, 480), ["a", "b"], payload={"pixels": np.ones((2, 2), np.uint8)})
    decoded = round_trip(["d", [frame], {}])[1][0]
    assert type(decoded) is Frame and same(decoded, frame)
    assert type(decoded.size) is tuple


def test_a_parcelable_travels_by_its_registered_name():
    body = parcel.encode(Frame(1, (1, 1))).body
    ext = msgpack.unpackb(body)
    assert ext.code == EXT_PARCELABLE
    name, fields = msgpack.unpackb(ext.data, ext_hook=lambda code, data: code)
    assert name == "tests.Frame" and set(fields) == {"index", "size", "tags", "payload"}


def test_an_unregistered_parcelable_name_is_a_protocol_error_naming_it():
    data = msgpack.ExtType(EXT_PARCELABLE, msgpack.packb(["tests.Nobody", {}]))
    with pytest.raises(ProtocolError, match=r"tests\.Nobody.*not registered"):
        parcel.decode(bytes(parcel_bytes(data)))


def test_unknown_fields_are_dropped_and_missing_ones_take_their_defaults():
    data = msgpack.ExtType(
        EXT_PARCELABLE, msgpack.packb(["tests.Frame", {"index": 1, "size": [2, 3], "new": 4}])
    )
    decoded, _ = parcel.decode(bytes(parcel_bytes(data)))
    assert decoded == Frame(1, [2, 3])


def test_parcelable_registration_checks():
    with pytest.raises(TypeError, match="dataclass"):

        @pybinder.parcelable
        class NotADataclass:
            pass

    @pybinder.parcelable(name="tests.values.Taken")
    @dataclasses.dataclass
    class One:
        x: int

    with pytest.raises(ValueError, match="already registered"):

        @pybinder.parcelable(name="tests.values.Taken")
        @dataclasses.dataclass
        class Other:
            x: int

    @pybinder.parcelable
    @dataclasses.dataclass(frozen=True)
    class Defaulted:
        x: int
        y: int = dataclasses.field(default=0, init=False)

    assert values.parcelable_name(Defaulted) == f"{__name__}.{Defaulted.__qualname__}"
    assert round_trip(Defaulted(5)) == Defaulted(5)
    assert round_trip(One(2)) == One(2)


# -- paths of values that cannot be sent --------------------------------------------------


class Foo:
    pass


def test_an_unsendable_value_is_a_type_error_naming_its_path():
    body = ["d", [1, {"frames": [0, 1, 2, Foo()]}], {}]
    with pytest.raises(TypeError, match=r"^args\[1\]\['frames'\]\[3\]: cannot send a Foo$"):
        parcel.encode(body)
    with pytest.raises(TypeError, match=r"^kwargs\['x'\]\[0\]\[1\]: cannot send a set$"):
        parcel.encode(["d", [], {"x": ((1, {2}),)}])
    with pytest.raises(TypeError, match=r"^args\[0\]\.payload\[0\]: cannot send a Foo$"):
        parcel.encode(["d", [Frame(1, (1, 1), payload=[Foo()])], {}])
    with pytest.raises(TypeError, match=r"^args\[0\] \(key frozenset\(\)\): cannot send a"):
        parcel.encode(["d", [{frozenset(): 1}], {}])
    with pytest.raises(TypeError, match=r"^result\['a'\]: cannot send a Foo$"):
        parcel.encode([REPLY_OK, {"a": Foo()}], names=("status", "result"))
    with pytest.raises(TypeError, match=r"^value\[0\]: cannot send a Foo$"):
        parcel.encode([Foo()])


def test_extensions_nested_too_deep_are_a_type_error_and_a_protocol_error():
    value: Any = "x"
    for _ in range(MAX_NESTING):
        value = (value,)
    assert round_trip(value) == value
    path = r"^args\[0\]" + r"\[0\]" * MAX_NESTING
    with pytest.raises(TypeError, match=path + ": .*nested"):
        parcel.encode(["d", [(value,)], {}])
    data = msgpack.packb("x")
    for _ in range(MAX_NESTING + 1):
        data = msgpack.packb(msgpack.ExtType(EXT_TUPLE, data))
    with pytest.raises(ProtocolError, match="deep"):
        parcel.decode(bytes(parcel_bytes(msgpack.unpackb(data))))


def test_hostile_nesting_fails_cleanly_on_a_small_thread_stack():
    """Each nesting level unpacks with an Unpacker, whose state is on the heap: a
    small stack survives a body nested as deep as it gets (and deeper)."""

    def nested(depth: int) -> bytes:
        data = msgpack.packb([1])
        for _ in range(depth - 1):
            data = msgpack.packb([msgpack.ExtType(EXT_TUPLE, data)])
        return bytes(parcel_bytes(msgpack.ExtType(EXT_TUPLE, data)))

    hostile, fine = nested(2000), nested(MAX_NESTING)
    outcome: list[Any] = []

    def decode() -> None:
        try:
            parcel.decode(hostile)
        except ProtocolError as exc:
            outcome.append(exc)
        outcome.append(parcel.decode(fine)[0])

    old = threading.stack_size(256 << 10)
    try:
        thread = threading.Thread(target=decode)
        thread.start()
        thread.join(30)
    finally:
        threading.stack_size(old)
    expected: Any = (1,)
    for _ in range(MAX_NESTING - 1):
        expected = ((expected),)
    assert isinstance(outcome[0], ProtocolError)
    assert outcome[1] == expected


def test_malformed_extensions_are_protocol_errors():
    for code, data in [
        (EXT_TUPLE, b"\x93\x01"),  # truncated
        (EXT_TUPLE, msgpack.packb([1]) + b"\x01"),  # bytes left over
        (EXT_TUPLE, msgpack.packb({"a": 1})),  # not a list
        (EXT_BIGINT, b""),
        (EXT_PARCELABLE, msgpack.packb("tests.Frame")),
        (99, b""),
    ]:
        with pytest.raises(ProtocolError):
            parcel.decode(bytes(parcel_bytes(msgpack.ExtType(code, data))))


def test_objects_inside_tuples_are_named_and_decoded():
    ref = ObjectRef(OBJ_NODE, 7, "tests.IThing")
    data = bytes(parcel_bytes(["d", [(1, (ref,))], {}]))
    header = parcel.parse_header(data)
    assert parcel.object_descriptors(data, header) == {0: "tests.IThing"}
    decoded, _ = parcel.decode(data)
    assert decoded[1][0] == (1, (ref,))


# -- the fast path -----------------------------------------------------------------------


def test_a_small_call_is_plain_msgpack_and_is_not_rebuilt():
    """Speed sanity, untimed: a call of a few ints and strs takes no hook and no
    extension, and its argument list is not copied."""
    args = [1, "two", 3.0, None, True]
    body = ["tests.ITest", args, {}]
    assert parcel._lift_buffers(body, lambda view: None) is body
    encoded = parcel.encode(body)
    assert encoded.body == msgpack.packb(body, use_bin_type=True)
    assert not encoded.buffers and not encoded.objects


@pytest.mark.skipif(is_compiled(parcel), reason="patches module globals")
def test_a_small_call_decodes_without_a_reader(monkeypatch):
    def no_reader(*args: Any) -> Any:
        raise AssertionError("a reader was made")

    monkeypatch.setattr(parcel, "_Reader", no_reader)
    data = bytes(parcel_bytes(["tests.ITest", [1, "two"], {}]))
    assert parcel.decode(data)[0] == ["tests.ITest", [1, "two"], {}]


# -- exceptions (unit) -------------------------------------------------------------------


def reply_of(exc: BaseException) -> Any:
    """The reply body of ``exc`` as it arrives in the caller."""
    return round_trip(exception_reply(exc, "Traceback: remote"))


def test_a_registered_exception_arrives_as_itself_with_its_attributes():
    exc = QuotaError("over quota", 10)
    exc.add_note("a note")
    with pytest.raises(QuotaError) as info:
        unpack_reply(reply_of(exc))
    got = info.value
    assert got.args == ("over quota",)
    assert got.limit == 10 and got.where == ("disk", 3)
    assert got.remote_traceback == "Traceback: remote"  # type: ignore[attr-defined]


def test_a_builtin_exception_keeps_its_attributes_and_unsendable_ones_are_dropped():
    exc = KeyError("k")
    exc.field = (1, 2)  # type: ignore[attr-defined]
    exc.lock = threading.Lock()  # type: ignore[attr-defined]
    with pytest.raises(KeyError) as info:
        unpack_reply(reply_of(exc))
    assert info.value.field == (1, 2)  # type: ignore[attr-defined]
    assert not hasattr(info.value, "lock")


def test_unregistered_exceptions_are_remote_errors_and_name_no_module_to_import():
    class Local(Exception):
        pass

    with pytest.raises(RemoteError, match="Local: boom"):
        unpack_reply(reply_of(Local("boom")))
    # a remote side naming a module this process has not imported does not get it imported
    assert "antigravity" not in sys.modules
    body = [REPLY_EXCEPTION, "antigravity", "Exception", ["x"], ""]
    with pytest.raises(RemoteError, match=r"antigravity\.Exception: x"):
        unpack_reply(body)
    assert "antigravity" not in sys.modules


def test_malformed_exception_replies_are_protocol_errors():
    for body in (
        [REPLY_EXCEPTION, "builtins", "ValueError"],
        [REPLY_EXCEPTION, 1, "ValueError", [], ""],
        [REPLY_EXCEPTION, "builtins", "ValueError", {"args": [], "attrs": 3}, ""],
    ):
        with pytest.raises(ProtocolError):
            unpack_reply(body)


def test_remote_exception_registration_checks():
    with pytest.raises(TypeError):
        pybinder.remote_exception(int)
    with pytest.raises(ValueError, match="builtin"):
        pybinder.remote_exception(name="builtins.ValueError")(type("E", (Exception,), {}))

    @pybinder.remote_exception(name="Bare")
    class Bare(Exception):
        pass

    with pytest.raises(Bare):
        unpack_reply(reply_of(Bare("no dot in the name")))


# -- between processes -------------------------------------------------------------------


@pytest.fixture
def server(cluster):
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import peers; "
        "peers.values_server(sys.argv[1])"
    )
    cluster.spawn([sys.executable, "-c", code, cluster.socket]).wait_ready()


@pytest.fixture
def echo(server, proc):
    return proc.get_service("test", ITest, timeout=10).echo


@pytest.fixture
def remote(server, proc):
    return proc.get_service("values", IValues, timeout=10)


def copied(proc) -> int:
    return int(proc.status()["broker"]["buffer_bytes_copied"])


def test_a_float32_image_round_trips_with_one_copy_each_way(proc, echo, remote):
    image = np.random.default_rng(1).random((480, 640, 3), dtype=np.float32)
    size = image.nbytes
    before = copied(proc)
    seen = remote.inspect(image)
    one_way = copied(proc) - before
    assert size <= one_way < size + 4096
    assert seen == {
        "type": "numpy.ndarray",
        "dtype": "<f4",
        "shape": [480, 640, 3],
        "writeable": False,  # read-only in the server...
        "owndata": False,
        "on_memoryview": True,  # ...and backed by its region: no copy on its side
        "sha256": hashlib.sha256(image.tobytes()).hexdigest(),
    }
    before = copied(proc)
    back = echo(image)
    both_ways = copied(proc) - before
    assert 2 * size <= both_ways < 2 * size + 8192
    assert type(back) is np.ndarray and back.dtype == np.float32 and back.shape == image.shape
    assert back.tobytes() == image.tobytes()
    assert back.flags.owndata and not back.flags.writeable  # the reply buffer is gone


def test_tuples_big_ints_numpy_scalars_and_parcelables_round_trip(echo):
    frame = Frame(7, (640, 480), ["cam0"], payload=(np.arange(3, dtype=np.int16), 2**70))
    value = {
        "tuple": (1, (2, [3, (4,)])),
        "list": [1, [2]],
        "big": 2**200,
        "negative": -(2**100),
        "int64": np.int64(3),
        "float32": np.float32(1.5),
        "bool": np.bool_(True),
        "frame": frame,
        (1, "key"): "tuple key",
    }
    assert same(echo(value), value)
    assert same(echo((frame, frame)), (frame, frame))


def test_a_registered_exception_arrives_with_its_attributes(remote):
    with pytest.raises(QuotaError, match="over quota") as info:
        remote.raise_quota(42)
    assert info.value.limit == 42 and info.value.where == ("disk", 3)
    assert "in raise_quota" in info.value.remote_traceback  # type: ignore[attr-defined]


def test_an_unsendable_argument_names_its_path_and_nothing_is_sent(echo):
    with pytest.raises(TypeError, match=r"^args\[0\]\['frames'\]\[1\]: cannot send a Foo$"):
        echo({"frames": [1, Foo()]})
    assert echo((1,)) == (1,)


def test_an_unsendable_result_names_its_path(remote):
    with pytest.raises(TypeError, match=r"result\['frames'\]\[2\]: cannot send a set"):
        remote.bad_result()
    assert remote.inspect(1) == {"type": "builtins.int"}


def test_a_parcelable_the_server_does_not_know_is_a_protocol_error_naming_it(echo):
    @pybinder.parcelable(name="tests.OnlyHere")
    @dataclasses.dataclass
    class OnlyHere:
        x: int

    with pytest.raises(ProtocolError, match=r"tests\.OnlyHere"):
        echo(OnlyHere(1))
    assert echo(2**65) == 2**65
