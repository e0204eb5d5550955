"""The quantizer interface that rounding algorithms call.

A quantizer is fitted once to the whole (already transformed) weight; the fitted grid then rounds
any batch of values given their absolute row and column indices.  Fitting first means per-group
scales do not depend on the order in which LDLQ or YAQA visit tiles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class FittedGrid(ABC):
    """A set of representable points for one weight matrix (m x n)."""

    shape: tuple[int, int]

    @abstractmethod
    def round(
        self, values: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Round ``values[..., r, c]`` to the grid.

        ``rows`` has shape ``[..., r]`` and ``cols`` shape ``[..., c]`` (absolute indices into the
        weight, broadcastable over the leading batch dimensions of ``values``).  Returns the
        dequantized values (same dtype as ``values``) and the integer codes (int32).
        """

    def round_all(self, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, n = W.shape
        rows = torch.arange(m, device=W.device)
        cols = torch.arange(n, device=W.device)
        return self.round(W, rows, cols)

    @abstractmethod
    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes of the whole matrix (m x n) back to float32 values."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors needed to dequantize (saved next to the packed codes)."""


class Quantizer(ABC):
    """Configuration of a weight format; ``fit`` produces the grid for one matrix."""

    bits: int

    @abstractmethod
    def fit(self, W: torch.Tensor) -> FittedGrid: ...

    def check_shape(self, out_features: int, in_features: int) -> None:
        """Raise ValueError when this format cannot represent an out×in weight (checked for every
        layer before any heavy work)."""

    @abstractmethod
    def config(self) -> dict:
        """JSON-serialisable description, enough for :func:`quantizer_from_config`."""

    @abstractmethod
    def grid_from_state(self, shape: tuple[int, int], state: dict[str, torch.Tensor]) -> FittedGrid:
        """Rebuild a fitted grid from :meth:`FittedGrid.state_dict` (used when loading)."""
