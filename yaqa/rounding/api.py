"""``round_weight``: one entry point for RTN, LDLQ and YAQA on a single weight matrix."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..incoherence import IncoherenceTransform
from ..quantizers import FittedGrid, IntQuantizer, Quantizer, make_quantizer
from .ldlq import ldlq_round
from .refine import RefineStats, refine_codes, refine_factor
from .prepare import PreparedFactor, normalize_factor, prepare_factor, validate_factor, validate_weight
from .rtn import rtn_round
from .threads import small_cpu_problem_threads
from .yaqa import yaqa_round

log = logging.getLogger(__name__)

METHODS = ("rtn", "ldlq", "yaqa")


@dataclass
class RoundResult:
    """Everything a caller may need after rounding one weight.

    ``weight == transform.inverse_weight(grid.dequantize(codes))`` (or ``grid.dequantize(codes)``
    without a transform): codes and grid live in the transformed basis, ``weight`` in the original.
    """

    weight: torch.Tensor  # Ŵ, original basis, float32
    codes: torch.Tensor  # int32, m × n, transformed basis
    grid: FittedGrid  # fitted on the transformed weight
    transform: IncoherenceTransform | None
    method: str
    sigma_in: float | None  # final damping of H_in (None: no factorisation was needed)
    sigma_out: float | None
    proxy_loss: float  # tr(dW^T H_out dW H_in), normalised undamped factors (None = identity)
    proxy_loss_relative: float  # proxy_loss / tr(W^T H_out W H_in)
    block_size: int
    block_size_out: int
    refine: RefineStats | None = None  # set when refinement ran (refine > 0)


def proxy_loss(
    dW: torch.Tensor, H_in: torch.Tensor | None, H_out: torch.Tensor | None
) -> float:
    """``tr(dW^T H_out dW H_in)`` (a None factor is the identity), in float64 when ``dW`` is,
    else in float32: a diagnostic, for which float32's ~1e-6 relative error is plenty, and
    float64 matmuls took ~15 % of quantizing on a 2-core CPU."""
    d = dW if dW.dtype == torch.float64 else dW.to(torch.float32)
    left = d if H_out is None else H_out.to(d) @ d
    right = d if H_in is None else d @ H_in.to(d)
    return float((left * right).sum())


def _resolve_seed(incoherence: bool | int | None) -> int | None:
    if incoherence is None or incoherence is False:
        return None
    if incoherence is True:
        return 0
    if isinstance(incoherence, int):
        return int(incoherence)
    raise TypeError(f"incoherence must be False, True or an int seed, got {incoherence!r}")


def round_weight(
    W: torch.Tensor,
    H_in: torch.Tensor | None = None,
    H_out: torch.Tensor | None = None,
    quantizer: Quantizer | str = "int4",
    method: str = "rtn",
    *,
    incoherence: bool | int | IncoherenceTransform = False,
    block_size: int = 16,
    block_size_out: int | None = None,
    sigma: float = 0.01,
    max_sigma: float = 1e3,
    group_size: int | None = 128,
    return_details: bool = False,
    refine: int = 0,
) -> torch.Tensor | RoundResult:
    """Quantize one weight ``W`` (out_features × in_features) with RTN, LDLQ or YAQA.

    ``H_in`` (n × n) and ``H_out`` (m × m) are the Kronecker factors of the layer's Hessian/Fisher
    (``H_out=None`` means identity, which makes YAQA equal LDLQ); only their shape-normalised
    form matters.  ``quantizer`` is a :class:`Quantizer` or a spec like ``"int4"`` (then
    ``group_size`` applies).  ``incoherence=True`` (seed 0) or an int seed rotates weight and factors
    with random Hadamard transforms before rounding and back afterwards; an
    :class:`~yaqa.incoherence.IncoherenceTransform` is used as given (shared or block modes).  ``block_size`` is the tile
    width along inputs (and outputs unless ``block_size_out`` is given); ``sigma`` the initial
    damping relative to the mean diagonal, doubled until the factorisation succeeds.
    ``refine`` (LDLQ/YAQA with an int-k grid): up to that many rounds of ±1 code steps after the
    rounding that lower its proxy loss with the same damped, rotated factors (0: off); see
    :mod:`yaqa.rounding.refine`.

    Returns Ŵ with ``W``'s shape, dtype and device, or a :class:`RoundResult` if ``return_details``.
    """
    validate_weight(W)
    with small_cpu_problem_threads(W):
        return _round_weight(W, H_in, H_out, quantizer, method, incoherence, block_size,
                             block_size_out, sigma, max_sigma, group_size, return_details,
                             refine)


def _round_weight(W, H_in, H_out, quantizer, method, incoherence, block_size, block_size_out,
                  sigma, max_sigma, group_size, return_details, refine):
    method = str(method).lower()
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be an integer >= 0 (rounds of code steps), got {refine!r}")
    if refine and method == "rtn":
        raise ValueError("refine needs LDLQ or YAQA rounding (RTN has no Hessian to refine with)")
    if block_size < 1 or (block_size_out is not None and block_size_out < 1):
        raise ValueError("block sizes must be >= 1")
    bo = block_size if block_size_out is None else int(block_size_out)
    m, n = W.shape
    if H_in is not None:
        validate_factor(H_in, n, "H_in")
    if H_out is not None:
        validate_factor(H_out, m, "H_out")
    if method in ("ldlq", "yaqa") and H_in is None:
        raise ValueError(f"method {method!r} needs the input-side factor H_in (n × n)")

    q = make_quantizer(quantizer, group_size=group_size) if isinstance(quantizer, str) else quantizer
    if not isinstance(q, Quantizer):
        raise TypeError(f"quantizer must be a Quantizer or a spec string, got {type(quantizer).__name__}")
    if refine and not isinstance(q, IntQuantizer):
        raise ValueError(f"refine needs an int-k quantizer (codes stepped by ±1); "
                         f"{type(q).__name__} is not one. Use refine=0")
    dev = W.device
    Wf = W.detach().to(torch.float32)

    if isinstance(incoherence, IncoherenceTransform):
        tf = incoherence
        if (tf.m, tf.n) != (m, n):
            raise ValueError(f"incoherence transform is {tf.m}x{tf.n}, the weight {m}x{n}")
    else:
        seed = _resolve_seed(incoherence)
        tf = IncoherenceTransform(m, n, seed) if seed is not None else None
    Wt = tf.weight(Wf) if tf is not None else Wf

    prep_in: PreparedFactor | None = None
    prep_out: PreparedFactor | None = None
    if method in ("ldlq", "yaqa"):
        prep_in = prepare_factor(H_in, block_size, sigma, name="H_in", max_sigma=max_sigma,
                                 rotate=tf.factor_in if tf is not None else None, device=dev)
    if method == "yaqa" and H_out is not None:
        prep_out = prepare_factor(H_out, bo, sigma, name="H_out", max_sigma=max_sigma,
                                  rotate=tf.factor_out if tf is not None else None, device=dev)

    grid = q.fit(Wt)
    if method == "rtn":
        _, codes = rtn_round(Wt, grid)
    elif method == "ldlq":
        _, codes = ldlq_round(Wt, grid, prep_in.A, block_size)  # type: ignore[union-attr]
    else:
        _, codes = yaqa_round(Wt, grid, prep_in.A,  # type: ignore[union-attr]
                              prep_out.A if prep_out is not None else None, block_size, bo)
    stats = None
    if refine:
        # The objective the rounding minimised: damped factors in the transformed basis.
        codes, stats = refine_codes(
            Wt, codes, grid, refine_factor(prep_in.H, prep_in.sigma),  # type: ignore[union-attr]
            refine_factor(prep_out.H, prep_out.sigma) if prep_out is not None else None, refine)

    # Ŵ is rebuilt from the codes exactly as a loader would, so stored and returned agree.
    What = grid.dequantize(codes)
    if tf is not None:
        What = tf.inverse_weight(What)
    if not return_details:
        return What.to(W.dtype)

    # The proxy is invariant under the transform; evaluate it in the original basis.
    Hin_n = normalize_factor(H_in.to(dev), "H_in") if H_in is not None else None
    Hout_n = normalize_factor(H_out.to(dev), "H_out") if H_out is not None else None
    loss = proxy_loss(Wf - What, Hin_n, Hout_n)
    ref = proxy_loss(Wf, Hin_n, Hout_n)
    result = RoundResult(
        weight=What,
        codes=codes,
        grid=grid,
        transform=tf,
        method=method,
        sigma_in=prep_in.sigma if prep_in is not None else None,
        sigma_out=prep_out.sigma if prep_out is not None else None,
        proxy_loss=loss,
        proxy_loss_relative=loss / ref if ref > 0 else float("nan"),
        block_size=block_size,
        block_size_out=bo,
        refine=stats,
    )
    log.debug("round_weight %s %dx%d: proxy %.4g (relative %.4g)", method, m, n, loss,
              result.proxy_loss_relative)
    return result
