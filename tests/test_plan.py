"""The memory plan: estimates against measured peaks, the choice of blocks per pass, refusals."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers

import yaqa
from yaqa.plan import (GiB, CollectionRequest, LiveTensorBytes, ModelShape, PlanError,
                       collection_seconds, collection_terms, make_plan, oom_message,
                       rounding_terms, timed_warmup)
from yaqa.quantize_model import quantize

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402


def test_live_tensor_bytes_counts_new_storage_once_and_frees_it():
    w = torch.zeros(1000)
    with LiveTensorBytes([w]) as lv:
        a = torch.ones(2000)          # 8000 bytes
        v = w.view(10, 100).t()        # a view of an existing storage: nothing new
        b = a * 2                      # 8000 more
        del a, b
        c = torch.ones(500)            # the peak stays at 16000 + baseline
        del v, c
    assert lv.baseline == 4000
    assert lv.peak_bytes == 4000 + 16000


@pytest.mark.parametrize("cfg", [
    dict(hidden=64, intermediate=128, layers=2, vocab=128, batch=4, ctx=32, dtype=torch.float32,
         hx=True, iters=1, bpp=None),
    dict(hidden=96, intermediate=256, layers=3, vocab=512, batch=2, ctx=40, dtype=torch.float32,
         hx=False, iters=1, bpp=2),
    dict(hidden=64, intermediate=192, layers=2, vocab=256, batch=2, ctx=24, dtype=torch.bfloat16,
         hx=True, iters=2, bpp=1),
    # several label draws: every micro-batch runs as batch · draws rows
    dict(hidden=64, intermediate=128, layers=2, vocab=256, batch=2, ctx=32, dtype=torch.float32,
         hx=True, iters=1, bpp=None, draws=3),
])
def test_collection_estimate_is_within_20_percent_of_the_measured_peak(cfg):
    model = tiny_model("llama", hidden=cfg["hidden"], intermediate=cfg["intermediate"],
                       layers=cfg["layers"], vocab=cfg["vocab"], dtype=cfg["dtype"])
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["ctx"]),
                        generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes(list(model.parameters()) + [ids]) as lv:
        yaqa.collect_hessians(model, ids, sketch="B", power_iters=cfg["iters"],
                              batch_size=cfg["batch"], collect_hx=cfg["hx"],
                              blocks_per_pass=cfg["bpp"], progress=False,
                              label_draws=cfg.get("draws", 1))
    req = CollectionRequest(power_iters=cfg["iters"], n_seqs=ids.shape[0], ctx=cfg["ctx"],
                            batch_size=cfg["batch"], collect_hx=cfg["hx"],
                            label_draws=cfg.get("draws", 1), keep_factors=True)
    plan = make_plan(ModelShape.from_model(model), req, budget_bytes=1 << 40, device="cpu",
                     blocks_per_pass=cfg["bpp"])
    # collect_hessians keeps every finished group's factors: the last group peaks with the
    # earlier groups' results alive beside it
    kept = sum(plan.factor_bytes_per_block for g in plan.groups[:-1] for _ in g)
    est = plan.collection_peak_bytes
    est_last = sum(collection_terms(ModelShape.from_model(model), req, plan.groups[-1]).values())
    est = max(est, est_last + kept)
    assert abs(est - lv.peak_bytes) <= 0.2 * lv.peak_bytes, (est, lv.peak_bytes)


def test_rounding_estimate_is_within_20_percent_of_the_measured_peak():
    model = tiny_model("llama", hidden=128, intermediate=512, layers=1, vocab=128)
    ids = torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    hs = yaqa.collect_hessians(model, ids, sketch="B", batch_size=2, progress=False)
    factors = [t for h in hs.values() for t in (h.H_in, h.H_out, h.H_x)]
    with LiveTensorBytes(list(model.parameters()) + factors) as lv:
        quantize(model, hs, method="yaqa", quantizer="int4", group_size=32, progress=False)
    measured = lv.peak_bytes - LiveTensorBytes(factors).baseline  # the factors are streamed
    est = sum(rounding_terms(ModelShape.from_model(tiny_model("llama", hidden=128,
                                                              intermediate=512, layers=1,
                                                              vocab=128))).values())
    assert abs(est - measured) <= 0.2 * measured, (est, measured)


def llama8b_shape() -> ModelShape:
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256)
    return ModelShape.from_config(cfg, torch.bfloat16)  # meta device: nothing is allocated


def test_plan_for_an_8b_model_splits_the_blocks_to_fit_80_gb():
    shape = llama8b_shape()
    assert shape.n_blocks == 32 and len(shape.linears) == 7
    assert 15e9 < shape.param_bytes < 17e9
    req = CollectionRequest(n_seqs=1024, ctx=2048, batch_size=2)
    plan = make_plan(shape, req, budget_bytes=80 * 10**9, margin=0.1)
    assert 4.2e9 < plan.factor_bytes_per_block < 4.4e9  # q..down: H_in, H_x, H_out in fp32
    assert 1 < plan.blocks_per_pass < 32
    assert plan.collection_peak_bytes <= 72 * 10**9
    assert sum(len(g) for g in plan.groups) == 32
    # one pass fewer would not fit (group sizes are ceil(32 / passes): 32, 16, 11, 8, ...)
    fewer = -(-32 // (len(plan.groups) - 1))
    bigger = make_plan(shape, req, budget_bytes=10**15, blocks_per_pass=fewer)
    assert bigger.collection_peak_bytes > plan.limit_bytes
    assert "pass(es)" in plan.summary()


def test_plan_that_cannot_fit_says_what_to_lower():
    req = CollectionRequest(n_seqs=64, ctx=8192, batch_size=16)
    with pytest.raises(PlanError, match="activations.*batch-size"):
        make_plan(llama8b_shape(), req, budget_bytes=80 * 10**9)
    msg = oom_message(torch.OutOfMemoryError("CUDA out of memory"),
                      make_plan(llama8b_shape(), CollectionRequest(ctx=2048, batch_size=1),
                                budget_bytes=80 * 10**9), "collection")
    assert "--blocks-per-pass" in msg


def test_a_plan_forced_into_several_passes_gives_the_factors_of_one_pass():
    model = tiny_model("llama", hidden=32, intermediate=64, layers=3, vocab=64,
                       dtype=torch.float64)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    req = CollectionRequest(n_seqs=4, ctx=8, batch_size=2, acc_bytes=8)
    shape = ModelShape.from_model(model)
    one = make_plan(shape, req, budget_bytes=1 << 40, device="cpu")
    assert one.blocks_per_pass == 3
    tight = one.collection_peak_bytes - one.collection_terms["accumulators"] // 3
    plan = make_plan(shape, req, budget_bytes=int(tight / 0.9) + 1, device="cpu")
    assert len(plan.groups) > 1
    ref = yaqa.collect_hessians(model, ids, dtype=torch.float64, batch_size=2, progress=False)
    got = yaqa.collect_hessians(model, ids, dtype=torch.float64, batch_size=2, progress=False,
                                blocks_per_pass=plan.blocks_per_pass)
    for name, h in ref.items():
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(got[name], k), getattr(h, k)), (name, k)


def test_cli_dry_run_prints_only_the_plan(tmp_path, capsys):
    from tiny_models import tiny_tokenizer

    from yaqa.cli import main

    tok = tiny_tokenizer("the quick brown fox jumps over the lazy dog " * 20)
    model = tiny_model("llama", hidden=64, intermediate=128, vocab=len(tok))
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    out = tmp_path / "hs"
    for sub, extra in (("hessians", ["--n-seqs", "4", "--out", str(out)]),
                       ("quantize", ["--n-calib", "4", "--out", str(tmp_path / "q")]),
                       ("run", ["--n-calib", "4", "--out", str(tmp_path / "r")])):
        assert main(["-q", sub, "--model", str(tmp_path / "m"), "--device", "cpu", "--ctx", "16",
                     "--dry-run", *extra]) == 0
        text = capsys.readouterr().out
        assert "memory plan" in text and "accumulators" in text
    assert not out.exists() and not (tmp_path / "q").exists() and not (tmp_path / "r").exists()


def test_time_estimate_gives_each_group_its_share_of_the_model():
    shape = llama8b_shape()
    req = CollectionRequest(n_seqs=1024, ctx=2048, batch_size=2, collect_hx=False)
    kw = dict(budget_bytes=80 * GiB, device="cuda", blocks_per_pass=8, disk_bytes=None)
    cached = make_plan(shape, req, host_bytes=128 * GiB, **kw)
    off = make_plan(shape, req, host_bytes=1, **kw)
    assert cached.boundary_cache["mode"] == "memory" and off.boundary_cache["mode"] == "off"
    tokens = 1024 * 2048
    # cached: the top group runs the forward through all 32 blocks and its backward through
    # 8 (1/3 + 2/3 · 8/32); each other group its own 8 blocks both ways (8/32)
    assert collection_seconds(cached, 32, 1.0, 0.0) == pytest.approx(
        tokens * (1 / 3 + 2 / 3 / 4 + 3 / 4))
    # without the cache every group runs the whole forward and the backward to its first block
    assert collection_seconds(off, 32, 1.0, 0.0) == pytest.approx(
        tokens * sum(1 / 3 + 2 / 3 * (32 - g0) / 32 for g0 in (0, 8, 16, 24)))
    # the statistics: every block once per pass, split over the ranks
    assert collection_seconds(cached, 32, 0.0, 1.0, world=2) == pytest.approx(tokens * 32 / 2)


def test_timed_warmup_estimates_a_cached_plan(tmp_path):
    model = tiny_model("llama", hidden=32, intermediate=64, layers=3, vocab=64)
    ids = torch.randint(0, 64, (8, 16), generator=torch.Generator().manual_seed(0))
    req = CollectionRequest(n_seqs=8, ctx=16, batch_size=2)
    plan = make_plan(ModelShape.from_model(model), req, budget_bytes=1 << 40, device="cpu",
                     blocks_per_pass=1, boundary_cache="memory", host_bytes=1 << 40)
    secs = timed_warmup(model, ids, plan, req, steps=1)
    assert 0 < secs == plan.seconds_estimate and "min of collection" in plan.summary()


def test_label_draws_scale_the_plan_and_turn_the_boundary_cache_off():
    shape = llama8b_shape()
    kw = dict(budget_bytes=10**15, device="cuda", blocks_per_pass=8, disk_bytes=None,
              host_bytes=1 << 50)
    one = make_plan(shape, CollectionRequest(n_seqs=64, ctx=512, batch_size=4), **kw)
    four = make_plan(shape, CollectionRequest(n_seqs=64, ctx=512, batch_size=4, label_draws=4),
                     **kw)
    wide = make_plan(shape, CollectionRequest(n_seqs=64, ctx=512, batch_size=16),
                     **{**kw, "host_bytes": 1})  # uncached too: the same worst group
    assert one.boundary_cache["mode"] == "memory" and four.boundary_cache["mode"] == "off"
    # the model runs 4 rows per sequence: activations and logits as a batch of 16
    for term in ("activations", "logits + gradient"):
        assert four.collection_terms[term] == wide.collection_terms[term]
    uncached = make_plan(shape, CollectionRequest(n_seqs=64, ctx=512, batch_size=4),
                         **{**kw, "host_bytes": 1})
    assert four.model_work == pytest.approx(4 * uncached.model_work)
    assert "4 label draws" in four.summary()
