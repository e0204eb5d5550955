"""The quantizer interface that rounding algorithms call.

A quantizer is fitted once to the whole (already transformed) weight; the fitted grid then rounds
any batch of values given their absolute row and column indices.  Fitting first means per-group
scales do not depend on the order in which LDLQ or YAQA visit tiles.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


def check_weight(W: torch.Tensor) -> tuple[int, int]:
    """The checks every ``Quantizer.fit`` starts with; returns the shape (m, n)."""
    if W.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise ValueError("weight contains NaN or Inf; cannot fit a quantization grid")
    return tuple(W.shape)


class FittedGrid(ABC):
    """A set of representable points for one weight matrix (m x n).

    ``joint`` is the block of entries the grid rounds jointly (rows, cols): ``(1, 1)`` for scalar
    grids, ``(16, 16)`` for a trellis that encodes each 16x16 tile as one sequence.  ``round`` must
    then be given whole aligned blocks: the last two dimensions of ``values`` are multiples of
    ``joint`` and start at absolute indices that are multiples of it.  The rounding engines only
    have to cut their work (LDLQ column blocks, YAQA tiles) in multiples of ``joint``; see
    :func:`check_joint`.
    """

    shape: tuple[int, int]
    joint: tuple[int, int] = (1, 1)

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


def check_joint(grid: FittedGrid, block_rows: int | None, block_cols: int) -> None:
    """Raise a clear error when a rounding engine's blocks would split the grid's joint unit.

    ``block_rows=None`` means the engine passes whole columns (all rows at once), as LDLQ does.
    """
    jr, jc = grid.joint
    if (jr, jc) == (1, 1):
        return
    m, n = grid.shape
    if m % jr or n % jc:
        raise ValueError(f"this quantizer rounds {jr}x{jc} tiles jointly; the {m}x{n} weight "
                         "is not a whole number of tiles")
    if block_cols % jc or (block_rows is not None and block_rows % jr):
        raise ValueError(f"this quantizer rounds {jr}x{jc} tiles jointly; rounding block "
                         f"{block_rows or m}x{block_cols} must be a multiple of it "
                         f"(use --block-size {jc})")
    if block_rows is not None and (m % block_rows or n % block_cols):
        # YAQA pads partial tiles with clamped indices, which a joint grid cannot round.
        raise ValueError(f"this quantizer rounds {jr}x{jc} tiles jointly; the {m}x{n} weight "
                         f"must be a whole number of {block_rows}x{block_cols} rounding tiles")


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

    def placeholder_state(self, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Zero tensors with the shapes and dtypes of a fitted grid's state (for empty modules).

        The default fits a one-row dummy and repeats its per-row state ``m`` times, which is right
        for grids whose state tensors all have one leading entry per output row.
        """
        m, n = shape
        g = self.fit(torch.ones(1, n))
        return {k: torch.zeros((m,) + tuple(v.shape[1:]), dtype=v.dtype)
                for k, v in g.state_dict().items()}
