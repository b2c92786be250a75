"""Shared memory: receive regions (broker-written, owner-read-only) and send areas.

A **receive region** is one process's mailbox, as binder's mmap'd buffer space. The
broker creates it with ``posix_ipc.SharedMemory`` under a random /dev/shm name, opens
a second, read-only descriptor for the owner, and removes the name at once: from then
on only the broker (read-write) and the owner (read-only, via SCM_RIGHTS) hold it, no
other process can open it by name, and nothing stays in /dev/shm when anyone dies.
The owner maps its descriptor with ``PROT_READ``; because the descriptor is
``O_RDONLY`` the kernel refuses ``PROT_WRITE`` mappings and ``mprotect`` upgrades
(binder clears VM_MAYWRITE for the same effect). The file's mode is 0400, so reopening
``/proc/self/fd/N`` for writing fails for any non-root user.

Regions are backed when they are made (``posix_fallocate``): a full /dev/shm is a
clear error at connect, never a SIGBUS in the broker at its first copy. The name
lives from creation to unlink, a few microseconds; a broker killed in between leaves
it, and the next broker to start removes every name of a broker that no longer runs
(:func:`sweep_dead_brokers_names`; each name carries its broker's pid).

A **send area** is one thread's outbox, shared with the broker only: a ``memfd`` the
thread creates, sealed against shrinking and growing (``F_SEAL_SHRINK``,
``F_SEAL_GROW``, ``F_SEAL_SEAL``) so it cannot pull pages out from under the
broker's mapping while the broker copies from it, and handed to the broker over the
thread's socket. The broker refuses any other descriptor (:func:`map_send_area`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import mmap
import os
import secrets
from typing import Final

import posix_ipc

from pybinder.errors import ProtocolError, RegionUnavailableError

#: Binder's default buffer space per process: 1 MiB minus two 4 KiB pages (BINDER_VM_SIZE).
DEFAULT_REGION_SIZE: Final = 1024 * 1024 - 8 * 1024

#: The smallest region the broker hands out, in bytes.
MIN_REGION_SIZE: Final = 64 * 1024

#: Prefix of every /dev/shm name this project creates (they live for microseconds).
SHM_PREFIX: Final = "pybinder-"

#: Seals a send area must carry before the broker maps it.
REQUIRED_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

#: Seals a send area must not carry: the broker writes the words at its end.
WRITE_SEALS: Final = fcntl.F_SEAL_WRITE | 0x0010  # F_SEAL_FUTURE_WRITE (Linux 5.1)

#: Where POSIX shared memory names live.
SHM_DIR: Final = "/dev/shm"


class BrokerRegion:
    """The broker's read-write mapping of one process's receive region.

    Attributes:
        size: the region's size in bytes.
        view: a writable memoryview of the whole region.
        address: where the mapping starts in the broker's memory (valid until close).

    Raises:
        RegionUnavailableError: /dev/shm has no room for ``size`` bytes.
        OSError: the region cannot be created or mapped otherwise.
    """

    def __init__(self, size: int) -> None:
        name = f"/{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(8)}"
        writable = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o400, size=size)
        try:
            readable = posix_ipc.SharedMemory(name, 0, read_only=True)
        finally:
            writable.unlink()
        try:
            _back(writable.fd, size)
            self._map = mmap.mmap(writable.fd, size)
        except BaseException:
            os.close(readable.fd)
            raise
        finally:
            writable.close_fd()
        self.size = size
        self.view = memoryview(self._map)
        self.address = buffer_address(self._map)
        self._owner_fd: int | None = readable.fd

    def take_owner_fd(self) -> int:
        """The read-only descriptor for the owner; the caller closes it after sending."""
        fd, self._owner_fd = self._owner_fd, None
        if fd is None:
            raise RuntimeError("the owner's descriptor was already handed over")
        return fd

    def close(self) -> None:
        """Unmap the region and close any descriptor not yet handed over."""
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None
        self.view.release()
        self._map.close()


def _back(fd: int, size: int) -> None:
    """Give a new region its pages now (``posix_fallocate``), so that a full /dev/shm
    fails here and not as a SIGBUS at the first copy into it.

    Raises:
        RegionUnavailableError: /dev/shm is full.
    """
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
            raise
        stats = os.statvfs(SHM_DIR)
        free = stats.f_bavail * stats.f_frsize
        raise RegionUnavailableError(
            f"{SHM_DIR} is full: a receive region of {size} bytes does not fit in the"
            f" {free} bytes free",
            size,
            free,
        ) from None


def sweep_dead_brokers_names(shm_dir: str = SHM_DIR) -> int:
    """Remove the /dev/shm names that brokers no longer running left (a broker
    killed between creating a region and unlinking its name); return how many.

    Each name is ``pybinder-<broker pid>-<random>``; a name whose pid runs is left
    alone (another broker may be making a region right now).
    """
    removed = 0
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return 0
    for name in names:
        pid_text = name[len(SHM_PREFIX) :].split("-", 1)[0]
        if not name.startswith(SHM_PREFIX) or not pid_text.isdigit():
            continue
        if _pid_runs(int(pid_text)):
            continue
        with contextlib.suppress(posix_ipc.ExistentialError, OSError):
            posix_ipc.unlink_shared_memory("/" + name)
            removed += 1
    return removed


def _pid_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def buffer_address(buffer: mmap.mmap | memoryview) -> int:
    """The address of a writable, contiguous buffer's first byte (for ``ctypes.memmove``).

    It stays valid while the buffer's memory is mapped; the caller must not copy
    after the mapping is closed.
    """
    anchor = ctypes.c_char.from_buffer(buffer)
    address = ctypes.addressof(anchor)
    del anchor  # release the export, or the mapping could never be closed
    return address


def map_region_readonly(fd: int, size: int) -> mmap.mmap:
    """Map a receive region read-only in its owner (``PROT_READ``, ``MAP_SHARED``).

    Raises:
        OSError: the descriptor cannot be mapped.
    """
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)


def create_send_area(size: int) -> tuple[int, mmap.mmap]:
    """Create a sealed ``memfd`` of ``size`` bytes and map it; return ``(fd, mapping)``.

    The caller sends ``fd`` to the broker and then closes it.
    """
    fd = os.memfd_create("pybinder-send", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
        return fd, mmap.mmap(fd, size)
    except BaseException:
        os.close(fd)
        raise


def map_send_area(fd: int, size: int) -> mmap.mmap:
    """The broker's mapping of a thread's send area, after checking it is safe to map.

    The broker reads it, and writes only the words at its end (the progress word of
    ``protocol.TF_RING`` and the settle words of ``protocol.TF_WINDOW``); ``ctypes``
    takes the address of writable buffers only. Only an ordinary memfd (no hugetlb)
    opened read-write (not O_APPEND), sealed with :data:`REQUIRED_SEALS` and none of
    :data:`WRITE_SEALS`, of at least ``size`` bytes, is taken: its pages can neither
    go away nor refuse the broker's writes, so no client can make the broker fault.

    Raises:
        ProtocolError: any other descriptor, or one that cannot be mapped (EPERM,
            EACCES, ENOMEM, EINVAL, ...): the error names why.
    """
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        status_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        stat = os.fstat(fd)
    except OSError:
        raise ProtocolError("a send area must be a sealed memfd") from None
    access = status_flags & os.O_ACCMODE
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        raise ProtocolError(f"send area seals {seals:#x} lack {REQUIRED_SEALS:#x}")
    if seals & WRITE_SEALS:
        raise ProtocolError(f"send area seals {seals:#x} forbid writing")
    if access != os.O_RDWR or status_flags & os.O_APPEND:
        raise ProtocolError("a send area must be open for reading and writing, not appending")
    if stat.st_blksize != mmap.PAGESIZE:
        raise ProtocolError(
            f"a send area must be an ordinary memfd, not {stat.st_blksize}-byte pages"
        )
    if size <= 0 or stat.st_size < size:
        raise ProtocolError(f"send area claims {size} bytes but holds {stat.st_size}")
    try:
        return mmap.mmap(fd, size)
    except OSError as exc:
        raise ProtocolError(f"cannot map the send area: {os.strerror(exc.errno or 0)}") from None
