"""Hand-driven broker connections, for tests that speak the protocol themselves."""

from __future__ import annotations

import mmap
import os
import socket

from pybinder import protocol
from pybinder.protocol import BC_SET_SEND_AREA, BR_OK, MAX_MESSAGE, SEND_AREA
from pybinder.region import create_send_area

#: Seconds a hand-driven connection waits for the broker.
RAW_TIMEOUT_S = 10


def raw_connection(socket_path: str) -> socket.socket:
    """A new SEQPACKET connection to the broker at ``socket_path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.settimeout(RAW_TIMEOUT_S)
    sock.connect(socket_path)
    return sock


def answer(sock: socket.socket) -> list[tuple[int, ...]]:
    """The commands of the broker's next message on ``sock``."""
    return list(protocol.decode(sock.recv(MAX_MESSAGE)))


def give_send_area(sock: socket.socket, size: int) -> mmap.mmap:
    """Create a sealed send area of ``size`` bytes, register it for the thread behind
    ``sock`` (BC_SET_SEND_AREA) and return its mapping, once the broker said BR_OK."""
    fd, mapping = create_send_area(size)
    try:
        socket.send_fds(sock, [protocol.encode(BC_SET_SEND_AREA, size, SEND_AREA)], [fd])
    finally:
        os.close(fd)
    assert answer(sock)[0][0] == BR_OK
    return mapping
