"""``report.md`` for a run: the results table, KL against bits per weight, the layers where
quantization hurts most, time and memory per stage, and what it takes to reproduce the run.

Written by ``yaqa run`` next to ``results.json``.  The plot needs matplotlib (``pip install
'yaqa[plot]'``); without it the report says so and is complete otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import math
import platform
import re
import resource
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

PLOT_NAME = "kl_vs_bits.png"
TOP_LAYERS = 10
_VERSIONED = ("yaqa", "torch", "transformers", "safetensors", "accelerate", "numpy", "lm_eval",
              "datasets", "matplotlib")


# -- time and memory per stage ----------------------------------------------------------------


@dataclass
class Stage:
    """``peak_rss_mb``: the process's resident-memory high-water mark during the stage (since
    the process started where the kernel cannot reset it: ``rss_since_start``);
    ``peak_gpu_mb``: torch's peak CUDA allocation during the stage (None without CUDA)."""

    name: str
    seconds: float
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    rss_since_start: bool = False


def _hwm_kb() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(r"VmHWM:\s+(\d+)\s+kB", status)
    return int(m.group(1)) if m else None


def _reset_hwm() -> bool:
    # Linux >= 4.0: writing 5 to clear_refs resets the peak-RSS counter, which gives true
    # per-stage peaks; elsewhere the peak since process start is reported (and marked so).
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _hwm_kb() is not None


class StageLog:
    """Wall time and peak memory of each named stage of a run."""

    def __init__(self) -> None:
        self.stages: list[Stage] = []

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        per_stage = _reset_hwm()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        try:
            yield
        finally:
            if cuda or (torch.cuda.is_available() and torch.cuda.is_initialized()):
                torch.cuda.synchronize()
                gpu = torch.cuda.max_memory_allocated() / 2**20
            else:
                gpu = None
            if per_stage:
                rss = _hwm_kb() / 1024
            else:  # ru_maxrss is kB on Linux, bytes on macOS
                ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                rss = ru / 2**20 if sys.platform == "darwin" else ru / 1024
            self.stages.append(Stage(name, time.perf_counter() - t, rss, gpu,
                                     rss_since_start=not per_stage))

    def as_dicts(self) -> list[dict]:
        return [asdict(s) for s in self.stages]


# -- versions ---------------------------------------------------------------------------------


def versions() -> dict[str, str]:
    """Python, platform, installed versions of the packages that shape results, and the GPU."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in _VERSIONED:
        try:
            out[pkg] = importlib.metadata.version(pkg.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            continue
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = str(torch.version.cuda)
    return out


# -- pieces of the report ---------------------------------------------------------------------


def _get(row, name, default=None):
    return row.get(name, default) if isinstance(row, Mapping) else getattr(row, name, default)


def row_label(row) -> str:
    bits = _get(row, "bits")
    return f"{_get(row, 'method')}-int{bits}" if bits else str(_get(row, "method"))


def task_names(rows: Sequence) -> list[str]:
    names: list[str] = []
    for r in rows:
        for t in (_get(r, "extra") or {}).get("tasks", {}):
            if t not in names:
                names.append(t)
    return names


def task_cell(row, task: str) -> str:
    """``value ± stderr`` of the task's headline metric, ``-`` when the row lacks it."""
    s = (_get(row, "extra") or {}).get("tasks", {}).get(task)
    if not s:
        return "-"
    se = s.get("stderr")
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{s['value']:.4f}"
    return f"{s['value']:.4f} ± {se:.4f}"


def task_headers(rows: Sequence) -> list[str]:
    heads = []
    for t in task_names(rows):
        metric = next(((_get(r, "extra") or {})["tasks"][t]["metric"] for r in rows
                       if t in (_get(r, "extra") or {}).get("tasks", {})), "")
        heads.append(f"{t} {metric}".strip())
    return heads


def _fmt(x, spec: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def markdown_table(rows: Sequence) -> str:
    """The results table (KL, perplexity, top-1, tasks with standard errors) in Markdown."""
    heads = ["method", "bits", "group", "bits/weight", "size MB", "KL", "ppl", "top-1",
             "time s"] + task_headers(rows)
    lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(["---"] * len(heads)) + "|"]
    tasks = task_names(rows)
    for r in rows:
        cells = [str(_get(r, "method")), _fmt(_get(r, "bits"), "d"),
                 _fmt(_get(r, "group_size"), "d"), _fmt(_get(r, "bpw"), ".3f"),
                 _fmt(_get(r, "size_mb"), ".1f"), _fmt(_get(r, "kl"), ".4f"),
                 _fmt(_get(r, "ppl"), ".2f"), _fmt(_get(r, "top1"), ".3f"),
                 _fmt(_get(r, "seconds"), ".1f")] + [task_cell(r, t) for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_kl_vs_bits(rows: Sequence, path: str | Path) -> Path | None:
    """KL against bits per weight, one line per method (log KL axis).  None without
    matplotlib or without any quantized row to plot."""
    points: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        bpw, kl = _get(r, "bpw"), _get(r, "kl")
        if bpw and kl is not None and kl > 0 and math.isfinite(kl):
            points.setdefault(str(_get(r, "method")), []).append((bpw, kl))
    if not points:
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only: no display needed, none touched
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, pts in sorted(points.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (scales included)")
    ax.set_ylabel("KL(original ‖ quantized), nats/token")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def top_layers(layers: Sequence, k: int = TOP_LAYERS) -> list:
    """The ``k`` layers with the largest relative proxy loss (falling back to the absolute one
    when the relative one was not recorded): where quantization hurts most."""
    def key(layer):
        rel = _get(layer, "proxy_loss_relative")
        if rel is not None and math.isfinite(rel):
            return (1, rel)
        loss = _get(layer, "proxy_loss")
        return (0, loss if loss is not None and math.isfinite(loss) else -math.inf)
    return sorted(layers, key=key, reverse=True)[:k]


def _layers_section(layers_by_run: Mapping[str, Sequence], k: int) -> list[str]:
    out = ["## Layers where quantization hurts most", "",
           f"Per run, the {k} layers with the largest relative proxy loss "
           "tr(ΔWᵀ H_out ΔW H_in) / tr(Wᵀ H_out W H_in), each method under its own Hessians "
           "(RTN and LDLQ: H_out = I; RTN: H_in = I, i.e. relative weight error). The absolute "
           "proxy loss is on normalised factors.", ""]
    for run, layers in layers_by_run.items():
        top = top_layers(layers, k)
        if not top:
            continue
        out += [f"### {run}", "", "| layer | shape | relative proxy loss | proxy loss |",
                "|---|---|---|---|"]
        for layer in top:
            shape = "×".join(str(d) for d in (_get(layer, "shape") or ()))
            out.append(f"| {_get(layer, 'name')} | {shape} | "
                       f"{_fmt(_get(layer, 'proxy_loss_relative'), '.4g')} | "
                       f"{_fmt(_get(layer, 'proxy_loss'), '.4g')} |")
        out.append("")
    return out


def _stages_section(stages: Sequence) -> list[str]:
    out = ["## Time and peak memory per stage", "",
           "| stage | time s | peak RSS MB | peak GPU MB |", "|---|---|---|---|"]
    since_start = False
    for s in stages:
        rss = _fmt(_get(s, "peak_rss_mb"), ".0f")
        if _get(s, "rss_since_start"):
            rss, since_start = rss + "*", True
        out.append(f"| {_get(s, 'name')} | {_get(s, 'seconds'):.1f} | {rss} | "
                   f"{_fmt(_get(s, 'peak_gpu_mb'), '.0f')} |")
    if since_start:
        out += ["", "\\* peak since the process started (this system cannot reset the counter)"]
    return out + [""]


@dataclass
class RunRecord:
    """What a run report says beyond the rows: how to reproduce it and how it went."""

    command: str | None = None
    seeds: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    stages: list = field(default_factory=list)
    layers: dict = field(default_factory=dict)  # run label → LayerReport (or dict) list
    sanity: list = field(default_factory=list)  # sanity Findings (or strings)
    versions: dict = field(default_factory=versions)


def write_report(out_dir: str | Path, rows: Sequence, record: RunRecord, *,
                 top_k: int = TOP_LAYERS, plot: bool = True) -> Path:
    """Write ``report.md`` (and the KL plot when matplotlib is there) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLOT_NAME).unlink(missing_ok=True)  # never leave a stale plot from an earlier run
    lines = ["# yaqa run report", ""]
    if record.sanity:
        lines += ["## Sanity checks FAILED", "",
                  "The reference model failed these checks; every number below is measured "
                  "against it and may be meaningless:", ""]
        lines += [f"- **{_get(f, 'check') or 'check'}**: {_get(f, 'message') or f}"
                  for f in record.sanity] + [""]
    lines += ["## Results", "", markdown_table(rows), "",
              "KL: mean per-token KL(original ‖ quantized) in nats; ppl: perplexity on the "
              "evaluation windows; top-1: agreement of the most likely next token; tasks: "
              "lm-evaluation-harness headline metric ± its standard error.", ""]
    lines += ["## KL against bits per weight", ""]
    png = plot_kl_vs_bits(rows, out / PLOT_NAME) if plot else None
    if png is not None:
        lines += [f"![KL against bits per weight]({PLOT_NAME})", ""]
    elif not any(_get(r, "bpw") for r in rows):
        lines += ["No quantized rows to plot.", ""]
    else:
        lines += ["Plot skipped: matplotlib is not installed (`pip install 'yaqa[plot]'`).", ""]
    lines += _layers_section(record.layers, top_k)
    lines += _stages_section(record.stages)
    lines += ["## Reproduce", ""]
    if record.command:
        lines += ["```", record.command, "```", ""]
    if record.seeds:
        lines += ["Seeds: " + ", ".join(f"{k} = {v}" for k, v in record.seeds.items()), ""]
    if record.settings:
        lines += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in record.settings.items()), ""]
    lines += ["| package | version |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in record.versions.items()] + [""]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines), encoding="utf-8")
    tmp.replace(path)
    log.info("report written to %s", path)
    return path
