"""Hidden states cached at pass boundaries: later block groups skip the forward before them."""

from __future__ import annotations

import pytest
import torch

import yaqa
from yaqa.hessians import HessianCollector
from yaqa.hessians.boundary import CACHE_DIR, choose_boundary_cache
from yaqa.plan import CollectionRequest, ModelShape, make_plan

from hessian_checks import assert_same_hessians as _assert_same
from tiny_models import tiny_model

SEED = 3
GiB = 1024 ** 3


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(1))


class BlockCalls:
    """Counts forwards that really run a block (its MLP), skipped ones excluded."""

    def __init__(self, model, block=0):
        self.n = 0
        self._h = model.model.layers[block].mlp.register_forward_hook(self._count)

    def _count(self, *a):
        self.n += 1

    def close(self):
        self._h.remove()


def _collect(model, ids, block=0, **kw):
    calls = BlockCalls(model, block)
    try:
        out = yaqa.collect_hessians(model, ids, seed=SEED, batch_size=2, progress=False, **kw)
    finally:
        calls.close()
    return out, calls.n


@pytest.mark.parametrize("sketch,iters,bpp", [("B", 1, 1), ("B", 2, 3), ("A", 2, 2)])
def test_cached_boundaries_give_the_one_pass_factors_bit_for_bit(ids, sketch, iters, bpp):
    model = tiny_model("llama", layers=4)
    kw = dict(sketch=sketch, power_iters=iters, dtype=torch.float64)
    one, _ = _collect(model, ids, **kw)
    off, calls_off = _collect(model, ids, blocks_per_pass=bpp, boundary_cache="off", **kw)
    cached, calls_cached = _collect(model, ids, blocks_per_pass=bpp, boundary_cache="memory", **kw)
    _assert_same(one, off)
    _assert_same(one, cached)
    n_mb, groups = 3, -(-4 // bpp)
    passes = len(yaqa.hessians.pass_kinds(sketch, iters))
    assert calls_off == groups * passes * n_mb
    # block 0 runs in the top group's first pass (which records the states) and in its own
    # group's passes; every other pass runs its own group's blocks only
    assert calls_cached == n_mb + passes * n_mb


@pytest.mark.parametrize("family", ["gemma2", "phi3"])
def test_other_families_and_bf16_models_match_with_the_cache(ids, family):
    model = tiny_model(family, hidden=32, intermediate=64, layers=3, vocab=128,
                       dtype=torch.bfloat16)
    one, _ = _collect(model, ids, sketch="B")
    cached, calls = _collect(model, ids, sketch="B", blocks_per_pass=1, boundary_cache="memory")
    _assert_same(one, cached)
    assert calls == 6


def test_disk_cache_survives_an_interrupted_group_and_is_removed_when_done(ids, tmp_path,
                                                                          monkeypatch):
    model = tiny_model("llama", layers=3)
    kw = dict(sketch="B", dtype=torch.float64, blocks_per_pass=1, checkpoint_every=1)
    ref, _ = _collect(model, ids, sketch="B", dtype=torch.float64)
    real_step, seen = HessianCollector.step, []

    def stop_in_group_1(self, ids_, seq, index=None):
        if self.blocks == [1] and len(seen) == 1:
            raise KeyboardInterrupt("simulated end of a timed command")
        if self.blocks == [1]:
            seen.append(index)
        return real_step(self, ids_, seq, index)

    monkeypatch.setattr(HessianCollector, "step", stop_in_group_1)
    with pytest.raises(KeyboardInterrupt):
        _collect(model, ids, out_dir=tmp_path, boundary_cache="disk", **kw)
    monkeypatch.setattr(HessianCollector, "step", real_step)
    cache = tmp_path / CACHE_DIR
    assert (cache / "state0001-rank0.bin").exists() and (cache / "grad0002-rank0.bin").exists()
    got, calls = _collect(model, ids, block=2, out_dir=tmp_path, boundary_cache="disk", **kw)
    assert calls == 0  # the resumed group 1 starts from the files: state 1 and gradient 2
    _assert_same(ref, got)
    assert not cache.exists()


def test_a_stale_disk_cache_is_discarded(ids, tmp_path):
    model = tiny_model("llama", layers=3)
    kw = dict(sketch="B", dtype=torch.float64, blocks_per_pass=1, boundary_cache="disk")
    ref, _ = _collect(model, ids, out_dir=tmp_path, **kw)
    for b in (1, 2):  # blocks 1 and 2 are to be collected again
        (tmp_path / f"block_{b:04d}.safetensors").unlink()
    cache = tmp_path / CACHE_DIR
    cache.mkdir()
    (cache / "meta-rank0.json").write_text('{"key": "another run", "tokens": 1}')
    (cache / "state0001-rank0.flags").write_bytes(b"\x01\x01\x01")  # claims complete entries
    (cache / "state0001-rank0.bin").write_bytes(b"\x00" * 8)
    got, calls = _collect(model, ids, out_dir=tmp_path, **kw)
    _assert_same(ref, got)
    # group 2 runs from the embeddings (recording state 1 and gradient 2); group 1 from those
    assert calls == 3


def test_cache_placement_falls_back_from_memory_to_disk_to_off():
    c = choose_boundary_cache("auto", 10 * GiB, host_bytes=100 * GiB, disk_bytes=None)
    assert c.mode == "memory" and "host memory" in c.reason
    c = choose_boundary_cache("auto", 70 * GiB, host_bytes=100 * GiB, disk_bytes=500 * GiB)
    assert c.mode == "disk" and "over 60% of the host memory" in c.reason
    c = choose_boundary_cache("auto", 70 * GiB, host_bytes=100 * GiB, disk_bytes=None)
    assert c.mode == "off" and "recompute" in c.reason
    c = choose_boundary_cache("disk", 70 * GiB, host_bytes=100 * GiB, disk_bytes=50 * GiB)
    assert c.mode == "off" and "50.0 GiB free" in c.reason
    assert choose_boundary_cache("auto", 0, host_bytes=1, disk_bytes=1).mode == "off"
    with pytest.raises(ValueError, match="boundary_cache must be one of"):
        choose_boundary_cache("ram", 1, host_bytes=1, disk_bytes=1)
    with pytest.raises(ValueError, match="boundary_cache must be one of"):
        yaqa.hessians.CollectConfig(boundary_cache="ram")


def test_plan_prints_the_cache_size_and_where_it_goes():
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256)
    shape = ModelShape.from_config(cfg)
    req = CollectionRequest(n_seqs=1024, ctx=2048, batch_size=2, collect_hx=False)
    kw = dict(budget_bytes=80 * GiB, device="cuda", blocks_per_pass=8)
    plan = make_plan(shape, req, host_bytes=128 * GiB, disk_bytes=None, **kw)
    # states entering blocks 8, 16, 24 + one gradient, each 1024 x 2048 tokens x 4096 x bf16
    assert plan.boundary_cache["bytes"] == 4 * 16 * GiB
    assert plan.boundary_cache["mode"] == "memory"
    assert "boundary cache: 64.00 GiB in host memory" in plan.summary()
    small = make_plan(shape, req, host_bytes=100 * GiB, disk_bytes=200 * GiB, **kw)
    assert small.boundary_cache["mode"] == "disk" and "on disk" in small.summary()
    none = make_plan(shape, req, host_bytes=100 * GiB, disk_bytes=None, **kw)
    assert none.boundary_cache["mode"] == "off"
    assert "recompute" in none.summary()
    # the model's work: the top group's whole forward and its own backward (1/3 + 2/3 · 1/4),
    # the others their own blocks (3/4), against 4/3 + 2/3 (1 + 3/4 + 1/2 + 1/4) without
    assert plan.model_work == pytest.approx(1 / 3 + 2 / 3 / 4 + 3 / 4)
    assert none.model_work == pytest.approx(4 / 3 + 2 / 3 * 2.5)



def test_an_asked_for_cache_that_does_not_fit_stops_before_any_work(ids, tmp_path, monkeypatch):
    # a plan that chose the cache sized its passes for it: going on without would risk an OOM
    import yaqa.hessians.collect as collect_mod
    monkeypatch.setattr(collect_mod, "host_available_bytes", lambda: 1)
    model = tiny_model("llama", layers=3)
    with pytest.raises(RuntimeError, match="boundary cache 'memory' was asked for"):
        _collect(model, ids, out_dir=tmp_path, sketch="B", blocks_per_pass=1,
                 boundary_cache="memory")
    assert not list(tmp_path.glob("block_*.safetensors"))
    # "auto" falls back to recomputing, and the factors are still collected
    out, _ = _collect(model, ids, sketch="B", blocks_per_pass=1, boundary_cache="auto")
    assert len(out) == 3 * 7
