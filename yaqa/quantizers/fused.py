"""One NVFP4 global scale per group of linears that vLLM fuses (q/k/v, gate/up).

vLLM loads such a group as one layer with one global scale, so a checkpoint it can serve needs
the group's members to share it.  The shared scale is the standard rule applied to the group's
concatenated weights *as the quantizer sees them* (after the incoherence rotation), i.e. to the
largest of their maxima; each member is then fitted with that scale fixed, so its block scales
(standard or MSE-searched) are chosen under it.  This happens before rounding, which is why RTN,
LDLQ and YAQA all get it unchanged: they only see a quantizer whose ``fit`` uses a given scale.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch

from .base import Quantizer
from .fp4 import FP4Quantizer, nvfp4_global_scale


def uses_fused_global_scale(q: Quantizer) -> bool:
    return isinstance(q, FP4Quantizer) and q.fmt == "nvfp4" and bool(q.fused_global_scale)


def group_global_scale(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """The standard NVFP4 global scale of the concatenation of ``weights`` (float32 scalar)."""
    maxima = [w.detach().float().abs().max().cpu() for w in weights]
    if not maxima:
        raise ValueError("a fused group needs at least one weight")
    return nvfp4_global_scale(torch.stack(maxima))


def fused_quantizers(q: Quantizer, weights: Mapping[str, torch.Tensor],
                     groups: Iterable[Iterable[str]]) -> dict[str, Quantizer]:
    """Per-layer quantizers that pin each fused group's shared global scale.

    ``weights``: name -> the weight the quantizer will be fitted on (rotated when incoherence is
    on); ``groups``: names that vLLM fuses.  Layers outside every group are left out (they keep
    ``q`` and the per-layer rule).  Empty unless ``q`` asks for a fused global scale.
    """
    if not uses_fused_global_scale(q):
        return {}
    out: dict[str, Quantizer] = {}
    for group in groups:
        names = list(group)
        missing = [n for n in names if n not in weights]
        if missing:
            raise KeyError(f"fused group {names} lacks weights for {missing}")
        g = group_global_scale(weights[n] for n in names)
        pinned = dataclasses.replace(q, global_scale=float(g))
        out.update({n: pinned for n in names})
    return out
