"""Weight formats: one small interface (:mod:`.base`), integer k-bit grids (:mod:`.intk`), the
QTIP-style bitshift trellis (:mod:`.trellis`) and the FP4 formats MXFP4/NVFP4 (:mod:`.fp4`)."""

from __future__ import annotations

import re

from .base import FittedGrid, Quantizer, check_joint
from .fp4 import FP4Grid, FP4Quantizer
from .intk import IntGrid, IntQuantizer
from .trellis import TrellisGrid, TrellisQuantizer

# Names accepted by make_quantizer (and --quantizer); trellisK means the HYB code with V = 2.
QUANTIZER_NAMES = ("int2", "int3", "int4", "int8", "trellis2", "trellis3", "trellis4",
                   "trellis2-1mad", "trellis3-3inst", "mxfp4", "nvfp4")
_TRELLIS = re.compile(r"trellis(\d)(?:-(hyb|1mad|3inst))?$")


def make_quantizer(spec: "str | Quantizer", group_size: int | None = 128,
                   symmetric: bool = False, scale_search: str = "maxabs",
                   fused_global_scale: bool | None = None) -> Quantizer:
    """A quantizer from a name plus options, or an existing quantizer passed through.

    ``"int4"`` / ``"int3"`` / ... (``group_size``, ``symmetric``, ``scale_search`` apply),
    ``"trellis2"`` / ``"trellis3"`` / ``"trellis4"`` (HYB code, 2 weights per step; append
    ``-1mad`` or ``-3inst`` for the computed codes with 1 weight per step), ``"mxfp4"`` and
    ``"nvfp4"`` (``scale_search`` applies; block sizes are fixed by the formats).
    ``fused_global_scale``: NVFP4 only, one global scale per group of linears that vLLM fuses
    (None: on for NVFP4, off elsewhere; True for another format is an error).
    """
    if isinstance(spec, Quantizer):
        return spec
    s = str(spec).lower()
    if fused_global_scale and s != "nvfp4":
        raise ValueError(f"fused_global_scale applies to nvfp4 only (the one format with a "
                         f"global scale), not {spec!r}")
    if s.startswith("int") and s[3:].isdigit():
        return IntQuantizer(bits=int(s[3:]), group_size=group_size, symmetric=symmetric,
                            scale_search=scale_search)
    t = _TRELLIS.match(s)
    if t:
        code = t.group(2) or "hyb"
        return TrellisQuantizer(bits=int(t.group(1)), code=code, V=2 if code == "hyb" else 1)
    if s in ("mxfp4", "nvfp4"):
        return FP4Quantizer(fmt=s, scale_search=scale_search,
                            fused_global_scale=fused_global_scale if s == "nvfp4" else None)
    raise ValueError(f"unknown quantizer {spec!r}; expected one of {', '.join(QUANTIZER_NAMES)}")


def quantizer_name(cfg: dict) -> str:
    """The short name of a quantizer config (``int4``, ``trellis2``, ``trellis3-3inst``, ``nvfp4``)."""
    fmt = cfg.get("format", "int")
    if fmt == "trellis":
        code = cfg.get("code", "hyb")
        return f"trellis{cfg['bits']}" + ("" if code == "hyb" else f"-{code}")
    if fmt == "fp4":
        return cfg["fmt"]
    return f"int{cfg.get('bits')}"


def quantizer_from_config(cfg: dict) -> Quantizer:
    cfg = dict(cfg)
    fmt = cfg.pop("format", "int")
    if fmt == "int":
        return IntQuantizer(**cfg)
    if fmt == "trellis":
        return TrellisQuantizer(**cfg)
    if fmt == "fp4":
        cfg.setdefault("fused_global_scale", False)  # configs without it: per-layer scales
        return FP4Quantizer(**cfg)
    raise ValueError(f"unknown quantizer format {fmt!r} in checkpoint config")


__all__ = ["FittedGrid", "Quantizer", "check_joint", "IntGrid", "IntQuantizer", "TrellisGrid",
           "TrellisQuantizer", "FP4Grid", "FP4Quantizer", "QUANTIZER_NAMES", "make_quantizer", "quantizer_name",
           "quantizer_from_config"]
