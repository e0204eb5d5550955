"""A collection resumed in a fresh call (a new command) after its host-memory boundary cache was
lost: the same factors as one uninterrupted call, and no more memory than that call."""

from __future__ import annotations

import pytest
import torch

import yaqa
from yaqa.hessians import HessianCollector, run_collection
from yaqa.plan import CollectionRequest, LiveTensorBytes, ModelShape, accumulator_bytes

from hessian_checks import assert_same_hessians as _assert_same
from tiny_models import tiny_model

SEED = 5


def _interrupt_in(monkeypatch, group: list[int], after: int) -> None:
    """The next collection stops (as a timed command's Ctrl-C) in ``group`` after ``after``
    micro-batches of it; checkpoint_every=1 has saved each one."""
    real_step, seen = HessianCollector.step, []

    def step(self, ids_, seq, index=None):
        if self.blocks == group:
            if len(seen) == after:
                monkeypatch.setattr(HessianCollector, "step", real_step)
                raise KeyboardInterrupt("simulated end of a timed command")
            seen.append(index)
        return real_step(self, ids_, seq, index)

    monkeypatch.setattr(HessianCollector, "step", step)


def _collect(model, ids, out_dir, **kw):
    return yaqa.collect_hessians(model, ids, seed=SEED, batch_size=2, progress=False,
                                 out_dir=out_dir, checkpoint_every=1, **kw)


@pytest.mark.parametrize("sketch,group,mode,refills", [
    ("B", [0], "memory", 2), ("B", [1], "memory", 2 + 1), ("A", [1], "memory", 3),
    ("B", [0], "disk", 0)])  # the gradients of a disk cache outlive the call: none recomputed
def test_cache_resume_in_a_fresh_call_gives_the_uninterrupted_factors(
        tmp_path, monkeypatch, sketch, group, mode, refills):
    model = tiny_model("llama", hidden=32, intermediate=64, layers=3)
    ids = torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(sketch=sketch, dtype=torch.float64, blocks_per_pass=1, boundary_cache=mode)
    ref = _collect(model, ids, tmp_path / "ref", **kw)
    _interrupt_in(monkeypatch, group, 1)
    with pytest.raises(KeyboardInterrupt):
        _collect(model, ids, tmp_path / "run", **kw)
    real, calls = HessianCollector.refill_gradient, []

    def refill(self, ids_, seq, index):
        calls.append((self.blocks[0], index))
        return real(self, ids_, seq, index)

    monkeypatch.setattr(HessianCollector, "refill_gradient", refill)
    # the cache lived in the interrupted call: the resumed group recomputes the gradients it
    # starts its backward from (Sketch B: from its cursor on; A: every micro-batch, as its
    # later passes read them all), and the group below those of the micro-batches the
    # interrupted call had done
    head = model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    heads = []
    try:
        got = _collect(model, ids, tmp_path / "run", **kw)
    finally:
        head.remove()
    _assert_same(ref, got)
    assert len(calls) == refills, calls
    # the head runs only where a gradient is recomputed: the groups' own passes start their
    # backward from the cached one
    assert len(heads) == refills


def _peak(model, fn) -> int:
    with LiveTensorBytes(list(model.parameters())) as lv:
        try:
            fn()
        except KeyboardInterrupt:
            pass
    return lv.peak_bytes


# activations far above the accumulators: the blocks above the resumed group kept theirs when
# the cached gradient was gone
def test_a_resumed_command_peaks_no_higher_than_the_uninterrupted_one(tmp_path, monkeypatch):
    model = tiny_model("llama", hidden=32, intermediate=64, layers=6, vocab=512)
    ids = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(2))
    kw = dict(sketch="B", blocks_per_pass=2, boundary_cache="memory", collect_hx=False)
    run = lambda d: _collect(model, ids, d, **kw)  # noqa: E731
    one = _peak(model, lambda: run(tmp_path / "one"))
    _interrupt_in(monkeypatch, [0, 1], 1)
    first = _peak(model, lambda: run(tmp_path / "two"))
    resumed = _peak(model, lambda: run(tmp_path / "two"))
    assert first <= one * 1.01
    assert resumed <= one * 1.01, (resumed, one)


def test_a_resumed_group_reads_its_checkpoint_one_tensor_at_a_time(tmp_path, monkeypatch):
    # accumulators far above the activations: the whole group's checkpoint read beside its
    # accumulators doubled them
    model = tiny_model("llama", hidden=96, intermediate=384, layers=3, vocab=64)
    ids = torch.randint(0, 64, (8, 8), generator=torch.Generator().manual_seed(2))
    kw = dict(sketch="B", blocks_per_pass=2, boundary_cache="memory", collect_hx=False,
              seed=SEED, batch_size=2, progress=False, checkpoint_every=1)
    _interrupt_in(monkeypatch, [0, 1], 1)
    with pytest.raises(KeyboardInterrupt):
        run_collection(model, ids, tmp_path, **kw)
    real_step, at_first_step = HessianCollector.step, []

    def step(self, *a, **k):
        if not at_first_step:
            at_first_step.append(lv.peak)
        return real_step(self, *a, **k)

    monkeypatch.setattr(HessianCollector, "step", step)
    with LiveTensorBytes(list(model.parameters()) + [ids]) as lv:
        run_collection(model, ids, tmp_path, **kw)
    # before the first step: the group's accumulators, and one checkpoint tensor being copied
    req = CollectionRequest(n_seqs=8, ctx=8, batch_size=2, collect_hx=False)
    acc = accumulator_bytes(ModelShape.from_model(model), req) * 2
    largest = 4 * 384 * 384
    assert acc < at_first_step[0] <= acc + largest + 64 * 1024, (at_first_step[0], acc)
