"""Symmetric factors stored as packed lower triangles (half the disk and host memory).

A symmetric n×n matrix is kept as its lower triangle, row by row: element (i, j), j <= i, sits at
``i(i+1)/2 + j`` of a 1-D tensor of length n(n+1)/2. Packing and unpacking work on bands of rows,
so neither builds an n²-sized index (``torch.tril_indices(14336)`` alone would be 1.6 GB).

``dtype=torch.bfloat16`` halves the packed size again; its cost (relative Frobenius error about
2e-3, the rounding of an 8-bit mantissa) is measured by :func:`packing_error`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PACKED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_BAND = 512  # rows per band: a band's mask is _BAND × n booleans


def packed_size(n: int) -> int:
    return n * (n + 1) // 2


def packed_order(length: int) -> int:
    """n from the length n(n+1)/2 of a packed triangle; ValueError when no n fits."""
    n = (math.isqrt(8 * length + 1) - 1) // 2
    if packed_size(n) != length:
        raise ValueError(f"{length} is not the length of a packed triangle n(n+1)/2")
    return n


def _band_mask(r0: int, r1: int, device: torch.device) -> Tensor:
    rows = torch.arange(r0, r1, device=device)[:, None]
    return torch.arange(r1, device=device)[None, :] <= rows


def pack_lower(h: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The lower triangle of square ``h`` (diagonal included), row-major, as a 1-D tensor."""
    if h.dim() != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"pack_lower needs a square matrix, got shape {tuple(h.shape)}")
    n = h.shape[0]
    out = torch.empty(packed_size(n), dtype=dtype or h.dtype, device=h.device)
    for r0 in range(0, n, _BAND):
        r1 = min(n, r0 + _BAND)
        out[packed_size(r0):packed_size(r1)] = h[r0:r1, :r1][_band_mask(r0, r1, h.device)]
    return out


def unpack_lower(p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """The symmetric matrix whose lower triangle :func:`pack_lower` packed into ``p``."""
    if p.dim() != 1:
        raise ValueError(f"a packed triangle is 1-D, got shape {tuple(p.shape)}")
    n = packed_order(p.numel())
    out = torch.empty(n, n, dtype=dtype or p.dtype, device=p.device)
    for r0 in range(0, n, _BAND):
        r1 = min(n, r0 + _BAND)
        band = out[r0:r1, :r1]
        band[_band_mask(r0, r1, p.device)] = p[packed_size(r0):packed_size(r1)].to(out.dtype)
    for r0 in range(0, n, _BAND):  # mirror: the strictly upper part of band rows r0..r1
        r1 = min(n, r0 + _BAND)
        out[r0:r1, r1:] = out[r1:, r0:r1].T
        d = out[r0:r1, r0:r1]
        d.copy_(torch.tril(d) + torch.tril(d, -1).T)
    return out


def packing_error(h: Tensor, dtype: torch.dtype) -> float:
    """Relative Frobenius error of storing symmetric ``h`` packed in ``dtype``."""
    back = unpack_lower(pack_lower(h, dtype), h.dtype)
    return float((back - h).norm() / h.norm().clamp_min(torch.finfo(h.dtype).tiny))
