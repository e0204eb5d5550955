"""Hessian sketches against independent brute-force computations (float64, tiny random models)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import yaqa
from yaqa.hessians import HessianMetadataError, load_hessians, sample_labels
from yaqa.hessians import accumulators as acc_mod
from yaqa.models import get_adapter

from tiny_models import Interrupting, tiny_model

SEED = 7


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float64)


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 128, (6, 12), generator=g)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _linears(model):
    return get_adapter(model).named_linears(model)


def per_token_stats(model, ids, seed=SEED):
    """Inputs x_t and output gradients g_t of every linear, by plain autograd (no yaqa hooks)."""
    xs, ys, hooks = {}, {}, []
    for name, _, mod in _linears(model):
        def hook(m, args, out, name=name):
            xs[name] = args[0].detach()
            out.retain_grad()
            ys[name] = out
        hooks.append(mod.register_forward_hook(hook))
    emb = model.get_input_embeddings()
    hooks.append(emb.register_forward_hook(lambda m, a, out: out.requires_grad_()))
    try:
        logits = model(input_ids=ids, use_cache=False).logits
        labels = sample_labels(logits.detach(), range(ids.shape[0]), seed)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                        reduction="sum").backward()
    finally:
        for h in hooks:
            h.remove()
    return {n: (xs[n].reshape(-1, xs[n].shape[-1]), ys[n].grad.reshape(-1, ys[n].shape[-1]))
            for n in xs}


def per_sequence_weight_grads(model, ids, seed=SEED):
    """∇W_b for every linear and sequence, from autograd on the weights themselves."""
    lin = _linears(model)
    weights = [mod.weight for _, _, mod in lin]
    for w in weights:
        w.requires_grad_(True)
    grads = {name: [] for name, _, _ in lin}
    try:
        for i in range(ids.shape[0]):
            logits = model(input_ids=ids[i:i + 1], use_cache=False).logits
            labels = sample_labels(logits.detach(), [i], seed)
            loss = F.cross_entropy(logits[0], labels[0], reduction="sum")
            for (name, _, _), g in zip(lin, torch.autograd.grad(loss, weights)):
                grads[name].append(g)
    finally:
        for w in weights:
            w.requires_grad_(False)
    return grads


def nearest_kronecker(Fm: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """Van Loan–Pitsianis: best A ⊗ B (A m×m, B n×n) to an mn×mn matrix, via the SVD of its
    rearrangement R[(i,k), (j,l)] = F[(i,j), (k,l)], returned as the Kronecker product."""
    R = Fm.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    A = (S[0].sqrt() * U[:, 0]).reshape(m, m)
    B = (S[0].sqrt() * Vh[0]).reshape(n, n)
    return torch.kron(A, B)


# -- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("route", ["gram", "direct"])
def test_sketch_b_equals_factors_from_per_sequence_autograd_gradients(llama, ids, route):
    hs = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                               batch_size=4, route=route, progress=False)
    grads = per_sequence_weight_grads(llama, ids)
    assert set(hs) == set(grads)
    for name, gs in grads.items():
        h_in = sum(g.T @ g for g in gs) / len(gs)
        h_out = sum(g @ g.T for g in gs) / len(gs)
        assert rel(hs[name].H_in, h_in) < 1e-8, name
        assert rel(hs[name].H_out, h_out) < 1e-8, name
        assert hs[name].n_seqs == ids.shape[0] and hs[name].n_tokens == ids.numel()


def test_plain_hessian_equals_mean_of_input_outer_products(llama, ids):
    hs = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                               batch_size=4, progress=False)
    stats = per_token_stats(llama, ids)
    for name, (x, _) in stats.items():
        assert rel(hs[name].H_x, x.T @ x / x.shape[0]) < 1e-10, name


def test_symmetric_tiling_gives_the_same_factors(llama, ids, monkeypatch):
    ref = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                                batch_size=4, progress=False)
    monkeypatch.setattr(acc_mod, "_SYM_TILE", 24)  # 3 tiles for n=64, 5 for 128
    assert len(acc_mod.sym_tiles(128)) > 1
    tiled = yaqa.collect_hessians(llama, ids, sketch="B", seed=SEED, dtype=torch.float64,
                                  batch_size=4, progress=False)
    for name, h in ref.items():
        for k in ("H_in", "H_out", "H_x"):
            assert rel(getattr(tiled[name], k), getattr(h, k)) < 1e-12
            t = getattr(tiled[name], k)
            assert torch.equal(t, t.T)


def micro_llama(seed: int, n_seqs: int, ctx: int):
    """A Llama small enough that its full per-layer Fisher (mn x mn) can be formed."""
    model = tiny_model("llama", hidden=16, intermediate=32, heads=2, kv_heads=1, vocab=32,
                       dtype=torch.float64, seed=seed)
    ids = torch.randint(0, 32, (n_seqs, ctx), generator=torch.Generator().manual_seed(seed))
    return model, ids


def test_sketch_a_converges_to_nearest_kronecker_product_of_per_token_fisher():
    model, ids = micro_llama(seed=1, n_seqs=3, ctx=8)
    hs = yaqa.collect_hessians(model, ids, sketch="A", power_iters=50, seed=SEED,
                               dtype=torch.float64, batch_size=2, progress=False)
    for name, (x, g) in per_token_stats(model, ids).items():
        m, n = g.shape[1], x.shape[1]
        fisher = sum(torch.kron(gt[:, None] * gt, xt[:, None] * xt) for xt, gt in zip(x, g))
        fisher /= x.shape[0]
        best = nearest_kronecker(fisher, m, n)
        assert rel(torch.kron(hs[name].H_out, hs[name].H_in), best) < 1e-8, name


def test_sketch_a_first_half_iteration_matches_its_formula(llama, ids):
    hs = yaqa.collect_hessians(llama, ids, sketch="A", power_iters=1, seed=SEED,
                               dtype=torch.float64, batch_size=3, progress=False)
    for name, (x, g) in per_token_stats(llama, ids).items():
        h_x = x.T @ x / x.shape[0]
        w = ((x @ h_x) * x).sum(-1) / h_x.pow(2).sum()
        assert rel(hs[name].H_in, h_x) < 1e-10
        assert rel(hs[name].H_out, (g * w[:, None]).T @ g / x.shape[0]) < 1e-8, name


def test_sketch_b_power_iterations_converge_to_nearest_kronecker_of_sequence_fisher():
    model, ids = micro_llama(seed=2, n_seqs=4, ctx=6)
    hs = yaqa.collect_hessians(model, ids, sketch="B", power_iters=120, seed=SEED,
                               dtype=torch.float64, batch_size=4, progress=False)
    for name, gs in per_sequence_weight_grads(model, ids).items():
        v = torch.stack([g.reshape(-1) for g in gs])
        best = nearest_kronecker(v.T @ v / len(gs), *gs[0].shape)
        assert rel(torch.kron(hs[name].H_out, hs[name].H_in), best) < 1e-8, name


# -- determinism, blocks, memory options -------------------------------------------------------

def test_same_seed_gives_identical_factors_and_another_seed_differs(llama, ids):
    def run(seed, bs):
        return yaqa.collect_hessians(llama, ids, sketch="B", seed=seed, batch_size=bs,
                                     progress=False)
    a, b, c = run(SEED, 2), run(SEED, 2), run(SEED + 1, 2)
    for name in a:
        assert torch.equal(a[name].H_in, b[name].H_in)
        assert torch.equal(a[name].H_out, b[name].H_out)
    assert any(not torch.allclose(a[n].H_out, c[n].H_out) for n in a)
    d = run(SEED, 3)  # labels are seeded per sequence: micro-batch size does not matter
    assert all(rel(d[n].H_in, a[n].H_in) < 1e-5 for n in a)


def test_block_subsets_groups_and_activation_checkpointing_match_a_full_run(llama, ids):
    requires_grad = [p.requires_grad for p in llama.parameters()]
    full = yaqa.collect_hessians(llama, ids, sketch="A", power_iters=2, seed=SEED,
                                 dtype=torch.float64, batch_size=3, progress=False)
    one = yaqa.collect_hessians(llama, ids, sketch="A", power_iters=2, seed=SEED,
                                dtype=torch.float64, batch_size=3, blocks=[1], progress=False)
    assert set(one) == {n for n in full if ".layers.1." in n}
    grouped = yaqa.collect_hessians(llama, ids, sketch="A", power_iters=2, seed=SEED,
                                    dtype=torch.float64, batch_size=3, blocks_per_pass=1,
                                    gradient_checkpointing=True, progress=False)
    for name in full:
        for k in ("H_in", "H_out", "H_x"):
            if name in one:
                assert rel(getattr(one[name], k), getattr(full[name], k)) < 1e-12
            assert rel(getattr(grouped[name], k), getattr(full[name], k)) < 1e-12
    assert [p.requires_grad for p in llama.parameters()] == requires_grad  # restored


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi3", "mistral"])
def test_other_families_give_finite_symmetric_factors_of_the_right_shape(family):
    model = tiny_model(family, hidden=32, intermediate=64, layers=1, vocab=64)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    hs = yaqa.collect_hessians(model, ids, sketch="B", batch_size=2, progress=False)
    lin = _linears(model)
    assert set(hs) == {n for n, _, _ in lin}
    for name, _, mod in lin:
        h = hs[name]
        assert h.H_in.shape == (mod.in_features,) * 2 and h.H_out.shape == (mod.out_features,) * 2
        for t in (h.H_in, h.H_out, h.H_x):
            assert torch.isfinite(t).all() and torch.equal(t, t.T) and t.diagonal().gt(0).any()


# -- storage and resume ------------------------------------------------------------------------



@pytest.mark.parametrize("sketch,power_iters,stop_after", [("B", 1, 2), ("A", 2, 7)])
def test_interrupted_run_resumes_to_the_uninterrupted_result(llama, ids, tmp_path, sketch,
                                                             power_iters, stop_after):
    kw = dict(sketch=sketch, power_iters=power_iters, seed=SEED, dtype=torch.float64,
              progress=False, checkpoint_every=1)
    ref = yaqa.collect_hessians(llama, list(ids.split(2)), **kw)
    data = Interrupting(ids, 2, stop_after)
    with pytest.raises(KeyboardInterrupt):
        yaqa.collect_hessians(llama, data, out_dir=tmp_path, **kw)
    assert (tmp_path / "resume").exists() and not list(tmp_path.glob("block_*"))
    got = yaqa.collect_hessians(llama, data, out_dir=tmp_path, **kw)
    assert not (tmp_path / "resume").exists() or not any((tmp_path / "resume").iterdir())
    for name in ref:
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(got[name], k), getattr(ref[name], k)), (name, k)
    loaded = load_hessians(tmp_path, llama)
    for name in ref:
        assert torch.equal(loaded[name].H_in, ref[name].H_in)
        assert loaded[name].n_seqs == ids.shape[0]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["sketch"] == sketch and meta["seed"] == SEED and meta["data"]["n_seqs"] == 6
    assert meta["data"]["ctx"] == [ids.shape[1]] and meta["dtype"] == "float64"


def test_finished_directory_is_reused_without_recomputing(llama, ids, tmp_path, monkeypatch):
    first = yaqa.collect_hessians(llama, ids, sketch="B", out_dir=tmp_path, batch_size=3,
                                  progress=False)
    from yaqa.hessians import collect as collect_mod

    def boom(*a, **k):
        raise AssertionError("should not recompute")
    monkeypatch.setattr(collect_mod.HessianCollector, "step", boom)
    again = yaqa.collect_hessians(llama, ids, sketch="B", out_dir=tmp_path, batch_size=3,
                                  progress=False)
    assert all(torch.equal(again[n].H_out, first[n].H_out) for n in first)


def test_mismatched_request_model_or_data_is_refused_with_a_clear_message(llama, ids, tmp_path):
    yaqa.collect_hessians(llama, ids, sketch="B", seed=1, out_dir=tmp_path, batch_size=3,
                          progress=False)
    with pytest.raises(HessianMetadataError, match=r"sketch: stored 'B', now 'A'"):
        yaqa.collect_hessians(llama, ids, sketch="A", seed=1, out_dir=tmp_path, progress=False)
    with pytest.raises(HessianMetadataError, match=r"seed: stored 1, now 2"):
        yaqa.collect_hessians(llama, ids, sketch="B", seed=2, out_dir=tmp_path, progress=False)
    wider = tiny_model("llama", hidden=32, intermediate=128, heads=4, kv_heads=2)
    with pytest.raises(HessianMetadataError, match=r"expected \(32, 32\)"):
        load_hessians(tmp_path, wider)
    deeper = tiny_model("llama", layers=3)
    with pytest.raises(HessianMetadataError, match=r"lacks finished blocks \[2\]"):
        load_hessians(tmp_path, deeper)
    with pytest.raises(HessianMetadataError, match="not a yaqa Hessian directory"):
        load_hessians(tmp_path / "nothing", llama)
    other = tmp_path / "other"
    yaqa.collect_hessians(llama, ids, sketch="B", out_dir=other, overwrite=True, batch_size=3,
                          progress=False, blocks=[0])
    with pytest.raises(HessianMetadataError, match=r"lacks finished blocks \[1\]"):
        load_hessians(other, llama)


def test_resuming_with_different_data_is_refused(llama, ids, tmp_path):
    kw = dict(sketch="B", seed=SEED, progress=False, checkpoint_every=1)
    with pytest.raises(KeyboardInterrupt):
        yaqa.collect_hessians(llama, Interrupting(ids, 2, 2), out_dir=tmp_path, **kw)
    with pytest.raises(HessianMetadataError, match="data differs"):
        yaqa.collect_hessians(llama, list((ids + 1).split(2)), out_dir=tmp_path, **kw)


def test_one_shot_iterator_is_refused_for_multi_pass_sketches(llama, ids):
    with pytest.raises(ValueError, match="more than once"):
        yaqa.collect_hessians(llama, iter(ids.split(2)), sketch="A", progress=False)


def test_ctrl_c_saves_a_checkpoint_and_the_resumed_run_equals_an_uninterrupted_one(llama, ids,
                                                                                 tmp_path):
    import os
    import signal

    kw = dict(sketch="B", seed=SEED, dtype=torch.float64, progress=False, batch_size=2)
    ref = yaqa.collect_hessians(llama, ids, **kw)

    def sigint_after_two():  # the user presses Ctrl-C while the third micro-batch is read
        for i, mb in enumerate(ids.split(2)):
            if i == 2:
                os.kill(os.getpid(), signal.SIGINT)
            yield mb

    # No periodic checkpoints: only the interrupt itself can save the progress.
    with pytest.raises(KeyboardInterrupt, match="resume state saved"):
        yaqa.collect_hessians(llama, sigint_after_two(), out_dir=tmp_path, **kw)
    progress = json.loads(next((tmp_path / "resume").rglob("progress.json")).read_text())
    assert progress["cursor"] == 3
    got = yaqa.collect_hessians(llama, list(ids.split(2)), out_dir=tmp_path, **kw)
    for name in ref:
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(got[name], k), getattr(ref[name], k)), (name, k)
