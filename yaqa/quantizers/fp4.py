"""The hardware FP4 formats: MXFP4 (OCP Microscaling v1.0) and NVFP4.

Both store E2M1 elements (1 sign, 2 exponent, 1 mantissa bit; magnitudes 0, 0.5, 1, 1.5, 2, 3,
4, 6) in blocks along the input dimension, each block with one shared scale:

- MXFP4: blocks of 32, scale E8M0 (a power of two 2^e, e in [-127, 127], stored as e + 127).
  The standard rule (OCP MX v1.0, 6.3) is ``e = floor(log2(amax)) - 2`` (2 = E2M1's largest
  exponent), so the block maximum lands in [4, 8) and values above 6 saturate.
- NVFP4: blocks of 16, scale FP8 E4M3, times one FP32 scale per tensor.  The standard rule puts
  the tensor maximum at 6 * 448 (the largest E2M1 times the largest E4M3): ``g = amax / 2688``,
  block scale ``e4m3(amax_block / (6 g))``, effective scale ``block * g``.

NVFP4 models served by vLLM need one global scale per *fused* layer: vLLM loads q/k/v_proj and
gate/up_proj as one linear each and keeps a single global scale for it.  ``fused_global_scale``
(on by default for NVFP4) asks :func:`yaqa.quantize` to give each such group the scale the
standard rule gives their concatenated (rotated) weights, ``max_amax / 2688``; it reaches
:meth:`FP4Quantizer.fit` as a fixed ``global_scale``, under which the block scales are then chosen
as usual.  A quantizer fitted on one matrix alone (``round_weight``) has a group of one.

``scale_search="mse"`` tries a few scales per block around the standard one (the neighbouring
exponents for MXFP4, shrink factors for NVFP4) and keeps the one with the least squared error.
Element codes are the 4-bit E2M1 encodings ``sign << 3 | magnitude index``; elements round to
nearest with ties to even (the code with an even magnitude index), saturating at +-6.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .base import check_weight, FittedGrid, Quantizer

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
FORMATS = {"mxfp4": 32, "nvfp4": 16}


def e2m1_values() -> torch.Tensor:
    """All 16 code values (code = sign << 3 | magnitude index), float32."""
    mags = torch.tensor(E2M1)
    return torch.cat([mags, -mags])


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Codes (int32) of the nearest E2M1 values, ties to even, saturating at +-6."""
    mags = torch.tensor(E2M1, device=x.device)
    mid = (mags[1:] + mags[:-1]) / 2
    a = x.abs().float()
    lo = torch.searchsorted(mid, a, right=False)  # ties resolved to the smaller magnitude
    hi = torch.searchsorted(mid, a, right=True)  # ties resolved to the larger magnitude
    idx = torch.where(lo % 2 == 0, lo, hi)  # differ only on a tie: take the even index
    sign = (x < 0) & (idx > 0)  # -0 is stored as +0
    return (idx | (sign.to(idx.dtype) << 3)).to(torch.int32)


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round non-negative float32 to FP8 E4M3 (nearest even, saturating at 448); float32 back."""
    return x.clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float32)


@dataclass
class FP4Quantizer(Quantizer):
    """MXFP4 or NVFP4 (``fmt``) with the standard or an MSE-searched block scale."""

    fmt: str = "nvfp4"
    scale_search: str = "maxabs"  # or "mse"
    mse_grid: int = 8
    mse_max_shrink: float = 0.3
    bits: int = 4
    # NVFP4: one global scale per group of linears that vLLM fuses (q/k/v, gate/up), set by
    # yaqa.quantize.  None: the format's default (on for NVFP4; MXFP4 has no global scale).
    fused_global_scale: bool | None = None
    # NVFP4: this fixed global scale (a float32 value) instead of the standard rule; what
    # yaqa.quantize passes per layer for a fused group.  Not part of the config: the fitted grid
    # stores the scale it used.
    global_scale: float | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.fmt not in FORMATS:
            raise ValueError(f"FP4 format must be one of {tuple(FORMATS)}, got {self.fmt!r}")
        if self.fused_global_scale is None:
            self.fused_global_scale = self.fmt == "nvfp4"
        if self.fmt != "nvfp4" and (self.fused_global_scale or self.global_scale is not None):
            raise ValueError(f"{self.fmt} has no global scale (only nvfp4 has one)")
        if self.global_scale is not None:
            g = float(torch.tensor(float(self.global_scale), dtype=torch.float32))
            if not (math.isfinite(g) and g > 0):
                raise ValueError(f"NVFP4 global_scale must be a positive finite float32, got "
                                 f"{self.global_scale!r}")
            self.global_scale = g
        if self.scale_search not in ("maxabs", "mse"):
            raise ValueError(f"scale_search must be 'maxabs' or 'mse', got {self.scale_search!r}")
        if self.bits != 4:
            raise ValueError("FP4 formats have 4-bit elements")

    @property
    def block(self) -> int:
        return FORMATS[self.fmt]

    def check_shape(self, out_features: int, in_features: int) -> None:
        if in_features % self.block:
            raise ValueError(f"{self.fmt} uses blocks of {self.block} input columns; the layer's "
                             f"{in_features} columns are not a multiple of it")

    def _blocks(self, W: torch.Tensor) -> torch.Tensor:
        m, n = check_weight(W)
        self.check_shape(m, n)
        return W.detach().float().reshape(m, n // self.block, self.block)

    def _candidates(self, amax: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
        """Stored block scales to try (E8M0 exponents or E4M3 values), the standard one first."""
        if self.fmt == "mxfp4":
            tiny = torch.finfo(torch.float32).tiny
            e = torch.floor(torch.log2(amax.clamp(min=tiny))) - 2
            e = torch.where(amax > 0, e, torch.full_like(e, -127.0))
            cands = [e] + ([e + 1, e - 1] if self.scale_search == "mse" else [])
            return [c.clamp(-127, 127) for c in cands]
        base = amax / (E2M1_MAX * g)
        cands = [e4m3(base)]
        if self.scale_search == "mse":
            for i in range(1, self.mse_grid + 1):
                cands.append(e4m3(base * (1 - self.mse_max_shrink * i / self.mse_grid)))
        return cands

    def _effective(self, stored: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return torch.exp2(stored) if self.fmt == "mxfp4" else stored * g

    def fit(self, W: torch.Tensor) -> "FP4Grid":
        Wb = self._blocks(W)
        amax = Wb.abs().amax(-1)
        g = torch.zeros((), dtype=torch.float32)
        if self.fmt == "nvfp4":
            g = (nvfp4_global_scale(amax.max()) if self.global_scale is None
                 else torch.tensor(self.global_scale, dtype=torch.float32))
        best, best_err = None, None
        for cand in self._candidates(amax, g):
            s = self._effective(cand, g)
            err = (_dequant_blocks(round_e2m1(_safe_div(Wb, s)), s) - Wb).pow(2).sum(-1)
            if best is None:
                best, best_err = cand, err
            else:
                better = err < best_err
                best = torch.where(better, cand, best)
                best_err = torch.where(better, err, best_err)
        m, n = W.shape
        return FP4Grid((m, n), self.fmt, self.block, best.cpu(), g.reshape(1).cpu())

    def config(self) -> dict:
        cfg = asdict(self)
        cfg["format"] = "fp4"
        cfg.pop("global_scale")
        # Absent means per-layer global scales, as in every config written before the option,
        # so those (and MXFP4's) configs and identities stay what they were.
        if not cfg["fused_global_scale"]:
            cfg.pop("fused_global_scale")
        return cfg

    def placeholder_state(self, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        m, n = shape
        state = {"scale": torch.zeros(m, max(1, n // self.block), dtype=torch.uint8)}
        if self.fmt == "nvfp4":
            state["global_scale"] = torch.zeros(1, dtype=torch.float32)
        return state

    def grid_from_state(self, shape: tuple[int, int], state: dict[str, torch.Tensor]) -> "FP4Grid":
        raw = state["scale"].to(torch.uint8).cpu()
        if self.fmt == "mxfp4":
            stored = raw.to(torch.float32) - 127
            g = torch.zeros(1)
        else:
            stored = raw.view(torch.float8_e4m3fn).to(torch.float32)
            g = state["global_scale"].float().cpu().reshape(1)
        return FP4Grid(tuple(shape), self.fmt, self.block, stored, g)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """The standard NVFP4 global scale (float32 scalar) of a tensor whose largest magnitude is
    ``amax``: ``amax / (6 · 448)``, or 1 for an all-zero tensor.  For a group of tensors pass the
    largest of their maxima (the rule is monotone, so that is the concatenation's scale)."""
    top = torch.as_tensor(amax).detach().float().max()
    return (top / (E2M1_MAX * E4M3_MAX)).float() if top > 0 else torch.ones((), dtype=torch.float32)


def _safe_div(Wb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    # A block whose scale rounds to 0 (NVFP4, tiny next to the tensor maximum) stores zeros.
    s = s.unsqueeze(-1)
    return torch.where(s > 0, Wb / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(Wb))


def _dequant_blocks(codes: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return e2m1_values().to(codes.device)[codes.long()] * s.unsqueeze(-1)


class FP4Grid(FittedGrid):
    def __init__(self, shape: tuple[int, int], fmt: str, block: int, stored: torch.Tensor,
                 global_scale: torch.Tensor):
        self.shape = shape
        self.fmt = fmt
        self.block = block
        self.stored = stored  # (m, n / block): E8M0 exponent or E4M3 value, as float32
        self.global_scale = global_scale  # (1,) float32 (NVFP4; unused by MXFP4)
        self.scale = torch.exp2(stored) if fmt == "mxfp4" else stored * global_scale

    def round(self, values, rows, cols):
        s = self.scale.to(values.device)[rows.unsqueeze(-1), (cols // self.block).unsqueeze(-2)]
        v = values.float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        codes = round_e2m1(torch.where(s > 0, v / safe, torch.zeros_like(v)))
        q = e2m1_values().to(values.device)[codes.long()] * s
        return q.to(values.dtype), codes

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        c = codes.reshape(m, n // self.block, self.block)
        return _dequant_blocks(c, self.scale.to(codes.device)).reshape(m, n)

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.fmt == "mxfp4":
            return {"scale": (self.stored + 127).to(torch.uint8)}
        return {"scale": self.stored.to(torch.float8_e4m3fn).view(torch.uint8),
                "global_scale": self.global_scale.float()}
