"""Where the broker listens: one rule, shared by the broker and every client."""

from __future__ import annotations

import os
import stat
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


def ensure_socket_dir(path: Path, shared: bool = False) -> None:
    """Create the socket's directory (mode 0700, or 0755 when ``shared``: the socket's
    own mode then says who may connect) if it does not exist yet, and refuse one
    that another user could have prepared: owned by a uid other than ours or root's,
    or writable by its group or others (unless it is sticky, as /tmp).

    Raises:
        PermissionError: the directory is not one this process can trust.
        OSError: it cannot be created.
    """
    directory = path.parent
    if not directory.exists():
        directory.mkdir(mode=0o755 if shared else 0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{directory} is not a directory (a symlink?)")
    if info.st_uid not in (os.getuid(), 0):
        raise PermissionError(f"{directory} belongs to uid {info.st_uid}, not to this user")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise PermissionError(f"{directory} is writable by others (mode {info.st_mode & 0o777:o})")
