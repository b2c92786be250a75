"""Types of the C extension ``_stream.c``: the broker's streaming copy."""

#: 1 where the copy uses streaming (non-temporal) stores, 0 where it is a memmove.
STREAMING: int

def copy(destination: int, source: int, size: int, /) -> None:
    """Copy ``size`` bytes between two non-overlapping addresses; releases the GIL."""
