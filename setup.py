"""Build pybinder; compile the broker's hot path with mypyc when a C compiler is at hand.

The metadata lives in pyproject.toml. ``pybinder/broker/_stream.c`` is the broker's
copy of large parcels with streaming stores, a small C extension. The modules in
``pybinder.compiled.COMPILED_MODULES`` are plain Python that mypyc also compiles to
C extensions (about a third fewer instructions per broker call; see
docs/performance.md). Without a working compiler the extensions are skipped and
pybinder runs as pure Python (the broker then copies with ``memmove``);
``PYBINDER_PURE=1`` at build time skips them too.
"""

from __future__ import annotations

import os
import runpy
import sys

from setuptools import Extension, setup


def compiled_extensions() -> list:
    compiled = runpy.run_path("pybinder/compiled.py")
    if compiled["pure_requested"]():
        return []
    paths = [os.path.join(*name.split(".")) + ".py" for name in compiled["COMPILED_MODULES"]]
    try:
        from mypyc.build import mypycify

        extensions = mypycify(paths, opt_level="3")
    except (Exception, SystemExit) as exc:  # mypyc exits on a type error
        print(f"pybinder: not compiling with mypyc ({exc!r}); pure Python", file=sys.stderr)
        return []
    for extension in extensions:
        extension.optional = True  # no C compiler: build the rest, run from source
    return extensions


def stream_extension() -> list:
    if runpy.run_path("pybinder/compiled.py")["pure_requested"]():
        return []
    return [Extension("pybinder.broker._stream", ["pybinder/broker/_stream.c"], optional=True)]


setup(ext_modules=stream_extension() + compiled_extensions())
