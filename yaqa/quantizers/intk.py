"""Integer k-bit quantization with per-channel or per-group scales (the GPTQ/RTN format)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .base import check_weight, FittedGrid, Quantizer

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class IntQuantizer(Quantizer):
    """int-k with codes in ``[0, 2^k - 1]`` and value ``(code - zero) * scale``.

    ``group_size`` input columns share one scale (``None`` or ``-1``: one scale per output row).
    Symmetric grids fix ``zero = 2^(k-1)`` (GPTQ's convention); asymmetric grids fit min and max.
    ``scale_search="mse"`` shrinks each group's range over a small grid and keeps the factor with
    the lowest squared rounding error, which helps most at 2-3 bits.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    scale_search: str = "maxabs"  # or "mse"
    mse_grid: int = 40
    mse_max_shrink: float = 0.5

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"int quantizer supports bits in {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size is not None and self.group_size <= 0:
            self.group_size = None
        if self.scale_search not in ("maxabs", "mse"):
            raise ValueError(f"scale_search must be 'maxabs' or 'mse', got {self.scale_search!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def check_shape(self, out_features: int, in_features: int) -> None:
        self._group(in_features)

    def _group(self, n: int) -> int:
        g = n if self.group_size is None else self.group_size
        if n % g != 0:
            raise ValueError(
                f"group size {g} does not divide the layer's {n} input columns; "
                "choose a group size that divides every layer width (or -1 for per-channel)"
            )
        return g

    def _scale_zero(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maxq = self.maxq
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi.abs())
            scale = 2 * amax / maxq
            zero = torch.full_like(scale, float((maxq + 1) // 2))
        else:
            lo = torch.minimum(lo, torch.zeros_like(lo))
            hi = torch.maximum(hi, torch.zeros_like(hi))
            scale = (hi - lo) / maxq
        # fp16 scales are what we store; fit with exactly those so saved == in-memory.
        scale = scale.to(torch.float16).to(torch.float32)
        # An all-zero group has range 0; the floor must survive the fp16 cast (1e-8 does not),
        # else 0/0 turns the group and, through error feedback, the rest of the matrix into NaN.
        tiny = torch.finfo(torch.float16).tiny
        scale = torch.where(scale > 0, scale, torch.full_like(scale, tiny))
        if not self.symmetric:
            zero = torch.clamp(torch.round(-lo / scale), 0, maxq)
        return scale, zero

    def fit(self, W: torch.Tensor) -> "IntGrid":
        m, n = check_weight(W)
        g = self._group(n)
        Wg = W.detach().float().reshape(m, n // g, g)
        lo, hi = Wg.amin(dim=-1), Wg.amax(dim=-1)
        scale, zero = self._scale_zero(lo, hi)
        if self.scale_search == "mse":
            best_err = torch.full_like(scale, float("inf"))
            for i in range(self.mse_grid + 1):
                p = 1.0 - self.mse_max_shrink * i / self.mse_grid
                s, z = self._scale_zero(lo * p, hi * p)
                q = torch.clamp(torch.round(Wg / s[..., None]) + z[..., None], 0, self.maxq)
                err = ((q - z[..., None]) * s[..., None] - Wg).pow(2).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                scale = torch.where(better, s, scale)
                zero = torch.where(better, z, zero)
        return IntGrid(shape=(m, n), bits=self.bits, group_size=g, scale=scale, zero=zero)

    def config(self) -> dict:
        cfg = asdict(self)
        cfg["format"] = "int"
        return cfg

    def grid_from_state(self, shape: tuple[int, int], state: dict[str, torch.Tensor]) -> "IntGrid":
        g = self._group(shape[1])
        return IntGrid(
            shape=tuple(shape), bits=self.bits, group_size=g,
            scale=state["scale"].float(), zero=state["zero"].float(),
        )


@dataclass
class IntGrid(FittedGrid):
    shape: tuple[int, int]
    bits: int
    group_size: int
    scale: torch.Tensor  # m x (n / group_size), float32 holding fp16-representable values
    zero: torch.Tensor  # m x (n / group_size), float32 holding integers

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def _gather(self, t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        t = t.to(rows.device)
        return t[rows.unsqueeze(-1), (cols // self.group_size).unsqueeze(-2)]

    def round(self, values, rows, cols):
        s = self._gather(self.scale, rows, cols)
        z = self._gather(self.zero, rows, cols)
        v = values.float()
        q = torch.clamp(torch.round(v / s) + z, 0, self.maxq)
        return ((q - z) * s).to(values.dtype), q.to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        g = self.group_size
        q = codes.float().reshape(m, n // g, g)
        s = self.scale.to(codes.device)[..., None]
        z = self.zero.to(codes.device)[..., None]
        return ((q - z) * s).reshape(m, n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scale": self.scale.to(torch.float16), "zero": self.zero.to(torch.uint8)}
