"""Where the broker listens: one rule, shared by the broker and every client."""

from __future__ import annotations

import os
from pathlib import Path


def resolve_socket_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The broker's socket path, in order of precedence.

    1. ``explicit`` (the ``--socket`` option or ``connect(socket_path=...)``);
    2. ``$PYBINDER_SOCKET``;
    3. ``$XDG_RUNTIME_DIR/pybinder/broker.sock``;
    4. ``/tmp/pybinder-<uid>/broker.sock``.

    Only resolves; :func:`ensure_socket_dir` creates the directory.
    """
    if explicit:
        return Path(explicit)
    if os.environ.get("PYBINDER_SOCKET"):
        return Path(os.environ["PYBINDER_SOCKET"])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "pybinder" / "broker.sock"
    return Path(f"/tmp/pybinder-{os.getuid()}") / "broker.sock"


def ensure_socket_dir(path: Path) -> None:
    """Create the socket's directory with mode 0700 if it does not exist yet."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
