"""Data-driven shrinkage of Sketch-B factors: exact limits, an unbiased and consistent noise
estimate, the per-sequence statistic against brute force, and where the amounts are recorded."""

import copy
import json

import pytest
import torch

import yaqa
from yaqa.hessians import LayerAccumulator
from yaqa.hessians.shrinkage import (Shrinkage, estimate_amounts, ledoit_wolf_amount,
                                     noise_variance, shrink, shrink_layer)

from tiny_models import tiny_model


def _spd(n, g):
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T / n + 0.1 * torch.eye(n, dtype=torch.float64)


def test_shrink_is_exact_at_both_ends():
    g = torch.Generator().manual_seed(0)
    H, Hx = _spd(12, g), _spd(12, g)
    assert shrink(H, Hx, 0.0) is H                   # infinite data: the factor, untouched
    assert torch.equal(shrink(H, Hx, 1.0), Hx)       # no evidence: LDLQ's input factor
    assert torch.equal(shrink(H, None, 1.0), torch.eye(12, dtype=H.dtype))
    half = shrink(H, Hx, 0.5)  # in between: a convex mix at the target's trace
    assert torch.allclose(half.trace(), Hx.trace())
    s = Hx.trace() / H.trace()
    assert torch.allclose(half, 0.5 * s * H + 0.5 * Hx)


def test_settings_parse_and_reject_bad_values():
    assert Shrinkage.parse("auto").mode == "auto" and Shrinkage.parse("OFF").mode == "off"
    assert Shrinkage.parse(0.25) == Shrinkage("fixed", 0.25)
    assert Shrinkage.parse("0.5").amount == 0.5 and str(Shrinkage.parse("0.5")) == "0.5"
    for bad in ("sometimes", 1.5, -0.1, "nan"):
        with pytest.raises(ValueError, match="shrinkage"):
            Shrinkage.parse(bad)


def _terms(N, m, n, g, A):
    """Per-sequence terms S_b = D_b D_b^T, D_b = A Z_b: E[S_b] = n A A^T, all else known."""
    Z = torch.randn(N, A.shape[1], n, generator=g, dtype=torch.float64)
    D = A @ Z
    S = D @ D.transpose(1, 2)
    return S.mean(0), float(S.pow(2).sum((1, 2)).mean())


def test_noise_estimate_is_unbiased_and_the_amount_vanishes_with_data():
    g = torch.Generator().manual_seed(1)
    m, n = 8, 5
    A = torch.randn(m, m, generator=g, dtype=torch.float64)
    H = n * A @ A.T
    est, err = [], []
    for _ in range(400):
        Hhat, msq = _terms(10, m, n, g, A)
        est.append(noise_variance(Hhat, msq, 10))
        err.append(float((Hhat - H).pow(2).sum()))
    mean_est, mse = sum(est) / len(est), sum(err) / len(err)
    assert abs(mean_est / mse - 1) < 0.1, (mean_est, mse)

    amounts = []
    for N in (4, 16, 64, 256, 4096):
        Hhat, msq = _terms(N, m, n, g, A)
        amounts.append(ledoit_wolf_amount(Hhat, None, msq, N))
    assert all(a >= b for a, b in zip(amounts, amounts[1:])), amounts
    assert amounts[0] > 0.2 and amounts[-1] < 0.01, amounts
    assert ledoit_wolf_amount(Hhat, None, msq, 1) == 1.0  # one sequence: no evidence at all


def test_identical_sequences_mean_zero_noise_and_unchanged_factors():
    g = torch.Generator().manual_seed(2)
    S = _spd(6, g)
    msq = float(S.pow(2).sum())
    est = estimate_amounts(S, S, None, msq, 50)
    assert est["in"] == 0.0 and est["out"] == 0.0
    H_in, H_out, a_in, a_out = shrink_layer(S, S, None, est, Shrinkage("auto"))
    assert H_in is S and H_out is S and (a_in, a_out) == (0.0, 0.0)


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_per_sequence_statistic_matches_brute_force(route):
    g = torch.Generator().manual_seed(3)
    b, T, n, m = 5, 7, 12, 9
    acc = LayerAccumulator(n, m, device="cpu", dtype=torch.float64, route=route)
    acc.begin_pass("b")
    X, G = torch.randn(b, T, n, generator=g), torch.randn(b, T, m, generator=g)
    acc.update_backward(X.double(), G.double())
    acc.update_backward(X[:2].double(), G[:2].double())
    acc.end_pass()
    D = torch.cat([G, G[:2]]).double().transpose(1, 2) @ torch.cat([X, X[:2]]).double()
    want = (D @ D.transpose(1, 2)).pow(2).sum((1, 2)).mean()
    assert torch.allclose(acc.factors["seq_sq"].reshape(()), want, rtol=1e-10)
    assert torch.allclose(acc.factors["H_out"], (D @ D.transpose(1, 2)).mean(0))


def _calib(vocab, n=6, T=16, seed=0):
    return torch.randint(0, vocab, (n, T), generator=torch.Generator().manual_seed(seed))


def test_full_shrinkage_is_ldlq_bit_for_bit():
    torch.manual_seed(0)
    ref = tiny_model("llama", vocab=300)
    hs = yaqa.collect_hessians(ref, _calib(300), sketch="B", batch_size=3, progress=False)
    out = {}
    for method, shrinkage in (("ldlq", "off"), ("yaqa", 1.0), ("yaqa", "off")):
        q = copy.deepcopy(ref)
        yaqa.quantize(q, hs, method=method, quantizer="int3", group_size=32, incoherence=True,
                      shrinkage=shrinkage, progress=False)
        out[(method, shrinkage)] = q.state_dict()
    a, b = out[("ldlq", "off")], out[("yaqa", 1.0)]
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = out[("yaqa", "off")]
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("qweight"))


def test_amounts_are_recorded_in_hessian_files_and_yaqa_json(tmp_path):
    torch.manual_seed(0)
    ref = tiny_model("llama", vocab=300)
    calib = _calib(300, n=8)
    live = yaqa.collect_hessians(ref, calib, sketch="B", batch_size=4, out_dir=tmp_path / "h",
                                 progress=False)
    block = json.loads(__import__("safetensors").safe_open(
        str(tmp_path / "h" / "block_0000.safetensors"), "pt").metadata()["yaqa"])
    rel, info = next(iter(block["layers"].items()))
    est = info["shrinkage"]
    assert est["n_seqs"] == 8 and 0.0 <= est["in"] <= 1.0 and 0.0 < est["out"] <= 1.0
    loaded = yaqa.load_hessians(tmp_path / "h", ref)
    name = block["block_prefix"] + rel
    assert loaded[name].shrinkage == est
    assert live[name].shrinkage["out"] == pytest.approx(est["out"])

    q = copy.deepcopy(ref)
    report = yaqa.quantize(q, loaded, method="yaqa", quantizer="int4", group_size=32,
                           progress=False)
    assert report.shrinkage == "auto"
    layer = next(r for r in report.layers if r.name == name)
    assert (layer.shrink_in, layer.shrink_out) == (est["in"], est["out"])
    saved = yaqa.save_quantized(q, tmp_path / "q", info={"report": report.to_dict()})
    stored = json.loads((saved.path / "yaqa.json").read_text())
    assert json.dumps(stored).count('"shrink_out"') == len(report.layers)

    # Sketch A and ALS passes carry no statistic: "auto" leaves their factors alone
    hs_a = yaqa.collect_hessians(ref, calib, sketch="A", power_iters=1, batch_size=4,
                                 progress=False)
    assert all(h.shrinkage is None for h in hs_a.values())


def test_run_table_says_when_text_was_generated(monkeypatch):
    import yaqa.data
    from yaqa.cli import _data_line
    from yaqa.pipeline import RunConfig

    cfg = RunConfig(n_calib=32, calib_ctx=256, n_eval=16)
    assert "wikitext2-valid" in _data_line(cfg) and "generated" not in _data_line(cfg)
    monkeypatch.setattr(yaqa.data, "find_wikitext2", lambda: None)
    line = _data_line(cfg)
    assert line.count("text generated by the model itself") == 2 and "shrinkage: auto" in line


def test_recipe_carries_the_setting_and_keys_stored_work_by_it():
    from yaqa.recipe import RecipeError, get_recipe

    auto, half = get_recipe("yaqa-b"), get_recipe("yaqa-b", shrinkage=0.5)
    assert auto.shrinkage == "auto" and half.shrinkage == "0.5"
    assert auto.identity_hash() != half.identity_hash()
    assert get_recipe("yaqa", shrinkage="OFF").shrinkage == "off"
    assert get_recipe("ldlq", shrinkage="auto").shrinkage == "off"  # YAQA only
    with pytest.raises(RecipeError, match="shrinkage"):
        get_recipe("yaqa-b", shrinkage="lots")
