"""The calculator's interface, shared by its server and its clients."""

from __future__ import annotations

import pybinder


class ICalc(pybinder.Interface):
    """A small calculator that also checksums large buffers in place."""

    DESCRIPTOR = "example.ICalc"

    @pybinder.method
    def add(self, a: int, b: int) -> int:
        """a + b."""

    @pybinder.oneway
    def log(self, line: str) -> None:
        """Append ``line`` to the server's log; the caller does not wait."""

    @pybinder.method
    def checksum(self, data: bytes) -> str:
        """sha256 hex of ``data``, which the server reads in place in its region."""

    @pybinder.method
    def history(self) -> list[str]:
        """What the server has done, one line per call."""
