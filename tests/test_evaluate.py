"""KL / perplexity / top-1 against brute-force numpy computations on tiny models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from tests.tiny_models import tiny_model
import yaqa.evaluate
from yaqa.evaluate import (EvalResult, ReferenceCache, compare, compare_many, kl_divergence,
                           perplexity, top1_agreement)

VOCAB = 96


@pytest.fixture(scope="module")
def ref():
    return tiny_model("llama", vocab=VOCAB, seed=0)


@pytest.fixture(scope="module")
def windows():
    return torch.randint(0, VOCAB, (6, 20), generator=torch.Generator().manual_seed(0))


def noisy(model, scale: float, seed: int = 1):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.model.layers.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())
    return out


def numpy_log_softmax(model, ids):
    with torch.no_grad():
        logits = model(ids).logits.double().numpy()
    m = logits.max(-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))


def test_kl_of_a_model_to_itself_is_zero(ref, windows):
    res = compare(ref, ref, windows, batch_size=4, progress=False)
    assert res.kl == 0.0 and res.kl_p99 == 0.0
    assert res.top1 == 1.0 and res.ppl == pytest.approx(res.ref_ppl)
    assert res.n_tokens == windows.numel()


def test_kl_matches_brute_force_numpy(ref, windows):
    model = noisy(ref, 0.3)
    lp, lq = numpy_log_softmax(ref, windows), numpy_log_softmax(model, windows)
    per_token = (np.exp(lp) * (lp - lq)).sum(-1)
    expected_top1 = (lp.argmax(-1) == lq.argmax(-1)).mean()
    res = compare(ref, model, windows, batch_size=4, progress=False)
    assert res.kl == pytest.approx(per_token.mean(), rel=1e-4)
    assert res.kl_p99 == pytest.approx(np.percentile(per_token, 99), rel=1e-3)
    assert res.top1 == pytest.approx(expected_top1)
    assert kl_divergence(ref, model, windows, progress=False) == pytest.approx(res.kl, rel=1e-6)
    assert top1_agreement(ref, model, windows, progress=False) == res.top1


def test_kl_is_positive_and_grows_with_weight_noise(ref, windows):
    kls = [kl_divergence(ref, noisy(ref, s), windows, progress=False) for s in (0.02, 0.1, 0.5)]
    assert 0 < kls[0] < kls[1] < kls[2]


def test_perplexity_matches_manual_next_token_nll(ref, windows):
    lp = numpy_log_softmax(ref, windows)
    ids = windows.numpy()
    nll = -np.take_along_axis(lp[:, :-1], ids[:, 1:, None], -1)
    assert perplexity(ref, windows, batch_size=4, progress=False) == pytest.approx(
        np.exp(nll.mean()), rel=1e-5)


def test_compare_reports_both_perplexities_in_one_pass(ref, windows):
    model = noisy(ref, 0.3)
    res = compare(ref, model, windows, progress=False)
    assert isinstance(res, EvalResult)
    assert res.ppl == pytest.approx(perplexity(model, windows, progress=False), rel=1e-6)
    assert res.ref_ppl == pytest.approx(perplexity(ref, windows, progress=False), rel=1e-6)
    assert set(res.as_dict()) == {"kl", "kl_p99", "ppl", "ref_ppl", "top1", "n_tokens"}


def test_batches_as_iterable_or_tensor_give_the_same_result(ref, windows):
    model = noisy(ref, 0.3)
    a = compare(ref, model, windows, batch_size=5, progress=False)
    b = compare(ref, model, [windows[:2], windows[2:]], progress=False)
    assert a.kl == pytest.approx(b.kl, rel=1e-6) and a.ppl == pytest.approx(b.ppl, rel=1e-6)


def test_reference_cache_full_reproduces_direct_comparison(ref, windows):
    model = noisy(ref, 0.3)
    direct = compare(ref, model, windows, progress=False)
    cache = ReferenceCache(ref, windows, batch_size=4, progress=False)
    cached = compare(cache, model, progress=False)
    assert cached.kl == pytest.approx(direct.kl, rel=1e-5)
    assert cached.top1 == direct.top1 and cached.ref_ppl == pytest.approx(direct.ref_ppl)
    assert cache.nbytes == windows.numel() * VOCAB * 4
    half = compare(ReferenceCache(ref, windows, dtype=torch.float16, progress=False), model,
                   progress=False)
    assert half.kl == pytest.approx(direct.kl, rel=2e-2)


def test_reference_cache_top_k_is_a_lower_bound_exact_at_full_vocab(ref, windows):
    model = noisy(ref, 0.3)
    exact = compare(ref, model, windows, progress=False)
    small = compare(ReferenceCache(ref, windows, top_k=8, progress=False), model, progress=False)
    full = compare(ReferenceCache(ref, windows, top_k=VOCAB, progress=False), model,
                   progress=False)
    assert 0 < small.kl <= exact.kl + 1e-7
    assert full.kl == pytest.approx(exact.kl, rel=1e-4)
    assert small.top1 == exact.top1 and small.ref_ppl == pytest.approx(exact.ref_ppl)


def test_reference_cache_rejects_other_windows(ref, windows):
    cache = ReferenceCache(ref, windows, progress=False)
    with pytest.raises(ValueError, match="differ"):
        compare(cache, ref, windows.flip(0), progress=False)


def test_models_in_different_dtypes_compare_in_float32(ref, windows):
    res = compare(ref, copy.deepcopy(ref).to(torch.bfloat16), windows, progress=False)
    assert 0 < res.kl < 1e-2 and res.top1 > 0.9


@pytest.mark.parametrize("chunk", [1024, 7])  # 7: several log-softmax chunks per batch
def test_joint_sweep_gives_each_model_exactly_its_own_comparison(ref, windows, monkeypatch,
                                                                  chunk):
    monkeypatch.setattr(yaqa.evaluate, "_CHUNK", chunk)
    models = [noisy(ref, 0.3, seed=1), noisy(ref, 0.05, seed=2), ref, noisy(ref, 1.0, seed=3)]
    joint = compare_many(ref, models, windows, batch_size=4, progress=False)
    for model, res in zip(models, joint.results):
        alone = compare(ref, model, windows, batch_size=4, progress=False)
        assert res == alone  # bit for bit: the sweep shares the reference, nothing else
        lp, lq = numpy_log_softmax(ref, windows), numpy_log_softmax(model, windows)
        assert res.kl == pytest.approx((np.exp(lp) * (lp - lq)).sum(-1).mean(), rel=1e-4,
                                       abs=1e-9)
    assert joint.results[2].kl == 0.0 and joint.results[2].top1 == 1.0
    assert len(joint.seconds) == len(models) and joint.reference_seconds > 0


def test_joint_sweep_against_a_reference_cache(ref, windows):
    models = [noisy(ref, 0.3, seed=1), noisy(ref, 0.1, seed=2)]
    for cache in (ReferenceCache(ref, windows, batch_size=4, progress=False),
                  ReferenceCache(ref, windows, top_k=8, progress=False)):
        joint = compare_many(cache, models, progress=False).results
        assert joint == [compare(cache, m, progress=False) for m in models]


def test_joint_sweep_needs_a_model(ref, windows):
    with pytest.raises(ValueError, match="no models"):
        compare_many(ref, [], windows, progress=False)
