"""The statistics stream (yaqa.hessians.overlap) on CPU: a recording fake stands in for CUDA.

The fake runs every update at once (CPU) and keeps a log of what a GPU would be told: events
recorded on a stream, waits, record_stream, launches. The tests check the protocol at the
points where it matters (every read of the sums sees every launched update waited for), the
backlog bound, the precision switch, and that the factors do not change.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import yaqa
from yaqa.hessians import HessianCollector
from yaqa.hessians import accumulators as acc_mod
from yaqa.hessians import distributed as D
from yaqa.hessians import overlap
from yaqa.hessians import passes as passes_mod
from yaqa.hessians.overlap import StatsStream, backlog_bytes, stats_stream_enabled
from yaqa.plan import CollectionRequest, make_plan

from tiny_models import tiny_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


class FakeStream:
    def __init__(self, name: str, be: "FakeStreams"):
        self.name, self.be = name, be
        self.launched = 0      # updates launched on it (statistics stream)
        self.waited_for = 0    # (model stream) statistics updates it has waited for

    def wait_event(self, ev: "FakeEvent") -> None:
        self.be.log.append(("wait", self.name, ev.stream.name, ev.mark))
        if ev.stream is self.be.stats:
            self.waited_for = max(self.waited_for, ev.mark)


class FakeEvent:
    def __init__(self, be: "FakeStreams"):
        self.be, self.stream, self.mark = be, None, None

    def record(self, stream: FakeStream) -> None:
        self.stream, self.mark = stream, stream.launched
        self.be.log.append(("record", stream.name, self.mark))

    def synchronize(self) -> None:
        self.be.log.append(("sync", self.stream.name, self.mark))
        if self.stream is self.be.stats:
            self.be.cpu_waited_for = max(self.be.cpu_waited_for, self.mark)


class FakeStreams:
    """What StatsStream asks of CUDA, logged; the model's stream is "model"."""

    def __init__(self):
        self.log: list[tuple] = []
        self.model = FakeStream("model", self)
        self.stats: FakeStream | None = None
        self.cpu_waited_for = 0
        self.recorded: set[int] = set()

    def new_stream(self):
        self.stats = FakeStream("stats", self)
        return self.stats

    def current_stream(self):
        return self.model

    def run(self, stream, fn):
        stream.launched += 1
        self.log.append(("run", stream.name, stream.launched))
        fn()

    def new_event(self):
        return FakeEvent(self)

    def record_stream(self, t, stream):
        self.recorded.add(t.untyped_storage().data_ptr())
        self.log.append(("record_stream", stream.name))

    def complete(self) -> bool:
        """Every launched update is waited for by the model's stream and the CPU."""
        n = self.stats.launched
        return self.model.waited_for == n and self.cpu_waited_for == n


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", layers=2)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 128, (6, 12), generator=torch.Generator().manual_seed(3))


def _use_fake(monkeypatch, bound: int = overlap.DEFAULT_BACKLOG) -> list[FakeStreams]:
    """Every HessianCollector built from here on gets a fresh fake stream (backlog ``bound``)."""
    made: list[FakeStreams] = []
    real = StatsStream

    def fake(device, enabled=None, *, backlog=None, backend=None):
        be = FakeStreams()
        made.append(be)
        return real(device, enabled, backlog=bound, backend=be)
    monkeypatch.setattr("yaqa.hessians.hooks.StatsStream", fake)
    return made


def test_cpu_ignores_the_switch_and_calls_the_update_in_the_hook():
    for flag in (None, True, False):
        s = StatsStream("cpu", flag)
        assert not s.active
        ran = []
        s.launch(lambda: ran.append(1), torch.zeros(2))
        assert ran == [1] and s.in_flight == 0
        s.drain()
    col = HessianCollector(tiny_model("llama", layers=1), [0], stats_stream=True)
    assert not col.stats.active


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.delenv(overlap.ENV_VAR, raising=False)
    assert stats_stream_enabled() is True
    for v, want in (("0", False), ("off", False), ("1", True), ("on", True)):
        monkeypatch.setenv(overlap.ENV_VAR, v)
        assert stats_stream_enabled() is want
    monkeypatch.setenv(overlap.ENV_VAR, "0")
    assert stats_stream_enabled(True) is True  # an explicit argument wins
    assert not StatsStream("cpu", None, backend=FakeStreams()).active  # env off: no stream
    monkeypatch.setenv(overlap.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="YAQA_STATS_STREAM must be 1 or 0"):
        stats_stream_enabled()
    with pytest.raises(ValueError, match="backlog must be >= 1"):
        StatsStream("cpu", backlog=0)


def test_each_update_waits_for_the_model_and_marks_its_inputs(model, ids, monkeypatch):
    made = _use_fake(monkeypatch)
    seen: list[tuple[int, int, set[int]]] = []
    real = acc_mod.LayerAccumulator._update_backward

    def spy(self, X, G, cache):
        seen.append((X.untyped_storage().data_ptr(), G.untyped_storage().data_ptr(),
                     set(made[0].recorded)))
        real(self, X, G, cache)
    monkeypatch.setattr(acc_mod.LayerAccumulator, "_update_backward", spy)
    with HessianCollector(model, [0, 1]) as col:
        col.begin_pass("b")
        col.step(ids[:2], range(2))
    be = made[0]
    n_linears = len(col.acc)
    assert be.stats.launched == n_linears == len(seen)
    log = be.log
    runs = [i for i, e in enumerate(log) if e[0] == "run"]
    for k, i in enumerate(runs):
        # just before the launch: an event recorded on the model's stream, waited for by stats
        assert log[i - 2][:2] == ("record", "model") and log[i - 1][:3] == ("wait", "stats",
                                                                               "model")
        # just after: X and dL/dy marked as used by the statistics stream
        assert log[i + 1] == log[i + 2] == ("record_stream", "stats")
    for x, g, _ in seen:  # (marked right after the launch returns: check the final set)
        assert {x, g} <= be.recorded


def test_backlog_is_bounded_and_waited_for_oldest_first(model, ids, monkeypatch):
    made = _use_fake(monkeypatch, bound=3)
    with HessianCollector(model, [0, 1]) as col:
        col.begin_pass("b")
        made[0].log.clear()  # (begin_pass drained an empty stream)
        for j in range(2):
            col.step(ids[2 * j:2 * j + 2], range(2 * j, 2 * j + 2))
            assert col.stats.in_flight <= 3
        # no wait at the end of a step: the next micro-batch's forward overlaps the tail
        assert col.stats.in_flight == 3 and not made[0].complete()
        be = made[0]
        syncs = [e[2] for e in be.log if e[0] == "sync"]
        # the CPU waited for update k once update k + 3 was launched, in order
        assert syncs == list(range(1, be.stats.launched - 3 + 1))
        col.block_state()  # what a checkpoint saves
        assert col.stats.in_flight == 0 and be.complete()
        col.step(ids[4:], range(4, 6))
        col.end_pass()
        assert col.stats.in_flight == 0 and be.complete()


def test_every_read_of_the_sums_sees_every_update_finished(model, ids, tmp_path, monkeypatch):
    """All-reduce, checkpoint and end of pass: wrapped to assert that the model's stream and the
    CPU have waited for every update launched so far."""
    made = _use_fake(monkeypatch, bound=2)
    checks = {"all_reduce": 0, "reduce": 0, "end_pass": 0}

    def checked(what, fn):
        def wrapper(*a, **k):
            assert made and made[-1].complete(), f"{what} before the statistics finished"
            checks[what] += 1
            return fn(*a, **k)
        return wrapper
    monkeypatch.setattr(D, "all_reduce_sum_", checked("all_reduce", D.all_reduce_sum_))
    monkeypatch.setattr(D, "reduce_sum_to_rank0_", checked("reduce", D.reduce_sum_to_rank0_))
    monkeypatch.setattr(acc_mod.LayerAccumulator, "end_pass",
                        checked("end_pass", acc_mod.LayerAccumulator.end_pass))
    saved = []
    real_save = passes_mod.save_checkpoint

    def save(*a, **k):
        assert made[-1].complete(), "checkpoint saved before the statistics finished"
        saved.append(1)
        return real_save(*a, **k)
    monkeypatch.setattr(passes_mod, "save_checkpoint", save)
    yaqa.collect_hessians(model, list(ids.split(2)), sketch="B", power_iters=2, seed=1,
                          out_dir=tmp_path, checkpoint_every=1, progress=False)
    assert checks["all_reduce"] == 2 and checks["reduce"] >= 3 and saved
    assert checks["end_pass"] == 2 * 14  # 2 passes x 14 linears
    assert made[-1].stats.launched == 2 * 3 * 14


def test_precision_switch_is_set_for_the_statistics_only(model, ids, monkeypatch):
    """The process-wide TF32 flag is on while an update runs and back before the hook returns
    to autograd (cuBLAS reads it when a kernel is launched)."""
    made = _use_fake(monkeypatch)
    mm = torch.backends.cuda.matmul
    attr = "fp32_precision" if hasattr(mm, "fp32_precision") else "allow_tf32"
    before = getattr(mm, attr)
    monkeypatch.setattr(acc_mod.Products, "scope", lambda self: acc_mod._tf32(True))
    inside, after = [], []
    real = acc_mod.LayerAccumulator._update_backward

    def spy(self, X, G, cache):
        inside.append(getattr(mm, attr))
        real(self, X, G, cache)
    monkeypatch.setattr(acc_mod.LayerAccumulator, "_update_backward", spy)
    real_launch = StatsStream.launch

    def launch(self, *a):
        real_launch(self, *a)
        after.append(getattr(mm, attr))
    monkeypatch.setattr(StatsStream, "launch", launch)
    with HessianCollector(model, [0, 1]) as col:
        col.begin_pass("b")
        col.step(ids[:2], range(2))
    assert made and len(inside) == len(after) == 14
    assert set(inside) == {"tf32" if attr == "fp32_precision" else True}
    assert set(after) == {before}


@pytest.mark.parametrize("sketch,power_iters", [("B", 1), ("A", 1)])
def test_factors_are_bit_identical_with_and_without_the_stream(model, ids, monkeypatch, sketch,
                                                               power_iters):
    kw = dict(sketch=sketch, power_iters=power_iters, seed=2, progress=False, batch_size=2)
    plain = yaqa.collect_hessians(model, ids, **kw)
    made = _use_fake(monkeypatch, bound=2)
    streamed = yaqa.collect_hessians(model, ids, **kw)
    assert made and made[-1].stats.launched > 0
    for name, h in plain.items():
        for k in ("H_in", "H_out", "H_x"):
            a, b = getattr(h, k), getattr(streamed[name], k)
            assert (a is None and b is None) or torch.equal(a, b), (name, k)


def test_plan_counts_the_backlog_on_cuda_only():
    from test_plan import llama8b_shape

    shape = llama8b_shape()
    req = CollectionRequest(n_seqs=1024, ctx=2048, batch_size=2)
    kw = dict(budget_bytes=80 * 10**9, margin=0.1, host_bytes=1, disk_bytes=None)
    on = make_plan(shape, CollectionRequest(**{**req.__dict__, "stats_stream": True}), **kw)
    off = make_plan(shape, CollectionRequest(**{**req.__dict__, "stats_stream": False}), **kw)
    cpu = make_plan(shape, CollectionRequest(**{**req.__dict__, "stats_stream": True}),
                    **{**kw, "budget_bytes": 10**12}, device="cpu")
    # X and dL/dy of gate/up/down: 2 x 2048 tokens x (14336 + 4096) bf16, 8 updates in flight
    want = 8 * 2 * 2048 * (14336 + 4096) * 2
    assert backlog_bytes(shape.linears, 2 * 2048, 2) == want
    assert on.collection_terms["statistics backlog"] == want
    assert "statistics backlog" not in off.collection_terms
    assert "statistics backlog" not in cpu.collection_terms
    assert on.collection_peak_bytes - off.collection_peak_bytes == want \
        or on.blocks_per_pass < off.blocks_per_pass


def test_profile_summary_splits_kernel_time_by_stream(tmp_path):
    spec = importlib.util.spec_from_file_location("scale_bench", ROOT / "bench" / "scale.py")
    scale = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scale)

    class Prof:  # stream 7: [0, 10), [20, 30), [40, 50) ms; stream 13: [5, 25) ms
        def export_chrome_trace(self, path):
            ev = [{"ph": "X", "cat": "kernel", "ts": a * 1000, "dur": (b - a) * 1000,
                   "args": {"stream": s}}
                  for s, a, b in ((7, 0, 10), (7, 20, 30), (7, 40, 50), (13, 5, 25))]
            ev.append({"ph": "X", "cat": "cpu_op", "ts": 0, "dur": 90000})
            Path(path).write_text(json.dumps({"traceEvents": ev}))
    text = scale.stream_summary(Prof(), tmp_path)
    # kernels span 50 ms; some stream runs 40 of them; 30 + 20 busy: 10 ms overlap, 10 idle
    assert text.startswith("span 50.0 ms, any stream busy 40.0 ms, idle 10.0 ms, overlap "
                           "10.0 ms; stream 7: 3 kernels, busy 30.0 ms; stream 13: 1 kernels, "
                           "busy 20.0 ms"), text
    assert scale._union_s([(0, 10), (20, 30), (5, 25)]) == 30
    assert scale._union_s([(0, 10), (20, 30)]) == 20
    assert not (tmp_path / "profile_trace.json").exists()
