"""Post-rounding refinement: monotone, a local optimum under single ±1 steps, exact bookkeeping."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from yaqa.quantizers import IntQuantizer, make_quantizer
from yaqa.rounding import proxy_loss, refine_codes, refine_factor, round_weight
from yaqa.rounding import refine as refine_mod

DEVICE = os.environ.get("YAQA_TEST_DEVICE", "cpu")
F64 = dict(dtype=torch.float64)


def random_pd(k: int, gen: torch.Generator, coupling: float = 1.0) -> torch.Tensor:
    """A positive-definite factor with off-diagonal coupling, unit mean diagonal."""
    X = torch.randn(k, k + 1, generator=gen, **F64)
    H = coupling * (X @ X.T) / (k + 1) + 0.05 * torch.eye(k, **F64)
    return H / torch.diagonal(H).mean()


def exact_loss(W, grid, codes, Hi, Ho) -> float:
    d = W.double() - grid.dequantize(codes).double()
    return proxy_loss(d, Hi.double(), None if Ho is None else Ho.double())


def tiny_problem(seed: int, m: int, n: int, bits: int = 2, symmetric: bool = False):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    Hi, Ho = random_pd(n, g), random_pd(m, g)
    grid = IntQuantizer(bits=bits, group_size=n if n % 2 else 2, symmetric=symmetric).fit(W)
    _, codes = grid.round_all(W)
    return W, grid, codes, Hi, Ho


def assert_single_step_optimum(W, grid, q, Hi, Ho, loss):
    """Brute force: no single ±1 step (within the code range) lowers the exact loss."""
    for i, j, d in itertools.product(range(q.shape[0]), range(q.shape[1]), (-1, 1)):
        t = int(q[i, j]) + d
        if not 0 <= t <= grid.maxq:
            continue
        q2 = q.clone()
        q2[i, j] = t
        assert exact_loss(W, grid, q2, Hi, Ho) >= loss - 1e-5 * loss


@pytest.mark.parametrize("seed,shape,sym", [(0, (2, 3), False), (1, (3, 4), False),
                                            (2, (3, 4), True), (3, (4, 6), False)])
def test_refinement_converges_to_a_single_step_local_optimum(seed, shape, sym):
    W, grid, codes, Hi, Ho = tiny_problem(seed, *shape, symmetric=sym)
    before = exact_loss(W, grid, codes, Hi, Ho)
    q, st = refine_codes(W, codes, grid, Hi, Ho, rounds=1000)
    after = exact_loss(W, grid, q, Hi, Ho)
    assert after <= before + 1e-12
    assert st.loss_after == pytest.approx(after, rel=1e-5, abs=1e-9)
    assert st.loss_before == pytest.approx(before, rel=1e-5, abs=1e-9)
    assert_single_step_optimum(W, grid, q, Hi, Ho, after)
    assert int(q.min()) >= 0 and int(q.max()) <= grid.maxq
    assert q.dtype == torch.int32


def test_loss_never_increases_round_by_round():
    W, grid, codes, Hi, Ho = tiny_problem(4, 6, 8, bits=2)
    prev, q = exact_loss(W, grid, codes, Hi, Ho), codes
    improved = False
    for _ in range(30):
        q, st = refine_codes(W, q, grid, Hi, Ho, rounds=1)
        cur = exact_loss(W, grid, q, Hi, Ho)
        assert cur <= prev + 1e-9 * prev
        improved |= cur < prev
        prev = cur
    assert improved  # RTN codes under coupled factors are never a local optimum here


def test_incremental_g_equals_recomputed():
    """G is updated by subtracting H_out E H_in per accepted batch; after many batches it must
    still equal H_out Δ H_in computed from scratch on the final codes."""
    W, grid, codes, Hi, Ho = tiny_problem(5, 8, 12, bits=2)
    for ho in (Ho, None):
        st = refine_mod._search(W, codes, grid, Hi, ho, rounds=6)
        assert st.rounds >= 2
        delta = W - grid.dequantize(st.codes)
        fresh = (delta if ho is None else ho.float() @ delta) @ Hi.float()
        torch.testing.assert_close(st.G, fresh, rtol=1e-4, atol=1e-5)


def test_refined_codes_dequantize_as_a_loader_would():
    g = torch.Generator().manual_seed(6)
    m, n = 24, 32
    W = torch.randn(m, n, generator=g)
    Hi, Ho = random_pd(n, g), random_pd(m, g)
    q = IntQuantizer(bits=3, group_size=8)
    r = round_weight(W, Hi, Ho, q, "yaqa", incoherence=3, refine=4, return_details=True)
    assert r.refine is not None and r.refine.rounds > 0
    grid = q.grid_from_state((m, n), r.grid.state_dict())
    What = r.transform.inverse_weight(grid.dequantize(r.codes))
    torch.testing.assert_close(What, r.weight, rtol=0, atol=1e-6)
    assert r.weight.shape == W.shape


def test_round_weight_refinement_lowers_the_damped_proxy():
    g = torch.Generator().manual_seed(7)
    m, n = 32, 48
    W = torch.randn(m, n, generator=g)
    Hi, Ho = random_pd(n, g), random_pd(m, g)
    for method, ho in (("ldlq", None), ("yaqa", Ho)):
        base = round_weight(W, Hi, ho, "int3", method, incoherence=True, group_size=16,
                            return_details=True)
        ref = round_weight(W, Hi, ho, "int3", method, incoherence=True, group_size=16,
                           return_details=True, refine=20)
        st = ref.refine
        assert st.loss_after < st.loss_before
        # the stats' objective is the damped one in the rotated basis: recompute it
        tf = ref.transform
        Wt = tf.weight(W)
        Hid = refine_factor(tf.factor_in(Hi.double() / torch.diagonal(Hi).mean()), ref.sigma_in)
        Hod = None if ho is None else refine_factor(
            tf.factor_out(Ho.double() / torch.diagonal(Ho).mean()), ref.sigma_out)
        assert exact_loss(Wt, ref.grid, ref.codes, Hid, Hod) == pytest.approx(st.loss_after,
                                                                              rel=1e-4)
        assert exact_loss(Wt, base.grid, base.codes, Hid, Hod) == pytest.approx(
            st.loss_before, rel=1e-4)


@pytest.mark.parametrize("method", ["ldlq", "yaqa"])
def test_refine_zero_is_bit_identical_to_no_refinement(method):
    g = torch.Generator().manual_seed(8)
    W = torch.randn(40, 64, generator=g)
    Hi, Ho = random_pd(64, g), random_pd(40, g)
    ho = Ho if method == "yaqa" else None
    a = round_weight(W, Hi, ho, "int4", method, incoherence=True, group_size=32,
                   return_details=True)
    b = round_weight(W, Hi, ho, "int4", method, incoherence=True, group_size=32,
                   return_details=True, refine=0)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.weight, b.weight)
    assert a.proxy_loss == b.proxy_loss and b.refine is None


@pytest.mark.parametrize("incoherence", [False, 4])
def test_yaqa_with_identity_output_factor_refines_as_ldlq(incoherence):
    g = torch.Generator().manual_seed(9)
    m, n = 64, 128
    W = torch.randn(m, n, generator=g).to(DEVICE)
    Hi = random_pd(n, g).to(DEVICE)
    q = IntQuantizer(bits=3, group_size=16)
    a = round_weight(W, Hi, None, q, "ldlq", incoherence=incoherence, refine=6,
                     return_details=True)
    b = round_weight(W, Hi, torch.eye(m, device=DEVICE), q, "yaqa", incoherence=incoherence,
                     refine=6, return_details=True)
    assert a.refine.rounds > 0
    assert torch.equal(a.codes, b.codes)
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("spec", ["trellis2", "nvfp4"])
def test_refinement_rejects_non_integer_grids(spec):
    g = torch.Generator().manual_seed(10)
    W = torch.randn(16, 64, generator=g)
    Hi = random_pd(64, g)
    with pytest.raises(ValueError, match="int-k"):
        round_weight(W, Hi, None, spec, "ldlq", refine=2)
    grid = make_quantizer(spec).fit(W)
    with pytest.raises(ValueError, match="int-k"):
        refine_codes(W, torch.zeros(16, 64, dtype=torch.int32), grid, Hi, None, 2)


def test_refinement_rejects_rtn_and_negative_rounds():
    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="RTN"):
        round_weight(W, None, None, "int4", "rtn", refine=1)
    with pytest.raises(ValueError, match="refine must be an integer >= 0"):
        round_weight(W, torch.eye(16), None, "int4", "ldlq", refine=-1)


def _model_hessians(model):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(11)
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            m, n = mod.weight.shape
            Hi, Ho = random_pd(n, g).float(), random_pd(m, g).float()
            out[name] = SimpleNamespace(H_in=Hi, H_x=Hi, H_out=Ho, shrinkage=None)
    return out


@pytest.mark.parametrize("method", ["ldlq", "yaqa-b"])
def test_quantize_applies_refinement_per_layer_and_reports_it(method):
    from tiny_models import tiny_model

    from yaqa import quantize

    hs = _model_hessians(tiny_model("llama", hidden=32, intermediate=64, layers=1))
    reports = {}
    for rounds in (0, 4):
        model = tiny_model("llama", hidden=32, intermediate=64, layers=1)
        reports[rounds] = quantize(model, hs, method=method, quantizer="int3", group_size=16,
                                   shrinkage="off", refine=rounds, progress=False)
    plain, refined = reports[0].layers, reports[4].layers
    assert all(lr.refine_reduction is None for lr in plain)
    assert all(lr.refine_reduction > 0 and lr.refine_seconds >= 0 for lr in refined)
    # the proxy (undamped, original basis) follows the damped one down on these factors
    assert sum(r.proxy_loss for r in refined) < sum(p.proxy_loss for p in plain)


def test_cli_refine_flag_reaches_the_recipe():
    from yaqa.cli import build_parser, recipe_from_args

    args = build_parser().parse_args(["quantize", "--method", "yaqa-b", "--refine", "8",
                                      "--out", "x"])
    assert recipe_from_args(args, args.method, args.bits).refine == 8
    args = build_parser().parse_args(["run", "--refine", "3"])
    assert args.refine == 3


def test_run_and_cli_default_to_the_device_rule_and_keep_asked_rounds():
    from yaqa.cli import build_parser, recipe_from_args
    from yaqa.pipeline import RunConfig, _refine_setting

    gpu = RunConfig(device="cuda", methods=("rtn", "ldlq", "yaqa-b"))
    assert [gpu.recipe(m, 4).refine for m in gpu.methods] == [0, 0, 32]
    assert _refine_setting(gpu) == "refined: yaqa-b 32 rounds (the GPU default)"
    assert RunConfig(device="cuda", refine=0).recipe("yaqa-b", 4).refine == 0
    asked = RunConfig(device="cpu", refine=3, methods=("ldlq", "yaqa-b"))
    assert _refine_setting(asked) == "refined: ldlq 3 rounds, yaqa-b 3 rounds"
    assert RunConfig(device="cpu").recipe("yaqa-b", 4).refine == 0
    assert _refine_setting(RunConfig(device="cpu")) == ""
    for argv, rounds in ((["--device", "cuda"], 32), (["--device", "cuda", "--refine", "0"], 0),
                         (["--device", "cpu"], 0)):
        args = build_parser().parse_args(["quantize", "--method", "yaqa-b", "--out", "x", *argv])
        assert recipe_from_args(args, args.method, args.bits).refine == rounds, argv


@pytest.mark.parametrize("method, refined", [("yaqa-b", True), ("ldlq", False)])
def test_quantize_resolves_the_default_on_the_rounding_device(monkeypatch, method, refined):
    """refine=None takes default_refine's rounds for the device that rounds (here the model's
    CPU, given rounds by patching the table); an explicit 0 stays off."""
    from tiny_models import tiny_model

    import yaqa.recipe
    from yaqa import quantize

    monkeypatch.setitem(yaqa.recipe.AUTO_REFINE_ROUNDS, "cpu", 4)
    hs = _model_hessians(tiny_model("llama", hidden=32, intermediate=64, layers=1))
    for refine, expect in ((None, refined), (0, False)):
        model = tiny_model("llama", hidden=32, intermediate=64, layers=1)
        rep = quantize(model, hs, method=method, quantizer="int3", group_size=16,
                       shrinkage="off", refine=refine, progress=False)
        assert all((lr.refine_reduction is not None) == expect for lr in rep.layers), refine


def test_cli_refuses_refine_for_rtn_before_loading_anything(tmp_path, capsys):
    from yaqa.cli import main

    out = tmp_path / "ckpt"
    rc = main(["quantize", "--method", "rtn", "--refine", "8", "--model", str(tmp_path / "none"),
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--refine applies to LDLQ and YAQA" in err and "rtn" in err
    assert not out.exists()


def test_quality_bench_parses_refine_values_and_tables_refined_rows():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    spec = importlib.util.spec_from_file_location("bench_quality", path)
    bq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bq)
    assert bq._refines("0,8,8") == [0, 8]
    with pytest.raises(SystemExit):
        bq._refines("-1")
    rows = [{"method": m, "n_calib": 64, "ctx": 256, "bits": 3, "kl": kl, "refine": ref,
             "shrinkage": "auto" if m == "yaqa-b" else None, "label_draws": None, "extra": {}}
            for m, ref, kl in (("ldlq", 0, 0.4), ("yaqa-b", 0, 0.3), ("ldlq", 8, 0.35),
                               ("yaqa-b", 8, 0.28))]
    meta = {"machine": "m", "command": "c", "eval": "e", "quantizer": "q", "total_seconds": 1}
    lines = bq.sweep_table(rows, [("auto", 1)], meta)
    assert "| 64 x 256 | 3 | off | 0.4 | 0.3 (0.750) |" in lines
    assert "| 64 x 256 | 3 | 8 | 0.35 | 0.28 (0.800 / 0.700) |" in lines


def coupled_problem(seed: int, m: int, n: int, rho: float):
    """Output factor ``|rho| v vᵀ + (1 - |rho|) R`` (R random positive definite, v all ones, or
    alternating signs for rho < 0): every pair of rows coupled by about ``±rho``, so steps
    in different rows interact strongly."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g)
    Hi = random_pd(n, g)
    v = torch.ones(m, **F64)
    if rho < 0:
        v[1::2] = -1.0
    Ho = abs(rho) * torch.outer(v, v) + (1 - abs(rho)) * random_pd(m, g)
    Ho = Ho / torch.diagonal(Ho).mean()
    grid = IntQuantizer(bits=2, group_size=n).fit(W)
    _, codes = grid.round_all(W)
    return W, grid, codes, Hi, Ho


@pytest.mark.parametrize("seed,shape,rho", [(20, (4, 3), 0.9), (21, (5, 4), 0.95),
                                            (22, (3, 5), -0.4)])
def test_strongly_row_coupled_output_factor_reaches_a_local_optimum(seed, shape, rho):
    W, grid, codes, Hi, Ho = coupled_problem(seed, *shape, rho)
    prev, q = exact_loss(W, grid, codes, Hi, Ho), codes
    for _ in range(200):  # one batch at a time: never up
        q, st = refine_codes(W, q, grid, Hi, Ho, rounds=1)
        cur = exact_loss(W, grid, q, Hi, Ho)
        assert cur <= prev + 1e-9 * prev
        if st.rounds == 0:
            break
        prev = cur
    else:
        pytest.fail("refinement did not converge")
    assert_single_step_optimum(W, grid, q, Hi, Ho, cur)


def test_coupled_batch_change_is_exact_and_each_join_improves():
    """The k x k pairwise model predicts the batch's loss change exactly, and with several
    steps joined, dropping the last one joined would not have been better."""
    W, grid, codes, Hi, Ho = coupled_problem(23, 24, 16, 0.3)
    Hi32, Ho32 = Hi.float(), Ho.float()
    S = grid.scale.float().repeat_interleave(grid.group_size, dim=1)
    curv = S * S * (torch.diagonal(Ho32)[:, None] * torch.diagonal(Hi32)[None, :])
    G = Ho32 @ (W - grid.dequantize(codes)) @ Hi32
    batch = refine_mod._coupled_batch(G, codes.clone(), S, curv, Hi32, Ho32, grid.maxq)
    assert batch is not None and batch.rows.numel() >= 2
    assert batch.rows.unique().numel() == batch.rows.numel()  # at most one step per row
    q = codes.clone()
    q[batch.rows, batch.cols] += batch.steps
    before, after = exact_loss(W, grid, codes, Hi, Ho), exact_loss(W, grid, q, Hi, Ho)
    assert after - before == pytest.approx(batch.change, rel=1e-4)
    assert batch.change < 0
    q_less = q.clone()
    q_less[batch.rows[-1], batch.cols[-1]] -= batch.steps[-1]
    assert exact_loss(W, grid, q_less, Hi, Ho) > after


def test_coupled_batches_respect_the_candidate_cap(monkeypatch):
    W, grid, codes, Hi, Ho = coupled_problem(24, 40, 16, 0.2)
    monkeypatch.setattr(refine_mod, "CANDIDATES", 3)
    st = refine_mod._search(W, codes, grid, Hi, Ho, rounds=5)
    assert 0 < st.changed <= 3 * st.rounds
    assert exact_loss(W, grid, st.codes, Hi, Ho) < exact_loss(W, grid, codes, Hi, Ho)


@pytest.mark.parametrize("bad", [2.5, True, "3", -1, float("nan")])
def test_refine_values_are_checked_alike_everywhere(bad):
    from yaqa.recipe import RecipeError, get_recipe

    W = torch.randn(8, 16)
    with pytest.raises(ValueError, match="refine must be an integer"):
        round_weight(W, torch.eye(16), None, "int4", "ldlq", group_size=8, refine=bad)
    for name in ("yaqa-b", "rtn"):  # checked even where refine does not apply
        with pytest.raises(RecipeError, match="refine must be an integer"):
            get_recipe(name, refine=bad)


def test_library_refuses_refine_where_nothing_is_refined(tmp_path):
    from tiny_models import tiny_model

    from yaqa import quantize
    from yaqa.pipeline import RunConfig, run_pipeline

    with pytest.raises(ValueError, match="nothing to refine"):
        quantize(tiny_model("llama", layers=1), None, method="rtn", refine=3, progress=False)
    cfg = RunConfig(methods=("rtn",), refine=3, out_dir=str(tmp_path / "run"),
                    model=str(tmp_path / "no-model"))
    with pytest.raises(ValueError, match="nothing to refine"):
        run_pipeline(cfg)  # before the model is loaded (its path does not exist)


def test_recipe_output_tiles_reach_the_rounding():
    """A YAQA recipe's block_size_out is the tile height round_weight uses: quantize gives the
    codes of a direct round_weight call with it, and not those of square tiles."""
    from tiny_models import tiny_model

    from yaqa import quantize
    from yaqa.recipe import get_recipe

    hs = _model_hessians(tiny_model("llama", hidden=32, intermediate=64, layers=1))
    q = make_quantizer("int3", group_size=16)
    name = "model.layers.0.mlp.down_proj"
    codes = {}
    for bo in (1, 8):
        model = tiny_model("llama", hidden=32, intermediate=64, layers=1)
        W = model.get_submodule(name).weight.detach().float().clone()
        recipe = get_recipe("yaqa-b", quantizer="int3", group_size=16, incoherence=False,
                            shrinkage="off", block_size=8, block_size_out=bo)
        quantize(model, hs, recipe=recipe, progress=False)
        codes[bo] = model.get_submodule(name).codes()
        direct = round_weight(W, hs[name].H_in, hs[name].H_out, q, method="yaqa",
                              incoherence=False, block_size=8, block_size_out=bo,
                              return_details=True)
        assert torch.equal(codes[bo].to(direct.codes.dtype), direct.codes), bo
    assert not torch.equal(codes[1], codes[8])


def test_resume_across_devices_names_the_refine_that_matches(monkeypatch, tmp_path):
    """A run whose default refined (the GPU rule, patched onto the CPU here) and its resume under
    the CPU rule differ only in recipe.refine: the error says so and how to match it."""
    from tiny_models import tiny_model

    import yaqa.recipe
    from yaqa import quantize
    from yaqa.store import StaleWorkError

    hs = _model_hessians(tiny_model("llama", hidden=32, intermediate=64, layers=1))
    kw = dict(method="yaqa-b", quantizer="int3", group_size=16, shrinkage="off", progress=False,
              work_dir=tmp_path / "work")
    with monkeypatch.context() as mp:
        mp.setitem(yaqa.recipe.AUTO_REFINE_ROUNDS, "cpu", 4)
        quantize(tiny_model("llama", hidden=32, intermediate=64, layers=1), hs, **kw)
    with pytest.raises(StaleWorkError, match=r"pass --refine 4 \(refine=4\) to resume"):
        quantize(tiny_model("llama", hidden=32, intermediate=64, layers=1), hs, **kw)
    rep = quantize(tiny_model("llama", hidden=32, intermediate=64, layers=1), hs, refine=4, **kw)
    assert rep.resumed_blocks == 1
    with pytest.raises(StaleWorkError) as e:  # another difference too: no refine hint
        quantize(tiny_model("llama", hidden=32, intermediate=64, layers=1), hs,
                 **{**kw, "quantizer": "int4"})
    assert "--refine" not in str(e.value)


def test_run_with_only_rtn_is_not_refused_for_the_refine_default(tmp_path):
    from yaqa.pipeline import RunConfig, run_pipeline

    cfg = RunConfig(model=str(tmp_path / "no-such-model"), methods=("rtn",), device="cpu",
                    out_dir=str(tmp_path / "out"), progress=False)
    with pytest.raises(Exception) as e:
        run_pipeline(cfg)
    assert "no-such-model" in str(e.value) and "refine" not in str(e.value)
