"""Rounding algorithms: RTN, LDLQ (≡ GPTQ) and YAQA's two-sided adaptive rounding.

Pure tensor functions: ``round_weight(W, H_in, H_out, quantizer, method=...)`` is the entry point;
:mod:`.prepare` turns factors into feedback matrices, :mod:`.ldlq` and :mod:`.yaqa` hold the
algorithms, which take any fitted grid (:class:`yaqa.quantizers.FittedGrid`).
"""

from __future__ import annotations

from .api import METHODS, RoundResult, proxy_loss, round_weight
from .ldlq import ldlq_round
from .prepare import (
    PreparedFactor,
    block_ldl,
    damped_cholesky,
    normalize_factor,
    prepare_factor,
    validate_factor,
    validate_weight,
)
from .refine import RefineStats, refine_codes, refine_factor
from .rtn import rtn_round
from .yaqa import yaqa_round

__all__ = [
    "METHODS",
    "RoundResult",
    "round_weight",
    "proxy_loss",
    "rtn_round",
    "ldlq_round",
    "yaqa_round",
    "refine_codes",
    "refine_factor",
    "RefineStats",
    "PreparedFactor",
    "prepare_factor",
    "block_ldl",
    "damped_cholesky",
    "normalize_factor",
    "validate_factor",
    "validate_weight",
]
