"""Quantize a whole model, block by block: RTN, LDLQ (= GPTQ) or YAQA.

Every linear layer of every decoder block is rounded independently (Hessians come from the
original model), replaced in place by a :class:`~yaqa.nn.QuantizedLinear`, and, when a work
directory is given, saved after each block so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from .hessians.storage import atomic_save_tensors, atomic_write_text, block_filename
from .models import get_adapter
from .nn import QuantizedLinear
from .quantizers import Quantizer, make_quantizer
from .rounding.api import METHODS

log = logging.getLogger(__name__)

# CLI names for the rounding methods: the sketch is chosen where the Hessians are collected.
_ALIASES = {"gptq": "ldlq", "yaqa-a": "yaqa", "yaqa-b": "yaqa"}


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    proxy_loss: float | None
    sigma_in: float | None
    sigma_out: float | None
    seconds: float


@dataclass
class QuantizeReport:
    method: str
    quantizer: dict
    incoherence: bool
    seed: int
    layers: list[LayerReport] = field(default_factory=list)
    seconds: float = 0.0
    resumed_blocks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_seed(seed: int, name: str) -> int:
    # Independent, reproducible sign vectors per layer, stable across runs and resumes.
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _factors(method: str, hessians: Mapping | None, name: str):
    if method == "rtn":
        return None, None
    if hessians is None or name not in hessians:
        raise ValueError(f"method {method!r} needs Hessians for {name}; collect them first "
                         "(yaqa.collect_hessians or `yaqa hessians`)")
    h = hessians[name]
    if method == "ldlq":
        return getattr(h, "H_x", None) if getattr(h, "H_x", None) is not None else h.H_in, None
    return h.H_in, h.H_out


def quantize(model: nn.Module, hessians: Mapping | None = None, method: str = "yaqa",
             quantizer: str | Quantizer = "int4", group_size: int | None = 128, *,
             symmetric: bool = False, scale_search: str = "maxabs",
             incoherence: bool = False, seed: int = 0, block_size: int = 16,
             sigma: float = 0.01, include_head: bool = False,
             device: str | torch.device | None = None, work_dir: str | os.PathLike | None = None,
             fingerprint: dict | None = None, progress: bool = True) -> QuantizeReport:
    """Replace every decoder-block linear of ``model`` by its quantized version, in place.

    ``method``: ``"rtn"`` (no Hessians), ``"ldlq"`` (GPTQ: the plain input Hessian ``H_x`` of each
    entry in ``hessians``, output side identity) or ``"yaqa"`` (both Kronecker factors
    ``H_in``/``H_out``).  ``hessians`` maps full linear names to objects with those attributes.
    ``work_dir`` enables resume: finished blocks are stored there and reloaded next time when the
    settings (and ``fingerprint``) match.
    """
    method = _ALIASES.get(method.lower(), method.lower())
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS + tuple(_ALIASES)}")
    q = make_quantizer(quantizer, group_size=group_size, symmetric=symmetric,
                       scale_search=scale_search)
    adapter = get_adapter(model)
    report = QuantizeReport(method, q.config(), bool(incoherence), seed)
    settings = {"method": method, "quantizer": q.config(), "incoherence": bool(incoherence),
                "seed": seed, "block_size": block_size, "sigma": sigma,
                "fingerprint": fingerprint or {}}
    resume = _Resume(work_dir, settings) if work_dir is not None else None
    blocks = adapter.blocks(model)
    t0 = time.perf_counter()
    bar = tqdm(total=len(blocks), desc=f"quantize {method} {q.config()['bits']}-bit",
               disable=not progress, unit="block")
    for i, block in enumerate(blocks):
        linears = adapter.block_linears(block)
        prefix = f"{adapter.blocks_path}.{i}."
        if resume is not None and resume.has(i):
            resume.restore(i, block, linears, q, incoherence)
            report.resumed_blocks += 1
            bar.update(1)
            continue
        for rel, lin in linears.items():
            name = prefix + rel
            H_in, H_out = _factors(method, hessians, name)
            report.layers.append(_quantize_linear(block, rel, lin, name, method, q, H_in, H_out,
                                                  incoherence, seed, block_size, sigma, device))
        if resume is not None:
            resume.save(i, block)
        bar.update(1)
    bar.close()
    if include_head:
        head = model.get_output_embeddings()
        if head is None or not isinstance(head, nn.Linear):
            raise ValueError("model has no linear LM head to quantize")
        if head.weight is model.get_input_embeddings().weight:
            raise ValueError("the LM head is tied to the input embeddings; quantizing it would "
                             "also change the embeddings. Leave include_head off for this model")
        name = next(n for n, m in model.named_modules() if m is head)
        report.layers.append(_quantize_linear(model, name, head, name, "rtn", q, None, None,
                                              incoherence, seed, block_size, sigma, device))
    report.seconds = time.perf_counter() - t0
    return report


def _quantize_linear(parent: nn.Module, rel: str, lin: nn.Linear, name: str, method: str,
                     q: Quantizer, H_in, H_out, incoherence, seed: int, block_size: int,
                     sigma: float, device) -> LayerReport:
    from .rounding import round_weight

    t = time.perf_counter()
    dev = torch.device(device) if device is not None else lin.weight.device
    W = lin.weight.detach().to(dev, torch.float32)
    inc = _layer_seed(seed, name) if incoherence else False
    res = round_weight(W, None if H_in is None else H_in.to(dev),
                       None if H_out is None else H_out.to(dev), q, method=method,
                       incoherence=inc, block_size=block_size, sigma=sigma, return_details=True)
    bias = lin.bias.detach() if lin.bias is not None else None
    new = QuantizedLinear.from_codes(res.codes.cpu(), res.grid, q, transform=res.transform,
                                     bias=bias,
                                     dtype=lin.weight.dtype).to(lin.weight.device)
    parent.set_submodule(rel, new)
    return LayerReport(name, tuple(W.shape), _num(res.proxy_loss), _num(res.sigma_in),
                       _num(res.sigma_out),
                       time.perf_counter() - t)


def _num(x):
    if x is None:
        return None
    return float(x)


class _Resume:
    """Per-block results of an unfinished run, keyed by a hash of its settings."""

    def __init__(self, work_dir, settings: dict):
        self.dir = Path(work_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str)
                                  .encode()).hexdigest()[:16]
        manifest = self.dir / "resume.json"
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("key") != self.key:
                log.warning("work dir %s holds blocks from different settings; starting over",
                            self.dir)
                for f in self.dir.glob("block_*.safetensors"):
                    f.unlink()
        atomic_write_text(manifest, json.dumps({"key": self.key, "settings": settings},
                                               default=str))

    def _path(self, i: int) -> Path:
        return self.dir / block_filename(i)

    def has(self, i: int) -> bool:
        return self._path(i).exists()

    def save(self, i: int, block: nn.Module) -> None:
        state = {}
        for name, mod in block.named_modules():
            if isinstance(mod, QuantizedLinear):
                for k, v in mod.state_dict().items():
                    state[f"{name}.{k}"] = v.detach().cpu().contiguous()
        atomic_save_tensors(self._path(i), state, {"key": self.key, "block": i})

    def restore(self, i: int, block: nn.Module, linears: dict, q: Quantizer,
                incoherence: bool) -> None:
        state = load_file(str(self._path(i)))
        for rel, lin in linears.items():
            new = QuantizedLinear(lin.in_features, lin.out_features, q,
                                  bias=lin.bias is not None, incoherence=bool(incoherence),
                                  dtype=lin.weight.dtype)
            sub = {k[len(rel) + 1:]: v for k, v in state.items() if k.startswith(rel + ".")}
            new.load_state_dict(sub)
            block.set_submodule(rel, new.to(lin.weight.device))
        log.info("block %d restored from %s", i, self._path(i))
