"""Machine description, ratios, markdown tables, JSON and the PNG figure."""

from __future__ import annotations

import fcntl
import importlib
import importlib.metadata
import json
import math
import os
import platform
import sys
import textwrap
from pathlib import Path
from typing import Any

from pybinder import compiled

from .common import fmt_size

DISTRIBUTIONS = (
    "pybinder",
    "pyzmq",
    "Pyro5",
    "msgpack",
    "iceoryx2",
    "psutil",
    "tqdm",
    "matplotlib",
)
BASELINE_NAMES = ("pipe", "socketpair")


# --------------------------------------------------------------------------
# machine


def _cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo, if any."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_bytes() -> int | None:
    """Total RAM in bytes (psutil if installed, else /proc/meminfo)."""
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _default_pipe_size() -> int | None:
    """Capacity in bytes of a fresh os.pipe (F_GETPIPE_SZ)."""
    r, w = os.pipe()
    try:
        return fcntl.fcntl(w, 1032)  # F_GETPIPE_SZ
    except OSError:
        return None
    finally:
        os.close(r)
        os.close(w)


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that matter here (None = absent)."""
    versions: dict[str, str | None] = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


def machine_info() -> dict[str, Any]:
    """Everything needed to tell which machine produced a result."""
    uname = platform.uname()
    return {
        "cpus_online": os.cpu_count(),
        "cpus_usable": sorted(os.sched_getaffinity(0)),
        "cpu_model": _cpu_model(),
        "memory_bytes": _memory_bytes(),
        "kernel": f"{uname.system} {uname.release} {uname.version}",
        "machine": uname.machine,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "python_executable": sys.executable,
        "loadavg_at_start": list(os.getloadavg()),
        "pipe_capacity_bytes": _default_pipe_size(),
        "packages": package_versions(),
        "pybinder_compiled": pybinder_compiled(),
    }


def pybinder_compiled() -> bool:
    """Whether pybinder's broker and wire modules run compiled (mypyc) in this install."""
    for name in compiled.COMPILED_MODULES:
        importlib.import_module(name)
    return compiled.running_compiled()


# --------------------------------------------------------------------------
# ratios


def _index(rows: list[dict[str, Any]], key: str) -> dict[Any, dict[str, Any]]:
    return {row[key]: row for row in rows}


def add_ratios(transports: list[dict[str, Any]], memcpy: dict[str, Any]) -> None:
    """Add speed-ups vs pipe and socketpair (>1 = better) and memcpy fractions."""
    by_name = {t["name"]: t for t in transports if t["status"] == "ok"}
    large = memcpy.get("best_MBps")
    per_size = memcpy.get("by_size_MBps", {})
    for t in transports:
        for row in t.get("stream", []):
            if large:
                row["fraction_of_memcpy"] = row["MBps"] / large
            if per_size.get(str(row["size"])):
                row["fraction_of_memcpy_same_size"] = row["MBps"] / per_size[str(row["size"])]
        for base in BASELINE_NAMES:
            ref = by_name.get(base)
            if ref is None:
                continue
            _ratio(
                t.get("echo", []),
                _index(ref.get("echo", []), "size"),
                "size",
                "median_us",
                base,
                True,
            )
            _ratio(
                t.get("stream", []),
                _index(ref.get("stream", []), "size"),
                "size",
                "MBps",
                base,
                False,
            )
            agg_ref = _index(ref.get("aggregate", []), "clients")
            _ratio(t.get("aggregate", []), agg_ref, "clients", "calls_per_s", base, False)


def _ratio(
    rows: list[dict[str, Any]],
    ref: dict[Any, dict[str, Any]],
    key: str,
    metric: str,
    base: str,
    lower_is_better: bool,
) -> None:
    """Store ``vs_<base>`` on each row whose key the baseline also measured."""
    for row in rows:
        other = ref.get(row[key])
        if not other or not other.get(metric) or not row.get(metric):
            continue
        a, b = row[metric], other[metric]
        row[f"vs_{base}"] = b / a if lower_is_better else a / b


# --------------------------------------------------------------------------
# markdown


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _vs(row: dict[str, Any]) -> str:
    parts = [f"{row[k]:.2f}x" for k in ("vs_pipe", "vs_socketpair") if k in row]
    return " / ".join(parts)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _copies_cell(t: dict[str, Any]) -> str:
    copies = t.get("copies") or {}
    value = copies.get("per_byte")
    if value is None:
        return "-"
    return f"{value:.2f} ({copies.get('kind', '?')})"


def _status_section(result: dict[str, Any]) -> list[str]:
    rows = []
    for t in result["transports"]:
        state = t["status"] if t["status"] == "ok" else f"{t['status']}: {t.get('reason', '')}"
        rows.append([t["name"], state, _copies_cell(t), t.get("received", "")])
    lines = ["### Transports", ""]
    lines += _table(["transport", "status", "copies/byte (>= 64 KiB)", "received means"], rows)
    return lines


def _echo_section(result: dict[str, Any]) -> list[str]:
    sizes = result["config"]["echo_sizes"]
    rows = []
    for t in result["transports"]:
        by_size = _index(t.get("echo", []), "size")
        if not by_size:
            continue
        cells = []
        for s in sizes:
            row = by_size.get(s)
            cells.append(f"{_fmt(row['median_us'])} / {_fmt(row['p99_us'])}" if row else "-")
        rows.append([t["name"], *cells])
    lines = ["### Echo round trip, median / p99 (µs; lower is better)", ""]
    lines += _table(["transport", *[fmt_size(s) for s in sizes]], rows)
    lines += ["", "Speed-up of the median vs pipe / socketpair (>1 = faster):", ""]
    vs_rows = [
        [t["name"], *[_vs(_index(t["echo"], "size").get(s, {})) or "-" for s in sizes]]
        for t in result["transports"]
        if t.get("echo")
    ]
    lines += _table(["transport", *[fmt_size(s) for s in sizes]], vs_rows)
    return lines


def _stream_section(result: dict[str, Any]) -> list[str]:
    sizes = result["config"]["stream_sizes"]
    memcpy = result.get("memcpy", {})
    rows, vs_rows = [], []
    for t in result["transports"]:
        by_size = _index(t.get("stream", []), "size")
        if not by_size:
            continue
        cells = []
        for s in sizes:
            row = by_size.get(s)
            frac = row.get("fraction_of_memcpy") if row else None
            pct = f" ({frac:.0%})" if frac is not None else ""
            cells.append(f"{_fmt(row['MBps'], 0)}{pct}" if row else "-")
        rows.append([t["name"], *cells])
        vs_rows.append([t["name"], *[_vs(by_size.get(s, {})) or "-" for s in sizes]])
    same = memcpy.get("by_size_MBps") or {}
    if same:
        rows.append(["*memcpy, same size*", *[_fmt(same.get(str(s)), 0) for s in sizes]])
    big = f"{_fmt(memcpy.get('best_MBps'), 0)} MB/s for {fmt_size(memcpy.get('bytes', 0))}"
    lines = [
        "### One-way streaming, MB/s (10^6 B/s; higher is better)",
        "",
        f"In brackets: share of single-thread memcpy ({big}, the one-copy limit).",
        "",
    ]
    lines += _table(["transport", *[fmt_size(s) for s in sizes]], rows)
    lines += ["", "Speed-up vs pipe / socketpair (>1 = faster):", ""]
    lines += _table(["transport", *[fmt_size(s) for s in sizes]], vs_rows)
    return lines


def _aggregate_section(result: dict[str, Any]) -> list[str]:
    counts = result["config"]["clients"]
    size = result["config"]["aggregate_size"]
    rows = []
    for t in result["transports"]:
        by_n = _index(t.get("aggregate", []), "clients")
        if not by_n:
            continue
        cells = []
        for n in counts:
            row = by_n.get(n)
            vs = _vs(row) if row else ""
            cells.append(
                f"{_fmt(row['calls_per_s'], 0)}" + (f" ({vs})" if vs else "") if row else "-"
            )
        rows.append([t["name"], *cells])
    lines = [f"### Aggregate {fmt_size(size)} echo calls/s (speed-up vs pipe / socketpair)", ""]
    lines += _table(["transport", *[f"{n} client{'s' if n > 1 else ''}" for n in counts]], rows)
    return lines


def _targets_section(result: dict[str, Any]) -> list[str]:
    rows = result.get("targets") or []
    if not rows:
        return []
    met_text = {True: "yes", False: "**no**", None: "not measured"}
    signs = {"<=": "≤", ">=": "≥", "<": "<", "==": "="}
    table = [
        [
            f"{row['target']} {signs[row['comparison']]} {row['limit']:g}",
            *("-" if v is None else f"{v:.3g}" for v in (row["value"], row["loan_value"])),
            met_text[row["met"]],
        ]
        for row in rows
    ]
    lines = [
        "### pybinder's targets (ratios within this run)",
        "",
        "Stated for `--full` with the default `--pin cross`; met or not by the plain"
        " pybinder row, the loaned row beside it.",
        "",
    ]
    lines += _table(["target", "pybinder", "loaned", "met"], table)
    return lines


def _machine_line(result: dict[str, Any]) -> str:
    m = result["machine"]
    mem = m.get("memory_bytes")
    mem_txt = f", {mem / 2**30:.0f} GiB" if mem else ""
    load = ", ".join(f"{x:.2f}" for x in m["loadavg_at_start"])
    kernel = m["kernel"].split(" #")[0]
    return (
        f"Machine: {m['cpus_online']} CPUs ({m['cpu_model']}{mem_txt}), {kernel}, "
        f"{m['python']} (pybinder {_build(m)}); load at start {load};"
        f" pin={result['config']['pin']} "
        f"({result['config']['pin_note']}); mode={result['config']['mode']}"
        f"{_rounds_note(result['config'].get('rounds', 1))}"
    )


def _build(machine: dict[str, Any]) -> str:
    # Results from before the build compiled anything have no flag: pure Python.
    return "compiled with mypyc" if machine.get("pybinder_compiled") else "pure Python"


def _rounds_note(rounds: int) -> str:
    if rounds == 1:
        return ""
    return f"; {rounds} interleaved rounds, each figure the median of the rounds"


def markdown(result: dict[str, Any]) -> str:
    """Render the whole result as markdown."""
    lines = [
        f"## pybinder comparison benchmark ({result['created']})",
        "",
        _machine_line(result),
        "",
    ]
    sections = (
        _status_section,
        _echo_section,
        _stream_section,
        _aggregate_section,
        _targets_section,
    )
    for section in sections:
        lines += section(result)
        lines.append("")
    notes = result.get("notes", [])
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write the result as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")


# --------------------------------------------------------------------------
# figure


def write_plot(result: dict[str, Any], path: Path) -> str | None:
    """Draw latency and throughput vs size (log-log); return an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"no figure: {exc}"
    fig, (ax_lat, ax_bw) = plt.subplots(1, 2, figsize=(12, 5.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, t in enumerate(result["transports"]):
        style = {"marker": "o", "label": t["name"], "color": colors[i % len(colors)]}
        if t.get("echo"):
            xs = [r["size"] for r in t["echo"]]
            ax_lat.plot(xs, [r["median_us"] for r in t["echo"]], **style)
        if t.get("stream"):
            xs = [r["size"] for r in t["stream"]]
            ax_bw.plot(xs, [r["MBps"] for r in t["stream"]], **style)
    memcpy = result.get("memcpy", {})
    if memcpy.get("best_MBps"):
        label = f"memcpy {fmt_size(memcpy['bytes'])} (1-copy limit)"
        ax_bw.axhline(memcpy["best_MBps"], color="black", linestyle="--", linewidth=1, label=label)
    by_size = memcpy.get("by_size_MBps") or {}
    if by_size:
        xs = sorted(int(s) for s in by_size)
        ys = [by_size[str(x)] for x in xs]
        ax_bw.plot(
            xs, ys, color="grey", linestyle=":", marker="x", label="memcpy, same size, reused"
        )
    _decorate(ax_lat, "Echo round trip (median)", "latency (µs)", result["config"]["echo_sizes"])
    _decorate(ax_bw, "One-way streaming", "throughput (MB/s)", result["config"]["stream_sizes"])
    fig.suptitle(textwrap.fill(_machine_line(result), width=170), fontsize=7)
    labels: dict[str, Any] = {}
    for ax in (ax_lat, ax_bw):
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            labels.setdefault(label, handle)
    fig.legend(list(labels.values()), list(labels), loc="lower center", ncol=5, fontsize=8)
    fig.tight_layout(rect=(0, 0.12, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _decorate(ax: Any, title: str, ylabel: str, sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [fmt_size(s) for s in sizes])
    ax.tick_params(axis="x", labelrotation=30)  # 16 MiB and 64 MiB sit close together
    ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel("payload size (bytes)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
