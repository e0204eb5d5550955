"""Weight formats: one small interface (:mod:`.base`), integer k-bit grids (:mod:`.intk`)."""

from __future__ import annotations

from .base import FittedGrid, Quantizer
from .intk import IntGrid, IntQuantizer


def make_quantizer(spec: "str | Quantizer", group_size: int | None = 128,
                   symmetric: bool = False, scale_search: str = "maxabs") -> Quantizer:
    """``"int4"`` / ``"int3"`` / ... plus options, or an existing quantizer passed through."""
    if isinstance(spec, Quantizer):
        return spec
    s = str(spec).lower()
    if s.startswith("int") and s[3:].isdigit():
        return IntQuantizer(bits=int(s[3:]), group_size=group_size, symmetric=symmetric,
                            scale_search=scale_search)
    raise ValueError(f"unknown quantizer {spec!r}; expected one of int2, int3, int4, int8")


def quantizer_from_config(cfg: dict) -> Quantizer:
    cfg = dict(cfg)
    fmt = cfg.pop("format", "int")
    if fmt == "int":
        return IntQuantizer(**cfg)
    raise ValueError(f"unknown quantizer format {fmt!r} in checkpoint config")


__all__ = ["FittedGrid", "Quantizer", "IntGrid", "IntQuantizer", "make_quantizer",
           "quantizer_from_config"]
