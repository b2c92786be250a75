"""Hand-driven broker connections, for tests that speak the protocol themselves."""

from __future__ import annotations

import socket

from pybinder import protocol
from pybinder.protocol import MAX_MESSAGE

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
