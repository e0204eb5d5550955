"""Which linear layers each decoder block has, per model family, as data.

Everything model-specific in yaqa lives here.  A family lists the path of the decoder-block list
and the linear layers of one block in quantization order; unknown families fall back to "every
nn.Linear inside the largest ModuleList of blocks".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)

_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Linears that read the same input and that vLLM loads as one fused layer (the
# packed_modules_mapping of its Llama-style models), by leaf name.
VLLM_FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_FUSED = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
          ("mlp.gate_proj", "mlp.up_proj"))


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    linears: tuple[str, ...]
    # groups of linears (names relative to the block) that serving engines fuse into one layer
    fused: tuple[tuple[str, ...], ...] = _FUSED


FAMILIES: tuple[Family, ...] = (
    Family("llama", ("llama",), "model.layers", _ATTN + _MLP),
    Family("mistral", ("mistral",), "model.layers", _ATTN + _MLP),
    Family("qwen2", ("qwen2",), "model.layers", _ATTN + _MLP),
    Family("qwen3", ("qwen3",), "model.layers", _ATTN + _MLP),
    Family("gemma2", ("gemma2",), "model.layers", _ATTN + _MLP),
    Family("gemma3", ("gemma3_text", "gemma3"), "model.layers", _ATTN + _MLP),
    # already fused in the checkpoint: nothing left to group
    Family("phi3", ("phi3",), "model.layers",
           ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"),
           fused=()),
)


# Families trained with a BOS token at every document start that break without it (Gemma's
# perplexity goes to the thousands); others merely prefer it, which the sanity check measures.
NEEDS_BOS_MODEL_TYPES = ("gemma", "gemma2", "gemma3", "gemma3_text")


def needs_bos(model: nn.Module) -> bool:
    """True for model families known to need a BOS token at the start of every sequence."""
    return getattr(getattr(model, "config", None), "model_type", None) in NEEDS_BOS_MODEL_TYPES


class UnsupportedModelError(ValueError):
    """The model has no decoder blocks with linear layers that yaqa knows how to quantize."""


@dataclass(frozen=True)
class ModelAdapter:
    family: str
    blocks_path: str
    linears: tuple[str, ...] | None  # None: discover nn.Linear modules in each block
    fused: tuple[tuple[str, ...], ...] | None = None  # None: group by vLLM's leaf names

    def fused_groups(self, names) -> list[tuple[str, ...]]:
        """The groups (two or more of ``names``, block-relative) that vLLM fuses into one layer."""
        names = list(names)
        if self.fused is not None:
            return [g for g in self.fused if all(n in names for n in g)]
        groups: dict[tuple[str, int], list[str]] = {}
        for n in names:
            parent, _, leaf = n.rpartition(".")
            for i, grp in enumerate(VLLM_FUSED):
                if leaf in grp:
                    groups.setdefault((parent, i), []).append(n)
        return [tuple(g) for g in groups.values() if len(g) > 1]

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks_path)

    def block_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Linear layers of one decoder block, keyed by their name relative to the block."""
        if self.linears is None:
            return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        out = {}
        for name in self.linears:
            mod = _get(block, name)
            if not isinstance(mod, nn.Linear):
                raise UnsupportedModelError(f"{name} in a {self.family} block is {type(mod).__name__}, "
                                            "not nn.Linear (already quantized?)")
            out[name] = mod
        return out

    def named_linears(self, model: nn.Module) -> list[tuple[str, int, nn.Linear]]:
        """``(full name, block index, module)`` for every linear layer yaqa quantizes."""
        out = []
        for i, block in enumerate(self.blocks(model)):
            for name, mod in self.block_linears(block).items():
                out.append((f"{self.blocks_path}.{i}.{name}", i, mod))
        return out


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise UnsupportedModelError(f"{type(root).__name__} has no submodule {path!r}")
        mod = getattr(mod, part)
    return mod


def _find_block_list(model: nn.Module) -> str | None:
    best, best_params = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
                continue
            n_params = sum(p.numel() for p in mod.parameters())
            if n_params > best_params:
                best, best_params = name, n_params
    return best


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``: a known family, else a generic one (with a warning)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for fam in FAMILIES:
        if model_type in fam.model_types:
            adapter = ModelAdapter(fam.name, fam.blocks_path, fam.linears, fam.fused)
            adapter.block_linears(adapter.blocks(model)[0])  # fail early on a changed layout
            return adapter
    path = _find_block_list(model)
    if path is None:
        raise UnsupportedModelError(
            f"cannot find decoder blocks with nn.Linear layers in {type(model).__name__} "
            f"(model_type={model_type!r}); supported families: "
            + ", ".join(f.name for f in FAMILIES)
        )
    log.warning("model_type %r has no dedicated adapter; quantizing every nn.Linear in %s.*",
                model_type, path)
    return ModelAdapter("generic", path, None)


def input_embeddings(model: nn.Module) -> nn.Module:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        raise UnsupportedModelError(f"{type(model).__name__} exposes no input embeddings")
    return emb


def freeze(model: nn.Module) -> None:
    """No parameter gradients anywhere: Hessian collection only needs activation gradients."""
    for p in model.parameters():
        p.requires_grad_(False)


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
