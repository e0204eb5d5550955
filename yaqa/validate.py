"""Checks that run before any heavy work: a bad argument, a layer the grid cannot represent, a
damaged weight or an unusable output path fails in seconds, not after hours of Hessian collection.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .incoherence import hadamard_supported
from .models import get_adapter
from .recipe import Recipe

log = logging.getLogger(__name__)


class ModelCheckError(ValueError):
    """The model cannot be quantized as asked (a layer's shape, non-finite weights)."""


def check_recipe_fits(model: nn.Module, recipe: Recipe, *, include_head: bool = False) -> None:
    """Every linear that will be quantized fits the quantizer grid (and incoherence sizes)."""
    adapter = get_adapter(model)
    q = recipe.make_quantizer()
    layers = [(name, mod) for name, _, mod in adapter.named_linears(model)]
    if include_head:
        head = model.get_output_embeddings()
        if isinstance(head, nn.Linear):
            layers.append(("lm_head", head))
    problems = []
    for name, mod in layers:
        try:
            q.check_shape(mod.out_features, mod.in_features)
        except ValueError as e:
            problems.append(f"{name} ({mod.out_features}x{mod.in_features}): {e}")
            continue
        if recipe.incoherence:
            bad = [d for d in (mod.in_features, mod.out_features) if not hadamard_supported(d)]
            if bad:
                problems.append(f"{name}: no Hadamard transform of size {bad[0]} "
                                "(use --no-incoherence)")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ModelCheckError(f"{recipe.name} {recipe.quantizer} group {recipe.group_size or 'row'}"
                              f" cannot quantize {problems[0]}{more}")


def check_finite_weights(model: nn.Module) -> None:
    """Every parameter is finite; otherwise name the first bad tensor (an Inf would silently
    poison the Hessians of every later layer)."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise ModelCheckError(f"model weight {name} has {bad} non-finite value(s) (inf/nan); "
                                  "the model file is damaged or was saved in a dtype too narrow "
                                  "for its values")
