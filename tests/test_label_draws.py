"""Several label draws per sequence (Sketch B): the factors and the shrinkage statistics against
brute-force per-draw gradients, one draw bit-identical to the single-draw path, and the seeds."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import yaqa
from yaqa.hessians import CollectConfig, LayerAccumulator, StaleHessiansError, load_hessians
from yaqa.hessians.labels import _draw, _probs, draw_seed, row_seeds, sequence_seed
from yaqa.models import get_adapter

from tiny_models import tiny_model

SEED = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", hidden=32, intermediate=48, dtype=torch.float64)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(1))


def rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def per_draw_grads(model, ids, draws, seed=SEED):
    """∇W_{b,d} per linear: ``{name: [[per draw] per sequence]}``, from autograd on the weights,
    one sequence and one draw at a time, labels drawn with each draw's own seed."""
    lin = get_adapter(model).named_linears(model)
    weights = [mod.weight for _, _, mod in lin]
    for w in weights:
        w.requires_grad_(True)
    out = {name: [] for name, _, _ in lin}
    gen = torch.Generator()
    try:
        for i in range(ids.shape[0]):
            for name in out:
                out[name].append([])
            for d in range(draws):
                logits = model(input_ids=ids[i:i + 1], use_cache=False).logits[0]
                labels = _draw(_probs(logits.detach()), draw_seed(seed, i, d), gen)
                loss = F.cross_entropy(logits, labels, reduction="sum")
                for (name, _, _), g in zip(lin, torch.autograd.grad(loss, weights)):
                    out[name][-1].append(g)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return out


def brute_force(model, ids, draws, seed=SEED):
    """Per linear: the per-sequence draw means S_in,b and S_out,b."""
    grads = per_draw_grads(model, ids, draws, seed)
    s_in = {n: [sum(g.T @ g for g in gs) / draws for gs in seqs] for n, seqs in grads.items()}
    s_out = {n: [sum(g @ g.T for g in gs) / draws for gs in seqs] for n, seqs in grads.items()}
    return s_in, s_out


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_several_draws_equal_brute_force_per_draw_gradients(llama, ids, route):
    draws = 3
    hs = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                               batch_size=2, route=route, label_draws=draws, progress=False)
    s_in, s_out = brute_force(llama, ids, draws)
    n = ids.shape[0]
    for name in s_in:
        h = hs[name]
        assert rel(h.H_in, sum(s_in[name]) / n) < 1e-8, name
        assert rel(h.H_out, sum(s_out[name]) / n) < 1e-8, name
        assert h.n_seqs == n and h.n_tokens == ids.numel()  # draws are not extra samples
        msq_in = sum(float(s.pow(2).sum()) for s in s_in[name]) / n
        msq_out = sum(float(s.pow(2).sum()) for s in s_out[name]) / n
        assert rel(h.shrinkage["mean_sq"], msq_in) < 1e-8, name
        assert rel(h.shrinkage["mean_sq_out"], msq_out) < 1e-8, name
        # with several draws the two sides' statistics really differ
        assert abs(msq_in - msq_out) > 1e-6 * msq_in, name


def test_h_x_does_not_depend_on_the_draws(llama, ids):
    one = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                                batch_size=2, progress=False)
    two = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                                batch_size=2, label_draws=2, progress=False)
    for name in one:
        assert rel(two[name].H_x, one[name].H_x) < 1e-12
        assert rel(two[name].H_in, one[name].H_in) > 1e-6  # more labels: other factors


@pytest.mark.parametrize("route", ["gram", "direct"])
def test_one_draw_is_bit_identical_to_the_single_draw_path(route):
    """label_draws=1 runs the code of a single draw: the accumulator's sums and statistic equal
    those of the plain update exactly (and of the same update with the option left out)."""
    g = torch.Generator().manual_seed(3)
    X, G = torch.randn(4, 6, 12, generator=g), torch.randn(4, 6, 9, generator=g)
    out = []
    for kw in ({}, {"label_draws": 1}):
        acc = LayerAccumulator(12, 9, device="cpu", route=route, **kw)
        acc.begin_pass("b")
        acc.update_backward(X, G)
        acc.end_pass()
        out.append(acc.factors)
    assert set(out[0]) == set(out[1]) == {"H_in", "H_out", "H_x", "seq_sq"}
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_draw_zero_keeps_the_per_sequence_seed_and_draws_are_batch_independent():
    for s in (0, 1, 7, 123456):
        assert draw_seed(SEED, s, 0) == sequence_seed(SEED, s)
    seeds = {draw_seed(SEED, s, k) for s in range(50) for k in range(4)}
    assert len(seeds) == 200  # every (sequence, draw) its own stream
    # the rows of a micro-batch take their seeds from (global index, draw) only
    assert row_seeds([3, 4], SEED, 2) == [draw_seed(SEED, 3, 0), draw_seed(SEED, 3, 1),
                                          draw_seed(SEED, 4, 0), draw_seed(SEED, 4, 1)]
    assert row_seeds([3, 4], SEED) == [sequence_seed(SEED, 3), sequence_seed(SEED, 4)]


def test_draws_do_not_depend_on_the_micro_batch_size(llama, ids):
    a = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                              batch_size=1, label_draws=2, progress=False)
    b = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                              batch_size=5, label_draws=2, progress=False)
    for name in a:
        assert rel(a[name].H_in, b[name].H_in) < 1e-10
        assert rel(a[name].H_out, b[name].H_out) < 1e-10


def test_bad_settings_are_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="Sketch B only"):
        CollectConfig(sketch="A", power_iters=1, label_draws=2)
    with pytest.raises(ValueError, match="integer >= 1"):
        CollectConfig(label_draws=0)
    with pytest.raises(ValueError, match="label_draws > 1"):
        CollectConfig(label_draws=2, boundary_cache="memory")


def test_power_iterations_average_the_draws_too(llama, ids):
    """A Sketch-B ALS step with draws: H_in ← mean_b mean_d ∇W^T Ĥ_out ∇W (and the mirror),
    the new H_in at the previous one's norm."""
    draws = 2
    hs = yaqa.collect_hessians(llama, ids, sketch="B", power_iters=2, seed=SEED,
                               dtype=torch.float64, batch_size=3, label_draws=draws,
                               progress=False)
    grads = per_draw_grads(llama, ids, draws)
    for name, seqs in grads.items():
        flat = [g for gs in seqs for g in gs]
        h_in0 = sum(g.T @ g for g in flat) / len(flat)
        h_out0 = sum(g @ g.T for g in flat) / len(flat)
        u_in, u_out = h_in0 / h_in0.pow(2).sum(), h_out0 / h_out0.pow(2).sum()
        h_in = sum(g.T @ u_out @ g for g in flat) / len(flat)
        h_out = sum(g @ u_in @ g.T for g in flat) / len(flat)
        h_in = h_in * h_in0.norm() / h_in.norm()
        assert rel(hs[name].H_in, h_in) < 1e-8, name
        assert rel(hs[name].H_out, h_out) < 1e-8, name
        assert hs[name].shrinkage is None  # the statistic describes a single pass only


def test_block_groups_and_resume_give_the_uninterrupted_single_group_factors(llama, ids,
                                                                            tmp_path):
    kw = dict(sketch="B", seed=SEED, dtype=torch.float64, batch_size=2, label_draws=2,
              progress=False)
    ref = yaqa.collect_hessians(llama, ids, **kw)
    grouped = yaqa.collect_hessians(llama, ids, blocks_per_pass=1, boundary_cache="auto", **kw)
    for name in ref:
        for k in ("H_in", "H_out", "H_x"):
            assert rel(getattr(grouped[name], k), getattr(ref[name], k)) < 1e-12, (name, k)

    from yaqa.hessians import HessianCollector

    real, calls = HessianCollector.step, []

    def flaky(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated interruption")
        return real(self, *a, **k)

    HessianCollector.step = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            yaqa.collect_hessians(llama, ids, out_dir=tmp_path, checkpoint_every=1, **kw)
    finally:
        HessianCollector.step = real
    assert (tmp_path / "resume").exists()
    got = yaqa.collect_hessians(llama, ids, out_dir=tmp_path, checkpoint_every=1, **kw)
    for name in ref:
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(got[name], k), getattr(ref[name], k)), (name, k)
        assert got[name].shrinkage == ref[name].shrinkage
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["label_draws"] == 2
    loaded = load_hessians(tmp_path, llama)
    assert all(loaded[n].shrinkage == ref[n].shrinkage for n in ref)


def test_stored_factors_of_another_draw_count_are_never_reused(llama, ids, tmp_path):
    kw = dict(sketch="B", seed=SEED, dtype=torch.float64, batch_size=5, progress=False)
    yaqa.collect_hessians(llama, ids, out_dir=tmp_path, **kw)
    assert "label_draws" not in json.loads((tmp_path / "meta.json").read_text())
    with pytest.raises(StaleHessiansError, match="label_draws"):
        yaqa.collect_hessians(llama, ids, out_dir=tmp_path, label_draws=2, **kw)
    yaqa.collect_hessians(llama, ids, out_dir=tmp_path, label_draws=2, overwrite=True, **kw)
    with pytest.raises(StaleHessiansError, match="label_draws"):
        yaqa.collect_hessians(llama, ids, out_dir=tmp_path, label_draws=3, **kw)
    with pytest.raises(StaleHessiansError, match="label_draws"):
        yaqa.collect_hessians(llama, ids, out_dir=tmp_path, **kw)


def test_recipes_carry_the_draw_count_into_their_identity_and_the_run_keys_it():
    from yaqa.pipeline import RunConfig, _hessian_plan, _hessians_key
    from yaqa.recipe import Recipe, RecipeError, get_recipe

    base = get_recipe("yaqa-b")
    assert "label_draws" not in base.identity()  # one draw: every earlier identity holds
    two = get_recipe("yaqa-b", label_draws=2)
    assert two.label_draws == 2 and two.identity()["label_draws"] == 2
    assert two.identity_hash() != base.identity_hash()
    # a run passes one value to every method: only Sketch B takes it
    assert get_recipe("ldlq", label_draws=4).label_draws == 1
    assert get_recipe("yaqa-a", label_draws=4).label_draws == 1
    with pytest.raises(RecipeError, match="Sketch B only"):
        Recipe("x", "yaqa", "A", power_iters=2, label_draws=2)
    cfg = RunConfig(label_draws=3)
    recipes = [cfg.recipe(m, 4) for m in ("ldlq", "yaqa-b")]
    assert [r.label_draws for r in recipes] == [1, 3]
    plan = _hessian_plan(recipes)
    assert list(plan) == ["B1d3"]  # its own Hessian directory, LDLQ's H_x from the same pass
    assert {_hessians_key(plan, r) for r in recipes} == {"B1d3"}
    assert list(_hessian_plan([RunConfig().recipe("yaqa-b", 4)])) == ["B1"]  # as before


def test_cli_collects_with_label_draws_and_refuses_them_for_sketch_a(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    from yaqa.cli import main

    tok = tiny_tokenizer("the quick brown fox jumps over the lazy dog " * 20)
    model = tiny_model("llama", hidden=32, intermediate=48, vocab=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    common = ["-q", "hessians", "--model", str(tmp_path / "m"), "--device", "cpu", "--ctx", "8",
              "--n-seqs", "3", "--calib", "generated"]
    assert main([*common, "--sketch", "A", "--label-draws", "2",
                 "--out", str(tmp_path / "a")]) == 2
    assert "Sketch B only" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    assert main([*common, "--label-draws", "2", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["label_draws"] == 2 and meta["data"]["n_seqs"] == 3
    hs = load_hessians(tmp_path / "b")
    assert all("mean_sq_out" in h.shrinkage for h in hs.values())
