"""Round to nearest: every weight independently to its closest grid point (the baseline)."""

from __future__ import annotations

import torch

from ..quantizers.base import FittedGrid


def rtn_round(W: torch.Tensor, grid: FittedGrid) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dequantized, codes)`` of ``W`` rounded independently per entry on a fitted grid."""
    return grid.round_all(W)
