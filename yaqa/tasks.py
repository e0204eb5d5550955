"""Downstream tasks (zero-shot ARC, HellaSwag, PIQA, ...) through lm-evaluation-harness.

The model object itself, with its :class:`~yaqa.nn.QuantizedLinear` layers, is handed to
lm-eval's Hugging Face wrapper (``HFLM(pretrained=model, tokenizer=tok)``), so what is scored is
exactly the packed model yaqa produced, not a re-quantized or dequantized copy.

Tasks are resolved and their data loaded once (:class:`TaskSuite`), before any heavy work, so a
typo in a task name or a missing network fails in seconds; the same suite then scores the original
and every checkpoint.  Hub tasks (``arc_easy``, ``hellaswag``, ...) download their data from the
Hugging Face hub; local tasks are lm-eval YAML files (plus JSON data) in a directory passed as
``include_path``.

Needs the optional ``lm-eval`` package: ``pip install 'yaqa[eval]'``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

# Reported first when a task has it: length-normalised accuracy is the number papers quote for
# ARC / HellaSwag / PIQA, plain accuracy for Winogrande and most others.
_PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity")


class TaskError(RuntimeError):
    """Downstream tasks cannot run: lm-eval missing, an unknown task, or unreachable task data."""


@dataclass
class TaskScore:
    """One task's result: ``metric`` is the headline metric (``acc_norm`` when the task reports
    it, else ``acc``, ...), ``value`` ± ``stderr`` its value and lm-eval's standard error;
    ``metrics`` every metric lm-eval reported (``<name>_stderr`` keys included)."""

    task: str
    metric: str
    value: float
    stderr: float | None
    n_samples: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        if self.stderr is None or math.isnan(self.stderr):
            return f"{self.value:.4f}"
        return f"{self.value:.4f} ± {self.stderr:.4f}"


def parse_task_list(spec: str | Sequence[str] | None) -> tuple[str, ...]:
    """``"arc_easy, hellaswag"`` or a sequence → a tuple of names (order kept, no duplicates)."""
    if not spec:
        return ()
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in (x.strip() for x in items):
        if s and s not in out:
            out.append(s)
    return tuple(out)


def _import_lm_eval():
    try:
        from lm_eval.evaluator import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise TaskError("downstream tasks need lm-evaluation-harness: pip install 'yaqa[eval]' "
                        f"(import failed: {e})") from None
    return simple_evaluate, HFLM, TaskManager


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


class TaskSuite:
    """lm-eval tasks resolved and loaded once, scored on any number of models.

    ``include_path``: directories (or one) of local lm-eval task YAML files; tasks found there
    take precedence over lm-eval's built-in ones, and when every requested task is local the
    built-in index (about 15k entries, ~10 s to scan) is not built at all.
    ``limit``: examples per task (lm-eval's ``--limit``; for quick checks, not for reporting).
    ``num_fewshot``: None keeps each task's default (zero-shot for the usual suite).
    """

    def __init__(self, tasks: str | Sequence[str], *,
                 include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
                 limit: int | float | None = None, num_fewshot: int | None = None,
                 batch_size: int = 8, seed: int = 0) -> None:
        self.names = parse_task_list(tasks)
        if not self.names:
            raise TaskError("no tasks given (e.g. --tasks arc_easy,hellaswag)")
        if isinstance(include_path, (str, os.PathLike)):
            include_path = [include_path]
        self.include_path = [str(Path(p).expanduser()) for p in include_path or ()]
        for p in self.include_path:
            if not Path(p).is_dir():
                raise TaskError(f"task directory {p} does not exist (expected a directory of "
                                "lm-eval task YAML files)")
        self.limit, self.num_fewshot = limit, num_fewshot
        self.batch_size, self.seed = batch_size, seed
        self._simple_evaluate, self._HFLM, TaskManager = _import_lm_eval()
        self.manager = self._manager(TaskManager)
        self._loaded = self._load()

    def _manager(self, TaskManager):
        if self.include_path:
            local = TaskManager(include_path=self.include_path, include_defaults=False)
            if all(n in local.all_tasks for n in self.names):
                return local
        manager = TaskManager(include_path=self.include_path or None)
        unknown = [n for n in self.names if n not in manager.all_tasks]
        if unknown:
            where = f" or in {', '.join(self.include_path)}" if self.include_path else ""
            raise TaskError(f"unknown task(s) {', '.join(unknown)}: not among lm-eval's "
                            f"{len(manager.all_tasks)} built-in tasks{where} (`lm-eval ls tasks` "
                            "lists them; local tasks need --tasks-path DIR)")
        return manager

    def _load(self) -> list:
        """Top-level task/group objects, their data read now (downloaded for hub tasks)."""
        objects = []
        for name in self.names:
            try:
                loaded = self.manager.load([name])
            except Exception as e:  # datasets/hub raise many unrelated types when offline
                raise TaskError(self._data_error(name, e)) from e
            if name in loaded["groups"]:
                objects.append(loaded["groups"][name])
            else:  # a task, or a tag that expanded into several tasks
                objects.extend(loaded["tasks"].values())
        return objects

    def _data_error(self, name: str, e: Exception) -> str:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        hint = ("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set, so nothing can be downloaded"
                if _offline() else "the network may be unreachable")
        return (f"could not load the data of task {name!r} ({type(e).__name__}: {first}). Task "
                f"data comes from the Hugging Face hub and needs the network ({hint}); run once "
                "online to fill the cache, or use local lm-eval task files (YAML + JSON data) "
                "with --tasks-path DIR")

    def evaluate(self, model: nn.Module, tokenizer) -> dict[str, TaskScore]:
        """Score ``model`` (as it is in memory: quantized layers included) on every task."""
        # lm-eval logs "pretrained is not a str" and similar at WARNING for every call; the
        # in-memory model is the point here, so keep those quiet unless yaqa is verbose.
        quiet = logging.getLogger("lm_eval")
        level = quiet.level
        if not log.isEnabledFor(logging.DEBUG):
            quiet.setLevel(logging.ERROR)
        try:
            # A copy: HFLM sets a pad token on the tokenizer it is given, and the caller's may
            # still be saved into checkpoints.
            lm = self._HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer),
                            batch_size=self.batch_size)
            out = self._simple_evaluate(
                model=lm, tasks=list(self._loaded), num_fewshot=self.num_fewshot,
                limit=self.limit, task_manager=self.manager, log_samples=False,
                random_seed=self.seed, numpy_random_seed=self.seed,
                torch_random_seed=self.seed, fewshot_random_seed=self.seed)
        finally:
            quiet.setLevel(level)
        return parse_results(out)


def parse_results(out: dict) -> dict[str, TaskScore]:
    """lm-eval's ``results`` dict → one :class:`TaskScore` per task and group.

    lm-eval keys metrics as ``"<metric>,<filter>"`` with ``"<metric>_stderr,<filter>"`` beside
    them; the filter is dropped when a task has a single one (the usual ``none``).
    """
    scores: dict[str, TaskScore] = {}
    n_samples = out.get("n-samples", {})
    for task, res in out.get("results", {}).items():
        metrics: dict[str, float] = {}
        filters = {k.split(",", 1)[1] for k in res if "," in k}
        for key, val in res.items():
            if "," not in key or not isinstance(val, (int, float)):
                continue
            metric, flt = key.split(",", 1)
            metrics[metric if len(filters) == 1 else f"{metric},{flt}"] = float(val)
        values = [m for m in metrics if not m.endswith("_stderr") and "_stderr," not in m]
        if not values:
            continue
        primary = next((m for m in _PRIMARY_METRICS if m in values), values[0])
        base, _, flt = primary.partition(",")
        stderr_key = f"{base}_stderr" + (f",{flt}" if flt else "")
        stderr = metrics.get(stderr_key)
        ns = n_samples.get(task, {})
        scores[task] = TaskScore(task, primary, metrics[primary],
                                 None if stderr is None or math.isnan(stderr) else stderr,
                                 ns.get("effective") if isinstance(ns, dict) else None, metrics)
    return scores
