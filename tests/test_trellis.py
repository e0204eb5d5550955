"""Bitshift trellis: Viterbi vs exhaustive search, codes vs their definitions, the grid contract."""

from __future__ import annotations

import itertools
import struct
import sys

import pytest
import torch

from yaqa.quantizers import TrellisQuantizer, make_quantizer, quantizer_from_config
from yaqa.quantizers.trellis import (
    codebook,
    decode_1mad,
    decode_3inst,
    hyb_table,
    path_states,
    viterbi,
    viterbi_tailbiting,
    viterbi_tailbiting_exact,
)


def path_cost(x: torch.Tensor, cb: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    return (cb.double()[states] - x.double()).pow(2).sum((-1, -2))


def brute_force(x, cb, L, kv, start_low=None, end_low=None, circular=False):
    """Least cost over every start state and bit sequence (or every circular bitstream)."""
    T = x.shape[0]
    R = 1 << (L - kv)
    best = float("inf")
    starts = [None] if circular else range(1 << L)
    for s0 in starts:
        if s0 is not None and start_low is not None and (s0 & (R - 1)) != start_low:
            continue
        for bits in itertools.product(range(1 << kv), repeat=T):
            if circular:
                states = path_states(torch.tensor([bits]), L, kv)[0]
            else:
                s, seq = s0, []
                for b in bits:
                    s = ((s << kv) | b) & ((1 << L) - 1)
                    seq.append(s)
                states = torch.tensor(seq)
            if end_low is not None and (int(states[-1]) & (R - 1)) != end_low:
                continue
            best = min(best, float(path_cost(x, cb, states)))
    return best


CASES = [(4, 1, 1, 6), (5, 2, 1, 4), (6, 1, 2, 3), (6, 2, 1, 4)]  # (L, k, V, T)


@pytest.mark.parametrize("L,k,V,T", CASES)
def test_viterbi_finds_the_exhaustive_optimum(L, k, V, T):
    g = torch.Generator().manual_seed(L * 100 + k * 10 + V)
    kv = k * V
    cb = torch.randn(1 << L, V, generator=g)
    x = torch.randn(3, T, V, generator=g)
    states = viterbi(x, cb, L, kv, cost_dtype=torch.float64)
    # Every step is a legal shift: s_t keeps the low L - kv bits of s_{t-1} as its high bits.
    assert torch.equal(states[:, 1:] >> kv, states[:, :-1] & ((1 << (L - kv)) - 1))
    for b in range(3):
        assert float(path_cost(x[b], cb, states[b])) == pytest.approx(
            brute_force(x[b], cb, L, kv), rel=1e-9)
    # Start and end both forced through the same low bits.
    R = 1 << (L - kv)
    low = torch.tensor([0, R - 1, R // 3])
    states = viterbi(x, cb, L, kv, start_low=low, end_low=low, cost_dtype=torch.float64)
    for b in range(3):
        c = int(low[b])
        assert (int(states[b, 0]) >> kv) == c
        assert (int(states[b, -1]) & (R - 1)) == c
        assert float(path_cost(x[b], cb, states[b])) == pytest.approx(
            brute_force(x[b], cb, L, kv, start_low=c, end_low=c), rel=1e-9)


@pytest.mark.parametrize("L,k,V,T", CASES)
def test_tail_biting_exact_is_the_best_circular_bitstream_and_heuristic_is_valid(L, k, V, T):
    g = torch.Generator().manual_seed(7 + L + k + V)
    kv = k * V
    cb = torch.randn(1 << L, V, generator=g)
    x = torch.randn(3, T, V, generator=g)
    exact = viterbi_tailbiting_exact(x, cb, L, kv)
    heur = viterbi_tailbiting(x, cb, L, kv, cost_dtype=torch.float64)
    for b in range(3):
        opt = brute_force(x[b], cb, L, kv, circular=True)
        assert float(path_cost(x[b], cb, path_states(exact[b:b + 1], L, kv)[0])) == \
            pytest.approx(opt, rel=1e-9)
        assert float(path_cost(x[b], cb, path_states(heur[b:b + 1], L, kv)[0])) >= opt - 1e-9


def test_tail_biting_heuristic_matches_the_constrained_viterbi_states():
    # The bits it returns, read as a circular stream, give exactly the states Viterbi scored.
    g = torch.Generator().manual_seed(1)
    L, kv = 8, 2
    cb = torch.randn(1 << L, 1, generator=g)
    x = torch.randn(4, 32, 1, generator=g)
    bits = viterbi_tailbiting(x, cb, L, kv)
    states = path_states(bits, L, kv)
    low = states[:, -1] & ((1 << (L - kv)) - 1)
    again = viterbi(x, cb, L, kv, start_low=low, end_low=low)
    assert torch.equal(states, again)


def _fp16(bits: int) -> float:
    return struct.unpack("<e", struct.pack("<H", bits))[0]


def test_computed_codes_match_their_definitions():
    states = list(range(0, 1 << 16, 97)) + [0, 1, 65535]
    got_1mad = decode_1mad(torch.tensor(states)).tolist()
    got_3inst = decode_3inst(torch.tensor(states)).tolist()
    m = struct.unpack("<H", struct.pack("<e", 0.922))[0]
    assert m == 0x3B60
    for s, a, b in zip(states, got_1mad, got_3inst):
        x = (34038481 * s + 76625530) % 2**32
        byte_sum = sum((x >> (8 * i)) & 255 for i in range(4))
        assert a == pytest.approx((byte_sum - 510) / 147.80054, rel=1e-5, abs=1e-6)
        y = ((89226354 * s + 64248484) % 2**32 & 0x8FFF8FFF) ^ (m << 16 | m)
        assert b == pytest.approx(_fp16(y >> 16) + _fp16(y & 0xFFFF), rel=1e-6)


@pytest.mark.parametrize("V", [1, 2])
def test_hyb_code_matches_its_definition(V):
    table = hyb_table(9, V)
    cb = codebook("hyb", 16, V, table)
    for s in list(range(0, 1 << 16, 211)) + [65535]:
        h = s * (s + 1) % 2**32
        row = table[(h >> 6) & 511].float().clone()
        if (h >> 15) & 1:
            row[0] = -row[0]
        assert torch.equal(cb[s], row)
    # The table is a k-means fit of a standard Gaussian: centred, spread below unit variance.
    assert table.float().mean(0).abs().max() < 0.15
    assert 0.6 < table.float().pow(2).mean() < 1.3


def test_computed_codes_are_close_to_standard_gaussian_over_all_states():
    for code, var in (("1mad", 1.0), ("3inst", None)):
        cb = codebook(code, 16, 1)
        assert abs(float(cb.mean())) < 0.02
        if var is not None:
            assert float(cb.var()) == pytest.approx(var, rel=0.01)


SMALL = dict(L=10, tlut_bits=6)


@pytest.mark.parametrize("q", [
    TrellisQuantizer(bits=2, V=2, code="hyb", **SMALL),
    TrellisQuantizer(bits=3, V=1, code="3inst", L=10),
    TrellisQuantizer(bits=2, V=1, code="1mad", L=10, scale="row"),
    TrellisQuantizer(bits=4, V=1, code="hyb", **SMALL),
])
def test_trellis_grid_codes_rebuild_values_and_state_roundtrips(q):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(32, 48, generator=g) * torch.linspace(0.5, 2, 32).unsqueeze(1)
    grid = q.fit(W)
    vals, codes = grid.round_all(W)
    assert codes.dtype == torch.int32 and codes.min() >= 0 and codes.max() < 2**q.bits
    assert torch.equal(grid.dequantize(codes), vals)
    again = quantizer_from_config(q.config()).grid_from_state(W.shape, grid.state_dict())
    assert torch.equal(again.dequantize(codes), vals)
    placeholder = q.placeholder_state(W.shape)
    assert {k: (v.shape, v.dtype) for k, v in placeholder.items()} == \
        {k: (v.shape, v.dtype) for k, v in grid.state_dict().items()}
    # Rounding a batch of tiles equals rounding each tile alone (tiles are independent).
    tiles = W.reshape(2, 16, 3, 16).permute(0, 2, 1, 3).reshape(6, 16, 16)
    rows = (torch.arange(2).repeat_interleave(3)[:, None] * 16 + torch.arange(16))
    cols = (torch.arange(3).repeat(2)[:, None] * 16 + torch.arange(16))
    v2, c2 = grid.round(tiles, rows, cols)
    assert torch.equal(c2.reshape(2, 3, 16, 16).permute(0, 2, 1, 3).reshape(32, 48), codes)
    rel = float((vals - W).pow(2).sum() / W.pow(2).sum())
    assert rel < {2: 0.2, 3: 0.07, 4: 0.03}[q.bits]


def test_trellis_beats_scalar_two_bit_rounding_on_gaussian_data():
    # Lloyd-Max 2-bit scalar quantization of a Gaussian has MSE 0.1175; a 12-bit trellis gets
    # within ~20% of the rate-distortion bound 0.0625.
    g = torch.Generator().manual_seed(3)
    W = torch.randn(32, 32, generator=g)
    q = TrellisQuantizer(bits=2, V=2, code="hyb", L=12, tlut_bits=8, scale_override=1.0)
    vals, _ = q.fit(W).round_all(W)
    assert float((vals - W).pow(2).mean() / W.pow(2).mean()) < 0.09


def test_trellis_rejects_bad_shapes_and_blocks():
    from yaqa.rounding import round_weight

    q = TrellisQuantizer(bits=2, **SMALL)
    with pytest.raises(ValueError, match="multiple of 16"):
        q.fit(torch.randn(24, 32))
    grid = q.fit(torch.randn(32, 32))
    with pytest.raises(ValueError, match="whole 16x16 tiles"):
        grid.round(torch.randn(8, 16), torch.arange(8), torch.arange(16))
    with pytest.raises(ValueError, match="aligned"):
        grid.round(torch.randn(16, 16), torch.arange(4, 20), torch.arange(16))
    H = torch.eye(32)
    with pytest.raises(ValueError, match="multiple of it"):
        round_weight(torch.randn(32, 32), H, None, q, "ldlq", block_size=8)
    with pytest.raises(ValueError, match="V=1"):
        TrellisQuantizer(code="1mad", V=2)
    with pytest.raises(ValueError, match="unknown quantizer"):
        make_quantizer("trellis2-foo")


def test_quantizer_names_build_the_documented_formats():
    q = make_quantizer("trellis3")
    assert (q.bits, q.L, q.V, q.code) == (3, 16, 2, "hyb")
    q = make_quantizer("trellis2-1mad")
    assert (q.bits, q.V, q.code) == (2, 1, "1mad")
    assert quantizer_from_config(q.config()) == q


def test_graph_runner_pads_batches_and_returns_the_eager_result(monkeypatch):
    # No GPU here: a stand-in "graph" runs the same function on the static buffers, which checks
    # the padding, buffer reuse across batch sizes and codebooks, and slicing of the runner.
    import yaqa.quantizers.trellis as tr

    class FakeGraph:
        def __init__(self, key, cb_shape):
            bucket, T, V, L, kv, dt, dev, backend = key
            self.sx, self.scb = torch.zeros(bucket, T, V), torch.zeros(cb_shape)
            self.out = torch.zeros(bucket, T, dtype=torch.int64)
            self.snv = torch.zeros(1, dtype=torch.int32)
            self.args = (L, kv, dt, backend)

        def replay(self):
            self.out.copy_(tr.viterbi_tailbiting(self.sx, self.scb, *self.args, self.snv))

    def capture(key, cb_shape):
        g = FakeGraph(key, cb_shape)
        return g, g.sx, g.scb, g.snv, g.out

    runner = tr._GraphedTailbiting()
    monkeypatch.setattr(runner, "_capture", capture)
    g = torch.Generator().manual_seed(0)
    L, kv = 8, 2
    for B in (3, 1, 4, 3):
        cb = torch.randn(1 << L, 1, generator=g)
        x = torch.randn(B, 16, 1, generator=g)
        assert torch.equal(runner(x, cb, L, kv, torch.float32, cap=8),
                           tr.viterbi_tailbiting(x, cb, L, kv))
    assert sorted(k[0] for k in runner.graphs) == [1, 4]


def test_float16_costs_give_a_valid_near_optimal_path():
    g = torch.Generator().manual_seed(5)
    L, kv = 10, 2
    cb = codebook("1mad", L, 1)
    x = torch.randn(4, 128, 1, generator=g)
    ref = viterbi_tailbiting(x, cb, L, kv)
    half = viterbi_tailbiting(x, cb, L, kv, cost_dtype=torch.float16)
    c_ref = path_cost(x, cb, path_states(ref, L, kv))
    c_half = path_cost(x, cb, path_states(half, L, kv))
    assert (c_half <= c_ref * 1.02).all()


def test_every_quantizer_name_survives_its_config():
    from yaqa.quantizers import QUANTIZER_NAMES, quantizer_name

    for name in QUANTIZER_NAMES:
        q = make_quantizer(name)
        assert quantizer_name(q.config()) == name
        assert quantizer_from_config(q.config()) == q


def test_auto_viterbi_falls_back_to_torch_when_triton_breaks(monkeypatch):
    import types

    import yaqa.quantizers.trellis as tr

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler for the Triton launcher")

    # A stand-in module: importing the real one would import triton outside its interpreter.
    fake = types.SimpleNamespace(viterbi_triton=broken, available=lambda: True)
    monkeypatch.setitem(sys.modules, "yaqa.quantizers.trellis_triton", fake)
    monkeypatch.setattr(tr, "_TRITON_FAILED", False)
    W = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
    rows = cols = torch.arange(16)
    ref = TrellisQuantizer(L=8, tlut_bits=5, viterbi="torch").fit(W).round(W, rows, cols)
    grid = TrellisQuantizer(L=8, tlut_bits=5).fit(W)
    monkeypatch.setattr(grid, "_backend", lambda dev, dt: "triton")  # as on a CUDA machine
    got = grid.round(W, rows, cols)
    assert torch.equal(got[1], ref[1]) and tr._TRITON_FAILED
    with pytest.raises(RuntimeError, match="compiler"):  # asked for Triton by name: no fallback
        TrellisQuantizer(L=8, tlut_bits=5, viterbi="triton").fit(W).round(W, rows, cols)
