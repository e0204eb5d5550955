"""A memory plan before any heavy work: how many decoder blocks one collection pass can hold.

From the model's shape (a loaded model, or only its config on the meta device), the sketch, the
context, the micro-batch and the device's memory, :func:`make_plan` estimates the peak memory of
Hessian collection and of rounding, and picks the largest ``blocks_per_pass`` whose peak stays
under the budget with a margin. Nothing is allocated to make the plan.

The collection peak is the start of the backward pass of the first micro-batch that touches the
deepest collected block, when every term is alive at once:

    weights + accumulators of the group + saved activations of every block from the first
    collected one down + logits and their gradient + the statistic workspace of one layer

Each term is counted from the model's shapes (see the ``_*_bytes`` functions); the activation
count follows a Llama-style block (pre-norm attention + gated MLP), which is what every family
yaqa supports looks like. ``tests/test_plan.py`` checks the estimate against the peak of live
tensor bytes measured with :class:`LiveTensorBytes` on CPU; ``bench/scale.py`` compares it with
``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .hessians.accumulators import choose_route, sum_shape, sym_blocks
from .hessians.boundary import (BoundaryChoice, boundary_bytes, choose_boundary_cache,
                                host_available_bytes)
from .hessians.collect import pass_kinds

log = logging.getLogger(__name__)

GiB = 1024 ** 3


class PlanError(RuntimeError):
    """The request cannot fit the device even at one block per pass; says what to lower."""


@dataclass
class ModelShape:
    """What the plan needs to know about a model: sizes, never weights."""

    name: str
    n_blocks: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    attn: str                             # "eager" (T×T probabilities saved) or a fused kernel
    linears: list[tuple[str, int, int]]   # (name in the block, out m, in n) of block 0
    shared_inputs: int                    # linears that read an input another linear also reads
    param_bytes: int
    dtype_bytes: int

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelShape:
        from .models.adapters import get_adapter

        adapter = get_adapter(model)
        blocks = adapter.blocks(model)
        lins = adapter.block_linears(blocks[0])
        cfg = getattr(model, "config", None)
        cfg = getattr(cfg, "text_config", None) or cfg
        hidden = int(getattr(cfg, "hidden_size", 0) or next(iter(lins.values())).in_features)
        inter = int(getattr(cfg, "intermediate_size", 0) or max(m.out_features
                                                                 for m in lins.values()))
        heads = int(getattr(cfg, "num_attention_heads", 1) or 1)
        kv = int(getattr(cfg, "num_key_value_heads", heads) or heads)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = int(getattr(cfg, "vocab_size", 0) or (head.out_features if head is not None else 0))
        params = {p.data_ptr() if p.device.type != "meta" else id(p): p
                  for p in model.parameters()}
        dtype = next(iter(params.values())).dtype
        shared = sum(1 for rel in lins if "o_proj" not in rel and "down" not in rel)
        return cls(
            name=str(getattr(cfg, "_name_or_path", "") or type(model).__name__),
            n_blocks=len(blocks), hidden=hidden, intermediate=inter, vocab=vocab, heads=heads,
            kv_heads=kv, attn=str(getattr(cfg, "_attn_implementation", None) or "sdpa"),
            linears=[(rel, int(m.out_features), int(m.in_features)) for rel, m in lins.items()],
            shared_inputs=shared,
            param_bytes=sum(p.numel() * p.element_size() for p in params.values()),
            dtype_bytes=torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4)

    @classmethod
    def from_config(cls, config: Any, dtype: torch.dtype = torch.bfloat16) -> ModelShape:
        """The shape of ``AutoModelForCausalLM.from_config(config)`` built on the meta device."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls.from_model(model)


@dataclass
class CollectionRequest:
    """The parts of a collection request that decide its memory."""

    sketch: str = "B"
    power_iters: int = 1
    n_seqs: int = 64
    ctx: int = 512
    batch_size: int = 4
    label_draws: int = 1            # Sketch B: each sequence runs as this many rows
    acc_bytes: int = 4              # float32 sums (8 for float64)
    collect_hx: bool = True
    gradient_checkpointing: bool = False
    world: int = 1
    # collect_hessians keeps every factor on the device; run_collection (yaqa hessians, yaqa
    # run) streams the last pass's factors to the store one linear at a time
    keep_factors: bool = False


@dataclass
class MemoryPlan:
    """What :func:`make_plan` chose, and why."""

    model: str
    device: str
    budget_bytes: int
    margin: float
    blocks_per_pass: int
    groups: list[list[int]]
    collection_peak_bytes: int            # the worst group's estimated peak
    collection_terms: dict[str, int]      # its peak during a pass, term by term
    rounding_peak_bytes: int
    rounding_terms: dict[str, int]
    factor_bytes_per_block: int           # finished fp32 factors of one block (full matrices)
    stored_bytes: int                     # the whole Hessian store, packed triangles
    passes_over_data: int                 # forward+backward passes over the calibration data
    tokens: int
    seconds_estimate: float | None = None
    notes: list[str] = field(default_factory=list)
    # hidden states entering each later group's first block: {"mode", "bytes", "reason",
    # "starts"}; with it, later passes start their forward there (see hessians/boundary.py)
    boundary_cache: dict[str, Any] = field(default_factory=dict)
    model_work: float = 0.0               # the model's own work over all passes, in plain
                                          # forward+backward passes over the data
    # at the end of a pass (activations gone): the worst group's end_of_pass_terms summed;
    # collection_peak_bytes is the larger of this and the sum of collection_terms
    end_of_pass_peak_bytes: int = 0
    end_of_pass_terms: dict[str, int] = field(default_factory=dict)

    def fits(self) -> bool:
        return max(self.collection_peak_bytes, self.rounding_peak_bytes) <= self.limit_bytes

    @property
    def limit_bytes(self) -> int:
        return int(self.budget_bytes * (1 - self.margin))

    def summary(self) -> str:
        g = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        lines = [f"memory plan for {self.model} on {self.device} "
                 f"(budget {g(self.budget_bytes)}, margin {self.margin:.0%} -> "
                 f"limit {g(self.limit_bytes)})",
                 f"  collection: {len(self.groups)} pass(es) of {self.blocks_per_pass} block(s) "
                 f"over {self.tokens} tokens ({self.passes_over_data} data passes), "
                 f"peak {g(self.collection_peak_bytes)}"]
        lines += [f"    {k:<24}{g(v):>12}" for k, v in self.collection_terms.items()]
        if self.end_of_pass_peak_bytes:
            lines.append(f"    {'(during a pass)':<24}{g(sum(self.collection_terms.values())):>12}"
                         f"; at a pass's end: {g(self.end_of_pass_peak_bytes)}"
                         + ("" if "finished factors" in self.end_of_pass_terms else
                            " (the last pass's factors leave one linear at a time)"))
            lines.append("      " + ", ".join(f"{k} {g(v)}"
                                              for k, v in self.end_of_pass_terms.items()))
        bc = self.boundary_cache
        if bc and bc["mode"] != "off":
            where = "in host memory" if bc["mode"] == "memory" else "on disk"
            lines.append(f"  boundary cache: {g(bc['bytes'])} {where}, the hidden states entering "
                         f"blocks {bc['starts']} and their gradients ({bc['reason']}); model "
                         f"work {self.model_work:.2f}x one forward+backward over the data")
        elif bc and bc["bytes"]:
            lines.append(f"  boundary cache: off ({bc['reason']}); model work "
                         f"{self.model_work:.2f}x one forward+backward over the data")
        lines.append(f"  rounding: one linear at a time, peak {g(self.rounding_peak_bytes)}")
        lines += [f"    {k:<24}{g(v):>12}" for k, v in self.rounding_terms.items()]
        lines.append(f"  factors: {g(self.factor_bytes_per_block)} per block in fp32, "
                     f"store {g(self.stored_bytes)} as packed triangles")
        if self.seconds_estimate is not None:
            lines.append(f"  time: about {self.seconds_estimate / 60:.1f} min of collection "
                         "(from a timed warm-up)")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- terms ----------------------------------------------------------------------------------------

def _matrices_per_pass(kind: str, collect_hx: bool,
                       power_iters: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Matrices alive during one pass kind, per linear: ((full, packed) n×n, (full, packed) m×m).

    Packed: the sums being accumulated (:func:`yaqa.hessians.accumulators.sum_shape`, about
    half of a full matrix). Full: finished factors kept from earlier passes and frozen unit-norm
    copies. The plain Hessian H_x (n×n) counts as a sum in the pass that collects it, as a full
    finished factor after."""
    hx, later = int(collect_hx), int(power_iters > 1)
    # Sketch A: H_in is H_x itself until an a_in pass gives it its own matrix (its worst
    # occurrence counts: a later a_out keeps that H_in and the previous H_out)
    return {"b": ((0, 1 + hx), (0, 1)),
            # factors of the last pass + frozen unit-norm copies + new sums
            "b_iter": ((2 + hx, 1), (2, 1)),
            "hx": ((0, 1), (0, 0)),
            "a_out": ((2 + later, 0), (later, 1)),   # H_x, H_in, frozen H_in; H_out sum
            "a_in": ((1 + int(power_iters > 2), 1), (2, 0)),  # H_x, H_in sum; H_out, frozen
            }[kind]


def _factors_after_pass(kind: str, collect_hx: bool, power_iters: int) -> tuple[int, int]:
    """Full n×n and m×m finished factors per linear once a pass of ``kind`` has ended (before
    the next pass or the store takes them)."""
    return {"b": (1 + int(collect_hx), 1), "b_iter": (1 + int(collect_hx), 1), "hx": (1, 0),
            "a_out": (1 + int(power_iters > 1), 1), "a_in": (2, 1)}[kind]


def _sum_numel(n: int) -> int:
    return math.prod(sum_shape(n))


def accumulator_bytes(shape: ModelShape, req: CollectionRequest) -> int:
    """Peak accumulator bytes of one block during the passes of the sketch (packed sums, full
    factors and frozen copies)."""
    return max(_accumulator_bytes(shape, req, kind)
               for kind in pass_kinds(req.sketch, req.power_iters))


def _accumulator_bytes(shape: ModelShape, req: CollectionRequest, kind: str) -> int:
    (nf, np_), (mf, mp) = _matrices_per_pass(kind, req.collect_hx, req.power_iters)
    return sum(nf * n * n + np_ * _sum_numel(n) + mf * m * m + mp * _sum_numel(m)
               for _, m, n in shape.linears) * req.acc_bytes


def end_of_pass_bytes(shape: ModelShape, req: CollectionRequest,
                      kinds: list[str] | None = None) -> int:
    """Finished factors of one block right after a pass (of ``kinds``, default: every pass of
    the sketch): each packed sum is unpacked into its full symmetric factor (and freed), so all
    of a group's factors are full at once before the next pass or the store takes them, while
    the pass's activations are gone."""
    worst = 0
    for kind in pass_kinds(req.sketch, req.power_iters) if kinds is None else kinds:
        nf, mf = _factors_after_pass(kind, req.collect_hx, req.power_iters)
        worst = max(worst, sum(nf * n * n + mf * m * m for _, m, n in shape.linears))
    return worst * req.acc_bytes


def finishing_workspace_bytes(shape: ModelShape, req: CollectionRequest) -> int:
    """Temporaries of finishing one linear for the store (its largest matrix, size k): the
    shrinkage estimate's two float64 k×k matrices (Sketch B, one pass), else the packed copy."""
    k = max(max(m, n) for _, m, n in shape.linears)
    shrink = 2 * k * k * 8 if req.sketch == "B" and req.power_iters == 1 else 0
    return max(shrink, k * (k + 1) // 2 * req.acc_bytes)


def activation_bytes_per_token(shape: ModelShape, ctx: int, gradient_checkpointing: bool) -> int:
    """Tensors one block saves for backward, per token (Llama-style block, frozen weights).

    RMSNorm saves its fp32 input (2 norms); the taps save each distinct linear input (after both
    norms, the attention output, the MLP product: 3h + I); attention keeps q, k, v as it consumes
    them (eager: repeated to h each, plus the fp32 T×T probabilities; fused kernels: q, k, v, the
    output); the gated MLP keeps gate, SiLU(gate) and up (3I).
    """
    h, i, d = shape.hidden, shape.intermediate, shape.dtype_bytes
    if gradient_checkpointing:
        return h * d  # the block input; the block is recomputed during its own backward
    norms = 2 * h * 4
    taps = (3 * h + i) * d
    kv = shape.hidden * shape.kv_heads // max(shape.heads, 1)
    if shape.attn == "eager":
        attn = 3 * h * d + shape.heads * ctx * (4 + (d if d != 4 else 0))
    else:
        attn = (2 * h + 2 * kv) * d
    mlp = 3 * i * d
    return norms + taps + attn + mlp


def head_bytes(shape: ModelShape, req: CollectionRequest) -> int:
    """Logits and their gradient (both alive through backward) + one sequence's fp32 softmax."""
    d, tv = shape.dtype_bytes, req.ctx * shape.vocab
    return 2 * req.batch_size * req.label_draws * tv * d + tv * 4 * (2 if d == 4 else 3)


def workspace_bytes(shape: ModelShape, req: CollectionRequest) -> int:
    """The largest statistic workspace of one layer's backward hook."""
    b, T, a, D = req.batch_size, req.ctx, req.acc_bytes, req.label_draws
    rows = b * D  # several label draws: every sequence's G (and ∇W) D times
    worst = 0
    for _, m, n in shape.linears:
        if choose_route(T, m, n) == "gram":
            # T×T Grams (own + cached X X^T), Y = S X (or Z), fp32 copies of X and G, one product
            rect = max((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in sym_blocks(max(n, m)))
            ws = 2 * b * T * T * a + rows * T * (2 * max(n, m) + n + m) * a + rect * a
            if D > 1:  # the draws side by side (G_cat), and one sequence's (D·T)² statistic
                ws += rows * T * m * a + (D * T) ** 2 * a
        else:
            ws = 2 * rows * m * n * a + max(n, m) ** 2 * a
            if D > 1:  # the draws' ∇W side by side, for H_out's statistic
                ws += rows * m * n * a
        worst = max(worst, ws)
    if req.collect_hx:
        big = max(n for _, _, n in shape.linears)
        # cached X^T X of a shared input (and its recycled buffer), packed like the sums
        worst += 2 * _sum_numel(big) * a
    return worst


def collection_terms(shape: ModelShape, req: CollectionRequest, group: list[int], *,
                     own_blocks_only: bool = False) -> dict[str, int]:
    """The peak of one group's passes, term by term. ``own_blocks_only``: the group runs from a
    cached state to a cached gradient (a lower group under the boundary cache): no head, and
    only its own blocks keep activations."""
    tokens_mb = req.batch_size * req.label_draws * req.ctx
    with_grad = shape.n_blocks - group[0]  # backward stops at the first collected block
    if own_blocks_only:
        with_grad = group[-1] + 1 - group[0]
    if req.sketch == "hx":  # forward only, without autograd, stopped after the last block
        with_grad = 0
    head = req.sketch != "hx" and not own_blocks_only
    return {
        "weights": shape.param_bytes,
        "accumulators": accumulator_bytes(shape, req) * len(group),
        "activations": activation_bytes_per_token(shape, req.ctx, req.gradient_checkpointing)
                       * tokens_mb * with_grad,
        "logits + gradient": head_bytes(shape, req) if head else 0,
        "statistic workspace": workspace_bytes(shape, req),
    }


def end_of_pass_terms(shape: ModelShape, req: CollectionRequest, group: list[int], *,
                      on_host: bool = False) -> dict[str, int]:
    """The other peak of a group: the end of a pass, after its activations are gone.

    After a pass whose factors the next pass (or ``keep_factors``) needs: the group's finished
    factors, all full (:func:`end_of_pass_bytes`), beside the weights and the last linear's
    packed sums. After the last pass when the store takes the factors: one linear at a time is
    finished, checked, estimated, packed and copied to host memory
    (:func:`yaqa.hessians.passes.stream_block_files`): the group's sums still packed, one
    linear's full factors and their temporaries (``on_host``: the packed copies for the store
    are in the same memory). The larger of the two, term by term."""
    kinds = pass_kinds(req.sketch, req.power_iters)
    options = []
    full = kinds if req.keep_factors else kinds[:-1]
    if full:
        last = max(_sum_numel(n) * (1 + int(req.collect_hx)) + _sum_numel(m)
                   for _, m, n in shape.linears)
        options.append({"weights": shape.param_bytes,
                        "finished factors": end_of_pass_bytes(shape, req, full) * len(group),
                        "packed sums of one linear": last * req.acc_bytes})
        if req.keep_factors:  # the shrinkage estimate of the results, beside them all
            options[-1]["finishing workspace"] = finishing_workspace_bytes(shape, req)
    if not req.keep_factors:
        nf, mf = _factors_after_pass(kinds[-1], req.collect_hx, req.power_iters)
        one = max(nf * n * n + mf * m * m for _, m, n in shape.linears) * req.acc_bytes
        t = {"weights": shape.param_bytes,
             "sums being finished": _accumulator_bytes(shape, req, kinds[-1]) * len(group),
             "factors of one linear": one,
             "finishing workspace": finishing_workspace_bytes(shape, req)}
        if on_host:
            t["packed for the store"] = (stored_bytes(shape, req.collect_hx, req.acc_bytes)
                                         // shape.n_blocks * len(group))
        options.append(t)
    return max(options, key=lambda t: sum(t.values()))


def rounding_terms(shape: ModelShape, method: str = "yaqa") -> dict[str, int]:
    """One linear at a time: W, its factors and their prepared copies, the rounding state.

    ``round_weight`` prepares each factor in fp32 (a device copy, normalised, damped, its
    Cholesky and block LDL, transformed by the incoherence: about 6 fp32 copies alive at once)
    and reports the proxy loss from an fp64 copy; the wavefront keeps W, its transform, the codes,
    the dequantized weight and the error feedback: about 8 fp32 m×n arrays. The counts were
    checked with :class:`LiveTensorBytes` on CPU (tests/test_plan.py).
    """
    worst_f, worst_w = 0, 0
    per_elem = 6 * 4 + 8
    for _, m, n in shape.linears:
        f = n * n * per_elem + (m * m * per_elem if method == "yaqa" else 0)
        # + the new QuantizedLinear being built (codes, scales, its dense fp32 weight): 3 more
        worst_f, worst_w = max(worst_f, f), max(worst_w, 11 * m * n * 4)
    return {"weights": shape.param_bytes, "factors of one linear": worst_f,
            "rounding state": worst_w}


def factor_bytes_per_block(shape: ModelShape, collect_hx: bool = True) -> int:
    return 4 * sum(n * n * (1 + int(collect_hx)) + m * m for _, m, n in shape.linears)


def stored_bytes(shape: ModelShape, collect_hx: bool = True, bytes_per_value: int = 4) -> int:
    per_block = sum((n * (n + 1) // 2) * (1 + int(collect_hx)) + m * (m + 1) // 2
                    for _, m, n in shape.linears)
    return per_block * shape.n_blocks * bytes_per_value


# -- the plan -------------------------------------------------------------------------------------

def device_budget(device: str | torch.device) -> int:
    """Bytes this process may use on ``device``: a GPU's total memory, or the host's available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    from .hessians.boundary import host_available_bytes

    available = host_available_bytes()
    if available is not None:
        return available
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _groups(blocks: list[int], size: int) -> list[list[int]]:
    return [blocks[i:i + size] for i in range(0, len(blocks), size)]


def make_plan(shape: ModelShape, req: CollectionRequest, *, budget_bytes: int,
              device: str = "cuda", margin: float = 0.1, blocks: list[int] | None = None,
              blocks_per_pass: int | None = None, method: str = "yaqa",
              boundary_cache: str = "auto", host_bytes: int | None = None,
              disk_bytes: int | None = None) -> MemoryPlan:
    """Choose ``blocks_per_pass`` (the largest that fits, unless given) and report the peaks.

    The boundary cache (hidden states entering each later group, see
    :mod:`yaqa.hessians.boundary`) goes where ``boundary_cache`` asks and it fits: host memory
    (``host_bytes`` available, default: read now), disk (``disk_bytes`` free in the output
    directory, less the fp32 Hessian store; None: no directory) or nowhere. On a CPU device it counts in the peak.

    Raises :class:`PlanError` when even one block per pass (or the rounding) does not fit, naming
    the setting to lower.
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    blocks = sorted(set(range(shape.n_blocks) if blocks is None else blocks))
    limit = int(budget_bytes * (1 - margin))
    if host_bytes is None:
        host_bytes = host_available_bytes()
    on_host = torch.device(device).type == "cpu"

    def cache_choice(size: int) -> BoundaryChoice:
        starts = [g[0] for g in _groups(blocks, size) if g[0] > 0]
        if req.label_draws > 1 and starts:
            return BoundaryChoice("off", 0, f"label_draws={req.label_draws}: every pass "
                                  "recomputes the forward below its blocks")
        # at its peak: every later group's state + the top group's gradient
        nbytes = boundary_bytes(req.n_seqs * req.ctx, shape.hidden, shape.dtype_bytes,
                                len(starts) + 1 if starts else 0)
        return choose_boundary_cache(boundary_cache, nbytes, host_bytes=host_bytes,
                                     disk_bytes=None if disk_bytes is None else
                                     max(disk_bytes - stored_bytes(shape, req.collect_hx), 0),
                                     world=req.world)

    def peak(size: int) -> tuple[int, dict[str, int], int, dict[str, int]]:
        """(peak, its terms during a pass, peak at a pass's end, its terms) of the worst
        group."""
        worst, end, end_terms = (0, {}), 0, {}
        bc = cache_choice(size)
        gs = _groups(blocks, size)
        for g in gs:
            # with the cache, every group but the top one runs between a cached state and a
            # cached gradient (when the group above is adjacent)
            own = bc.mode != "off" and g is not gs[-1] and g[-1] + 1 in blocks
            t = collection_terms(shape, req, g, own_blocks_only=own)
            et = end_of_pass_terms(shape, req, g, on_host=on_host)
            if on_host and bc.mode == "memory":
                t["boundary cache"] = bc.bytes  # host memory is the device's here
                et["boundary cache"] = bc.bytes
            worst = max(worst, (sum(t.values()), t), key=lambda x: x[0])
            if sum(et.values()) > end:
                end, end_terms = sum(et.values()), et
        return max(worst[0], end), worst[1], end, end_terms

    if blocks_per_pass is None:
        # fewest passes first: k passes of ceil(len/k) blocks, k = 1, 2, ...
        sizes = sorted({math.ceil(len(blocks) / k) for k in range(1, len(blocks) + 1)},
                       reverse=True)
        size = next((s for s in sizes if peak(s)[0] <= limit), 1)
    else:
        size = max(1, min(blocks_per_pass, len(blocks)))
    coll, terms, end, end_terms = peak(size)
    rterms = rounding_terms(shape, method)
    groups = _groups(blocks, size)
    tokens = req.n_seqs * req.ctx
    plan = MemoryPlan(
        model=shape.name, device=str(device), budget_bytes=int(budget_bytes), margin=margin,
        blocks_per_pass=size, groups=groups, collection_peak_bytes=coll, collection_terms=terms,
        rounding_peak_bytes=sum(rterms.values()), rounding_terms=rterms,
        factor_bytes_per_block=factor_bytes_per_block(shape, req.collect_hx),
        stored_bytes=stored_bytes(shape, req.collect_hx),
        passes_over_data=len(groups) * len(pass_kinds(req.sketch, req.power_iters)),
        tokens=tokens, end_of_pass_peak_bytes=end, end_of_pass_terms=end_terms)
    bc = cache_choice(size)
    plan.boundary_cache = {"mode": bc.mode, "bytes": bc.bytes, "reason": bc.reason,
                           "starts": [g[0] for g in groups if g[0] > 0]}
    n_kinds = len(pass_kinds(req.sketch, req.power_iters))
    # several label draws run every sequence that many times through the model
    plan.model_work = n_kinds * req.label_draws * sum(_model_shares(plan, shape.n_blocks))
    if coll > limit:
        parts = dict(terms)
        if end > sum(terms.values()):  # at a pass's end
            # all the group's factors full, or (streamed) its sums, mostly
            key = "finished factors" if "finished factors" in end_terms else "accumulators"
            parts = {key: end - shape.param_bytes}
        biggest = max(parts, key=parts.get)
        advice = {"activations": "lower --batch-size or --ctx, or add --gradient-checkpointing",
                  "logits + gradient": "lower --batch-size",
                  "accumulators": "collect fewer --blocks at once (no smaller group exists), or "
                                  "skip the plain Hessian",
                  "finished factors": "collect fewer --blocks at once (no smaller group exists),"
                                      " or skip the plain Hessian",
                  "weights": "use a smaller model dtype or a larger device",
                  "boundary cache": "use boundary_cache='disk' or 'off'",
                  "statistic workspace": "lower --batch-size or --ctx"}[biggest]
        raise PlanError(f"collection needs about {coll / GiB:.1f} GiB even at {size} block(s) per "
                        f"pass, over the {limit / GiB:.1f} GiB limit; the largest part is "
                        f"{biggest} ({parts[biggest] / GiB:.1f} GiB): {advice}")
    if plan.rounding_peak_bytes > limit:
        raise PlanError(f"rounding one linear needs about {plan.rounding_peak_bytes / GiB:.1f} GiB,"
                        f" over the {limit / GiB:.1f} GiB limit: round on a larger device")
    if req.label_draws > 1:
        plan.notes.append(f"{req.label_draws} label draws per sequence: every micro-batch runs "
                          f"as {req.batch_size * req.label_draws} rows, {req.label_draws}x the "
                          "forward+backward work of one draw")
    if req.world > 1:
        plan.notes.append(f"{req.world} ranks split the micro-batches of every pass; each rank "
                          "holds the whole group's accumulators")
    return plan


def timed_warmup(model: nn.Module, ids: Tensor, plan: MemoryPlan, req: CollectionRequest, *,
                 steps: int = 2, seed: int = 0, precision: str = "auto") -> float:
    """Time ``steps`` micro-batches of one group of the plan (after one untimed), with and
    without the statistics, and extrapolate to the whole plan with
    :func:`collection_seconds`: seconds for every group and pass over ``plan.tokens`` tokens.

    With the boundary cache the top group is timed (it runs the whole model; the first
    group's backward through every block would not fit: the plan sized it for its own blocks);
    without it the first group (the deepest backward).
    """
    from .hessians.collect import HessianCollector

    cached = plan.boundary_cache.get("mode", "off") != "off"
    group = plan.groups[-1] if cached else plan.groups[0]
    ids = ids[: req.batch_size * (steps + 1)]
    mbs = list(ids.split(req.batch_size))
    dev = next(model.parameters()).device

    def per_token(col: HessianCollector) -> float:
        col.step(mbs[0], range(req.batch_size))
        _sync(dev)
        t = time.perf_counter()
        for j, mb in enumerate(mbs[1:], 1):
            col.step(mb, range(j * req.batch_size, (j + 1) * req.batch_size))
        _sync(dev)
        return (time.perf_counter() - t) / max(sum(m.numel() for m in mbs[1:]), 1)

    with HessianCollector(model, group, seed=seed, precision=precision,
                          collect_hx=req.collect_hx, label_draws=req.label_draws,
                          gradient_checkpointing=req.gradient_checkpointing) as col:
        n_blocks = len(col.block_list)
        plain = per_token(col)  # no pass begun: no taps, the model's own work in this group
        # a first Sketch-B pass stands for every pass: Sketch A's backward passes cost about
        # the same, its forward-only pass 0 less, so the estimate errs on the long side
        col.begin_pass("b")
        full = per_token(col)
    share = _model_shares(plan, n_blocks)[plan.groups.index(group)]
    plan.seconds_estimate = collection_seconds(
        plan, n_blocks, plain / share, max(full - plain, 0.0) / len(group), req.world)
    return plan.seconds_estimate


def _model_shares(plan: MemoryPlan, n_blocks: int) -> list[float]:
    """Each group's model work per pass, in plain forward+backward passes (forward 1/3,
    backward 2/3). A group that runs the whole forward and the backward down to its first
    block: 1/3 + 2/3 (L - first) / L; under the boundary cache, a group below the top one
    (between a cached state and a cached gradient): its own blocks, size / L. The cached top
    group is of the first kind: its backward stops at its first block too."""
    L = n_blocks
    cached = plan.boundary_cache.get("mode", "off") != "off"
    top = plan.groups[-1]
    return [len(g) / L if cached and g is not top and g[-1] + 1 in plan.boundary_cache["starts"]
            else 1 / 3 + 2 / 3 * (L - g[0]) / L for g in plan.groups]


def collection_seconds(plan: MemoryPlan, n_blocks: int, plain_s_per_token: float,
                       stats_s_per_block_token: float, world: int = 1) -> float:
    """Collection time from per-token costs: a plain forward+backward of the whole model, and
    the statistics of one block. Every pass of every group does its share of the model's work
    (:func:`_model_shares`) and its own blocks' statistics."""
    n_kinds = plan.passes_over_data // max(len(plan.groups), 1)
    model = plain_s_per_token * sum(_model_shares(plan, n_blocks))
    stats = stats_s_per_block_token * sum(len(g) for g in plan.groups)
    return plan.tokens * n_kinds * (model + stats) / world


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def oom_message(exc: BaseException, plan: MemoryPlan | None, stage: str) -> str:
    """One line for an out-of-memory error: what ran out, and which setting to lower."""
    where = f"{stage} ran out of memory"
    if plan is None:
        return f"{where}; lower --batch-size, --blocks-per-pass or --ctx ({exc.__class__.__name__})"
    if stage == "rounding":
        return (f"{where} (plan: {plan.rounding_peak_bytes / GiB:.1f} GiB); round on a larger "
                "device or with fewer other jobs on it")
    return (f"{where} at {plan.blocks_per_pass} block(s) per pass (plan: "
            f"{plan.collection_peak_bytes / GiB:.1f} GiB of {plan.budget_bytes / GiB:.1f}); lower "
            f"--blocks-per-pass to {max(1, plan.blocks_per_pass // 2)}, or --batch-size")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# -- measurement ----------------------------------------------------------------------------------

class LiveTensorBytes:
    """Peak bytes of tensor storage alive at once, counted at every aten operation.

    A ``TorchDispatchMode`` sees every operator call (forward and backward, on the calling
    thread) and the storages its outputs use; a storage counts from the operator that created it
    until the last reference to it dies (checked through weak references at each later call).
    Storages of ``existing`` tensors (the weights) count once, as ``baseline``, views included. Not counted:
    allocator caching and fragmentation, and scratch memory inside one kernel. This is the CPU
    analogue of ``torch.cuda.max_memory_allocated``.
    """

    def __init__(self, existing: Any = (), device_type: str = "cpu"):
        self.device_type = device_type
        self._existing: dict[int, int] = {}
        for t in existing:  # views of these (a transposed weight) are not new memory
            st = t.untyped_storage()
            self._existing[st.data_ptr()] = st.nbytes()
        self.baseline = sum(self._existing.values())
        self.current = 0
        self.peak = 0
        self._mode = None

    def __enter__(self) -> LiveTensorBytes:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils import _pytree as pytree
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        live: dict[int, tuple[Any, int]] = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (ref, _) in live.items() if ref.expired()]:
                    tracker.current -= live.pop(key)[1]
                for t in pytree.tree_leaves(out):
                    if isinstance(t, Tensor) and t.device.type == tracker.device_type:
                        st = t.untyped_storage()
                        if st._cdata not in live and st.data_ptr() not in tracker._existing:
                            live[st._cdata] = (StorageWeakRef(st), st.nbytes())
                            tracker.current += st.nbytes()
                tracker.peak = max(tracker.peak, tracker.current)
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)

    @property
    def peak_bytes(self) -> int:
        return self.baseline + self.peak


# -- evaluation -----------------------------------------------------------------------------------

# A quantized copy held through a joint evaluation: its dense weight cache (the unquantized
# model's size) plus the packed codes and scales (under 0.3 of it at 4 bits or more).
HELD_MODEL_FACTOR = 1.3
# Float32 logit-sized tensors of one batch alive at the evaluation's peak: the reference's
# logits and log-probabilities, a model's logits, and the KL chunk temporaries.
EVAL_LOGIT_COPIES = 5


def joint_evaluation_bytes(shape: ModelShape, n_models: int, batch_size: int, ctx: int) -> int:
    """Peak memory of evaluating ``n_models`` quantized copies in one sweep over the windows
    (:func:`yaqa.evaluate.compare_many`): the reference and every copy resident, each counted
    at :data:`HELD_MODEL_FACTOR` times the reference's weights, plus one batch's logits."""
    held = math.ceil((n_models + 1) * HELD_MODEL_FACTOR * shape.param_bytes)
    return held + EVAL_LOGIT_COPIES * batch_size * ctx * shape.vocab * 4


def joint_evaluation_fits(shape: ModelShape, n_models: int, batch_size: int, ctx: int, *,
                          budget_bytes: int, margin: float = 0.2) -> bool:
    """Whether :func:`joint_evaluation_bytes` stays under the budget with ``margin`` to spare.
    (On the CPU the budget is the memory available with the reference already loaded, so the
    reference is counted twice there: the estimate errs on the safe side.)"""
    return joint_evaluation_bytes(shape, n_models, batch_size, ctx) <= budget_bytes * (1 - margin)
