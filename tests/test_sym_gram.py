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
