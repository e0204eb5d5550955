"""The options of one Hessian collection, in one place (library, ``yaqa hessians``, pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch


@dataclass
class CollectConfig:
    """How to collect.

    sketch: "B" (per-sequence gradients, one pass), "A" (per-token power iteration) or "hx"
        (forward passes only: the plain GPTQ Hessian E[x^T x], for LDLQ).
    power_iters: ALS steps; for "A", the number of H_out updates (2·power_iters passes).
    seed: seeds the labels sampled from the model's own distribution (per sequence).
    label_draws: Sketch B only: label draws per sequence. Each sequence's terms become the mean
        over D draws of sampled labels (less label noise at the same data; the sample count stays
        the number of sequences). Costs D forward+backward passes per sequence: the micro-batch
        runs as batch_size·D rows. 1 is the classic single draw.
    dtype: accumulation and result dtype (float32, or float64 for exact sums).
    blocks: decoder block indices to collect (default: all).
    batch_size: rows per micro-batch when the data is one tensor.
    precision: "auto" (bf16 operands with fp32 sums on CUDA, full precision on CPU), "full",
        "tf32", "mixed" or "bf16" — see :class:`yaqa.hessians.accumulators.Products` (sums are
        always fp32; on CPU the bf16 levels are emulated exactly, to measure their effect).
    blocks_per_pass: collect this many blocks at a time (bounds accumulator memory; each group
        re-runs the passes over the data).
    gradient_checkpointing: recompute each block in backward (long contexts).
    checkpoint_every / checkpoint_interval_s: with an output directory, save resumable state
        every this many micro-batches / seconds.
    collect_hx: also collect the plain GPTQ Hessian E[x^T x] (``H_x``).
    route: Sketch-B algebra, "auto" (cheapest by flops), "gram" (T×T) or "direct" (∇W_b).
    overwrite: discard results of a different request found in the output directory.
    progress: show a progress bar.
    storage_dtype: factors are stored as packed lower triangles in "float32" or "bfloat16"
        (half the disk and host memory again; relative error about 2e-3).
    boundary_cache: with several block groups, keep each micro-batch's hidden state entering a
        later group's first block (from the first pass that computes it), so later passes start
        their forward there: "auto" (host memory if it takes at most 60% of what is available,
        else files in the output directory, else off), "memory", "disk" or "off" (recompute the
        forward through the earlier blocks in every pass). Factors are the same either way.
    """

    sketch: str = "B"
    power_iters: int = 1
    seed: int = 0
    label_draws: int = 1
    dtype: torch.dtype = torch.float32
    blocks: range | Sequence[int] | None = None
    batch_size: int = 4
    precision: str = "auto"
    blocks_per_pass: int | None = None
    gradient_checkpointing: bool = False
    checkpoint_every: int | None = None
    checkpoint_interval_s: float = 1800.0
    collect_hx: bool = True
    route: str = "auto"
    overwrite: bool = False
    progress: bool = True
    storage_dtype: str = "float32"
    boundary_cache: str = "auto"

    def __post_init__(self) -> None:
        from .schedule import pass_kinds

        pass_kinds(self.sketch, self.power_iters)  # raises on a bad sketch / power_iters
        if self.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {self.dtype}")
        from .boundary import BOUNDARY_MODES

        if self.boundary_cache not in BOUNDARY_MODES:
            raise ValueError(f"boundary_cache must be one of {BOUNDARY_MODES}, "
                             f"got {self.boundary_cache!r}")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        check_label_draws(self.label_draws, self.sketch)
        if self.label_draws > 1 and self.boundary_cache in ("memory", "disk"):
            raise ValueError(f"boundary_cache={self.boundary_cache!r} does not support "
                             "label_draws > 1 (the cached states hold one copy per sequence); "
                             "use boundary_cache='auto' or 'off'")

    @classmethod
    def from_options(cls, **options) -> CollectConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise TypeError(f"unknown collection options {unknown}; see CollectConfig")
        return cls(**options)


def check_label_draws(label_draws: int, sketch: str) -> None:
    """Several label draws average Sketch B's per-sequence terms; nothing else samples labels
    per sequence (Sketch A's terms are per token, "hx" samples none)."""
    if not isinstance(label_draws, int) or isinstance(label_draws, bool) or label_draws < 1:
        raise ValueError(f"label_draws must be an integer >= 1, got {label_draws!r}")
    if label_draws > 1 and sketch != "B":
        raise ValueError(f"label_draws={label_draws} applies to Sketch B only, not sketch "
                         f"{sketch!r}; use label_draws=1")
