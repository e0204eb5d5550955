"""Cheaper statistics: the T x T Grams of the Gram route multiply their lower triangle only."""

from __future__ import annotations

import pytest
import torch

import yaqa

from tiny_models import tiny_model


def test_sym_gram_equals_the_full_gram():
    from yaqa.hessians.accumulators import Products, sym_blocks, sym_gram

    a = torch.randn(2, 1100, 24, generator=torch.Generator().manual_seed(0))
    assert len(sym_blocks(1100)) > 1  # two tiles: one rectangle and two leaves
    prod = Products("full", torch.float32, torch.device("cpu"))
    got = sym_gram(a, prod, "first", for_level="mid")
    want = a.double() @ a.double().transpose(1, 2)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got, got.transpose(1, 2))


@pytest.mark.parametrize("precision,tol", [("full", 1e-6), ("bf16", 2e-3)])
def test_syrk_grams_give_the_factors_of_full_grams(monkeypatch, precision, tol):
    from yaqa.hessians import accumulators as acc_mod

    model = tiny_model("llama", hidden=32, intermediate=64, layers=1, vocab=64)
    ids = torch.randint(0, 64, (2, 1030), generator=torch.Generator().manual_seed(2))
    kw = dict(sketch="B", batch_size=2, route="gram", precision=precision, collect_hx=False,
              progress=False)
    monkeypatch.setattr(acc_mod, "_GRAM_SCHEME", "full")
    full = yaqa.collect_hessians(model, ids, **kw)
    monkeypatch.setattr(acc_mod, "_GRAM_SCHEME", "syrk")
    syrk = yaqa.collect_hessians(model, ids, **kw)
    for name in full:
        for k in ("H_in", "H_out"):
            a, b = getattr(full[name], k), getattr(syrk[name], k)
            assert (a - b).norm() / a.norm() < tol, (name, k)


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_batched_diagonal_leaves_give_the_same_sums(monkeypatch, precision):
    from yaqa.hessians import accumulators as acc_mod

    g = torch.Generator().manual_seed(3)
    n, K = 1536, 200  # three 512-wide leaves
    assert acc_mod._uniform_leaf(n) == 512 and acc_mod._uniform_leaf(1000) == 500
    assert acc_mod._uniform_leaf(512) is None  # one leaf: nothing to batch
    a = torch.randn(n, K, generator=g).T  # a transposed view: the strides must be honoured
    b = a * torch.rand(K, 1, generator=g)
    prod = acc_mod.Products(precision, torch.float32, torch.device("cpu"))
    sums = {}
    for batched in (False, True):
        monkeypatch.setattr(acc_mod, "_BATCH_LEAVES", batched)
        acc = torch.full((n, n), 0.5)
        acc_mod.sym_addmm(acc, a, b, prod, "final")
        sums[batched] = acc
    assert torch.equal(sums[True], sums[False])
    want = torch.tril(a.double().T @ b.double() + 0.5)
    got = torch.tril(sums[True].double())
    tol = 1e-5 if precision == "full" else 1e-2
    assert ((got - want).norm() / want.norm()).item() < tol
