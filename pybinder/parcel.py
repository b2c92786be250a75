"""The parcel: header, object table, buffer table, msgpack body, out-of-band buffers.

A parcel is the one thing that crosses between processes, and it is laid out so the
broker can check and translate it without decoding the body, and the receiver can read
it in place::

    offset 0   header      magic "PBP1", version, flags, n_objects, n_buffers,
                           body_len, total_len                        (32 bytes)
    32         object table  n_objects x (kind u32, extra u32, value u64)  (16 bytes each)
    ...        buffer table  n_buffers x (offset u64, length u64)        (16 bytes each)
    ...        body        msgpack: the arguments, or the reply
    align 64   buffers     each out-of-band buffer, 64-byte aligned

The object table is binder's ``offsets`` array of flat_binder_objects: the broker
rewrites each entry (a node of the sender becomes a handle of the receiver, and back;
a descriptor becomes the receiver's index into the file descriptors that come with
the parcel) in the receiver's copy, and writes a handle's owner pid in its pad word.
The body names an object by an extension holding its table index and its interface
descriptor (the sender's word for it, which travels with the reference).

Bytes-like values of :data:`OUT_OF_BAND_THRESHOLD` bytes or more travel in the buffer
area, so the receiver can get them as memoryviews of its region instead of copies;
so do the elements of numpy arrays of that size.

What msgpack cannot carry as it was sent travels as an extension (the ``EXT_*``
codes): tuples, ints beyond 64 bits, numpy arrays and scalars, and parcelables
(:func:`pybinder.parcelable`). An extension that holds values holds them packed, so
they may nest, at most :data:`MAX_NESTING` deep.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
from collections.abc import Callable
from typing import Any, Final, NamedTuple

import msgpack

from pybinder import values
from pybinder.errors import ProtocolError

MAGIC: Final = b"PBP1"
VERSION: Final = 1

#: Bytes-like values of this many bytes or more travel out of band (4 KiB).
OUT_OF_BAND_THRESHOLD: Final = 4096

#: Out-of-band buffers start on this boundary, in bytes.
BUFFER_ALIGN: Final = 64

#: Upper bounds the broker enforces so a header cannot make it loop for long.
MAX_OBJECTS: Final = 4096
MAX_BUFFERS: Final = 4096

#: Object table kinds (binder's BINDER_TYPE_BINDER, BINDER_TYPE_HANDLE, BINDER_TYPE_FD).
OBJ_NODE: Final = 1  # value: the sender's local node id (a Stub it owns)
OBJ_HANDLE: Final = 2  # value: a handle in the sender's (or receiver's, after translation) table
OBJ_FD: Final = 3  # value: index into the descriptors sent with the parcel (SCM_RIGHTS)

#: The longest interface descriptor an object extension carries, in UTF-8 bytes.
MAX_DESCRIPTOR: Final = 255

#: msgpack extension codes used in the body.
EXT_BUFFER: Final = 1  # data: u32 index into the buffer table
EXT_OBJECT: Final = 2  # data: u32 index into the object table, then the descriptor (UTF-8)
EXT_TUPLE: Final = 3  # data: msgpack array of the items
EXT_BIGINT: Final = 4  # data: the int in signed big-endian bytes (beyond 64 bits)
EXT_NDARRAY: Final = 5  # data: msgpack [dtype.str, shape, bytes or an EXT_BUFFER]
EXT_NUMPY_SCALAR: Final = 6  # data: msgpack [dtype.str, bytes]
EXT_PARCELABLE: Final = 7  # data: msgpack [name, {field: value}]

#: How deep extensions that hold values (tuples, numpy values, parcelables) may nest
#: inside each other. Lists and dicts do not count (msgpack limits those itself).
MAX_NESTING: Final = 32

HEADER: Final = struct.Struct("<4sHHIIIIQ")
OBJECT_ENTRY: Final = struct.Struct("<IIQ")
BUFFER_ENTRY: Final = struct.Struct("<QQ")
_INDEX: Final = struct.Struct("<I")

assert HEADER.size == 32 and OBJECT_ENTRY.size == 16 and BUFFER_ENTRY.size == 16
_HEADER_SIZE: Final = HEADER.size
_ENTRY_SIZE: Final = BUFFER_ENTRY.size  # of either table
_unpack_header: Final = HEADER.unpack_from
_new_tuple: Final = tuple.__new__

#: ``encode_object(obj)`` -> ``(kind, value, descriptor)`` for a binder object, or None.
ObjectEncoder = Callable[[Any], "tuple[int, int, str] | None"]
#: ``decode_object(kind, value, descriptor, extra)`` -> the object; ``extra`` is a
#: handle's owner pid (0: unknown); for OBJ_FD, ``value`` is the received descriptor.
ObjectDecoder = Callable[[int, int, str, int], Any]


class ObjectRef:
    """A raw object-table entry, for code that handles parcels without a runtime.

    The broker's service manager reads and writes binder objects as ObjectRefs;
    :func:`encode` accepts them and :func:`decode` returns them when no
    ``decode_object`` is given.

    Attributes:
        kind, value: the object-table entry (OBJ_NODE, OBJ_HANDLE or OBJ_FD, and its value).
        descriptor: the interface descriptor the body gives for it ("" if none).
        extra: the entry's extra word: a handle's owner pid, as the broker writes it.
    """

    __slots__ = ("descriptor", "extra", "kind", "value")

    def __init__(self, kind: int, value: int, descriptor: str = "", extra: int = 0) -> None:
        self.kind = kind
        self.value = value
        self.descriptor = descriptor
        self.extra = extra

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectRef) and (other.kind, other.value) == (self.kind, self.value)

    def __hash__(self) -> int:
        return hash((self.kind, self.value))

    def __repr__(self) -> str:
        return f"ObjectRef(kind={self.kind}, value={self.value}, descriptor={self.descriptor!r})"


class ParcelHeader(NamedTuple):
    """A checked parcel header. All offsets are from the parcel's start, in bytes."""

    n_objects: int
    n_buffers: int
    body_start: int
    body_len: int
    total_len: int
    buffer_table: int


def align(n: int, boundary: int = BUFFER_ALIGN) -> int:
    """Round ``n`` up to a multiple of ``boundary`` (a power of two)."""
    return (n + boundary - 1) & ~(boundary - 1)


def parse_header(parcel: memoryview | bytes) -> ParcelHeader:
    """Check a parcel's header, tables and bounds; return the header.

    Every length and offset is checked against ``len(parcel)``, so a hostile sender
    cannot make the broker or a receiver read outside the parcel.

    Raises:
        ProtocolError: bad magic or version, or any offset or length out of bounds.
    """
    size = len(parcel)
    if size < _HEADER_SIZE:
        raise ProtocolError(f"parcel of {size} bytes is shorter than its {HEADER.size}-byte header")
    magic, version, _flags, n_objects, n_buffers, body_len, _pad, total_len = _unpack_header(parcel)
    if magic != MAGIC or version != VERSION:
        raise ProtocolError(f"not a parcel: magic {magic!r}, version {version}")
    if total_len != size:
        raise ProtocolError(f"parcel header says {total_len} bytes, frame says {size}")
    if n_objects > MAX_OBJECTS or n_buffers > MAX_BUFFERS:
        raise ProtocolError(f"parcel has {n_objects} objects and {n_buffers} buffers; too many")
    table = _HEADER_SIZE + _ENTRY_SIZE * n_objects
    body_start = table + _ENTRY_SIZE * n_buffers
    body_end = body_start + body_len
    if body_end > size:
        raise ProtocolError(f"parcel body ends at byte {body_end}, past its end at {size}")
    for i in range(n_buffers):
        offset, length = BUFFER_ENTRY.unpack_from(parcel, table + _ENTRY_SIZE * i)
        if offset < body_end or offset + length > size:
            raise ProtocolError(
                f"parcel buffer {i} ({offset}+{length}) lies outside {body_end}..{size}"
            )
    # tuple.__new__ skips the NamedTuple's Python-level __new__ (a third of this function)
    return _new_tuple(ParcelHeader, (n_objects, n_buffers, body_start, body_len, total_len, table))


def read_objects(parcel: memoryview | bytes, header: ParcelHeader) -> list[tuple[int, int]]:
    """Return the object table as ``[(kind, value), ...]``."""
    return [
        OBJECT_ENTRY.unpack_from(parcel, HEADER.size + OBJECT_ENTRY.size * i)[::2]
        for i in range(header.n_objects)
    ]


def read_entries(parcel: memoryview | bytes, header: ParcelHeader) -> list[tuple[int, int, int]]:
    """Return the object table as ``[(kind, extra, value), ...]``."""
    return [
        OBJECT_ENTRY.unpack_from(parcel, HEADER.size + OBJECT_ENTRY.size * i)
        for i in range(header.n_objects)
    ]


def count_fds(parcel: memoryview | bytes) -> int:
    """How many OBJ_FD entries a parcel's object table has (the descriptors that
    came with it), or 0 if its header is malformed."""
    try:
        header = parse_header(parcel)
    except ProtocolError:
        return 0
    return sum(1 for kind, _ in read_objects(parcel, header) if kind == OBJ_FD)


def write_object(
    parcel: memoryview | bytearray, index: int, kind: int, value: int, extra: int = 0
) -> None:
    """Overwrite entry ``index`` of the object table (the broker's translation step)."""
    OBJECT_ENTRY.pack_into(parcel, HEADER.size + OBJECT_ENTRY.size * index, kind, extra, value)


def object_descriptors(parcel: memoryview | bytes, header: ParcelHeader) -> dict[int, str]:
    """``{object index: descriptor}`` as the body names its objects (inside tuples and
    parcelables too); {} for a body that is not valid msgpack. The broker reads it
    when a node first arrives; it builds no values (and runs no parcelable's code)."""
    reader = _Reader(parcel, None, None, False, _NO_FDS, True)
    start = header.body_start
    try:
        _unpack(memoryview(parcel)[start : start + header.body_len], reader.hook)
    except ProtocolError:
        return {}
    return reader.found


def _descriptor_of(data: bytes) -> str:
    return bytes(data[_INDEX.size : _INDEX.size + MAX_DESCRIPTOR]).decode("utf-8", "replace")


class EncodedParcel:
    """A value split into what a parcel carries: body bytes, objects and buffers.

    Build one with :func:`encode`, learn its :attr:`size` (bytes), then
    :meth:`write_into` a writable buffer of at least :attr:`head_size` bytes.

    One out-of-band buffer may be made the parcel's *tail* (:meth:`set_tail`): it is
    laid out last and not written by :meth:`write_into`, because it already lies in
    shared memory the broker reads (a loan), so the broker copies it from there.

    Attributes:
        size: the whole parcel, in bytes.
        head_size: the bytes :meth:`write_into` writes (all but the tail).
        tail: index of the tail buffer, or None.
        fds: the file descriptors its OBJ_FD entries name, in order (borrowed from
            the objects sent: the sender passes them with SCM_RIGHTS, which duplicates
            them).
        fd_owners: those objects, kept alive with the parcel so that their
            descriptors stay open until it is sent.
    """

    __slots__ = (
        "body",
        "buffers",
        "fd_owners",
        "fds",
        "head_size",
        "objects",
        "offsets",
        "size",
        "tail",
    )

    def __init__(
        self,
        body: bytes,
        objects: list[tuple[int, int, int]],
        buffers: list[memoryview],
        fds: list[int] | None = None,
    ) -> None:
        self.body = body
        self.objects = objects
        self.buffers = buffers
        self.fds: list[int] = fds if fds is not None else []
        self.fd_owners: list[Any] = []
        self.tail: int | None = None
        if buffers:
            self._lay_out()
        else:  # the usual small call: no alignment to work out
            self.offsets: list[int] = []
            self.size = self.head_size = _HEADER_SIZE + _ENTRY_SIZE * len(objects) + len(body)

    def set_tail(self, index: int) -> None:
        """Make buffer ``index`` the tail (see the class docstring)."""
        self.tail = index
        self._lay_out()

    def _lay_out(self) -> None:
        buffers, tail = self.buffers, self.tail
        pos = HEADER.size + OBJECT_ENTRY.size * len(self.objects)
        pos += BUFFER_ENTRY.size * len(buffers) + len(self.body)
        if not buffers:
            self.offsets, self.size, self.head_size = [], pos, pos
            return
        order = [i for i in range(len(buffers)) if i != tail]
        if tail is not None:
            order.append(tail)
        offsets = [0] * len(buffers)
        for i in order:
            pos = align(pos)
            offsets[i] = pos
            pos += buffers[i].nbytes
        self.offsets = offsets
        self.size = pos
        self.head_size = pos if tail is None else offsets[tail]

    def write_into(self, dest: memoryview | bytearray) -> int:
        """Write the parcel, except any tail, at the start of ``dest``; return
        :attr:`head_size`. Copies each out-of-band buffer once, straight into ``dest``."""
        objects, buffers, body = self.objects, self.buffers, self.body
        HEADER.pack_into(
            dest, 0, MAGIC, VERSION, 0, len(objects), len(buffers), len(body), 0, self.size
        )
        if not objects and not buffers:  # the usual small call: header and body
            dest[_HEADER_SIZE : self.size] = body
            return self.size
        pos = HEADER.size
        for kind, value, extra in objects:
            OBJECT_ENTRY.pack_into(dest, pos, kind, extra, value)
            pos += OBJECT_ENTRY.size
        table = pos
        pos += BUFFER_ENTRY.size * len(buffers)
        dest[pos : pos + len(body)] = body
        for i, buf in enumerate(buffers):
            offset = self.offsets[i]
            BUFFER_ENTRY.pack_into(dest, table + BUFFER_ENTRY.size * i, offset, buf.nbytes)
            if i != self.tail:
                dest[offset : offset + buf.nbytes] = buf
        return self.head_size


def encode(
    value: Any,
    encode_object: ObjectEncoder | None = None,
    *,
    names: tuple[str, ...] | None = None,
) -> EncodedParcel:
    """Split ``value`` into a parcel's parts.

    What goes in comes out (see :func:`decode`), or this raises TypeError:

    - None, bool, float, str, and int of any size (beyond 64 bits as EXT_BIGINT);
    - list, dict and tuple (a tuple arrives as a tuple), nested;
    - bytes-likes (bytes, bytearray, memoryview, any buffer-protocol object): they
      arrive as ``bytes``, or, at :data:`OUT_OF_BAND_THRESHOLD` bytes or more, as a
      read-only memoryview of the receiver's region (a copy with ``copy_buffers``);
    - numpy arrays (``numpy.ndarray`` itself; C order, copied first if not
      contiguous) and numpy scalars, of any dtype but object, structured and
      zero-size ones: they arrive with their dtype and shape (see :func:`decode`);
    - instances of a :func:`pybinder.parcelable` dataclass;
    - any object ``encode_object`` accepts, and any object with a ``fileno()``
      method (a file, socket, pipe end, ParcelFileDescriptor): its descriptor goes
      with the parcel (OBJ_FD; see :attr:`EncodedParcel.fds`).

    Subclasses of int, float, str, list, dict and tuple (IntEnum, OrderedDict, a
    namedtuple...) travel as their base type.

    Args:
        encode_object: maps a binder object (Stub, Proxy) to ``(kind, value,
            descriptor)`` for the object table, or returns None for objects it does
            not know.
        names: how a TypeError names the items of a top-level list (``value[i]`` is
            called ``names[i]``); by default a call body ``[descriptor, args,
            kwargs]`` has its items called "descriptor", "args" and "kwargs", and
            anything else is "value".

    Raises:
        TypeError: a value that cannot be sent, or extensions nested more than
            :data:`MAX_NESTING` deep; the message starts with the value's path, as
            ``args[1]['frames'][3]: cannot send a Foo``.
        ValueError: a descriptor longer than MAX_DESCRIPTOR bytes, or a closed file.
    """
    encoder = getattr(_encoders, "idle", None)
    _encoders.idle = None  # taken: a nested encode on this thread builds its own
    if encoder is None:
        encoder = _Encoder()
    try:
        return encoder.encode(value, encode_object, names)
    finally:
        _encoders.idle = encoder


class _Encoder:
    """Reusable msgpack Packers (building one costs more than packing a small call),
    one for the body and one per nesting depth of extensions that hold values, and
    the object and buffer lists its hooks fill for the parcel being encoded."""

    def __init__(self) -> None:
        self.objects: list[tuple[int, int, int]] = []
        self.buffers: list[memoryview] = []
        self.fds: list[int] = []
        self.fd_owners: list[Any] = []
        self.encode_object: ObjectEncoder | None = None
        self.packer = self.new_packer()
        self.nested: list[Any] = []  # the Packer of each nesting depth, made when needed
        self.depth = 0

    def new_packer(self) -> Any:
        # strict_types: tuples and subclasses of the builtin types come to default()
        return msgpack.Packer(
            default=self.default, use_bin_type=True, datetime=False, strict_types=True
        )

    def encode(
        self, value: Any, encode_object: ObjectEncoder | None, names: tuple[str, ...] | None
    ) -> EncodedParcel:
        objects: list[tuple[int, int, int]] = []
        buffers: list[memoryview] = []
        fds: list[int] = []
        owners: list[Any] = []
        self.objects, self.buffers, self.fds, self.fd_owners = objects, buffers, fds, owners
        self.encode_object = encode_object
        self.depth = 0
        lifted = value
        if type(value) not in _SCALARS:
            lifted = _lift_buffers(value, self.out_of_band)
        try:
            body = self.packer.pack(lifted)
        except TypeError:
            found = _unsendable(value, encode_object, names)
            if found is None:
                raise
            raise TypeError(f"{found[0]}: {found[1]}") from None
        encoded = EncodedParcel(body, objects, buffers, fds)
        if owners:
            encoded.fd_owners = owners
            self.fd_owners = []
        return encoded

    def out_of_band(self, view: memoryview) -> msgpack.ExtType:
        self.buffers.append(view)
        return msgpack.ExtType(EXT_BUFFER, _INDEX.pack(len(self.buffers) - 1))

    def pack_nested(self, value: Any) -> bytes:
        """Pack the data of an extension that holds values (with this encoder's hooks)."""
        depth = self.depth
        if depth >= MAX_NESTING:
            raise TypeError(
                f"cannot send tuples, numpy values or parcelables nested more than"
                f" {MAX_NESTING} deep"
            )
        if depth == len(self.nested):
            self.nested.append(self.new_packer())
        self.depth = depth + 1
        try:
            packed: bytes = self.nested[depth].pack(value)
        finally:
            self.depth = depth
        return packed

    def default(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is tuple:  # its big bytes-likes were lifted with the list it is in
            return msgpack.ExtType(EXT_TUPLE, self.pack_nested(list(obj)))
        if kind is int:  # beyond 64 bits
            return msgpack.ExtType(EXT_BIGINT, _bigint_bytes(obj))
        if kind is ObjectRef:
            return self.add_object(obj.kind, obj.value, obj.descriptor, obj.extra)
        if self.encode_object is not None:
            entry = self.encode_object(obj)
            if entry is not None:
                return self.add_object(entry[0], entry[1], entry[2], 0)
        name = values.parcelable_name(kind)
        if name is not None:
            state = _lift_buffers(values.parcelable_state(obj, name), self.out_of_band)
            return msgpack.ExtType(EXT_PARCELABLE, self.pack_nested(state))
        if values.is_numpy(kind):
            return self.numpy_value(obj)
        if isinstance(obj, int):  # IntEnum, IntFlag...: as an int
            number = int.__index__(obj)
            if _INT_MIN <= number <= _UINT_MAX:
                return number
            return msgpack.ExtType(EXT_BIGINT, _bigint_bytes(number))
        if isinstance(obj, tuple):  # a namedtuple...: as a tuple
            items = _lift_buffers(list(obj), self.out_of_band)
            return msgpack.ExtType(EXT_TUPLE, self.pack_nested(items))
        if isinstance(obj, list):
            return _lift_buffers(list(obj), self.out_of_band)
        if isinstance(obj, dict):
            return _lift_buffers(dict(obj), self.out_of_band)
        if isinstance(obj, str):
            return str.__str__(obj)
        if isinstance(obj, float):
            return float.__float__(obj)
        try:
            view = memoryview(obj)
        except TypeError:
            fileno = getattr(obj, "fileno", None)
            if fileno is None or isinstance(obj, type):
                raise TypeError(f"cannot send a {kind.__qualname__}") from None
            self.fd_owners.append(obj)
            return self.add_fd(fileno())
        view = _flat_bytes(view)
        return self.out_of_band(view) if view.nbytes >= OUT_OF_BAND_THRESHOLD else view.tobytes()

    def numpy_value(self, obj: Any) -> msgpack.ExtType:
        is_array, dtype, shape, data = values.numpy_parts(obj)
        if not is_array:
            return msgpack.ExtType(EXT_NUMPY_SCALAR, self.pack_nested([dtype, data.tobytes()]))
        if data.nbytes >= OUT_OF_BAND_THRESHOLD:
            payload: Any = self.out_of_band(data)
        else:
            payload = data.tobytes()
        return msgpack.ExtType(EXT_NDARRAY, self.pack_nested([dtype, shape, payload]))

    def add_object(self, kind: int, value: int, descriptor: str, extra: int) -> msgpack.ExtType:
        self.objects.append((kind, value, extra))
        name = descriptor.encode()
        if len(name) > MAX_DESCRIPTOR:
            raise ValueError(f"interface descriptor longer than {MAX_DESCRIPTOR} bytes")
        return msgpack.ExtType(EXT_OBJECT, _INDEX.pack(len(self.objects) - 1) + name)

    def add_fd(self, fd: Any) -> msgpack.ExtType:
        if type(fd) is not int or fd < 0:
            raise ValueError(f"cannot send a closed file (fileno() gave {fd!r})")
        self.fds.append(fd)
        return self.add_object(OBJ_FD, len(self.fds) - 1, "", 0)


_encoders: Final = threading.local()
_INT_MIN: Final = -(2**63)
_UINT_MAX: Final = 2**64 - 1
_CALL_NAMES: Final = ("descriptor", "args", "kwargs")


def _bigint_bytes(number: int) -> bytes:
    """``number`` in signed big-endian bytes, as few as hold it (EXT_BIGINT)."""
    return number.to_bytes((number.bit_length() + 8) // 8, "big", signed=True)


def _unsendable(
    value: Any, encode_object: ObjectEncoder | None, names: tuple[str, ...] | None
) -> tuple[str, str] | None:
    """``(path, message)`` of the first part of ``value`` that cannot be sent, or None.

    Only called once packing failed, so the common case pays nothing for paths: it
    walks ``value`` as the encoder does, and tries each leaf on a scratch encoder."""
    scratch = _Encoder()
    scratch.encode_object = encode_object
    if type(value) is list:
        if names is None and _is_call_body(value):
            names = _CALL_NAMES
        if names is not None:
            for i, item in enumerate(value):
                found = _locate(item, names[i] if i < len(names) else f"[{i}]", 0, scratch)
                if found is not None:
                    return found
            return None
    return _locate(value, "value", 0, scratch)


def _is_call_body(value: list[Any]) -> bool:
    """Whether ``value`` has the shape of a call body, ``[descriptor, args, kwargs]``."""
    return (
        len(value) == 3
        and type(value[0]) is str
        and type(value[1]) is list
        and type(value[2]) is dict
    )


def _locate(value: Any, path: str, depth: int, scratch: _Encoder) -> tuple[str, str] | None:
    kind = type(value)
    if kind in _SCALARS or kind in _BYTES_LIKE or kind is msgpack.ExtType:
        return None
    nesting = f"cannot send tuples, numpy values or parcelables nested more than {MAX_NESTING} deep"
    if isinstance(value, (list, tuple)):
        if isinstance(value, tuple):
            if depth >= MAX_NESTING:
                return path, nesting
            depth += 1
        for i, item in enumerate(value):
            found = _locate(item, f"{path}[{i}]", depth, scratch)
            if found is not None:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _locate(key, f"{path} (key {key!r})", depth, scratch)
            if found is None:
                found = _locate(item, f"{path}[{key!r}]", depth, scratch)
            if found is not None:
                return found
        return None
    if values.parcelable_name(kind) is not None:
        if depth >= MAX_NESTING:
            return path, nesting
        for name, item in values.parcelable_fields(value):
            found = _locate(item, f"{path}.{name}", depth + 1, scratch)
            if found is not None:
                return found
        return None
    scratch.depth = depth
    try:
        scratch.default(value)
    except TypeError as exc:
        return path, str(exc)
    return None


def decode(
    parcel: memoryview | bytes,
    decode_object: ObjectDecoder | None = None,
    *,
    copy_buffers: bool = False,
    fds: list[int] | None = None,
) -> tuple[Any, list[memoryview]]:
    """Read a parcel's value; return ``(value, views)``.

    Values arrive as :func:`encode` took them: tuples as tuples, ints of any size,
    parcelables as their registered class (imported, so registered, in this
    process), numpy arrays and scalars with their dtype and shape (numpy is
    imported when the first one arrives).

    Out-of-band buffers come back as memoryviews of ``parcel`` (read-only when
    ``parcel`` is), listed in ``views`` so the caller can release them when the
    buffer is freed; with ``copy_buffers`` they come back as ``bytes`` instead.
    A numpy array is always read-only: without ``copy_buffers`` a view of
    ``parcel`` (no copy; its memoryview is in ``views``, and stays valid while the
    array lives, so code that keeps one past the buffer's life must copy it), with
    ``copy_buffers`` an array that owns a copy (``arr.flags.owndata``; it may be made
    writable with ``arr.flags.writeable = True``).
    Every handle in the object table goes through ``decode_object``, named in the
    body or not, so the receiver accounts for each delivery the broker counted.
    ``fds`` are the descriptors that came with the parcel, in the order of its
    OBJ_FD entries: each one the body names goes to ``decode_object`` (which then
    owns it), and this function closes the others.

    Raises:
        ProtocolError: the parcel is malformed, its body is not valid msgpack, it
            names a parcelable not registered here, or holds a numpy value when
            numpy is not installed.
    """
    if not fds:
        return _decode(parcel, decode_object, copy_buffers, _NO_FDS)
    received = fds
    try:
        return _decode(parcel, decode_object, copy_buffers, received)
    finally:
        for fd in received:  # the ones decode_object did not take
            if fd >= 0:
                _close_quietly(fd)


_NO_FDS: Final[list[int]] = []  # never changed: a parcel without descriptors names none


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _decode(
    parcel: memoryview | bytes,
    decode_object: ObjectDecoder | None,
    copy_buffers: bool,
    fds: list[int],
) -> tuple[Any, list[memoryview]]:
    header = parse_header(parcel)
    if not (header.n_objects or header.n_buffers):  # nothing out of band: no tables
        body = parcel[header.body_start : header.body_start + header.body_len]
        return _unpack(body, _plain_extension), []
    reader = _Reader(parcel, header, decode_object, copy_buffers, fds, False)
    value = _unpack(parcel[header.body_start : header.body_start + header.body_len], reader.hook)
    if decode_object is not None:
        # A handle the body never names was delivered all the same (the broker counted
        # it): decoding it makes a proxy that goes at once and releases it (BC_RELEASE),
        # or counts it on the proxy this process has.
        objects = reader.objects
        for index in sorted(reader.unused):
            kind, extra, handle = objects[index]
            if kind == OBJ_HANDLE:
                decode_object(kind, handle, "", extra)
    return value, reader.views


def _plain_extension(code: int, data: bytes) -> Any:
    """The ext_hook of a body without tables: values only."""
    return _Reader(b"", None, None, False, _NO_FDS, False).hook(code, data)


class _Reader:
    """The ext_hook of one decode (:meth:`hook`): it resolves the body's extensions,
    those nested in tuples, numpy values and parcelables too, each nesting level
    with a msgpack Unpacker of its own (whose state lives on the heap: msgpack's
    unpackb keeps tens of KiB on the C stack per call, which deep nesting would
    overflow), at most :data:`MAX_NESTING` deep.

    With ``scan`` it only notes the descriptor of each object in :attr:`found` and
    builds nothing (see :func:`object_descriptors`)."""

    def __init__(
        self,
        parcel: memoryview | bytes,
        header: ParcelHeader | None,
        decode_object: ObjectDecoder | None,
        copy_buffers: bool,
        fds: list[int],
        scan: bool,
    ) -> None:
        self.parcel = parcel
        self.n_buffers = 0
        self.table = 0
        self.objects: list[tuple[int, int, int]] = []
        if header is not None:
            self.n_buffers = header.n_buffers
            self.table = header.buffer_table
            if header.n_objects:
                self.objects = read_entries(parcel, header)
        self.unused = set(range(len(self.objects)))
        self.decode_object = decode_object
        self.copy_buffers = copy_buffers
        self.fds = fds
        self.scan = scan
        self.found: dict[int, str] = {}
        self.views: list[memoryview] = []
        self.depth = 0
        self.in_array = False  # decoding an array's data: a buffer comes as a view
        self.temporary: list[memoryview] = []  # such views, when copying buffers

    def hook(self, code: int, data: bytes) -> Any:
        if code in (EXT_BUFFER, EXT_OBJECT):
            if self.scan:
                if code == EXT_OBJECT and len(data) >= _INDEX.size:
                    self.found[_INDEX.unpack_from(data)[0]] = _descriptor_of(data)
                return None
            index = _INDEX.unpack_from(data)[0] if len(data) >= _INDEX.size else -1
            if code == EXT_BUFFER and 0 <= index < self.n_buffers:
                return self.buffer(index)
            if code == EXT_OBJECT and index in self.unused:
                return self.binder_object(index, data)
            raise ProtocolError(f"parcel body refers to missing extension {code}/{index}")
        if code == EXT_TUPLE:
            items = self.nested(data)
            if self.scan:
                return None
            if type(items) is not list:
                raise ProtocolError("malformed tuple in parcel body")
            return tuple(items)
        if code == EXT_BIGINT:
            if not data:
                raise ProtocolError("empty int in parcel body")
            return int.from_bytes(data, "big", signed=True)
        if code == EXT_NDARRAY:
            return self.ndarray(data)
        if code == EXT_NUMPY_SCALAR:
            parts = self.nested(data)
            return None if self.scan else values.build_numpy_scalar(parts)
        if code == EXT_PARCELABLE:
            state = self.nested(data)
            return None if self.scan else values.build_parcelable(state)
        raise ProtocolError(f"parcel body refers to unknown extension {code}")

    def nested(self, data: bytes) -> Any:
        """The one value packed in an extension's ``data``."""
        if self.depth >= MAX_NESTING:
            raise ProtocolError(f"parcel body nests extensions more than {MAX_NESTING} deep")
        self.depth += 1
        try:
            unpacker = msgpack.Unpacker(
                None,
                ext_hook=self.hook,
                raw=False,
                strict_map_key=False,
                max_buffer_size=max(len(data), 1),
            )
            unpacker.feed(data)
            value = unpacker.unpack()
            if unpacker.tell() != len(data):
                raise ProtocolError("an extension in the parcel body has bytes left over")
        finally:
            self.depth -= 1
        return value

    def buffer(self, index: int) -> Any:
        parcel = self.parcel
        offset, length = BUFFER_ENTRY.unpack_from(parcel, self.table + BUFFER_ENTRY.size * index)
        if self.copy_buffers and not self.in_array:
            return bytes(parcel[offset : offset + length])
        view = memoryview(parcel)[offset : offset + length]
        (self.temporary if self.copy_buffers else self.views).append(view)
        return view

    def ndarray(self, data: bytes) -> Any:
        """An array: a view of its buffer, or (copying buffers) a copy made straight
        from it, without a ``bytes`` in between."""
        outer = self.in_array
        self.in_array = True
        try:
            parts = self.nested(data)
            return None if self.scan else values.build_ndarray(parts, self.copy_buffers)
        finally:
            self.in_array = outer
            if self.temporary and not outer:
                for view in self.temporary:
                    with contextlib.suppress(BufferError):
                        view.release()
                self.temporary = []

    def binder_object(self, index: int, data: bytes) -> Any:
        self.unused.discard(index)
        kind, extra, value = self.objects[index]
        descriptor = _descriptor_of(data)
        decode_object = self.decode_object
        if decode_object is None:
            return ObjectRef(kind, value, descriptor, extra)
        if kind == OBJ_FD:
            fds = self.fds
            if value >= len(fds) or fds[value] < 0:
                raise ProtocolError(f"parcel names descriptor {value}, which did not come")
            taken = fds[value]
            fds[value] = -1  # decode_object owns it now
            value = taken
        return decode_object(kind, value, descriptor, extra)


def _unpack(body: memoryview | bytes, ext_hook: Callable[[int, bytes], Any] | None = None) -> Any:
    """Unpack a parcel body (and release it, if it is a view).

    Raises:
        ProtocolError: the body is not valid msgpack, or names a missing extension.
    """
    try:
        return msgpack.unpackb(
            body, ext_hook=ext_hook or _plain_extension, raw=False, strict_map_key=False
        )
    except ProtocolError:
        raise
    except Exception as exc:
        raise ProtocolError(f"parcel body is not valid msgpack: {exc}") from None
    finally:
        if type(body) is memoryview:
            body.release()


def _flat_bytes(view: memoryview) -> memoryview:
    """A C-contiguous, byte-formatted view of ``view`` (copying only if it must)."""
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


_BYTES_LIKE: Final = (bytes, bytearray, memoryview)
_SCALARS: Final = frozenset({int, float, str, bool, type(None)})
_CONTAINERS: Final = frozenset({list, tuple, dict})


def _lift_buffers(value: Any, out_of_band: Callable[[memoryview], Any]) -> Any:
    """Replace large bytes-likes inside ``value`` by out-of-band references.

    msgpack packs bytes, bytearray and memoryview inline without asking a hook, so
    large ones are found here first. Containers are rebuilt only when something in
    them changed, and scalars are skipped without a call.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind in _BYTES_LIKE:
        view = memoryview(value)
        if view.nbytes >= OUT_OF_BAND_THRESHOLD:
            return out_of_band(_flat_bytes(view))
        return value
    if kind is list or kind is tuple or kind is dict:
        if not value:
            return value
        pairs = value.items() if kind is dict else enumerate(value)
        lifted: Any = None
        for key, item in pairs:
            item_kind = type(item)
            if item_kind in _SCALARS or (item_kind is bytes and len(item) < OUT_OF_BAND_THRESHOLD):
                continue
            if item_kind in _CONTAINERS and not item:  # e.g. a call's empty kwargs
                continue
            new = _lift_buffers(item, out_of_band)
            if new is not item:
                if lifted is None:
                    lifted = dict(value) if kind is dict else list(value)
                lifted[key] = new
        if lifted is None:
            return value
        return tuple(lifted) if kind is tuple else lifted
    return value
