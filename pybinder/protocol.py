"""Control frames between a thread and the broker: BC_* commands in, BR_* returns out.

This mirrors the binder driver's write/read buffers (``BINDER_WRITE_READ``): one
SOCK_SEQPACKET message carries one or more commands back to back, each a little-endian
``u32`` command code followed by that command's fixed-size fields. Payload bytes never
travel here; a transaction frame only names a length in the sender's send area and an
offset in the receiver's region.

A thread batches commands into one message when it can (binder sends BC_FREE_BUFFER
together with BC_REPLY), so one system call carries both.
"""

from __future__ import annotations

import platform
import struct
from typing import Final

from pybinder.errors import ProtocolError

PROTOCOL_VERSION: Final = 7

#: The largest message either side sends or accepts, in bytes.
MAX_MESSAGE: Final = 4096

#: Transaction flag: no reply is wanted (binder's TF_ONE_WAY).
TF_ONE_WAY: Final = 0x01

#: Transaction and reply flag (pybinder's own): the parcel is written while it is sent,
#: in parts; it is complete when a BC_PARCEL_READY names all of its bytes. The broker
#: copies each part as it is announced, so the sender's writing and its copy overlap.
TF_PARTS: Final = 0x100

#: With TF_PARTS (pybinder's own): the sender writes the parcel through a ring, byte p
#: at offset ``p % PARTS_RING`` of its send area, and overwrites ring bytes only once
#: the broker has copied them. The broker reports how many bytes of the parcel it has
#: copied in the send area's last 8 bytes (:data:`PROGRESS`), or :data:`WRITE_WHOLE`
#: when it will not copy as the parts come (its target has no room yet, or this CPU
#: does not order the report after the copy); the sender then writes the parcel whole.
#: A ring that fits the caches keeps the sender's copy out of main memory, so the
#: sender's copy and the broker's no longer share its bandwidth.
TF_RING: Final = 0x200

#: With TF_ONE_WAY, without TF_PARTS (pybinder's own): a oneway call sent in a window
#: (the sender goes on before the broker has copied it, see :data:`WINDOW_RING`).
#: The broker sends no BR_TRANSACTION_COMPLETE for it: it counts the call as settled
#: in the sender's settle words (:data:`END_WORDS`) instead, and a failure also as
#: failed, after sending the failure itself (BR_FAILED_REPLY or BR_DEAD_REPLY) as
#: usual. A stream of oneway calls then costs one message per call, not two.
TF_WINDOW: Final = 0x400

#: Whether this CPU makes a store visible only after the loads before it (x86-64 is
#: TSO), so that a sender that reads a word the broker writes after its copy (the
#: progress word of TF_RING, the settle words of TF_WINDOW) never overwrites bytes
#: the copy has yet to read. Other CPUs would need a fence Python cannot issue: there
#: the broker tells senders to write parcels whole, and senders use no window.
RING_IS_ORDERED: Final = platform.machine().lower() in ("x86_64", "amd64")

#: The ring's size in bytes (see :data:`TF_RING`): two parts of 512 KiB. It stays in
#: the L3 cache the CPUs share (each CPU's L2 is 512 KiB here), and needs half as many
#: parts, each announced by a message, as a 512 KiB ring of 256 KiB parts: 16 MiB
#: calls took about a fifth less time.
PARTS_RING: Final = 1024 * 1024

#: The progress word at the end of a send area: a little-endian i64 (see TF_RING).
PROGRESS: Final = struct.Struct("<q")

#: The progress word's value that tells the sender to write its parcel whole.
WRITE_WHOLE: Final = -1

#: The i64 words at the end of a send area, as indices into its last END_WORDS x 8
#: bytes: the two settle words, then the progress word. The settle words count the
#: thread's TF_WINDOW calls that failed (FAILED_WORD) and those the broker has settled,
#: copied into the target's region or failed (SETTLED_WORD), from the thread's hello;
#: the broker writes them and never reads them, and the sender may restore them while
#: none of its windowed calls is in flight (a parcel sent whole may reach them). Each
#: word is written and read by one aligned 8-byte access (a memoryview cast to "q"),
#: never byte by byte, so a poller never sees a word half written.
END_WORDS: Final = 3
FAILED_WORD: Final = 0
SETTLED_WORD: Final = 1
PROGRESS_WORD: Final = 2

#: Windowed oneway calls (TF_WINDOW) are written one after another, each at a 64-byte
#: boundary, in a ring of (at most) this many bytes at the start of the send area
#: (BC_TRANSACTION's head_offset says where); the sender writes over a call only once
#: the settle words say the broker has copied it. The size of the parts ring: it stays
#: in the shared cache.
WINDOW_RING: Final = PARTS_RING

#: The most transaction commands (BC_TRANSACTION, BC_REPLY, BC_PARCEL_READY) the
#: broker holds back for a thread whose oneway call waits for room in its target, to
#: run in order once it has room; a thread that sends more gets a protocol error. A
#: window (TF_WINDOW) must therefore hold fewer calls.
MAX_BACKLOG: Final = 64

#: The service manager's handle in every process (binder's context manager).
SERVICE_MANAGER_HANDLE: Final = 0

# A thread has two areas it shares with the broker: its send area, where parcels are
# built, and its loan area, where a caller fills large buffers in place. A parcel of
# data_len bytes is data_len - tail_len bytes of the send area from head_offset
# followed by tail_len bytes of the loan area from tail_offset (tail_len 0: no tail).
# head_offset is 0 but for a oneway call in a window (see WINDOW_RING).
SEND_AREA: Final = 0
LOAN_AREA: Final = 1

# -- commands a thread sends (binder's BC_*) ---------------------------------------
BC_HELLO_PROCESS: Final = 0x4301  # version, region_size: open a process state (binder open+mmap)
BC_HELLO_THREAD: Final = 0x4302  # version, process_key: join an open process state as a thread
BC_SET_SEND_AREA: Final = 0x4303  # size, area (SEND_AREA or LOAN_AREA), one sealed memfd attached
BC_ENTER_LOOPER: Final = 0x4304  # this thread now waits for incoming transactions
BC_TRANSACTION: Final = 0x4305  # handle, code, flags, data_len, tail_offset, tail_len, head_offset
BC_REPLY: Final = 0x4306  # flags, data_len, tail_offset, tail_len: answer the current transaction
BC_FREE_BUFFER: Final = 0x4307  # offset: the receiver is done with a buffer in its region
BC_RELEASE: Final = 0x4308  # handle, count: drop `count` references to a handle
BC_EXIT_LOOPER: Final = 0x4309  # this thread no longer waits for transactions
BC_PARCEL_READY: Final = 0x430A  # ready: the first `ready` bytes of a TF_PARTS parcel are written
BC_REQUEST_DEATH_NOTIFICATION: Final = 0x430B  # handle: send BR_DEAD_BINDER when its node dies
BC_CLEAR_DEATH_NOTIFICATION: Final = 0x430C  # handle: no BR_DEAD_BINDER for it after all
BC_SET_MAX_THREADS: Final = 0x430D  # n: ask for up to n loopers (BINDER_SET_MAX_THREADS)
BC_REGISTER_LOOPER: Final = 0x430E  # BC_ENTER_LOOPER for a thread of the pool (counts toward n)
BC_DEADLINE: Final = 0x430F  # ns: the next BC_TRANSACTION's deadline (CLOCK_MONOTONIC, ns)
BC_CANCEL_TRANSACTION: Final = 0x4310  # give up the two-way call this thread waits on
BC_DETACH: Final = 0x4311  # the call this thread runs is answered later, by BC_REPLY_TO
BC_REPLY_TO: Final = 0x4312  # id, flags, data_len, tail_offset, tail_len: answer a detached
#   call; BR_OK once its parcel is copied (the send area may be written again)

# -- returns the broker sends (binder's BR_*) ---------------------------------------
BR_HELLO_PROCESS: Final = 0x5201  # process_key, region_size, max_parcel: one read-only fd attached
BR_HELLO_THREAD: Final = 0x5202  # process_key
BR_OK: Final = 0x5203  # the last command that wants an answer succeeded
BR_ERROR: Final = 0x5204  # code, size, limit: the last command failed
BR_TRANSACTION: Final = 0x5205  # node, code, flags, offset, data_len, pid, uid, gid
BR_REPLY: Final = 0x5206  # offset, data_len
BR_TRANSACTION_COMPLETE: Final = 0x5207  # a oneway transaction was copied into its target
BR_DEAD_REPLY: Final = 0x5208  # handle: the target died before answering (the caller's handle)
BR_FAILED_REPLY: Final = 0x5209  # code, size, limit: the transaction could not be delivered
BR_RELEASE_NODE: Final = 0x520A  # node, count: no remote references left to a local node
BR_DEAD_BINDER: Final = 0x520B  # handle: the node behind a handle with a death link has died
BR_SPAWN_LOOPER: Final = 0x520C  # every looper is busy and work waits: start one more
BR_FDS: Final = 0x520D  # count: the next message carries `count` descriptors (SCM_RIGHTS)
BR_DEADLINE: Final = 0x520E  # ns: the next BR_TRANSACTION's deadline (CLOCK_MONOTONIC, ns)
BR_DETACHED: Final = 0x5210  # id: the call is detached; BC_REPLY_TO(id) answers it
BR_CANCELLED: Final = 0x5211  # id: the caller of a detached call gave up (process connection)
BR_CANCEL_DONE: Final = 0x520F  # found: the call is given up (1), or had ended, outcome sent (0)
BR_CALL_CANCELLED: Final = 0x5212  # offset: the caller of the call whose buffer is at offset,
#   run by this thread, gave up (on the thread's connection; is_cancelled() reads it)

# -- the calling convention inside parcel bodies ---------------------------------
# A call's body is [descriptor, args, kwargs]; a reply's body starts with a status.
REPLY_OK: Final = 0  # [REPLY_OK, result]
REPLY_EXCEPTION: Final = 1  # [REPLY_EXCEPTION, module, qualname, args, traceback]; args is
#   a list, or {"args": [...], "attrs": {...}} for an exception with attributes
REPLY_BINDER_ERROR: Final = 2  # [REPLY_BINDER_ERROR, error code (errors.ERROR_CODES), message]

#: The first user transaction code (binder's FIRST_CALL_TRANSACTION).
FIRST_CALL_TRANSACTION: Final = 1

#: The last code an interface method may have (binder's LAST_CALL_TRANSACTION); the
#: codes above are the runtime's own, answered before any Stub sees them.
LAST_CALL_TRANSACTION: Final = 0x00FFFFFF

#: Is the node's process alive? Answered True by the runtime (binder's '_PNG').
PING_TRANSACTION: Final = 0x5F504E47

#: The node's interface: ``[descriptor, interface hash, [[code, name, oneway], ...]]``,
#: answered by the runtime from the Stub's class (binder's '_NTF').
INTERFACE_TRANSACTION: Final = 0x5F4E5446

#: The most loopers a process may ask the broker to spawn (BC_SET_MAX_THREADS).
MAX_THREADS_LIMIT: Final = 256

# -- the service manager at handle 0, served inside the broker ---------------------
SERVICE_MANAGER_DESCRIPTOR: Final = "pybinder.IServiceManager"
SM_CHECK_SERVICE: Final = 1  # (name) -> binder or None
SM_WAIT_FOR_SERVICE: Final = 2  # (name, timeout seconds or None) -> binder, or ServiceNotFoundError
SM_ADD_SERVICE: Final = 3  # (name, binder) -> None
SM_LIST_SERVICES: Final = 4  # () -> [name, ...]
SM_STATUS: Final = 5  # () -> the broker's status dict
SM_REGISTER_FOR_NOTIFICATIONS: Final = 6  # (name, callback binder) -> None
SM_UNREGISTER_FOR_NOTIFICATIONS: Final = 7  # (name, callback binder) -> None

#: The interface of a service-notification callback: the broker calls its one oneway
#: method, code FIRST_CALL_TRANSACTION, with (name, binder) when ``name`` is added.
SERVICE_CALLBACK_DESCRIPTOR: Final = "pybinder.IServiceCallback"

_FIELDS: Final[dict[int, str]] = {
    BC_HELLO_PROCESS: "IQ",
    BC_HELLO_THREAD: "IQ",
    BC_SET_SEND_AREA: "QI",
    BC_ENTER_LOOPER: "",
    BC_TRANSACTION: "QIIQQQQ",
    BC_REPLY: "IQQQ",
    BC_FREE_BUFFER: "Q",
    BC_RELEASE: "QQ",
    BC_EXIT_LOOPER: "",
    BC_PARCEL_READY: "Q",
    BC_REQUEST_DEATH_NOTIFICATION: "Q",
    BC_CLEAR_DEATH_NOTIFICATION: "Q",
    BC_SET_MAX_THREADS: "I",
    BC_REGISTER_LOOPER: "",
    BC_DEADLINE: "Q",
    BC_CANCEL_TRANSACTION: "",
    BC_DETACH: "",
    BC_REPLY_TO: "QIQQQ",
    BR_HELLO_PROCESS: "QQQ",
    BR_HELLO_THREAD: "Q",
    BR_OK: "",
    BR_ERROR: "IQQ",
    BR_TRANSACTION: "QIIQQiII",
    BR_REPLY: "QQ",
    BR_TRANSACTION_COMPLETE: "",
    BR_DEAD_REPLY: "Q",
    BR_FAILED_REPLY: "IQQ",
    BR_RELEASE_NODE: "QQ",
    BR_DEAD_BINDER: "Q",
    BR_SPAWN_LOOPER: "",
    BR_FDS: "I",
    BR_DEADLINE: "Q",
    BR_CANCEL_DONE: "I",
    BR_DETACHED: "Q",
    BR_CANCELLED: "Q",
    BR_CALL_CANCELLED: "Q",
}

#: One precompiled struct per command: the u32 code followed by its fields.
COMMAND_STRUCTS: Final[dict[int, struct.Struct]] = {
    cmd: struct.Struct("<I" + fields) for cmd, fields in _FIELDS.items()
}

COMMAND_NAMES: Final[dict[int, str]] = {
    value: name for name, value in globals().items() if name.startswith(("BC_", "BR_"))
}

_CODE: Final = struct.Struct("<I")


def encode(cmd: int, *fields: int) -> bytes:
    """Pack one command: ``encode(BC_FREE_BUFFER, offset)`` -> bytes.

    Raises:
        ProtocolError: unknown command or wrong number of fields.
    """
    try:
        return COMMAND_STRUCTS[cmd].pack(cmd, *fields)
    except (KeyError, struct.error) as exc:
        raise ProtocolError(f"cannot encode command {cmd:#x} with {fields}: {exc}") from None


def batch(commands: list[bytes]) -> list[bytes]:
    """Join encoded commands into as few messages as fit in :data:`MAX_MESSAGE` bytes."""
    messages: list[bytes] = []
    current = b""
    for command in commands:
        if current and len(current) + len(command) > MAX_MESSAGE:
            messages.append(current)
            current = b""
        current += command
    if current:
        messages.append(current)
    return messages


def decode(message: bytes | memoryview) -> list[tuple[int, ...]]:
    """Split a message into commands; each is a tuple ``(cmd, field, ...)``.

    Raises:
        ProtocolError: an unknown command code or a truncated command.
    """
    end = len(message)
    if end >= 4:  # the common case, a message of one whole command
        layout = COMMAND_STRUCTS.get(_CODE.unpack_from(message)[0])
        if layout is not None and layout.size == end:
            return [layout.unpack(message)]
    commands = []
    pos = 0
    while pos < end:
        if end - pos < 4:
            raise ProtocolError(f"truncated command code at byte {pos} of {end}")
        (cmd,) = _CODE.unpack_from(message, pos)
        layout = COMMAND_STRUCTS.get(cmd)
        if layout is None:
            raise ProtocolError(f"unknown command {cmd:#x} at byte {pos}")
        if end - pos < layout.size:
            name = COMMAND_NAMES[cmd]
            raise ProtocolError(f"truncated {name}: {end - pos} of {layout.size} bytes")
        commands.append(layout.unpack_from(message, pos))
        pos += layout.size
    return commands
