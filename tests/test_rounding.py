"""Rounding math: LDL, the fast wavefront vs a plain reference, special cases, GPTQ, optimality."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from yaqa.quantizers import IntQuantizer, make_quantizer
from yaqa.rounding import (
    block_ldl,
    damped_cholesky,
    ldlq_round,
    normalize_factor,
    prepare_factor,
    proxy_loss,
    round_weight,
    yaqa_round,
)

DEVICE = os.environ.get("YAQA_TEST_DEVICE", "cpu")
F64 = dict(dtype=torch.float64)


def random_pd(k: int, gen: torch.Generator, decay: float = 0.0, rank_mult: int = 2) -> torch.Tensor:
    """A positive-definite factor; ``decay > 0`` gives a spectrum like real activations."""
    X = torch.randn(k, rank_mult * k, generator=gen, **F64)
    if decay:
        X = X * torch.exp(-decay * torch.linspace(0, 1, rank_mult * k, **F64))
        X = torch.randn(k, k, generator=gen, **F64) @ X
    return X @ X.T / X.shape[1]


def correlated_pd(k: int, gen: torch.Generator) -> torch.Tensor:
    """Strongly correlated factor (random eigenvectors, geometrically decaying eigenvalues)."""
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, **F64))
    lam = torch.exp(-torch.linspace(0, 8, k, **F64)) + 1e-3
    return (Q * lam) @ Q.T


# ---------------------------------------------------------------------------------------------
# Reference implementations, deliberately naive


def reference_yaqa(W, grid, L_in, L_out, b_in, b_out):
    """Tile by tile, each target recomputed from whole matrices: T = W + [L_out^T E L_in - E]."""
    m, n = W.shape
    M, N = -(-m // b_out), -(-n // b_in)
    E = torch.zeros_like(W)
    Q = torch.zeros_like(W)
    codes = torch.zeros(m, n, dtype=torch.int32)
    for s in range(M + N - 2, -1, -1):
        for i in range(max(0, s - N + 1), min(M - 1, s) + 1):
            j = s - i
            r = torch.arange(i * b_out, min((i + 1) * b_out, m))
            c = torch.arange(j * b_in, min((j + 1) * b_in, n))
            fb = (L_out[:, r].T @ E @ L_in[:, c]) - E[r][:, c]
            q, code = grid.round(W[r][:, c] + fb, r, c)
            Q[r.unsqueeze(1), c] = q
            codes[r.unsqueeze(1), c] = code
            E[r.unsqueeze(1), c] = W[r][:, c] - q
    return Q, codes


def reference_gptq(W, H, grid):
    """GPTQ (OPTQ) with a fixed grid, first column first, using the Cholesky of H^{-1}."""
    W = W.clone()
    m, n = W.shape
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.zeros(m, n, dtype=torch.int32)
    rows = torch.arange(m)
    for i in range(n):
        q, c = grid(W[:, i:i + 1], rows, i)
        codes[:, i] = c[:, 0]
        err = (W[:, i] - q[:, 0]) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return codes


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,block", [(64, 16), (50, 16), (37, 8), (33, 1), (20, 32)])
def test_block_ldl_reconstructs_the_factor(n, block):
    g = torch.Generator().manual_seed(n)
    H = random_pd(n, g, decay=3.0).to(DEVICE)
    C, _ = damped_cholesky(H, 0.0)
    L, D = block_ldl(C, block)
    nb = D.shape[0]
    Dfull = torch.block_diag(*D)[:n, :n]
    assert torch.allclose(L @ Dfull @ L.T, H, atol=1e-12 * H.abs().max().item(), rtol=0)
    # unit block-lower: identity diagonal blocks, zeros above them
    for k in range(nb):
        s = slice(k * block, min((k + 1) * block, n))
        assert torch.equal(L[s, s], torch.eye(L[s, s].shape[0], **F64, device=DEVICE))
        assert not L[s, s.stop:].any()


@pytest.mark.parametrize(
    "m,n,b_out,b_in,group",
    [(48, 64, 16, 16, 16), (40, 56, 16, 16, 8), (37, 45, 8, 12, None), (24, 40, 4, 8, 20),
     (16, 96, 16, 4, 32), (70, 30, 16, 16, 15)],
)
def test_fast_wavefront_equals_tile_by_tile_reference(m, n, b_out, b_in, group):
    g = torch.Generator().manual_seed(m * n)
    W = torch.randn(m, n, generator=g, **F64)
    Li, _ = block_ldl(damped_cholesky(normalize_factor(random_pd(n, g, 2.0)), 0.01)[0], b_in)
    Lo, _ = block_ldl(damped_cholesky(normalize_factor(random_pd(m, g, 2.0)), 0.01)[0], b_out)
    grid = IntQuantizer(bits=3, group_size=group).fit(W)
    q_ref, c_ref = reference_yaqa(W, grid, Li, Lo, b_in, b_out)
    eye_i, eye_o = torch.eye(n, **F64), torch.eye(m, **F64)
    q, c = yaqa_round(W.to(DEVICE), grid, (Li - eye_i).to(DEVICE), (Lo - eye_o).to(DEVICE), b_in, b_out)
    assert torch.equal(c.cpu(), c_ref)
    assert torch.allclose(q.cpu(), q_ref, atol=1e-12)
    # The feedback changed something: the two-sided result is not plain rounding.
    assert not torch.equal(c_ref, grid.round_all(W)[1])


def test_error_identity_and_proxy_decomposition_hold():
    # L_out^T (W - Ŵ) L_in = η with |η| ≤ half a grid step, and the proxy splits over D blocks.
    m, n, b = 32, 48, 8
    g = torch.Generator().manual_seed(1)
    W = torch.randn(m, n, generator=g, **F64) * 0.1
    Hi, Ho = normalize_factor(random_pd(n, g, 2.0)), normalize_factor(random_pd(m, g, 2.0))
    pi, po = prepare_factor(Hi, b, 0.01), prepare_factor(Ho, b, 0.01)
    # A wide grid so nothing clamps: then every η entry is a plain rounding error.
    grid = IntQuantizer(bits=8, group_size=16).fit(W * 4)
    q, _ = yaqa_round(W, grid, pi.A, po.A, b, b)
    E = W - q
    eta = (po.A + torch.eye(m, **F64)).T @ E @ (pi.A + torch.eye(n, **F64))
    step = grid.scale.repeat_interleave(16, dim=1).double()
    assert (eta.abs() <= step / 2 + 1e-12).all()
    lhs = proxy_loss(E, Hi + pi.sigma * torch.eye(n, **F64), Ho + po.sigma * torch.eye(m, **F64))
    Di, Do = torch.block_diag(*pi.D), torch.block_diag(*po.D)
    rhs = proxy_loss(eta, Di, Do)
    assert lhs == pytest.approx(rhs, rel=1e-9)


@pytest.mark.parametrize("incoherence", [False, 4])
def test_yaqa_equals_ldlq_when_output_factor_is_identity(incoherence):
    for seed, (m, n) in enumerate([(64, 128), (40, 56), (96, 64)]):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(m, n, generator=g).to(DEVICE)
        Hi = random_pd(n, g, 2.0).to(DEVICE)
        q = IntQuantizer(bits=4, group_size=8)
        a = round_weight(W, Hi, None, q, "ldlq", incoherence=incoherence, return_details=True)
        b = round_weight(W, Hi, torch.eye(m, device=DEVICE), q, "yaqa", incoherence=incoherence,
                         return_details=True)
        assert torch.equal(a.codes, b.codes)
        assert torch.equal(a.weight, b.weight)
        assert b.sigma_out == 0.01


def test_ldlq_equals_rtn_when_input_factor_is_identity():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 72, generator=g).to(DEVICE)
    q = IntQuantizer(bits=3, group_size=24)
    for block in (1, 16):
        a = round_weight(W, torch.eye(72, device=DEVICE), None, q, "ldlq", block_size=block)
        assert torch.equal(a, round_weight(W, None, None, q, "rtn"))
    b = round_weight(W, torch.eye(72), torch.eye(40), q, "yaqa") if DEVICE == "cpu" else None
    if b is not None:
        assert torch.equal(b, round_weight(W, None, None, q, "rtn"))


def test_ldlq_equals_gptq_with_reversed_column_order():
    # QuIP: LDLQ runs last column first with lower L; GPTQ runs first column first with the
    # Cholesky of H^{-1}.  Reversing the column order maps one onto the other (block size 1).
    m, n = 24, 40
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(m, n, generator=g, **F64)
        pi = prepare_factor(random_pd(n, g, 3.0), 1, 0.01)
        grid = IntQuantizer(bits=3, group_size=8).fit(W)
        _, codes = ldlq_round(W, grid, pi.A, 1)
        H = pi.H + pi.sigma * torch.eye(n, **F64)

        def grid_reversed(vals, rows, i):
            return grid.round(vals, rows, torch.tensor([n - 1 - i]))

        codes_gptq = reference_gptq(W.flip(1), H.flip(0, 1), grid_reversed).flip(1)
        assert torch.equal(codes, codes_gptq)
        assert not torch.equal(codes, grid.round_all(W)[1])


def test_proxy_loss_orders_yaqa_below_ldlq_below_rtn_on_average():
    m, n = 64, 128
    losses = {"rtn": [], "ldlq": [], "yaqa": []}
    for seed in range(4):
        g = torch.Generator().manual_seed(100 + seed)
        W = torch.randn(m, n, generator=g).to(DEVICE)
        Hi, Ho = correlated_pd(n, g).to(DEVICE), correlated_pd(m, g).to(DEVICE)
        for method in losses:
            r = round_weight(W, Hi, Ho, "int3", method, group_size=32, return_details=True)
            losses[method].append(r.proxy_loss)
    mean = {k: sum(v) / len(v) for k, v in losses.items()}
    assert mean["yaqa"] < mean["ldlq"] < mean["rtn"]
    assert mean["yaqa"] < 0.8 * mean["ldlq"]


def test_exhaustive_search_optimum_bounds_yaqa_and_ldlq():
    m, n = 2, 3
    q = IntQuantizer(bits=2, group_size=None)
    res = {"opt": [], "rtn": [], "ldlq": [], "yaqa": []}
    for seed in range(24):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(m, n, generator=g)
        Hi, Ho = correlated_pd(n, g), correlated_pd(m, g)
        grid = q.fit(W)
        levels = torch.stack([grid.dequantize(torch.full((m, n), k, dtype=torch.int32))
                              for k in range(4)]).reshape(4, m * n)  # value of code k per entry
        combos = torch.tensor(list(itertools.product(range(4), repeat=m * n)))  # (4^6, m·n)
        cand = levels.gather(0, combos).reshape(-1, m, n)
        Hin, Hout = normalize_factor(Hi), normalize_factor(Ho)
        dW = (W[None] - cand).double()
        allp = ((Hout @ dW) * (dW @ Hin)).sum((-1, -2))
        res["opt"].append(allp.min().item())
        for method in ("rtn", "ldlq", "yaqa"):
            r = round_weight(W, Hi, Ho, q, method, block_size=1, return_details=True)
            # the proxy is evaluated in float32 (W is): 1e-5 relative covers its rounding
            assert r.proxy_loss >= allp.min().item() * (1 - 1e-5) - 1e-12
            res[method].append(r.proxy_loss)
    mean = {k: sum(v) / len(v) for k, v in res.items()}
    assert mean["opt"] <= mean["yaqa"] < mean["rtn"]
    assert mean["opt"] <= mean["ldlq"] < mean["rtn"]


# ---------------------------------------------------------------------------------------------
# Interface, errors, damping


def test_round_weight_returns_same_shape_dtype_device_and_rebuilds_from_codes():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 64, generator=g).to(torch.bfloat16).to(DEVICE)
    Hi = random_pd(64, g).to(DEVICE)
    out = round_weight(W, Hi, None, "int4", "yaqa", group_size=32)
    assert out.shape == W.shape and out.dtype == W.dtype and out.device == W.device
    r = round_weight(W, Hi, None, make_quantizer("int4", group_size=32), "yaqa", return_details=True)
    assert r.codes.dtype == torch.int32 and r.weight.dtype == torch.float32
    assert torch.equal(r.weight, r.grid.dequantize(r.codes)) and r.transform is None
    assert r.sigma_in == 0.01 and r.sigma_out is None
    assert 0 < r.proxy_loss_relative < 0.05


def test_invalid_inputs_raise_clear_errors():
    W = torch.randn(8, 16)
    H = random_pd(16, torch.Generator().manual_seed(0))
    bad = W.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        round_weight(bad, H, None, "int4", "ldlq", group_size=8)
    Hb = H.clone()
    Hb[1, 1] = float("inf")
    with pytest.raises(ValueError, match="H_in contains NaN or Inf"):
        round_weight(W, Hb, None, "int4", "ldlq", group_size=8)
    with pytest.raises(ValueError, match="H_in is 8×8 but the weight needs 16×16"):
        round_weight(W, H[:8, :8], None, "int4", "ldlq", group_size=8)
    with pytest.raises(ValueError, match="H_out is 16×16 but the weight needs 8×8"):
        round_weight(W, H, H, "int4", "yaqa", group_size=8)
    with pytest.raises(ValueError, match="square"):
        round_weight(W, H[:, :8], None, "int4", "ldlq", group_size=8)
    asym = H.clone()
    asym[0, 5] += 1.0
    with pytest.raises(ValueError, match="not symmetric"):
        round_weight(W, asym, None, "int4", "ldlq", group_size=8)
    with pytest.raises(ValueError, match="2-D"):
        round_weight(W[0], H, None, "int4", "rtn")
    with pytest.raises(ValueError, match="method"):
        round_weight(W, H, None, "int4", "gptq")
    with pytest.raises(ValueError, match="needs the input-side factor"):
        round_weight(W, None, None, "int4", "yaqa", group_size=8)


def test_damping_escalates_on_a_singular_factor_and_reports_sigma():
    n = 32
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, n, generator=g)
    v = torch.randn(n, 3, generator=g, **F64)
    singular = v @ v.T  # rank 3
    r = round_weight(W, singular, None, "int4", "ldlq", sigma=0.0, group_size=8, return_details=True)
    assert r.sigma_in > 0 and torch.isfinite(r.weight).all()
    # Indefinite by -0.03 after normalisation: 0.01 and 0.02 fail, 0.04 succeeds.
    indefinite = normalize_factor(singular) - 0.03 * torch.eye(n, **F64)
    r = round_weight(W, indefinite, None, "int4", "ldlq", group_size=8, return_details=True)
    assert r.sigma_in == pytest.approx(0.04)
    with pytest.raises(RuntimeError, match="not positive definite even with damping"):
        round_weight(W, indefinite, None, "int4", "ldlq", group_size=8, max_sigma=0.02)


def test_dead_input_channels_are_handled():
    n = 24
    g = torch.Generator().manual_seed(0)
    H = random_pd(n, g)
    H[3, :] = 0
    H[:, 3] = 0
    W = torch.randn(8, n, generator=g)
    r = round_weight(W, H, None, "int4", "yaqa", group_size=8, return_details=True)
    assert r.sigma_in == 0.01 and torch.isfinite(r.weight).all()
