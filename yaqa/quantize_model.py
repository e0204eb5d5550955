"""Quantize a whole model, block by block: RTN, LDLQ (= GPTQ) or YAQA.

Every linear layer of every decoder block is rounded independently (Hessians come from the
original model), replaced in place by a :class:`~yaqa.nn.QuantizedLinear`, and, when a work
directory is given, saved after each block so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from . import store
from .hessians.shrinkage import Shrinkage, shrink_layer
from .incoherence import block_hadamard_size, incoherence_mode, plan_transforms
from .models import get_adapter
from .nn import QuantizedLinear
from .quantizers import Quantizer, quantizer_name
from .quantizers.fused import fused_quantizers, uses_fused_global_scale
from .recipe import DEFAULT_BLOCK_SIZE, DEFAULT_GROUP_SIZE, DEFAULT_INCOHERENCE, DEFAULT_SIGMA
from .recipe import AUTO_REFINE_ROUNDS, Recipe, get_recipe, with_default_refine
from .rounding.threads import small_cpu_problem_threads

log = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    proxy_loss: float | None
    sigma_in: float | None
    sigma_out: float | None
    seconds: float
    shrink_in: float | None = None   # amounts H_in/H_out were shrunk by (None: not shrunk)
    shrink_out: float | None = None
    proxy_loss_relative: float | None = None  # proxy_loss / tr(W^T H_out W H_in)
    # refinement (recipe.refine > 0): relative drop of the damped proxy it minimised, its time
    refine_reduction: float | None = None
    refine_seconds: float | None = None


@dataclass
class QuantizeReport:
    method: str
    quantizer: dict
    incoherence: bool
    seed: int
    incoherence_mode: str | None = None
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    resumed_blocks: int = 0
    shrinkage: str = "off"

    def to_dict(self) -> dict:
        return asdict(self)


def _factors(rounding: str, hessians: Mapping | None, name: str, shrinkage: str = "off"):
    """(H_in, H_out, a_in, a_out) for one layer; YAQA's factors shrunk as ``shrinkage`` says."""
    if rounding == "rtn":
        return None, None, None, None
    if hessians is None or name not in hessians:
        raise ValueError(f"{rounding} rounding needs Hessians for {name}; collect them first "
                         "(yaqa.collect_hessians or `yaqa hessians`)")
    h = hessians[name]
    H_x = getattr(h, "H_x", None)
    if rounding == "ldlq":
        return H_x if H_x is not None else h.H_in, None, None, None
    if h.H_out is None:
        raise ValueError(f"yaqa rounding needs both Kronecker factors for {name}; these "
                         "Hessians hold only H_x (collect Sketch A or B)")
    return shrink_layer(h.H_in, h.H_out, H_x, getattr(h, "shrinkage", None),
                        Shrinkage.parse(shrinkage))


def recipe_from_args(method: str, quantizer: str | Quantizer, group_size: int | None, *,
                     symmetric: bool, scale_search: str, incoherence: bool | str, seed: int,
                     block_size: int, sigma: float,
                     shrinkage: str | float = "auto",
                     fused_global_scale: bool | None = None,
                     refine: int | None = None) -> tuple[Recipe, Quantizer | None]:
    """The library's keyword arguments as a :class:`Recipe` (plus a quantizer object, when one
    was passed instead of a name)."""
    if isinstance(quantizer, Quantizer):
        qobj, qname = quantizer, quantizer_name(quantizer.config())
        fused_global_scale = uses_fused_global_scale(quantizer)  # the object decides
    else:
        qobj, qname = None, str(quantizer).lower()
    recipe = get_recipe(method, quantizer=qname, group_size=group_size, symmetric=symmetric,
                        scale_search=scale_search, incoherence=incoherence, seed=seed,
                        block_size=block_size, sigma=sigma, shrinkage=str(shrinkage),
                        fused_global_scale=fused_global_scale, refine=refine)
    if refine and recipe.rounding == "rtn":
        raise ValueError(f"refine applies to LDLQ and YAQA rounding; method {method!r} rounds "
                         f"to nearest and has nothing to refine")
    return recipe, qobj


def hessians_identity(hessians: Mapping | None) -> str | None:
    """Identity of a set of factors: the collection identities they carry, or (for factors built
    by hand) a hash of every tensor."""
    if not hessians:
        return None
    if hasattr(hessians, "identities"):  # streamed from disk: known without reading factors
        ids = sorted(hessians.identities())
    else:
        ids = sorted({str(getattr(h, "identity", None)) for h in hessians.values()})
    if "None" not in ids:
        return store.identity_hash(ids)
    h = hashlib.sha256()
    for name in sorted(hessians):
        for k in ("H_in", "H_out", "H_x"):
            t = getattr(hessians[name], k, None)
            if t is not None:
                h.update(f"{name}.{k}".encode())
                h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def quantize(model: nn.Module, hessians: Mapping | None = None, method: str = "yaqa",
             quantizer: str | Quantizer = "int4", group_size: int | None = DEFAULT_GROUP_SIZE, *,
             symmetric: bool = False, scale_search: str = "maxabs",
             incoherence: bool | str = DEFAULT_INCOHERENCE, seed: int = 0,
             block_size: int = DEFAULT_BLOCK_SIZE, sigma: float = DEFAULT_SIGMA,
             include_head: bool = False, device: str | torch.device | None = None,
             work_dir: str | os.PathLike | None = None, fingerprint: dict | None = None,
             overwrite: bool = False, recipe: Recipe | None = None,
             shrinkage: str | float = "auto", fused_global_scale: bool | None = None,
             refine: int | None = None, progress: bool = True) -> QuantizeReport:
    """Replace every decoder-block linear of ``model`` by its quantized version, in place.

    ``method``: a recipe name (``"rtn"``; ``"ldlq"``/``"gptq"``: the plain input Hessian ``H_x``
    of each entry in ``hessians``, output side identity; ``"yaqa"``, ``"yaqa-a"``, ``"yaqa-b"``:
    both Kronecker factors ``H_in``/``H_out``), or pass a whole :class:`~yaqa.recipe.Recipe` as
    ``recipe`` (then the quantizer keywords are ignored).  ``shrinkage`` (YAQA only):
    ``"auto"`` shrinks each layer's factors towards the LDLQ pair (H_out → I, H_in → H_x) by
    the amounts estimated from the calibration data's noise (stored with single-pass Sketch-B
    Hessians; layers without the statistic are left alone), ``"auto-out"`` H_out only,
    ``"off"`` uses the factors as collected, a number in [0, 1] is a fixed amount for both
    (see :mod:`yaqa.hessians.shrinkage`).  ``incoherence``: False, True
    (= ``"per-layer"`` random Hadamard signs), ``"shared"`` (one random Hadamard per size, what
    compressed-tensors/vLLM can serve) or ``"block"`` (Sylvester blocks, vLLM's fast kernel); see
    :mod:`yaqa.incoherence`.  ``fused_global_scale`` (NVFP4; None: on for ``"nvfp4"``): the
    linears that vLLM fuses (q/k/v, gate/up) share one global scale, computed from their
    weights as the quantizer sees them, so the export serves in vLLM (see
    :mod:`yaqa.quantizers.fused`).  ``refine`` (LDLQ/YAQA, int-k): rounds of ±1 code steps
    after rounding that lower each layer's proxy loss (:mod:`yaqa.rounding.refine`; 0: off;
    None: :func:`~yaqa.recipe.default_refine`, i.e. 32 rounds for YAQA with int-k on CUDA, else
    off).
    ``hessians`` maps full linear names to
    objects with those attributes.  ``work_dir`` enables resume: finished blocks are stored there
    and reused only when the recipe, the weights, the Hessians and ``fingerprint`` all match;
    otherwise :class:`~yaqa.store.StaleWorkError` names what differs (``overwrite=True`` starts
    over).
    """
    qobj = None
    if recipe is None:
        recipe, qobj = recipe_from_args(method, quantizer, group_size, symmetric=symmetric,
                                        scale_search=scale_search, incoherence=incoherence,
                                        seed=seed, block_size=block_size, sigma=sigma,
                                        shrinkage=shrinkage,
                                        fused_global_scale=fused_global_scale, refine=refine)
        rounds_on = device if device is not None else next(model.parameters()).device
        recipe = with_default_refine(recipe, refine, rounds_on)
    q = qobj or recipe.make_quantizer()
    rounding, incoherence, seed = recipe.rounding, recipe.incoherence, recipe.seed
    adapter = get_adapter(model)
    mode = incoherence_mode(incoherence)
    report = QuantizeReport(rounding, q.config(), mode is not None, seed, mode,
                            shrinkage=recipe.shrinkage)
    resume = None
    if work_dir is not None:
        identity = {"recipe": recipe.identity(), "quantizer": q.config(),
                    "weights": store.weights_identity(model),
                    "hessians": hessians_identity(hessians) if rounding != "rtn" else None,
                    "extra": fingerprint or {}}
        resume = _Resume(work_dir, identity, overwrite=overwrite)
    blocks = adapter.blocks(model)
    plan = _TransformPlan(model, adapter, blocks, mode, seed, include_head)
    t0 = time.perf_counter()
    dev = device if device is not None else next(model.parameters()).device
    shapes = [(m.out_features, m.in_features) for _, _, m in adapter.named_linears(model)]
    # one thread-count decision for the whole model; round_weight inside sees it and keeps it
    with small_cpu_problem_threads(shapes=shapes, device=dev):
        _quantize_blocks(adapter, blocks, hessians, recipe, q, resume, report, plan, device,
                         progress)
    if include_head:
        head = model.get_output_embeddings()
        if head is None or not isinstance(head, nn.Linear):
            raise ValueError("model has no linear LM head to quantize")
        if head.weight is model.get_input_embeddings().weight:
            raise ValueError("the LM head is tied to the input embeddings; quantizing it would "
                             "also change the embeddings. Leave include_head off for this model")
        name = next(n for n, m in model.named_modules() if m is head)
        report.layers.append(_quantize_linear(model, name, head, name, "rtn", q, None, None,
                                              plan.for_layers({name: head})[name],
                                              recipe.block_size, recipe.sigma, device))
    report.seconds = time.perf_counter() - t0
    return report


def _quantize_blocks(adapter, blocks, hessians: Mapping | None, recipe: Recipe, q: Quantizer,
                     resume: _Resume | None, report: QuantizeReport, plan: "_TransformPlan",
                     device, progress: bool) -> None:
    rounding = recipe.rounding
    bar = tqdm(total=len(blocks), desc=f"quantize {recipe.name} {q.config()['bits']}-bit",
               disable=not progress, unit="block")
    for i, block in enumerate(blocks):
        linears = adapter.block_linears(block)
        prefix = f"{adapter.blocks_path}.{i}."
        if resume is not None and resume.has(i):
            report.layers += resume.restore(i, block, linears, q, report.incoherence)
            report.resumed_blocks += 1
            bar.update(1)
            continue
        done = []
        tfs = plan.for_layers({prefix + rel: lin for rel, lin in linears.items()})
        pinned = _fused_group_quantizers(adapter, linears, prefix, tfs, q, device)
        for rel, lin in linears.items():
            name = prefix + rel
            H_in, H_out, a_in, a_out = _factors(rounding, hessians, name, recipe.shrinkage)
            lr = _quantize_linear(block, rel, lin, name, rounding, q, H_in, H_out, tfs[name],
                                  recipe.block_size, recipe.sigma, device,
                                  fit_quantizer=pinned.get(rel), refine=recipe.refine,
                                  block_size_out=recipe.block_size_out)
            lr.shrink_in, lr.shrink_out = a_in, a_out
            done.append(lr)
        report.layers += done
        if resume is not None:
            resume.save(i, block, done)
        bar.update(1)
    bar.close()


def _fused_group_quantizers(adapter, linears: dict[str, nn.Linear], prefix: str, tfs: dict,
                            q: Quantizer, device) -> dict[str, Quantizer]:
    """Quantizers with the shared NVFP4 global scale of each fused group of this block (empty
    unless ``q`` asks for one), from the weights exactly as ``round_weight`` will fit them."""
    if not uses_fused_global_scale(q):
        return {}
    groups = adapter.fused_groups(linears)
    weights = {}
    for rel in {n for g in groups for n in g}:
        lin = linears[rel]
        dev = torch.device(device) if device is not None else lin.weight.device
        W = lin.weight.detach().to(dev, torch.float32)
        tf = tfs[prefix + rel]
        weights[rel] = tf.weight(W) if tf is not None else W
    return fused_quantizers(q, weights, groups)


def _quantize_linear(parent: nn.Module, rel: str, lin: nn.Linear, name: str, method: str,
                     q: Quantizer, H_in, H_out, transform, block_size: int,
                     sigma: float, device, fit_quantizer: Quantizer | None = None,
                     refine: int = 0, block_size_out: int | None = None) -> LayerReport:
    """``fit_quantizer``: the quantizer to fit with when it differs from ``q`` (a pinned NVFP4
    global scale); the module records ``q``."""
    from .rounding import round_weight

    t = time.perf_counter()
    dev = torch.device(device) if device is not None else lin.weight.device
    W = lin.weight.detach().to(dev, torch.float32)
    inc = transform if transform is not None else False
    res = round_weight(W, None if H_in is None else H_in.to(dev),
                       None if H_out is None else H_out.to(dev), fit_quantizer or q,
                       method=method,
                       incoherence=inc, block_size=block_size, block_size_out=block_size_out,
                       sigma=sigma, return_details=True, refine=refine)
    bias = lin.bias.detach() if lin.bias is not None else None
    new = QuantizedLinear.from_codes(res.codes.cpu(), res.grid, q, transform=res.transform,
                                     bias=bias,
                                     dtype=lin.weight.dtype).to(lin.weight.device)
    parent.set_submodule(rel, new)
    return LayerReport(name, tuple(W.shape), _num(res.proxy_loss), _num(res.sigma_in),
                       _num(res.sigma_out),
                       time.perf_counter() - t,
                       proxy_loss_relative=_num(res.proxy_loss_relative),
                       refine_reduction=_num(res.refine.reduction) if res.refine else None,
                       refine_seconds=_num(res.refine.seconds) if res.refine else None)


class _TransformPlan:
    """Incoherence transforms of every layer, from one model-wide mode (see ``plan_transforms``)."""

    def __init__(self, model: nn.Module, adapter, blocks, mode: str | None, seed: int,
                 include_head: bool):
        self.mode, self.seed, self.block = mode, seed, None
        cfg = getattr(model, "config", None)
        heads = getattr(cfg, "num_attention_heads", None)
        self.head_dim = getattr(cfg, "head_dim", None) or (
            cfg.hidden_size // heads if heads else None)
        if mode == "block":
            # One block size for the whole model: vLLM builds one transform per (scheme, size).
            dims = [d for b in blocks for lin in adapter.block_linears(b).values()
                    for d in (lin.in_features, lin.out_features)]
            head = model.get_output_embeddings() if include_head else None
            if isinstance(head, nn.Linear):
                dims += [head.in_features, head.out_features]
            self.block = block_hadamard_size(dims)
            log.info("block Hadamard incoherence with blocks of %d", self.block)

    def for_layers(self, linears: dict[str, nn.Module]) -> dict:
        shapes = {name: (lin.out_features, lin.in_features) for name, lin in linears.items()}
        return plan_transforms(self.mode, shapes, self.seed, block=self.block,
                               head_dim=self.head_dim)


def _num(x):
    if x is None:
        return None
    return float(x)


def _refine_hint(stored: dict, now: dict) -> str:
    """When only the refinement rounds differ: the default depends on the device, so a run
    started on a GPU and resumed on a CPU (or the reverse) differs there; say how to match it."""
    problems = store.diff_identity(stored, now)
    if not problems or not all(p.startswith("recipe.refine:") for p in problems):
        return ""
    rounds = (stored.get("recipe") or {}).get("refine", 0)
    return (f". Only the refinement rounds differ, whose default depends on the device "
            f"(YAQA with int-k: {AUTO_REFINE_ROUNDS['cuda']} on CUDA, 0 on CPU): pass --refine "
            f"{rounds} (refine={rounds}) to resume the stored run")


class _Resume:
    """Per-block results of an unfinished run, valid only for the identity they were made with."""

    MANIFEST = "resume.json"

    def __init__(self, work_dir, identity: dict, *, overwrite: bool = False):
        self.dir = Path(work_dir)
        store.check_output_dir(self.dir, what="work directory")
        manifest = self.dir / self.MANIFEST
        store.clean_stale_files(self.dir)
        if manifest.exists():
            stored = store.read_json(manifest).get("identity")
            try:
                store.check_identity(f"quantization resume state {self.dir}", stored, identity,
                                     "--overwrite (overwrite=True)")
            except store.StaleWorkError as e:
                if not overwrite:
                    raise store.StaleWorkError(str(e) + _refine_hint(stored, identity)) from None
                log.warning("discarding quantization resume state in %s (other settings)",
                            self.dir)
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = store.identity_hash(identity)
        store.atomic_write_json(manifest, {"key": self.key, "identity": identity})

    def _path(self, i: int) -> Path:
        return self.dir / f"block_{i:04d}.safetensors"

    def has(self, i: int) -> bool:
        return self._path(i).exists()

    def save(self, i: int, block: nn.Module, layers: list[LayerReport]) -> None:
        state = {}
        for name, mod in block.named_modules():
            if isinstance(mod, QuantizedLinear):
                for k, v in mod.state_dict().items():
                    state[f"{name}.{k}"] = v.detach().cpu().contiguous()
        store.atomic_save_tensors(self._path(i), state, {"key": self.key, "block": i,
                                                         "layers": [asdict(r) for r in layers]})

    def restore(self, i: int, block: nn.Module, linears: dict, q: Quantizer,
                incoherence: bool) -> list[LayerReport]:
        state, meta = store.read_tensors(self._path(i))
        if meta.get("key") != self.key:
            raise store.StaleWorkError(f"{self._path(i)} was written by another run than "
                                       f"{self.dir / self.MANIFEST} describes; pass --overwrite "
                                       "(overwrite=True) to start over")
        for rel, lin in linears.items():
            new = QuantizedLinear(lin.in_features, lin.out_features, q,
                                  bias=lin.bias is not None, incoherence=bool(incoherence),
                                  dtype=lin.weight.dtype)
            sub = {k[len(rel) + 1:]: v for k, v in state.items() if k.startswith(rel + ".")}
            try:
                res = new.load_state_dict(sub, strict=False)
            except RuntimeError as e:
                raise store.StoreError(f"{self._path(i)}: tensors for {rel} do not fit "
                                       f"({str(e).splitlines()[0]})") from None
            # Blocks saved before block-Hadamard incoherence existed lack `tf_block` (= full size).
            missing = [k for k in res.missing_keys if k != "tf_block"]
            if missing or res.unexpected_keys:
                raise store.StoreError(f"{self._path(i)}: tensors for {rel} do not fit (missing "
                                       f"{missing[:3]}, unexpected {res.unexpected_keys[:3]})")
            new.materialize_hadamard()  # the restored transform may be block Hadamard
            block.set_submodule(rel, new.to(lin.weight.device))
        log.info("block %d restored from %s", i, self._path(i))
        return [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in meta.get("layers", [])]
