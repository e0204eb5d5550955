"""The collection driver: which blocks, which passes, where results go.

Pieces, by file: ``config`` (:class:`CollectConfig`, every option), ``schedule`` (passes a request
needs, micro-batches), ``hooks`` (the autograd tap on each linear), ``passes`` (the loop over the
data for one group of blocks, checkpoints and resume), ``interrupt`` (Ctrl-C), ``storage`` (file
layout), ``distributed`` (torch.distributed glue).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__
from ..models.adapters import get_adapter, input_embeddings
from ..store import calibration_identity, identity_hash
from ..validate import check_finite_weights
from . import distributed as D
from .accumulators import resolve_precision
from .boundary import (CACHE_DIR, BoundaryCache, boundary_bytes, choose_boundary_cache,
                       disk_free_bytes, host_available_bytes)
from .config import CollectConfig
from .hooks import HessianCollector
from .passes import run_group
from .schedule import Batches, _count_tokens, _micro_batches, pass_kinds
from .stream import BackgroundWriter, storage_dtype as _storage_dtype
from .storage import (FORMAT_VERSION, LayerHessian, block_filename, check_run_identity, dtype_name,
                      load_hessians, model_fingerprint, read_meta, run_identity, write_meta)

log = logging.getLogger(__name__)

__all__ = ["CollectConfig", "HessianCollector", "collect_hessians", "pass_kinds",
           "run_collection"]


def collect_hessians(model: nn.Module, batches: Batches, sketch: str = "B", power_iters: int = 1,
                     *, out_dir: str | Path | None = None, config: CollectConfig | None = None,
                     **options: Any) -> dict[str, LayerHessian]:
    """Kronecker factors of the full-model KL Hessian for every linear of the chosen blocks.

    Args:
        model: a Hugging Face causal LM (any family :func:`yaqa.models.get_adapter` knows).
        batches: token ids, a LongTensor [N, T] (split into ``batch_size`` rows) or an iterable
            of [b, T] LongTensors. Multi-pass requests (Sketch A, power_iters > 1, several block
            groups) iterate it again, so it must be re-iterable (a list, a tensor). Under
            torch.distributed every rank passes the same data; rank r takes micro-batches
            r, r + world, ...
        sketch: "B" (per-sequence gradients, one pass), "A" (per-token power iteration) or "hx"
            (forward only: ``H_x`` alone, ``H_out`` None).
        power_iters: ALS steps; for "A", the number of H_out updates (2·power_iters passes).
        out_dir: store one safetensors file per block there and resume from it. Stored results
            are reused only for the same model weights, data and options; otherwise
            :class:`~yaqa.hessians.storage.StaleHessiansError` says what differs. With an
            ``out_dir`` (in a single process) nothing is held in memory after each block group
            is written: the result reads the stored factors back one block at a time, as
            ``load_hessians(out_dir, model, stream=True)`` does, so models whose factors exceed
            the device's memory (Llama-3.1-8B: about 100 GB of fp32 factors) can be collected
            and quantized. Those are the stored values (``storage_dtype``), unpacked to fp32.
        config / options: a :class:`CollectConfig`, or its fields as keywords (seed, label_draws, dtype,
            blocks, batch_size, precision, blocks_per_pass, gradient_checkpointing,
            checkpoint_every, checkpoint_interval_s, collect_hx, route, overwrite, progress).

    Returns:
        ``{full linear name: LayerHessian}``; factors are means (per sequence for Sketch B's
        H_in/H_out, per token otherwise), symmetric, on the device of the model's input
        embeddings. A mapping that reads ``out_dir`` block by block when one is given.
    """
    cfg = config or CollectConfig.from_options(sketch=sketch, power_iters=power_iters, **options)
    if out_dir is None or D.rank_and_world()[1] > 1:
        return _collect(model, batches, cfg, out_dir, keep=True)
    _collect(model, batches, cfg, out_dir, keep=False)
    return load_hessians(out_dir, model, device=input_embeddings(model).weight.device,
                         blocks=cfg.blocks, stream=True)


def run_collection(model: nn.Module, batches: Batches, out_dir: str | Path, *,
                   config: CollectConfig | None = None, **options: Any) -> Path:
    """What ``yaqa hessians`` runs: collect into ``out_dir`` (resuming), keep nothing in memory.

    Joins the torchrun process group when launched by torchrun. Returns ``out_dir``; read the
    factors with :func:`yaqa.hessians.load_hessians`.  Options as for :func:`collect_hessians`.
    """
    D.maybe_init_distributed()
    _collect(model, batches, config or CollectConfig.from_options(**options), out_dir,
             keep=False)
    return Path(out_dir)


def _collect(model: nn.Module, batches: Batches, cfg: CollectConfig,
             out_dir: str | Path | None, *, keep: bool) -> dict[str, LayerHessian]:
    sketch, power_iters = cfg.sketch, cfg.power_iters
    kinds = pass_kinds(sketch, power_iters)
    adapter = get_adapter(model)
    check_finite_weights(model)
    n_blocks = len(adapter.blocks(model))
    selected = sorted(set(range(n_blocks) if cfg.blocks is None else cfg.blocks))
    group = cfg.blocks_per_pass or len(selected)
    groups = [selected[i:i + group] for i in range(0, len(selected), group)]
    if (len(kinds) > 1 or len(groups) > 1) and not isinstance(batches, (Tensor, list, tuple)) \
            and iter(batches) is batches:
        raise ValueError(f"sketch {sketch} with power_iters={power_iters} over {len(groups)} block "
                         "group(s) reads the data more than once: pass a list or tensor of token "
                         "ids, not a one-shot iterator")
    rank, world = D.rank_and_world()
    device = input_embeddings(model).weight.device
    out_path = Path(out_dir) if out_dir is not None else None
    identity = {
        "format_version": FORMAT_VERSION, "yaqa_version": __version__,
        "model": model_fingerprint(model, adapter), "sketch": sketch,
        "power_iters": power_iters, "passes": kinds, "seed": cfg.seed, "dtype": dtype_name(cfg.dtype),
        "precision": resolve_precision(cfg.precision, device, cfg.dtype),
        "collect_hx": cfg.collect_hx,
        "calibration": calibration_identity(batches),
    }
    if cfg.label_draws != 1:  # (absent at 1: identities from before the option stay valid)
        identity["label_draws"] = cfg.label_draws
    if identity["calibration"] is None and out_path is not None:
        log.warning("the calibration data is a one-shot iterator, so stored Hessians in %s "
                    "cannot be checked against it; pass a tensor or list to make sure", out_path)
    if out_path is not None:
        if rank == 0:
            out_path.mkdir(parents=True, exist_ok=True)
            check_run_identity(out_path, identity, overwrite=cfg.overwrite)
            if read_meta(out_path) is None:
                write_meta(out_path, identity)
        D.barrier()
        if rank != 0:
            check_run_identity(out_path, identity, overwrite=False)

    tokens_per_pass = _count_tokens(batches)
    todo = [g for g in groups if out_path is None
            or not all((out_path / block_filename(b)).exists() for b in g)]
    total = tokens_per_pass * sum(len(kinds) for _ in todo) if tokens_per_pass else None
    bar = tqdm(total=total, unit="tok", unit_scale=True, dynamic_ncols=True,
               disable=not cfg.progress or rank != 0, desc=f"Sketch {sketch}")
    results: dict[str, LayerHessian] = {}
    store_dtype = _storage_dtype(cfg.storage_dtype)
    if cfg.dtype == torch.float64 and store_dtype == torch.float32:
        store_dtype = torch.float64  # fp64 sums were asked for exactness: packing is lossless
    writer = BackgroundWriter()  # finished groups are written while the next one collects
    boundary = _boundary_cache(model, batches, cfg, groups, todo, out_path, identity)
    finished = False
    # with the cache, the top group goes first: its full backward leaves the gradient at its
    # first block for the group below, which then runs only its own blocks
    order = groups[::-1] if boundary is not None else groups
    try:
        for g in order:
            if g not in todo:
                log.info("blocks %d-%d already collected in %s", g[0], g[-1], out_path)
                if keep:
                    results.update(load_hessians(out_path, model, device=device, blocks=g))
                continue
            collector = HessianCollector(model, g, seed=cfg.seed, dtype=cfg.dtype,
                                         precision=cfg.precision, route=cfg.route,
                                         collect_hx=cfg.collect_hx,
                                         gradient_checkpointing=cfg.gradient_checkpointing,
                                         boundary=boundary, label_draws=cfg.label_draws)
            summary = run_group(collector, batches, cfg, kinds, out_path, identity, bar,
                                writer, store_dtype, keep=keep)
            if boundary is not None:
                log.info("blocks %d-%d: %d micro-batch passes started from a cached state, %d "
                         "from a cached gradient", g[0], g[-1], boundary.hits,
                         boundary.grad_hits)
                boundary.hits = boundary.grad_hits = 0
                boundary.drop(g[0])  # no group left starts its forward here
                boundary.drop(g[-1] + 1, "g")  # nor its backward
            if keep:
                results.update(collector.results(sketch, power_iters,
                                                 identity_hash(run_identity(identity))))
            del collector
            log.info("blocks %d-%d: %d sequences, %d tokens per pass", g[0], g[-1],
                     summary["n_seqs"], summary["n_tokens"])
        finished = True
    finally:
        bar.close()
        writer.close()
        if boundary is not None:  # an interrupted run keeps a disk cache for its resume
            boundary.close(remove=finished)
    return results


def _disk_left(model: nn.Module, out_path: Path | None, todo: list[list[int]],
               cfg: CollectConfig) -> int | None:
    """Free disk in ``out_path`` once the factors still to collect are stored there."""
    free = disk_free_bytes(out_path)
    if free is None:
        return None
    item = 8 if cfg.dtype == torch.float64 else 2 if cfg.storage_dtype == "bfloat16" else 4
    blocks = {b for g in todo for b in g}
    store = sum((n * (n + 1) // 2) * (1 + int(cfg.collect_hx)) + m * (m + 1) // 2
                for _, b, mod in get_adapter(model).named_linears(model) if b in blocks
                for m, n in [(mod.out_features, mod.in_features)]) * item
    return max(free - store, 0)


def _boundary_cache(model: nn.Module, batches: Batches, cfg: CollectConfig,
                    groups: list[list[int]], todo: list[list[int]], out_path: Path | None,
                    identity: dict[str, Any]) -> BoundaryCache | None:
    """The cache of hidden states entering the later groups, where it fits (None: recompute)."""
    starts = [g[0] for g in todo if g[0] > 0]
    # a group's backward starts from the gradient the group above left (kept on disk when that
    # group finished in an earlier command)
    grads = sorted({g[0] for g in groups if g[0] > 0}
                   & ({g[-1] + 1 for g in todo} | set(starts)))
    # (only gradients: the groups still to collect are the lowest, resumed in a new command)
    if not (starts or grads) or cfg.boundary_cache == "off" \
            or not isinstance(batches, (Tensor, list, tuple)):
        return None
    if cfg.label_draws > 1:
        # its slots hold one copy of each micro-batch; with several draws every group
        # recomputes the forward below it instead
        log.info("boundary cache: off (label_draws=%d)", cfg.label_draws)
        return None
    rank, world = D.rank_and_world()
    mb_tokens = [int(ids.numel()) for ids in _micro_batches(batches, cfg.batch_size)]
    emb = input_embeddings(model).weight
    hidden, dtype = int(emb.shape[1]), emb.dtype
    # peak: every state (the top group records them all) + the gradient it leaves behind
    size = boundary_bytes(sum(mb_tokens), hidden, emb.element_size(),
                          len(starts) + min(len(grads), 1))
    cache_dir = out_path / CACHE_DIR if out_path is not None else None
    choice = choose_boundary_cache(cfg.boundary_cache, size, host_bytes=host_available_bytes(),
                                   disk_bytes=_disk_left(model, out_path, todo, cfg), world=world)
    log.info("boundary cache: %s, %s", choice.mode, choice.reason)
    if choice.mode == "off" and cfg.boundary_cache in ("memory", "disk"):
        # a plan sized its passes for the cache (its groups run only their own blocks); going on
        # without it would hold the activations of every block above each group: stop first
        raise RuntimeError(
            f"boundary cache {cfg.boundary_cache!r} was asked for (a memory plan may have chosen "
            f"it), but {choice.reason}. Nothing was collected. Free host memory or disk, or "
            "collect with boundary_cache='auto' (or 'off') and a fresh plan, which may choose "
            "fewer blocks per pass")
    if choice.mode == "off":
        return None
    key = identity_hash({"identity": identity, "batch_size": cfg.batch_size,
                         "mb_tokens": mb_tokens, "world": world})
    return BoundaryCache(starts, mb_tokens, hidden, dtype, choice.mode, grads=grads,
                         directory=cache_dir, key=key, rank=rank, world=world,
                         device=emb.device)
