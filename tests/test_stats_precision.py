"""Precision of the Sketch-B statistics: where bf16 rounding happens, in-place accumulation."""

from __future__ import annotations

import pytest
import torch

from yaqa.hessians import accumulators as acc_mod
from yaqa.hessians.accumulators import LayerAccumulator, Products, mirror_lower
from yaqa.hessians.shrinkage import seq_sq_norms_direct


def bf(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bf16 and back: what a bf16 operand carries."""
    return t.to(torch.bfloat16).double()


def batch(b=3, T=10, n=24, m=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, T, n, generator=g), torch.randn(b, T, m, generator=g))


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_bf16_gram_route_rounds_exactly_the_documented_operands():
    """bf16 mode: X, G, the T×T Grams and Y = S_G X, Z = S_X G enter products as bf16 (each an
    fp32-accumulated result rounded once); every sum is fp32. An fp64 brute force with the same
    roundings matches to fp32 accuracy, while the unrounded sums differ at bf16's level."""
    X, G = batch()
    acc = LayerAccumulator(X.shape[-1], G.shape[-1], device="cpu", precision="bf16",
                           route="gram", collect_hx=False)
    acc.begin_pass("b")
    acc.update_backward(X, G)
    acc.end_pass()
    Xd, Gd = X.double(), G.double()
    SG = bf(Gd @ Gd.transpose(1, 2))      # first level (fp32 activations here), rounded for mid
    SX = bf(Xd @ Xd.transpose(1, 2))
    Y = bf(SG @ bf(Xd))                    # mid level, rounded for final
    Z = bf(SX @ bf(Gd))
    h_in = sum(bf(x).T @ y for x, y in zip(Xd, Y)) / X.shape[0]
    h_out = sum(bf(g).T @ z for g, z in zip(Gd, Z)) / X.shape[0]
    exact_in = sum((g.T @ x).T @ (g.T @ x) for x, g in zip(Xd, Gd)) / X.shape[0]
    assert rel(acc.factors["H_in"], (h_in + h_in.T) / 2) < 2e-6
    assert rel(acc.factors["H_out"], (h_out + h_out.T) / 2) < 2e-6
    assert 1e-4 < rel(acc.factors["H_in"], exact_in) < 2e-2  # bf16 rounding is really there


def test_bf16_direct_route_rounds_the_per_sequence_gradients_once():
    X, G = batch(n=40, m=8)
    acc = LayerAccumulator(40, 8, device="cpu", precision="bf16", route="direct",
                           collect_hx=False)
    acc.begin_pass("b")
    acc.update_backward(X, G)
    acc.end_pass()
    D = bf(G.double().transpose(1, 2) @ X.double())  # [b, m, n], fp32 sums rounded once
    assert rel(acc.factors["H_in"], sum(d.T @ d for d in D) / 3) < 2e-6
    assert rel(acc.factors["H_out"], sum(d @ d.T for d in D) / 3) < 2e-6
    assert rel(acc.factors["seq_sq"], seq_sq_norms_direct(D).sum().reshape(1, 1) / 3) < 1e-6


@pytest.mark.parametrize("precision", ["mixed", "bf16"])
def test_low_precision_modes_stay_close_to_full_precision(precision):
    X, G = batch(b=4, T=16, n=48, m=32, seed=1)
    out = {}
    for p in ("full", precision):
        acc = LayerAccumulator(48, 32, device="cpu", precision=p, collect_hx=True)
        acc.begin_pass("b")
        for x, g in zip(X.split(2), G.split(2)):
            acc.update_backward(x, g)
        acc.end_pass()
        out[p] = acc.factors
    for k in ("H_in", "H_out", "seq_sq"):
        assert rel(out[precision][k], out["full"][k]) < 2e-2, k
    assert rel(out[precision]["H_x"], out["full"]["H_x"]) < 1e-6  # fp32 activations: exact


def test_products_accumulate_into_strided_views_in_place(monkeypatch):
    monkeypatch.setattr(acc_mod, "_SYM_TILE", 8)
    for precision in ("full", "bf16"):
        prod = Products(precision, torch.float32, torch.device("cpu"))
        a = torch.randn(20, 30, dtype=torch.bfloat16)
        out = torch.full((30, 30), 0.5)
        before = out.data_ptr()
        acc_mod.sym_addmm(out, a, a, prod, "final")
        assert out.data_ptr() == before
        want = a.double().T @ a.double() + 0.5
        assert torch.allclose(mirror_lower(out).double(), want, rtol=1e-5, atol=1e-5)


def test_fused_bf16_accumulation_is_refused_cleanly_where_unsupported():
    # CPU has no addmm with an fp32 output for bf16 operands: the check says no, raises nothing
    for batched in (False, True):
        assert acc_mod._fused_addmm_works(torch.device("cpu"), torch.bfloat16, batched) is False


def test_auto_precision_is_bf16_on_cuda_and_full_elsewhere():
    from yaqa.hessians.accumulators import resolve_precision

    assert resolve_precision("auto", torch.device("cuda"), torch.float32) == "bf16"
    assert resolve_precision("auto", torch.device("cpu"), torch.float32) == "full"
    # fp64 sums ask for fp64 products as well
    assert resolve_precision("auto", torch.device("cuda"), torch.float64) == "full"
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"), torch.float32)
