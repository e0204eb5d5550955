"""Packed symmetric sums: only the rectangles sym_addmm writes are stored, the factors are the
ones of full n×n sums bit for bit, and checkpoints of either layout resume."""

from __future__ import annotations

import pytest
import torch
import transformers

import yaqa
from yaqa.hessians import accumulators as acc_mod
from yaqa.hessians.storage import load_checkpoint, read_progress
from yaqa.plan import GiB, CollectionRequest, ModelShape, accumulator_bytes, make_plan

from tiny_models import Interrupting, tiny_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    # hidden 64, intermediate 128, k/v 32 wide: several leaves per factor at a small leaf size
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (6, 10), generator=torch.Generator().manual_seed(0))


def _collect(model, ids, packed: bool, monkeypatch, **kw):
    monkeypatch.setattr(acc_mod, "_PACKED_SUMS", packed)
    return yaqa.collect_hessians(model, list(ids.split(2)), seed=3, progress=False, **kw)


def _assert_identical(got, ref):
    assert set(got) == set(ref)
    for name, h in ref.items():
        for k in ("H_in", "H_out", "H_x"):
            a, b = getattr(got[name], k), getattr(h, k)
            assert (a is None) == (b is None), (name, k)
            if a is not None:
                assert torch.equal(a, b), (name, k, (a - b).abs().max().item())


# 16: equal leaves (one batched GEMM into the packed [k, t, t] leaves); 24: unequal tiles
# (21/22/21 for n = 64), one GEMM per leaf; 512: one leaf, the packed sum is the square itself
@pytest.mark.parametrize("tile", [16, 24, 512])
@pytest.mark.parametrize("request_kw", [
    dict(sketch="B", route="gram"),
    dict(sketch="B", route="direct", blocks_per_pass=1),
    dict(sketch="B", power_iters=2, route="gram", collect_hx=False),
    dict(sketch="A", power_iters=1, blocks_per_pass=1),
], ids=["B-gram", "B-direct-2groups", "B-als", "A-2groups"])
def test_packed_sums_give_bit_identical_factors(llama, ids, monkeypatch, tile, request_kw):
    monkeypatch.setattr(acc_mod, "_SYM_TILE", tile)
    ref = _collect(llama, ids, False, monkeypatch, **request_kw)  # full n×n sums (as before)
    got = _collect(llama, ids, True, monkeypatch, **request_kw)
    _assert_identical(got, ref)


def test_accumulators_hold_packed_sums_of_about_half_the_bytes(monkeypatch):
    acc = acc_mod.LayerAccumulator(4096, 1024, device="cpu", dtype=torch.float32)
    acc.begin_pass("b")
    assert acc.sums["H_in"].dim() == 1 and acc.sums["seq_sq"].shape == (1, 1)
    # 8 leaves of 512: 36 of 64 tiles; 2 leaves: 3 of 4
    assert acc.sums["H_in"].numel() == 36 * 512 * 512 and acc.sums["H_x"].numel() == 36 * 512 ** 2
    assert acc.sums["H_out"].numel() == 3 * 512 * 512
    assert acc_mod.packed_layout(14336).numel / 14336 ** 2 < 0.52


@pytest.mark.parametrize("scheme", acc_mod.SYM_SCHEMES)
@pytest.mark.parametrize("n", [1, 7, 513, 1100, 1537, 2600])
def test_packed_round_trip_is_exact(monkeypatch, scheme, n):
    """Odd n, n not divisible by the leaf, one and many leaves: packing the sum of full n×n
    accumulation and unpacking gives its mirror_lower exactly, and scatter/pack invert."""
    monkeypatch.setattr(acc_mod, "_SYM_SCHEME", scheme)
    g = torch.Generator().manual_seed(n)
    a = torch.randn(5, n, generator=g)
    prod = acc_mod.Products("full", torch.float32, torch.device("cpu"))
    full = torch.zeros(n, n)
    packed = torch.zeros(acc_mod.packed_layout(n).numel)
    acc_mod.sym_addmm(full, a, a, prod, "final")
    acc_mod.sym_addmm(packed, a, a, prod, "final")
    assert torch.equal(acc_mod.pack_sym(full), packed)
    assert torch.equal(acc_mod.scatter_sym(packed, n), full)  # zeros above the block triangle
    assert torch.equal(acc_mod.unpack_sym(packed, n), acc_mod.mirror_lower(full.clone()))
    # the rectangles tile the buffer exactly: every value belongs to one of them
    lay = acc_mod.packed_layout(n)
    spans = sorted((o, o + (r1 - r0) * (c1 - c0)) for o, (r0, r1, c0, c1)
                   in zip(lay.offsets, lay.blocks))
    assert spans[0][0] == 0 and spans[-1][1] == lay.numel
    assert all(e == s for (_, e), (s, _) in zip(spans, spans[1:]))
    with pytest.raises(ValueError, match="packed"):
        acc_mod.unpack_sym(packed[:-1], n)




def _interrupt_and_resume(model, ids, tmp_path, monkeypatch, packed_first: bool,
                          stop_after: int, kw):
    """Stop after ``stop_after`` micro-batches (3 per pass) with checkpoint_every=1, resume."""
    monkeypatch.setattr(acc_mod, "_PACKED_SUMS", packed_first)
    data = Interrupting(ids, 2, stop_after)
    with pytest.raises(KeyboardInterrupt):
        yaqa.collect_hessians(model, data, out_dir=tmp_path, checkpoint_every=1, **kw)
    state = next((tmp_path / "resume").iterdir())
    prog = read_progress(state)
    assert prog["cursor"] > 0  # mid-pass: sums, not only factors, are in the checkpoint
    tensors, _ = load_checkpoint(state, prog, [0, 1])[0]
    sums = {k: tensors[k] for k in tensors if ".sum.H_" in k}
    assert sums and all(t.dim() == (1 if packed_first else 2) for t in sums.values())
    monkeypatch.setattr(acc_mod, "_PACKED_SUMS", True)
    return yaqa.collect_hessians(model, data, out_dir=tmp_path, checkpoint_every=1, **kw)


@pytest.mark.parametrize("stop_after", [2, 5], ids=["first-pass", "als-pass"])
@pytest.mark.parametrize("packed_first", [True, False], ids=["packed", "full-square-checkpoint"])
def test_resume_from_a_mid_pass_checkpoint_gives_identical_factors(llama, ids, tmp_path,
                                                                   monkeypatch, packed_first,
                                                                   stop_after):
    """A checkpoint of packed sums, and one of full square sums written by the previous layout,
    both resume to the uninterrupted factors bit for bit (mid first pass: H_in, H_out, H_x and
    the noise statistic; mid ALS pass: sums beside finished factors)."""
    monkeypatch.setattr(acc_mod, "_SYM_TILE", 16)
    kw = dict(sketch="B", power_iters=2, seed=3, progress=False)
    monkeypatch.setattr(acc_mod, "_PACKED_SUMS", True)
    ref = yaqa.collect_hessians(llama, list(ids.split(2)), **kw)
    got = _interrupt_and_resume(llama, ids, tmp_path, monkeypatch, packed_first, stop_after,
                                 kw)
    _assert_identical(got, ref)


def test_checkpoint_of_another_layout_is_refused_clearly():
    acc = acc_mod.LayerAccumulator(1100, 64, device="cpu")
    with pytest.raises(ValueError, match="another blocking scheme"):
        acc.load_state_tensors({"sum.H_in": torch.zeros(12345),
                                "factor.H_in": torch.eye(1100), "factor.H_out": torch.eye(64)},
                               "b_iter", {"seqs": 1, "tokens": 1})


def test_plan_fits_16_blocks_per_pass_at_the_8b_shape(monkeypatch):
    """bench/gpu_scale.sh's plan: H100 (85.0 GB), 12% margin, Sketch B without H_x, 1024 x 2048
    tokens in micro-batches of 2, the boundary cache in host memory: 2 passes instead of 3."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=128256)
    cfg._attn_implementation = "sdpa"
    shape = ModelShape.from_config(cfg, torch.bfloat16)
    req = CollectionRequest(sketch="B", power_iters=1, n_seqs=1024, ctx=2048, batch_size=2,
                            collect_hx=False)
    kw = dict(budget_bytes=85_017_493_504, device="cuda", margin=0.12,
              host_bytes=int(124.8 * GiB))
    plan = make_plan(shape, req, **kw)
    assert plan.blocks_per_pass == 16 and len(plan.groups) == 2
    assert plan.collection_peak_bytes <= plan.limit_bytes
    # the store takes the factors one linear at a time: the end of the pass is below the pass
    during = sum(plan.collection_terms.values())
    assert plan.collection_peak_bytes == during > plan.end_of_pass_peak_bytes
    assert "finished factors" not in plan.end_of_pass_terms
    assert plan.end_of_pass_peak_bytes < shape.param_bytes + 16 * plan.factor_bytes_per_block
    # kept on the device (collect_hessians), the group's 16 blocks of finished factors are full
    kept = make_plan(shape, CollectionRequest(**{**req.__dict__, "keep_factors": True}), **kw)
    assert kept.end_of_pass_peak_bytes == kept.collection_peak_bytes > during
    assert kept.end_of_pass_peak_bytes >= shape.param_bytes + 16 * kept.factor_bytes_per_block
    packed_bytes = accumulator_bytes(shape, req)
    monkeypatch.setattr(acc_mod, "_PACKED_SUMS", False)  # full n×n sums, as before
    old = make_plan(shape, req, **kw)
    assert old.blocks_per_pass == 11 and len(old.groups) == 3
    assert packed_bytes < 0.55 * accumulator_bytes(shape, req)


@pytest.mark.parametrize("sketch,power_iters,hx", [("B", 1, True), ("B", 1, False),
                                                   ("B", 3, True), ("A", 1, True),
                                                   ("A", 2, True), ("A", 3, True),
                                                   ("hx", 1, True)])
def test_plan_counts_the_accumulators_bytes_exactly(monkeypatch, sketch, power_iters, hx):
    """The plan's accumulator bytes (packed sums, full factors, frozen copies) during each pass
    and its finished factors right after one, against the tensors a block's accumulators hold
    through the same passes (several leaves per factor, so packed sums are smaller)."""
    from yaqa.hessians.schedule import pass_kinds
    from yaqa.plan import end_of_pass_bytes

    monkeypatch.setattr(acc_mod, "_SYM_TILE", 16)
    model = tiny_model("llama", layers=1)
    shape = ModelShape.from_model(model)
    accs = [acc_mod.LayerAccumulator(n, m, device="cpu", collect_hx=hx)
            for _, m, n in shape.linears]

    def live_bytes() -> int:
        seen = {}
        for a in accs:
            ts = list(a.factors.values()) + [v for k, v in a.sums.items() if k != "seq_sq"]
            ts += [getattr(a, k, None) for k in ("_frozen", "_frozen_in", "_frozen_out")]
            for t in ts:
                if t is not None and t.numel() > 1:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    during, after = 0, 0
    for kind in pass_kinds(sketch, power_iters):
        for a in accs:
            a.begin_pass(kind)
        during = max(during, live_bytes())
        for a in accs:
            a.counts = {"seqs": 1, "tokens": 1}
            a.end_pass()
        after = max(after, live_bytes())
    req = CollectionRequest(sketch=sketch, power_iters=power_iters, collect_hx=hx)
    assert accumulator_bytes(shape, req) == during
    assert end_of_pass_bytes(shape, req) == after
    assert acc_mod.packed_layout(64).numel < 64 * 64  # the packed layout was in use
