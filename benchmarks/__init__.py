"""Comparison benchmarks for pybinder against other Linux IPC transports.

Run ``python -m benchmarks.bench --quick`` from the repository root, or call
:func:`benchmarks.bench.main` (``pybinder bench`` does).  See
``benchmarks/README.md`` for what is measured and how.
"""
