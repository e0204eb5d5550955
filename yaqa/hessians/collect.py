"""The collection loop: hooks on stock HF linears, passes over the data, resume, distribution.

Each target ``nn.Linear`` gets a forward hook that passes its output through :class:`_Tap`, an
identity autograd Function that keeps the layer input X and, in backward, hands (X, dL/dy) to the
layer's accumulator. Parameters are frozen and the hidden state entering the first collected
block is a fresh leaf that requires grad, so backward computes activation gradients only, and only
down to the blocks that need them.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from .. import __version__
from ..models.adapters import get_adapter, input_embeddings
from ..validate import check_finite_weights
from . import distributed as D
from .accumulators import LayerAccumulator, ProductCache, resolve_precision
from .labels import sampled_label_grad
from .shrinkage import layer_estimate
from .stream import BackgroundWriter, pack_factors, storage_dtype as _storage_dtype
from .storage import (FORMAT_VERSION, IDENTITY_KEYS, HessianMetadataError, LayerHessian,
                      atomic_save_tensors, block_filename, check_run_identity, dtype_name,
                      load_checkpoint, load_hessians, mismatches, model_fingerprint, read_meta,
                      identity_problems, read_progress, resume_dir, run_identity, save_checkpoint, write_meta)
from ..store import calibration_identity, identity_hash

log = logging.getLogger(__name__)

Batches = Tensor | Iterable[Tensor]


def pass_kinds(sketch: str, power_iters: int) -> list[str]:
    """The passes over the data a request needs, in order.

    Sketch B: one pass per ALS step; the first starts both factors from identity.
    Sketch A: pass 0 is forward-only (H_in = E[x^T x]); then ``power_iters`` updates of H_out
    with an H_in update between consecutive ones: 2·power_iters passes in all (the reference's
    6 passes are power_iters=3). The final pair is (H_in of the last even pass, H_out of the last).
    """
    if sketch == "hx":
        return ["hx"]
    if power_iters < 1:
        raise ValueError(f"power_iters must be >= 1, got {power_iters}")
    if sketch == "B":
        return ["b"] + ["b_iter"] * (power_iters - 1)
    if sketch == "A":
        return ["hx"] + ["a_out", "a_in"] * (power_iters - 1) + ["a_out"]
    raise ValueError(f"sketch must be 'A', 'B' or 'hx', got {sketch!r}")


class _Tap(torch.autograd.Function):
    """Identity on a linear layer's output; its backward sees that layer's X and dL/dy."""

    @staticmethod
    def forward(ctx, y: Tensor, x: Tensor, sink: Any) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.sink = sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        ctx.sink(x, g)
        return g, None, None


class _StopForward(Exception):
    """Raised after the last collected block when a pass needs no logits."""


class HessianCollector:
    """Hooks a model for one group of blocks; :meth:`step` runs one micro-batch.

    Use as a context manager: hooks (and the frozen-parameter state) are undone on exit.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[int], *, seed: int = 0,
                 dtype: torch.dtype = torch.float32, precision: str = "auto",
                 route: str = "auto", collect_hx: bool = True,
                 gradient_checkpointing: bool = False):
        self.model = model
        self.adapter = get_adapter(model)
        self.block_list = self.adapter.blocks(model)
        self.blocks = sorted(blocks)
        bad = [b for b in self.blocks if not 0 <= b < len(self.block_list)]
        if bad or not self.blocks:
            raise ValueError(f"blocks {bad or '[]'} out of range: the model has "
                             f"{len(self.block_list)} decoder blocks")
        self.seed = seed
        self.gradient_checkpointing = gradient_checkpointing
        self.device = input_embeddings(model).weight.device
        self.layers: dict[str, tuple[int, str, nn.Linear]] = {}
        self.acc: dict[str, LayerAccumulator] = {}
        for name, bi, mod in self.adapter.named_linears(model):
            if bi in self.blocks:
                rel = name.removeprefix(f"{self.adapter.blocks_path}.{bi}.")
                self.layers[name] = (bi, rel, mod)
                self.acc[name] = LayerAccumulator(
                    mod.in_features, mod.out_features, device=mod.weight.device, dtype=dtype,
                    precision=precision, route=route, collect_hx=collect_hx)
        self.precision = resolve_precision(precision, self.device, dtype)
        self.kind: str | None = None
        self.cache = ProductCache()
        self._handles: list[Any] = []
        self._saved_grad: list[tuple[nn.Parameter, bool]] = []
        self._patched: list[nn.Module] = []
        self._was_training = False
        self._batch = 0
        self._generator: torch.Generator | None = None

    # -- hooks ------------------------------------------------------------------------------
    def __enter__(self) -> HessianCollector:
        self._saved_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for p, _ in self._saved_grad:
            p.requires_grad_(False)
        self._was_training = self.model.training
        self.model.eval()  # dropout would make the "Fisher" depend on dropout masks
        for name, (_, _, mod) in self.layers.items():
            self._handles.append(mod.register_forward_hook(functools.partial(self._on_forward,
                                                                             name)))
        lo, hi = self.blocks[0], self.blocks[-1]
        self._handles.append(self.block_list[lo].register_forward_pre_hook(
            self._make_leaf, with_kwargs=True))
        self._handles.append(self.block_list[hi].register_forward_hook(self._maybe_stop))
        if self.gradient_checkpointing:
            for block in self.block_list[lo:]:
                block.forward = functools.partial(_checkpointed, block.forward)
                self._patched.append(block)
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self._patched:
            del block.forward  # the instance attribute shadowed the class method
        self._patched.clear()
        for p, rg in self._saved_grad:
            p.requires_grad_(rg)
        self.model.train(self._was_training)
        self.cache.release()

    def _make_leaf(self, module: nn.Module, args: tuple, kwargs: dict):
        # backward stops here: nothing below the first collected block needs gradients
        if not torch.is_grad_enabled() or self.kind == "hx":
            return None
        if args:
            return (args[0].detach().requires_grad_(),) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_()
        return args, kwargs

    def _maybe_stop(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.kind == "hx":
            raise _StopForward

    def _on_forward(self, name: str, module: nn.Module, args: tuple, out: Tensor):
        x = args[0]
        if self.kind == "hx":
            if not torch.is_grad_enabled():
                self.acc[name].update_forward(x.detach().reshape(self._batch, -1, x.shape[-1]))
            return None
        if self.kind is None or not out.requires_grad:
            return None
        return _Tap.apply(out, x.detach(), functools.partial(self._on_backward, name))

    def _on_backward(self, name: str, x: Tensor, g: Tensor) -> None:
        b = self._batch
        self.acc[name].update_backward(x.reshape(b, -1, x.shape[-1]),
                                       g.reshape(b, -1, g.shape[-1]), self.cache)

    # -- passes -------------------------------------------------------------------------------
    def begin_pass(self, kind: str) -> None:
        self.kind = kind
        for acc in self.acc.values():
            acc.begin_pass(kind)

    def step(self, ids: Tensor, seq_indices: Sequence[int]) -> None:
        """One micro-batch ``ids`` [b, T] whose rows are the global sequences ``seq_indices``."""
        ids = ids.to(self.device)
        self._batch = ids.shape[0]
        try:
            if self.kind == "hx":
                with torch.no_grad():
                    try:
                        self.model(input_ids=ids, use_cache=False)
                    except _StopForward:
                        pass
                return
            if self._generator is None or self._generator.device != self.device:
                self._generator = torch.Generator(device=self.device)
            with torch.enable_grad():
                logits = self.model(input_ids=ids, use_cache=False).logits
                grad, _ = sampled_label_grad(logits.detach(), seq_indices, self.seed,
                                             self._generator)
                logits.backward(grad)
        finally:
            self.cache.clear()

    def _sum_tensors(self) -> list[Tensor]:
        out = []
        for name in sorted(self.acc):
            acc = self.acc[name]
            out += [acc.sums[k] for k in sorted(acc.sums)]
        return out

    def _counts_tensor(self) -> Tensor:
        return torch.tensor([[a.counts["seqs"], a.counts["tokens"]]
                             for _, a in sorted(self.acc.items())],
                            dtype=torch.int64, device=self.device)

    def _set_counts(self, t: Tensor) -> None:
        for (_, a), (s, tok) in zip(sorted(self.acc.items()), t.tolist()):
            a.counts = {"seqs": int(s), "tokens": int(tok)}

    def reduce_to_rank0(self) -> None:
        counts = self._counts_tensor()
        D.reduce_sum_to_rank0_(self._sum_tensors() + [counts])
        self._set_counts(counts)

    def end_pass(self) -> None:
        counts = self._counts_tensor()
        D.all_reduce_sum_(self._sum_tensors() + [counts])
        self._set_counts(counts)
        for acc in self.acc.values():
            acc.end_pass()
        self.kind = None

    # -- state --------------------------------------------------------------------------------
    def block_state(self) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Any]]]:
        tensors: dict[int, dict[str, Tensor]] = {b: {} for b in self.blocks}
        meta: dict[int, dict[str, Any]] = {b: {"layers": {}} for b in self.blocks}
        for name, (bi, rel, _) in self.layers.items():
            acc = self.acc[name]
            tensors[bi].update({f"{rel}.{k}": v for k, v in acc.state_tensors().items()})
            meta[bi]["layers"][rel] = {"counts": acc.counts}
        return tensors, meta

    def load_block_state(self, states: dict[int, tuple[dict[str, Tensor], dict]],
                         kind: str | None) -> None:
        for name, (bi, rel, _) in self.layers.items():
            tensors, meta = states[bi]
            mine = {k[len(rel) + 1:]: v for k, v in tensors.items() if k.startswith(rel + ".")}
            counts = meta["layers"][rel]["counts"]
            if D.rank_and_world()[0] != 0:
                # the checkpoint's sums are global; rank 0 alone carries them forward
                counts = {"seqs": 0, "tokens": 0}
                mine = {k: (v.zero_() if k.startswith("sum.") else v) for k, v in mine.items()}
            self.acc[name].load_state_tensors(mine, kind, counts)
        self.kind = kind

    def check_finite(self) -> None:
        """Name the first layer whose factors are not finite (before anything is stored)."""
        for name, acc in self.acc.items():
            for k, t in acc.factors.items():
                if not bool(torch.isfinite(t).all()):
                    raise HessianMetadataError(
                        f"{name}.{k} is not finite after collection: check the model's weights "
                        "for inf/nan, or use a wider dtype (--fp64)")

    def results(self, sketch: str, power_iters: int,
                identity: str | None = None) -> dict[str, LayerHessian]:
        out = {}
        for name, acc in self.acc.items():
            f = acc.factors
            out[name] = LayerHessian(name, f["H_in"], f.get("H_out"), f.get("H_x"),
                                     acc.counts["seqs"], acc.counts["tokens"], sketch, power_iters,
                                     identity,
                                     layer_estimate(f, acc.counts["seqs"], sketch, power_iters))
        return out


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


# -- data --------------------------------------------------------------------------------------

def _micro_batches(batches: Batches, batch_size: int) -> Iterator[Tensor]:
    if isinstance(batches, Tensor):
        if batches.dim() != 2:
            raise ValueError(f"token ids must be [N, T], got shape {tuple(batches.shape)}")
        yield from batches.split(batch_size)
        return
    for b in batches:
        if not isinstance(b, Tensor) or b.dim() not in (1, 2):
            raise ValueError("each batch must be a LongTensor of token ids [b, T]")
        yield b if b.dim() == 2 else b[None]


def _count_tokens(batches: Batches) -> int | None:
    if isinstance(batches, Tensor):
        return batches.numel()
    if isinstance(batches, (list, tuple)):
        return sum(b.numel() for b in batches)
    return None


def _hash_update(h: "hashlib._Hash", ids: Tensor) -> None:
    h.update(str(tuple(ids.shape)).encode())
    h.update(ids.detach().to("cpu", torch.int64).numpy().tobytes())


# -- driver ------------------------------------------------------------------------------------

def collect_hessians(model: nn.Module, batches: Batches, sketch: str = "B", power_iters: int = 1,
                     *, seed: int = 0, dtype: torch.dtype = torch.float32,
                     blocks: range | Sequence[int] | None = None,
                     out_dir: str | Path | None = None, progress: bool = True,
                     batch_size: int = 4, precision: str = "auto",
                     blocks_per_pass: int | None = None, gradient_checkpointing: bool = False,
                     checkpoint_every: int | None = None, checkpoint_interval_s: float = 1800.0,
                     collect_hx: bool = True, route: str = "auto",
                     overwrite: bool = False,
                     storage_dtype: str = "float32") -> dict[str, LayerHessian]:
    """Kronecker factors of the full-model KL Hessian for every linear of the chosen blocks.

    Args:
        model: a Hugging Face causal LM (any family :func:`yaqa.models.get_adapter` knows).
        batches: token ids, a LongTensor [N, T] (split into ``batch_size`` rows) or an iterable
            of [b, T] LongTensors. Multi-pass requests (Sketch A, power_iters > 1, several block
            groups) iterate it again, so it must be re-iterable (a list, a tensor). Under
            torch.distributed every rank passes the same data; rank r takes micro-batches
            r, r + world, ...
        sketch: "B" (per-sequence gradients, one pass) or "A" (per-token power iteration).
        power_iters: ALS steps; for "A", the number of H_out updates (2·power_iters passes).
        seed: seeds the labels sampled from the model's own distribution (per sequence).
        dtype: accumulation and result dtype (float32, or float64 for exact sums).
        blocks: decoder block indices to collect (default: all).
        out_dir: store one safetensors file per block there and resume from it.
        batch_size: rows per micro-batch when ``batches`` is one tensor.
        precision: "auto" (TF32 / bf16 tensor cores on CUDA, full precision on CPU), "full",
            "tf32" or "bf16" — see :class:`yaqa.hessians.accumulators.Products`.
        blocks_per_pass: collect this many blocks at a time (bounds accumulator memory; each
            group re-runs the passes over the data).
        gradient_checkpointing: recompute each block in backward (long contexts).
        checkpoint_every / checkpoint_interval_s: with ``out_dir``, save resumable state every
            this many micro-batches / seconds.
        collect_hx: also collect the plain GPTQ Hessian E[x^T x] (``H_x``).
        route: Sketch-B algebra, "auto" (cheapest by flops), "gram" (T×T) or "direct" (∇W_b).
        overwrite: discard results of a different request found in ``out_dir``.
        storage_dtype: factors are stored as packed lower triangles in "float32" or "bfloat16"
            (half the disk and host memory again; relative error about 2e-3).

    Returns:
        ``{full linear name: LayerHessian}``; factors are means (per sequence for Sketch B's
        H_in/H_out, per token otherwise), symmetric, on the layer's device.
    """
    return _collect(model, batches, sketch, power_iters, seed=seed, dtype=dtype, blocks=blocks,
                    out_dir=out_dir, progress=progress, batch_size=batch_size,
                    precision=precision, blocks_per_pass=blocks_per_pass,
                    gradient_checkpointing=gradient_checkpointing,
                    checkpoint_every=checkpoint_every,
                    checkpoint_interval_s=checkpoint_interval_s, collect_hx=collect_hx,
                    route=route, overwrite=overwrite, keep=True, storage_dtype=storage_dtype)


def run_collection(model: nn.Module, batches: Batches, out_dir: str | Path, *,
                   sketch: str = "B", power_iters: int = 1, seed: int = 0,
                   dtype: torch.dtype = torch.float32, blocks: range | Sequence[int] | None = None,
                   batch_size: int = 4, precision: str = "auto",
                   blocks_per_pass: int | None = None, gradient_checkpointing: bool = False,
                   checkpoint_every: int | None = None, checkpoint_interval_s: float = 1800.0,
                   collect_hx: bool = True, overwrite: bool = False,
                   progress: bool = True, storage_dtype: str = "float32") -> Path:
    """What ``yaqa hessians`` runs: collect into ``out_dir`` (resuming), keep nothing in memory.

    Joins the torchrun process group when launched by torchrun. Returns ``out_dir``; read the
    factors with :func:`yaqa.hessians.load_hessians`.
    """
    D.maybe_init_distributed()
    _collect(model, batches, sketch, power_iters, seed=seed, dtype=dtype, blocks=blocks,
             out_dir=out_dir, progress=progress, batch_size=batch_size, precision=precision,
             blocks_per_pass=blocks_per_pass, gradient_checkpointing=gradient_checkpointing,
             checkpoint_every=checkpoint_every, checkpoint_interval_s=checkpoint_interval_s,
             collect_hx=collect_hx, route="auto", overwrite=overwrite, keep=False,
             storage_dtype=storage_dtype)
    return Path(out_dir)


def _collect(model, batches, sketch, power_iters, *, seed, dtype, blocks, out_dir, progress,
             batch_size, precision, blocks_per_pass, gradient_checkpointing, checkpoint_every,
             checkpoint_interval_s, collect_hx, route, overwrite, keep, storage_dtype="float32"):
    kinds = pass_kinds(sketch, power_iters)
    store_dtype = _storage_dtype(storage_dtype)
    if dtype == torch.float64 and store_dtype == torch.float32:
        store_dtype = torch.float64  # fp64 sums were asked for exactness: packing is lossless
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    adapter = get_adapter(model)
    check_finite_weights(model)
    n_blocks = len(adapter.blocks(model))
    selected = sorted(set(range(n_blocks) if blocks is None else blocks))
    group = blocks_per_pass or len(selected)
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
        "power_iters": power_iters, "passes": kinds, "seed": seed, "dtype": dtype_name(dtype),
        "precision": resolve_precision(precision, device, dtype), "collect_hx": collect_hx,
        "calibration": calibration_identity(batches),
    }
    if identity["calibration"] is None and out_path is not None:
        log.warning("the calibration data is a one-shot iterator, so stored Hessians in %s "
                    "cannot be checked against it; pass a tensor or list to make sure", out_path)
    if out_path is not None:
        if rank == 0:
            out_path.mkdir(parents=True, exist_ok=True)
            check_run_identity(out_path, identity, overwrite=overwrite)
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
               disable=not progress or rank != 0, desc=f"Sketch {sketch}")
    results: dict[str, LayerHessian] = {}
    writer = BackgroundWriter()  # finished groups are written while the next one collects
    try:
        for g in groups:
            if g not in todo:
                log.info("blocks %d-%d already collected in %s", g[0], g[-1], out_path)
                if keep:
                    results.update(load_hessians(out_path, model, device=device, blocks=g))
                continue
            collector = HessianCollector(model, g, seed=seed, dtype=dtype, precision=precision,
                                         route=route, collect_hx=collect_hx,
                                         gradient_checkpointing=gradient_checkpointing)
            summary = _run_group(collector, batches, batch_size, kinds, out_path, identity, bar,
                                 checkpoint_every, checkpoint_interval_s, writer, store_dtype)
            if keep:
                results.update(collector.results(sketch, power_iters,
                                                 identity_hash(run_identity(identity))))
            del collector
            log.info("blocks %d-%d: %d sequences, %d tokens per pass", g[0], g[-1],
                     summary["n_seqs"], summary["n_tokens"])
    finally:
        bar.close()
        writer.close()
    return results


_POLL_ROUNDS = 8  # micro-batch rounds between checks of the per-rank checkpoint flags


class _GracefulInterrupt:
    """First Ctrl-C: finish the micro-batch in flight, save a checkpoint, then stop.

    An interrupt in the middle of a backward pass would leave some layers' sums with the
    micro-batch and others without it, so it is deferred to the next step boundary.  A second
    Ctrl-C stops at once (losing only what came after the last checkpoint).
    """

    def __init__(self, active: bool) -> None:
        self.active = active and threading.current_thread() is threading.main_thread()
        self.requested = False
        self._previous = None

    def __enter__(self) -> "_GracefulInterrupt":
        if self.active:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupted: saving a checkpoint after this micro-batch "
                    "(Ctrl-C again to stop at once)")

    def __exit__(self, *exc) -> None:
        if self.active:
            signal.signal(signal.SIGINT, self._previous)


def _run_group(col: HessianCollector, batches: Batches, batch_size: int, kinds: list[str],
               out_path: Path | None, identity: dict[str, Any], bar: tqdm,
               checkpoint_every: int | None, checkpoint_interval_s: float,
               writer: BackgroundWriter, store_dtype: torch.dtype) -> dict[str, Any]:
    rank, world = D.rank_and_world()
    state_dir = resume_dir(out_path, col.blocks) if out_path is not None else None
    start_pass, cursor, cursor_hash = 0, 0, None
    if state_dir is not None:
        prog = read_progress(state_dir)
        if prog is not None:
            bad = identity_problems(prog.get("identity", {}), identity)
            if bad:
                raise HessianMetadataError(f"resume state in {state_dir} is from another request "
                                           f"({'; '.join(bad)})")
            start_pass, cursor, cursor_hash = prog["pass"], prog["cursor"], prog["data_sha256"]
            kind = kinds[start_pass] if start_pass < len(kinds) else None
            col.load_block_state(load_checkpoint(state_dir, prog, col.blocks, col.device),
                                 kind if cursor > 0 else None)
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
    with col, _GracefulInterrupt(state_dir is not None) as stop:
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
                    col.step(ids, seq_ids)
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
            col.end_pass()
            summary = {"ctx": sorted(ctx), "data_sha256": h.hexdigest()}
            if state_dir is not None and p + 1 < len(kinds):
                checkpoint_now(p + 1, 0, h.hexdigest())
    col.check_finite()
    any_acc = next(iter(col.acc.values()))
    summary["n_tokens"] = any_acc.counts["tokens"]
    summary["n_seqs"] = any_acc.counts["seqs"]
    if out_path is not None:
        if rank == 0:
            tensors, meta = _final_block_files(col, identity, summary)
            for b in col.blocks:
                # packed where they were computed, then in host memory: the device is free for
                # the next group while the worker thread writes
                meta[b]["storage_dtype"] = str(store_dtype).removeprefix("torch.")
                writer.submit(atomic_save_tensors, out_path / block_filename(b),
                              pack_factors(tensors[b], store_dtype), meta[b])
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


def _final_block_files(col: HessianCollector, identity: dict[str, Any], summary: dict[str, Any]):
    tensors: dict[int, dict[str, Tensor]] = {b: {} for b in col.blocks}
    meta: dict[int, dict[str, Any]] = {}
    for b in col.blocks:
        meta[b] = {**{k: identity[k] for k in IDENTITY_KEYS}, "block": b,
                   "block_prefix": f"{col.adapter.blocks_path}.{b}.", "layers": {},
                   "ctx": summary["ctx"], "data_sha256": summary["data_sha256"]}
    for name, (bi, rel, mod) in col.layers.items():
        acc = col.acc[name]
        for k in ("H_in", "H_out", "H_x"):
            if k in acc.factors:
                tensors[bi][f"{rel}.{k}"] = acc.factors[k]
        meta[bi]["layers"][rel] = {"n_seqs": acc.counts["seqs"], "n_tokens": acc.counts["tokens"],
                                   "in_features": mod.in_features,
                                   "out_features": mod.out_features,
                                   "shrinkage": layer_estimate(acc.factors, acc.counts["seqs"],
                                                               identity["sketch"],
                                                               identity["power_iters"])}
    return tensors, meta
