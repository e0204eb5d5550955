"""Hooks on stock HF linears: what the collection sees of the model.

Each target ``nn.Linear`` gets a forward hook that passes its output through :class:`_Tap`, an
identity autograd Function that keeps the layer input X and, in backward, hands (X, dL/dy) to the
layer's accumulator. Parameters are frozen and the hidden state entering the first collected
block is a fresh leaf that requires grad, so backward computes activation gradients only, and only
down to the blocks that need them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..models.adapters import get_adapter, input_embeddings
from . import distributed as D
from .accumulators import LayerAccumulator, ProductCache, resolve_precision
from .boundary import BoundaryCache
from .labels import sampled_label_grad
from .shrinkage import layer_estimate
from .storage import HessianMetadataError, LayerHessian, LazyTensors


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
                 gradient_checkpointing: bool = False, boundary: BoundaryCache | None = None,
                 label_draws: int = 1):
        self.model = model
        if label_draws < 1:
            raise ValueError(f"label_draws must be >= 1, got {label_draws}")
        if label_draws > 1 and boundary is not None:
            raise ValueError("the boundary cache holds one copy of each sequence: it does not "
                             "support label_draws > 1")
        # Sketch B: each sequence runs as this many consecutive rows, one per label draw
        self.label_draws = label_draws
        # hidden states at pass boundaries: start the forward at this group's first block
        self.boundary = boundary
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
                    precision=precision, route=route, collect_hx=collect_hx,
                    label_draws=label_draws)
        self.precision = resolve_precision(precision, self.device, dtype)
        self.kind: str | None = None
        self.cache = ProductCache()
        self._handles: list[Any] = []
        self._saved_grad: list[tuple[nn.Parameter, bool]] = []
        self._patched: list[nn.Module] = []
        self._was_training = False
        self._batch = 0
        self._generator: torch.Generator | None = None
        self._skip_below: int | None = None      # blocks before this one are skipped this step
        self._skip_tuple = False                 # ... and return (hidden,) rather than hidden
        self._inject: tuple[int, Tensor] | None = None  # (block, cached hidden state entering it)
        self._record: tuple[int, list[int]] | None = None  # (micro-batch, boundaries to keep)
        self._stop_at_top = False                # stop after the last block (cached gradient)
        self._top_out: Tensor | None = None      # the last block's output, when stopped there
        self._leaf: Tensor | None = None         # the state entering the first block, a leaf
        self._refilling = False                  # refill_gradient: the leaf is above the group

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
        if self.boundary is not None:
            for s in self.boundary.starts:
                if s <= lo:  # before the leaf hook: the injected state becomes the leaf
                    self._handles.append(self.block_list[s].register_forward_pre_hook(
                        functools.partial(self._inject_state, s), with_kwargs=True))
                # before the stop hook: a forward-only pass keeps the state after its last block
                self._handles.append(self.block_list[s - 1].register_forward_hook(
                    functools.partial(self._record_state, s)))
            for i, block in enumerate(self.block_list[:lo]):
                block.forward = functools.partial(self._skippable, block.forward, i)
                self._patched.append(block)
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
        if not torch.is_grad_enabled() or self.kind == "hx" or self._refilling:
            return None
        return self._leaf_at(args, kwargs)

    def _make_refill_leaf(self, module: nn.Module, args: tuple, kwargs: dict):
        return self._leaf_at(args, kwargs) if self._refilling else None

    def _leaf_at(self, args: tuple, kwargs: dict):
        if args:
            self._leaf = args[0].detach().requires_grad_()
            return (self._leaf,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        self._leaf = kwargs["hidden_states"].detach().requires_grad_()
        kwargs["hidden_states"] = self._leaf
        return args, kwargs

    # -- pass boundaries -------------------------------------------------------------------------
    def _skippable(self, forward, index: int, *args: Any, **kwargs: Any):
        if self._skip_below is not None and index < self._skip_below:
            # its output is replaced at the boundary: pass the hidden state through unchanged
            h = args[0] if args else kwargs["hidden_states"]
            return (h,) if self._skip_tuple else h
        return forward(*args, **kwargs)

    def _inject_state(self, block: int, module: nn.Module, args: tuple, kwargs: dict):
        if self._inject is None or self._inject[0] != block:
            return None
        h = self._inject[1]
        if args:
            return (h,) + tuple(args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = h
        return args, kwargs

    def _record_state(self, block: int, module: nn.Module, args: tuple, out: Any) -> None:
        if self._record is None or block not in self._record[1] or self.boundary is None:
            return
        h = out[0] if isinstance(out, tuple) else out
        try:
            self.boundary.put(block, self._record[0], h)
        except ValueError as e:
            logging.getLogger(__name__).warning("boundary cache off: %s", e)
            self.boundary = None

    def _maybe_stop(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.boundary is not None:  # a block's output form, for the blocks that are skipped
            self.boundary.returns_tuple = isinstance(out, tuple)
        if self.kind == "hx":
            raise _StopForward
        if self._stop_at_top:  # the backward starts here, from the cached gradient
            self._top_out = out[0] if isinstance(out, tuple) else out
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

    def _start_from_cache(self, bc: BoundaryCache, ids: Tensor, index: int) -> None:
        """Arrange the next forward to start at the deepest cached state at or before this
        group's first block (skipping needs the blocks' output form), and to record the states
        the cache still wants after it."""
        start = bc.best_start(self.blocks[0], index)
        if start is not None and bc.returns_tuple is not None:
            h = bc.get(start, index, self.device)
            self._inject = (start, h.view(ids.shape[0], ids.shape[1], -1))
            self._skip_below, self._skip_tuple = start, bc.returns_tuple
        else:
            start = 0
        self._record = (index, bc.wanted(index, after=start))

    def step(self, ids: Tensor, seq_indices: Sequence[int], index: int | None = None) -> None:
        """One micro-batch ``ids`` [b, T] whose rows are the global sequences ``seq_indices``;
        ``index``: its position in the data (the key of the boundary cache).

        With a boundary cache, the forward starts at the deepest cached hidden state at or
        before this group's first block; and when the loss gradient at the state entering the
        block after this group is cached too (the group above left it), the forward stops after
        this group's last block and the backward starts from that gradient: no logits, no labels,
        no blocks above the group. The gradients are the ones the full backward would give.
        """
        ids = ids.to(self.device)
        # (also with no pass begun: the plan's timing of the model's own work then counts them)
        draws = self.label_draws if self.kind != "hx" else 1
        if draws > 1:
            # every sequence D times in a row, each copy with its own draw of labels: D forward
            # and backward passes, simple and exact (the accumulators regroup the copies)
            ids = ids.repeat_interleave(draws, dim=0)
        self._batch = ids.shape[0]
        lo, hi = self.blocks[0], self.blocks[-1]
        bc = self.boundary if index is not None else None
        top_grad = None
        if bc is not None:
            self._start_from_cache(bc, ids, index)
            # (stopping needs no knowledge of the blocks' output form: the stop hook sees it)
            if self.kind != "hx" and bc.has(hi + 1, index, "g"):
                top_grad = bc.get(hi + 1, index, self.device, "g").view(ids.shape[0],
                                                                        ids.shape[1], -1)
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
                if top_grad is not None:
                    self._stop_at_top = True
                    try:
                        self.model(input_ids=ids, use_cache=False)
                    except _StopForward:
                        pass
                    top, self._top_out = self._top_out, None
                    top.backward(top_grad)
                else:
                    logits = self.model(input_ids=ids, use_cache=False).logits
                    grad, _ = sampled_label_grad(logits.detach(), seq_indices, self.seed,
                                                 self._generator, draws=draws)
                    logits.backward(grad)
                leaf = self._leaf
                if (bc is not None and self.boundary is not None and leaf is not None
                        and leaf.grad is not None and lo in bc.grads
                        and not bc.has(lo, index, "g")):
                    bc.put(lo, index, leaf.grad, "g")  # the group below starts its backward here
        finally:
            self.cache.clear()
            self._inject, self._skip_below, self._record = None, None, None
            self._stop_at_top, self._top_out, self._leaf = False, None, None
            if bc is not None and self.boundary is not None:
                bc.commit()

    def needs_gradient_above(self) -> bool:
        """Whether this group's backward is to start from the cached gradient entering the
        block after its last (a group below another, under the boundary cache)."""
        return self.boundary is not None and self.blocks[-1] + 1 in self.boundary.grads

    def refill_gradient(self, ids: Tensor, seq_indices: Sequence[int], index: int) -> None:
        """Compute the loss gradient entering the block after this group for micro-batch
        ``index`` and put it in the boundary cache (with the states entering lower groups that
        its forward passes), before this group's accumulators exist.

        A group below others is planned to start its backward from that gradient, which the
        group above left in the cache. A resumed command lacks it where the interrupted one
        kept the cache in its host memory (or left a disk cache incomplete); the step would then
        run the backward from the head, holding the activations of every block above the
        group beside its accumulators, past its plan. Here the blocks above run under
        activation checkpointing and this group's own blocks without autograd: the weights,
        the head, one hidden state per block above and one block's activations, less than the
        group's own passes hold. The values are those of the full backward (the same kernels
        on the same inputs; the recomputed forwards repeat the first ones).
        """
        bc, hi = self.boundary, self.blocks[-1]
        if not self.needs_gradient_above():
            return
        if self.kind is not None:
            raise RuntimeError("refill_gradient runs before the group's passes begin")
        ids = ids.to(self.device)
        self._batch = ids.shape[0]
        self._start_from_cache(bc, ids, index)
        above = self.block_list[hi + 1:]
        handles = [above[0].register_forward_pre_hook(self._make_refill_leaf, with_kwargs=True)]
        patched = [] if self.gradient_checkpointing else above  # else already checkpointed
        for block in patched:
            block.forward = functools.partial(_checkpointed, block.forward)
        self._refilling = True
        try:
            if self._generator is None or self._generator.device != self.device:
                self._generator = torch.Generator(device=self.device)
            with torch.enable_grad():
                logits = self.model(input_ids=ids, use_cache=False).logits
                grad, _ = sampled_label_grad(logits.detach(), seq_indices, self.seed,
                                             self._generator)
                logits.backward(grad)
            if self.boundary is not None:  # (a failed put turns the cache off)
                bc.put(hi + 1, index, self._leaf.grad, "g")
        finally:
            for h in handles:
                h.remove()
            for block in patched:
                del block.forward
            self._refilling = False
            self._inject, self._skip_below, self._record, self._leaf = None, None, None, None
            if self.boundary is not None:
                bc.commit()

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
        self._reduce_for_end()
        for acc in self.acc.values():
            acc.end_pass()
        self.kind = None

    def end_pass_streaming(self) -> Iterator[tuple[str, LayerAccumulator]]:
        """End the last pass one linear at a time: yields ``(name, accumulator)`` with that
        linear's factors finished (full) while the other linears' sums are still packed, and
        drops its factors when the caller moves on. The device then never holds more than one
        linear's full factors, instead of the whole group's (the caller must take what it needs
        from ``acc.factors`` before the next item; counts stay)."""
        self._reduce_for_end()
        for name, acc in self.acc.items():
            acc.end_pass()
            yield name, acc
            acc.factors = {}
        self.kind = None

    def _reduce_for_end(self) -> None:
        # the last step's cached products and recycled X^T X buffers: nothing reads them now,
        # and the end of a pass makes n×n factors beside them
        self.cache.release()
        counts = self._counts_tensor()
        D.all_reduce_sum_(self._sum_tensors() + [counts])
        self._set_counts(counts)

    # -- state --------------------------------------------------------------------------------
    def block_state(self) -> tuple[dict[int, dict[str, Tensor]], dict[int, dict[str, Any]]]:
        tensors: dict[int, dict[str, Tensor]] = {b: {} for b in self.blocks}
        meta: dict[int, dict[str, Any]] = {b: {"layers": {}} for b in self.blocks}
        for name, (bi, rel, _) in self.layers.items():
            acc = self.acc[name]
            tensors[bi].update({f"{rel}.{k}": v for k, v in acc.state_tensors().items()})
            # the H_x route a layer has learnt (shared product or in place) sums in a different
            # order; a resumed run must take the same one to give bit-identical factors
            meta[bi]["layers"][rel] = {"counts": acc.counts, "hx_shared": acc.hx_shared}
        return tensors, meta

    def load_block_state(self, states: Mapping[int, tuple[LazyTensors, dict]],
                         kind: str | None) -> None:
        """Restore a checkpoint (:func:`~yaqa.hessians.storage.load_checkpoint`). Its tensors
        are taken one at a time (a lazy mapping reads each from disk only then), so nothing
        but the accumulators stays on the device."""
        for name, (bi, rel, _) in self.layers.items():
            tensors, meta = states[bi]
            mine = tensors.sub(rel + ".")
            counts = meta["layers"][rel]["counts"]
            if D.rank_and_world()[0] != 0:
                # the checkpoint's sums are global; rank 0 alone carries them forward
                counts = {"seqs": 0, "tokens": 0}
                mine = {k: (v.zero_() if k.startswith("sum.") else v) for k, v in mine.items()}
            self.acc[name].load_state_tensors(mine, kind, counts)
            self.acc[name].hx_shared = meta["layers"][rel].get("hx_shared")
        self.kind = kind

    def check_finite(self) -> None:
        """Name the first layer whose factors are not finite (before anything is stored)."""
        for name, acc in self.acc.items():
            check_layer_finite(name, acc)

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


def check_layer_finite(name: str, acc: LayerAccumulator) -> None:
    """Raise naming ``name``'s first factor that is not finite."""
    for k, t in acc.factors.items():
        if not bool(torch.isfinite(t).all()):
            raise HessianMetadataError(
                f"{name}.{k} is not finite after collection: check the model's weights "
                "for inf/nan, or use a wider dtype (--fp64)")


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)
