"""The passes over the data for one group of blocks: checkpoints, resume, distributed polling."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed as D
from .config import CollectConfig
from . import phases
from .accumulators import LayerAccumulator
from .hooks import HessianCollector, check_layer_finite
from .interrupt import _GracefulInterrupt
from .refill import refill_gradients
from .schedule import Batches, _hash_update, _micro_batches
from .shrinkage import layer_estimate
from .stream import BackgroundWriter, pack_factors
from .storage import (IDENTITY_KEYS, HessianMetadataError, atomic_save_tensors, block_filename,
                      identity_problems, load_checkpoint, read_meta, read_progress, resume_dir,
                      save_checkpoint, write_meta)

log = logging.getLogger(__name__)


_POLL_ROUNDS = 8  # micro-batch rounds between checks of the per-rank checkpoint flags


def run_group(col: HessianCollector, batches: Batches, cfg: CollectConfig, kinds: list[str],
              out_path: Path | None, identity: dict[str, Any], bar: tqdm,
              writer: BackgroundWriter, store_dtype: torch.dtype, *,
              keep: bool = True) -> dict[str, Any]:
    """All passes of ``kinds`` for the blocks of ``col``; with ``out_path``, resumable state is
    checkpointed and the finished factors are stored there.  Returns the data summary.

    ``keep=False`` (the caller reads nothing from ``col`` afterwards; with ``out_path``): the
    last pass's factors are finished and moved to host memory one linear at a time
    (:func:`stream_block_files`), so the device never holds the whole group's full factors;
    ``col``'s accumulators are empty afterwards."""
    batch_size = cfg.batch_size
    checkpoint_every, checkpoint_interval_s = cfg.checkpoint_every, cfg.checkpoint_interval_s
    rank, world = D.rank_and_world()
    state_dir = resume_dir(out_path, col.blocks) if out_path is not None else None
    start_pass, cursor, cursor_hash, prog = 0, 0, None, None
    if state_dir is not None:
        prog = read_progress(state_dir)
        if prog is not None:
            bad = identity_problems(prog.get("identity", {}), identity)
            if bad:
                raise HessianMetadataError(f"resume state in {state_dir} is from another request "
                                           f"({'; '.join(bad)})")
            start_pass, cursor, cursor_hash = prog["pass"], prog["cursor"], prog["data_sha256"]
            log.info("resuming blocks %d-%d at pass %d, micro-batch %d", col.blocks[0],
                     col.blocks[-1], start_pass, cursor)
            if bar.total:
                bar.update(start_pass * (bar.total // max(len(kinds), 1)))

    def checkpoint_now(pass_idx: int, cur: int, digest: str) -> None:
        col.reduce_to_rank0()
        if rank == 0:
            tensors, meta = col.block_state()
            save_checkpoint(state_dir, {"pass": pass_idx, "cursor": cur, "data_sha256": digest,
                                        "identity": identity}, tensors, meta)
        D.barrier()

    summary: dict[str, Any] = {"ctx": None, "data_sha256": None}
    # the last pass's factors leave the device linear by linear when the store takes them
    stream = not keep and out_path is not None
    packed = None  # ({block: host tensors}, {block: meta}) once streamed
    phases.mark("passes")
    with col, _GracefulInterrupt(state_dir is not None) as stop:
        # before the accumulators exist: this group was planned to start its backward from the
        # cached gradient, which a resumed command may lack
        refill_gradients(col, batches, batch_size, kinds, start_pass, cursor, stop)
        if prog is not None:
            kind = kinds[start_pass] if start_pass < len(kinds) else None
            col.load_block_state(load_checkpoint(state_dir, prog, col.blocks),
                                 kind if cursor > 0 else None)
        for p in range(start_pass, len(kinds)):
            resumed_mid_pass = p == start_pass and cursor > 0
            if not resumed_mid_pass:
                col.begin_pass(kinds[p])
            bar.set_postfix_str(f"pass {p + 1}/{len(kinds)} ({kinds[p]})", refresh=False)
            h = hashlib.sha256()
            seq0, last_ckpt, n_mb, ctx = 0, time.monotonic(), 0, set()
            for gi, ids in enumerate(_micro_batches(batches, batch_size)):
                _hash_update(h, ids)
                seq_ids = range(seq0, seq0 + ids.shape[0])
                seq0 += ids.shape[0]
                n_mb += 1
                ctx.add(int(ids.shape[-1]))
                if resumed_mid_pass and gi < cursor:
                    if gi == cursor - 1 and h.hexdigest() != cursor_hash:
                        raise HessianMetadataError(
                            "the data differs from the interrupted run's (token ids or their "
                            "micro-batch split); resume with the same data and batch_size, or "
                            "use a fresh out_dir")
                    continue
                if gi % world == rank:
                    col.step(ids, seq_ids, gi)
                bar.update(ids.numel())
                if state_dir is not None and (gi + 1) % world == 0:
                    due = checkpoint_every is not None and (gi + 1) % checkpoint_every == 0
                    # The clock and Ctrl-C are per-rank: agreeing on them costs an all-reduce
                    # and a device sync, so ranks compare them every few rounds, not per step.
                    if world == 1 or ((gi + 1) // world) % _POLL_ROUNDS == 0:
                        due = D.any_rank(due or stop.requested or
                                         time.monotonic() - last_ckpt > checkpoint_interval_s,
                                         col.device)
                    if due:
                        checkpoint_now(p, gi + 1, h.hexdigest())
                        last_ckpt = time.monotonic()
                        if D.any_rank(stop.requested, col.device):
                            raise KeyboardInterrupt(f"stopped; resume state saved in {state_dir}")
            if resumed_mid_pass and n_mb < cursor:
                raise HessianMetadataError(f"the data has {n_mb} micro-batches, fewer than the "
                                           f"{cursor} the interrupted run had already processed")
            summary = {"ctx": sorted(ctx), "data_sha256": h.hexdigest()}
            phases.mark("end_pass")
            if stream and p + 1 == len(kinds):
                # nothing needs the factors on the device afterwards: finish, check, estimate
                # and pack them one linear at a time, each off the device before the next
                packed = stream_block_files(col, identity, summary, store_dtype, rank == 0)
            else:
                col.end_pass()
            if state_dir is not None and p + 1 < len(kinds):
                checkpoint_now(p + 1, 0, h.hexdigest())
            if p + 1 < len(kinds):
                phases.mark("passes")
    phases.mark("writing")
    any_acc = next(iter(col.acc.values()))
    summary["n_tokens"] = any_acc.counts["tokens"]
    summary["n_seqs"] = any_acc.counts["seqs"]
    if packed is None:
        col.check_finite()
    if out_path is not None:
        if rank == 0:
            if packed is None:
                tensors, meta = final_block_files(col, identity, summary)
                # packed where they were computed, then in host memory: the device is free for
                # the next group while the worker thread writes
                packed = ({b: pack_factors(tensors[b], store_dtype) for b in col.blocks}, meta)
                del tensors
            files, meta = packed
            for b in col.blocks:
                meta[b]["storage_dtype"] = str(store_dtype).removeprefix("torch.")
                writer.submit(atomic_save_tensors, out_path / block_filename(b), files[b],
                              meta[b])
            writer.submit(_finish_group, out_path, identity, summary, state_dir)
        if world > 1:
            writer.wait()  # other ranks may read the files right after the barrier
        D.barrier()
    return summary


def _finish_group(out_path: Path, identity: dict[str, Any], summary: dict[str, Any],
                  state_dir: Path) -> None:
    """After a group's block files are written: record the data, drop its resume state."""
    stored = read_meta(out_path) or identity
    stored["data"] = {k: summary[k] for k in ("n_seqs", "n_tokens", "ctx", "data_sha256")}
    write_meta(out_path, stored)
    shutil.rmtree(state_dir, ignore_errors=True)


def _block_meta(col: HessianCollector, identity: dict[str, Any],
                summary: dict[str, Any]) -> dict[int, dict[str, Any]]:
    meta = {}
    for b in col.blocks:
        meta[b] = {**{k: identity[k] for k in IDENTITY_KEYS}, "block": b,
                   "block_prefix": f"{col.adapter.blocks_path}.{b}.", "layers": {},
                   "ctx": summary["ctx"], "data_sha256": summary["data_sha256"]}
        if "label_draws" in identity:
            meta[b]["label_draws"] = identity["label_draws"]
    return meta


def _layer_files(col: HessianCollector, name: str, acc: LayerAccumulator,
                 identity: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """One linear's factors under their stored names, and its entry in the block's meta."""
    _, rel, mod = col.layers[name]
    tensors = {f"{rel}.{k}": acc.factors[k] for k in ("H_in", "H_out", "H_x")
               if k in acc.factors}
    meta = {"n_seqs": acc.counts["seqs"], "n_tokens": acc.counts["tokens"],
            "in_features": mod.in_features, "out_features": mod.out_features,
            "shrinkage": layer_estimate(acc.factors, acc.counts["seqs"], identity["sketch"],
                                        identity["power_iters"])}
    return tensors, meta


def final_block_files(col: HessianCollector, identity: dict[str, Any], summary: dict[str, Any]):
    tensors: dict[int, dict[str, Tensor]] = {b: {} for b in col.blocks}
    meta = _block_meta(col, identity, summary)
    for name, (bi, rel, _) in col.layers.items():
        t, m = _layer_files(col, name, col.acc[name], identity)
        tensors[bi].update(t)
        meta[bi]["layers"][rel] = m
    return tensors, meta


def stream_block_files(col: HessianCollector, identity: dict[str, Any], summary: dict[str, Any],
                       store_dtype: torch.dtype, write: bool
                       ) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Any]]]:
    """End the last pass linear by linear (:meth:`HessianCollector.end_pass_streaming`): each
    linear's factors are checked, give their shrinkage estimate, and (``write``: the rank that
    stores them) are packed for the store and copied to host memory before the next linear's
    are made. Returns the block files as :func:`final_block_files` would, packed, on the host;
    the same bytes as packing those."""
    files: dict[int, dict[str, Tensor]] = {b: {} for b in col.blocks}
    meta = _block_meta(col, identity, summary)
    for name, acc in col.end_pass_streaming():
        check_layer_finite(name, acc)  # on every rank: all of them stop alike
        if write:
            bi, rel, _ = col.layers[name]
            tensors, meta[bi]["layers"][rel] = _layer_files(col, name, acc, identity)
            files[bi].update(pack_factors(tensors, store_dtype))
            del tensors
    return files, meta  # (col.acc iterates in col.layers' order: the order of today's files)
