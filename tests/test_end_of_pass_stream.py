"""The last pass's factors leave the device one linear at a time when the store takes them
(run_collection): the same files as finishing them all at once, and never more than one linear's
full factors alive at the end of a pass."""

from __future__ import annotations

import hashlib
import math
import weakref

import pytest
import torch

import yaqa
from yaqa.hessians import accumulators as acc_mod
from yaqa.hessians import run_collection, shrinkage
from yaqa.plan import CollectionRequest, LiveTensorBytes, ModelShape, make_plan

from tiny_models import Interrupting, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", dtype=torch.float32)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(0))


def digests(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.glob("*")) if p.is_file()}




@pytest.mark.parametrize("kw", [
    dict(sketch="B", collect_hx=True, blocks_per_pass=1),
    dict(sketch="B", collect_hx=False, blocks_per_pass=1, storage_dtype="bfloat16"),
    dict(sketch="A", power_iters=2, blocks_per_pass=1),
], ids=["B-hx", "B-nohx-bf16", "A2"])
def test_streamed_files_are_bit_identical_to_finishing_all_at_once(model, ids, tmp_path, kw):
    kw = dict(batch_size=2, seed=3, progress=False, **kw)
    # collect_hessians keeps the factors: it finishes the whole group, then stores it
    yaqa.collect_hessians(model, list(ids.split(2)), out_dir=tmp_path / "kept", **kw)
    run_collection(model, list(ids.split(2)), tmp_path / "streamed", **kw)
    kept, streamed = digests(tmp_path / "kept"), digests(tmp_path / "streamed")
    assert len(kept) == 3 and streamed == kept


def test_streamed_files_after_a_resume_in_the_middle_are_bit_identical(model, ids, tmp_path):
    kw = dict(sketch="B", blocks_per_pass=1, batch_size=2, seed=3, progress=False,
              checkpoint_every=1)
    # the same kind of data (an iterable the store cannot fingerprint), never interrupted
    yaqa.collect_hessians(model, Interrupting(ids, 2, -1), out_dir=tmp_path / "ref", **kw)
    data = Interrupting(ids, 2, 4)  # in the second group's pass
    with pytest.raises(KeyboardInterrupt):
        run_collection(model, data, tmp_path / "resumed", **kw)
    assert list((tmp_path / "resumed").glob("block_*"))  # one group was already stored
    run_collection(model, data, tmp_path / "resumed", **kw)
    ref, got = digests(tmp_path / "ref"), digests(tmp_path / "resumed")
    assert len(ref) == 3 and got == ref


def _watch_full_factors(monkeypatch):
    """Record, at each accumulator's end_pass, how many full factors of other linears made
    at an earlier end_pass are still alive."""
    made: list[tuple[int, weakref.ref]] = []
    alive_others: list[int] = []
    orig = acc_mod.LayerAccumulator.end_pass

    def end_pass(self):
        alive_others.append(sum(1 for owner, r in made if owner != id(self) and r() is not None))
        orig(self)
        made.extend((id(self), weakref.ref(t)) for k, t in self.factors.items() if t.dim() == 2
                    and t.shape[0] > 1)

    monkeypatch.setattr(acc_mod.LayerAccumulator, "end_pass", end_pass)
    return alive_others


def test_the_last_pass_holds_one_linears_full_factors_at_a_time(model, ids, tmp_path,
                                                                monkeypatch):
    alive = _watch_full_factors(monkeypatch)
    run_collection(model, list(ids.split(2)), tmp_path / "s", sketch="B", batch_size=2,
                   progress=False)
    n_linears = len(list(yaqa.models.get_adapter(model).named_linears(model)))
    assert len(alive) == n_linears and max(alive) == 0
    # the check can fail: kept on the device, every earlier linear's factors are alive
    alive.clear()
    yaqa.collect_hessians(model, list(ids.split(2)), sketch="B", batch_size=2, progress=False)
    assert alive[-1] >= n_linears - 1


def test_shrinkage_estimate_in_place_equals_the_out_of_place_formula():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(9, 20, generator=g, dtype=torch.float64)
        H = (a @ a.T / 20).to(dtype)
        b = torch.randn(9, 30, generator=g, dtype=torch.float64)
        T = (b @ b.T / 30).to(dtype)
        H0, T0 = H.clone(), T.clone()
        mean_sq = float(H.double().pow(2).sum()) * 1.5
        for target in (None, T):
            got = shrinkage.ledoit_wolf_amount(H, target, mean_sq, 5)
            # the formula, out of place, as it read before
            Hd = H.double()
            tr = float(torch.diagonal(Hd).sum())
            if target is None:
                F = torch.eye(9, dtype=torch.float64) * (tr / 9)
            else:
                Td = target.double()
                F = Td * (tr / float(torch.diagonal(Td).sum()))
            beta2 = max(mean_sq - float(H.double().pow(2).sum()), 0.0) / 4
            want = min(1.0, beta2 / float((H.double() - F).pow(2).sum()))
            assert got == want and 0 < got < 1 and math.isfinite(got)
        assert torch.equal(H, H0) and torch.equal(T, T0)  # inputs untouched, float64 too


@pytest.mark.parametrize("cfg", [
    dict(hidden=64, intermediate=128, layers=2, vocab=128, batch=4, ctx=32, hx=True, bpp=None),
    dict(hidden=96, intermediate=256, layers=3, vocab=512, batch=2, ctx=40, hx=False, bpp=2),
])
def test_streamed_collection_estimate_is_within_20_percent_of_the_measured_peak(cfg, tmp_path):
    model = tiny_model("llama", hidden=cfg["hidden"], intermediate=cfg["intermediate"],
                       layers=cfg["layers"], vocab=cfg["vocab"], dtype=torch.float32)
    ids = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["ctx"]),
                        generator=torch.Generator().manual_seed(0))
    with LiveTensorBytes(list(model.parameters()) + [ids]) as lv:
        run_collection(model, ids, tmp_path, sketch="B", batch_size=cfg["batch"],
                       collect_hx=cfg["hx"], blocks_per_pass=cfg["bpp"], progress=False,
                       boundary_cache="off")
    req = CollectionRequest(n_seqs=ids.shape[0], ctx=cfg["ctx"], batch_size=cfg["batch"],
                            collect_hx=cfg["hx"])
    plan = make_plan(ModelShape.from_model(model), req, budget_bytes=1 << 40, device="cpu",
                     blocks_per_pass=cfg["bpp"], boundary_cache="off")
    est = plan.collection_peak_bytes
    assert abs(est - lv.peak_bytes) <= 0.2 * lv.peak_bytes, (est, lv.peak_bytes, plan.summary())
