"""Which modules mypyc compiles to C, and whether this process runs them compiled.

The broker's hot path (decode, route, allocate, copy, send), and the client's and the
server's (``runtime/thread_state``: send, wait, serve), is ordinary Python that
``pip install`` also compiles with mypyc when a C compiler is at hand (see
``setup.py`` and docs/performance.md): the same source, about a third fewer
instructions per call in the broker and a fifth fewer in the client and the server.
Python imports a module's extension (``*.so``) before its source, so two cases need
care, and :func:`use_compiled_or_source` handles both before any compiled module is
imported:

- ``PYBINDER_PURE=1`` in the environment runs the source everywhere (to debug, or to
  compare the two);
- in a source checkout installed with ``pip install -e``, a compiled module older
  than its source would silently run the old code. Then every compiled module runs
  from source (they call each other directly, so they are used all or none), with a
  warning to rebuild.

This module imports nothing from pybinder: ``setup.py`` reads :data:`COMPILED_MODULES`
from it before the package's dependencies are installed.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

#: The modules mypyc compiles: everything the broker runs per transaction, and each
#: thread's channel to it (ThreadState) on the client's and the server's side.
COMPILED_MODULES = (
    "pybinder.protocol",
    "pybinder.parcel",
    "pybinder.region",
    "pybinder.broker.allocator",
    "pybinder.broker.records",
    "pybinder.broker.process",
    "pybinder.broker.one_copy",
    "pybinder.broker.translate",
    "pybinder.broker.parts",
    "pybinder.broker.death",
    "pybinder.broker.connection",
    "pybinder.broker.router",
    "pybinder.broker.daemon",
    "pybinder.runtime.thread_state",
)

#: Set to a non-empty value other than "0" to run every module from its source.
PURE_ENV = "PYBINDER_PURE"

#: A source file this much newer than its extension (in seconds) was edited after the
#: build. Installing a wheel writes both within a second or two, in either order.
STALE_AFTER_S = 5.0

_PACKAGE_DIR = Path(__file__).resolve().parent


def source_path(module: str) -> Path:
    """The ``.py`` file of a module of this package (``pybinder.x.y`` -> ``x/y.py``)."""
    return _PACKAGE_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")


def extension_path(module: str) -> Path | None:
    """The compiled extension next to a module's source, or None if it was not built."""
    source = source_path(module)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale_modules() -> list[str]:
    """Compiled modules whose source was changed after they were built."""
    stale = []
    for module in COMPILED_MODULES:
        extension = extension_path(module)
        if extension is not None:
            age = source_path(module).stat().st_mtime - extension.stat().st_mtime
            if age > STALE_AFTER_S:
                stale.append(module)
    return stale


def pure_requested() -> bool:
    """Whether ``PYBINDER_PURE`` asks for every module to run from source."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def is_compiled(module: ModuleType) -> bool:
    """Whether ``module`` was loaded from a compiled extension."""
    return isinstance(getattr(module, "__loader__", None), importlib.machinery.ExtensionFileLoader)


def running_compiled() -> bool:
    """Whether this process imported compiled modules, and only compiled ones."""
    loaded = [sys.modules[name] for name in COMPILED_MODULES if name in sys.modules]
    return bool(loaded) and all(is_compiled(module) for module in loaded)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the compiled modules' source files ahead of their extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, source_path(fullname))


def use_compiled_or_source() -> None:
    """Make the compiled modules load from source when asked or when stale (see the
    module docstring). Call before importing any of them; later calls do nothing."""
    if any(isinstance(finder, _SourceFinder) for finder in sys.meta_path):
        return
    if not pure_requested():
        stale = stale_modules()
        if not stale:
            return
        warnings.warn(
            f"pybinder: {', '.join(stale)} changed after it was compiled, so every"
            " compiled module runs from source (slower); run `pip install -e .` again"
            " to rebuild",
            RuntimeWarning,
            stacklevel=2,
        )
    sys.meta_path.insert(0, _SourceFinder())
