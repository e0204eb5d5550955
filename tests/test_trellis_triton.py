"""The fused Triton Viterbi against the torch Viterbi (same states) and exhaustive search.

No GPU here: the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported), at small L.  Skipped when triton is not installed.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("triton was imported without its interpreter and there is no GPU",
                allow_module_level=True)

from yaqa.quantizers import TrellisQuantizer  # noqa: E402
from yaqa.quantizers.trellis import codebook, hyb_table, viterbi, viterbi_tailbiting  # noqa: E402
from yaqa.quantizers.trellis_triton import viterbi_triton  # noqa: E402

from test_trellis import CASES, brute_force, path_cost  # noqa: E402


@pytest.mark.parametrize("L,k,V,T", CASES)
def test_triton_viterbi_finds_the_exhaustive_optimum_with_the_torch_path(L, k, V, T):
    g = torch.Generator().manual_seed(L * 100 + k * 10 + V + T)
    kv = k * V
    cb = torch.randn(1 << L, V, generator=g)
    x = torch.randn(3, T, V, generator=g)
    lows = torch.tensor([0, 1, (1 << (L - kv)) - 1])
    for start, end in ((None, None), (lows, lows)):
        ours = viterbi_triton(x, cb, L, kv, start, end, block=2, tiles_per_program=2)
        assert torch.equal(ours, viterbi(x, cb, L, kv, start, end))
        for b in range(x.shape[0]):
            lo = None if start is None else int(lows[b])
            best = brute_force(x[b], cb, L, kv, start_low=lo, end_low=lo)
            assert float(path_cost(x[b], cb, ours[b])) == pytest.approx(best, rel=1e-5)


@pytest.mark.parametrize("L,k,V,code", [(8, 2, 2, "hyb"), (8, 2, 1, "1mad")])
def test_triton_tailbiting_equals_torch_on_real_codes(L, k, V, code):
    # HYB repeats codewords (2^(Q+1) distinct of 2^L), so exact cost ties are common: the same
    # states here also prove the same tie-breaking.
    g = torch.Generator().manual_seed(L + k + V)
    kv = k * V
    cb = codebook(code, L, V, hyb_table(L - 2, V) if code == "hyb" else None)
    x = torch.randn(3, 24 // V, V, generator=g)
    for nt, block in ((1, 1 << (L - kv)), (2, 1 << (L - kv - 2))):  # one chunk / four chunks
        ours = viterbi_tailbiting(x, cb, L, kv, backend="triton")
        assert torch.equal(ours, viterbi_tailbiting(x, cb, L, kv))
        assert torch.equal(viterbi_triton(x, cb, L, kv, block=block, tiles_per_program=nt),
                           viterbi(x, cb, L, kv))


@pytest.mark.parametrize("states", [8, 128, 256])  # 1, 2 and 4 (all) groups per chunk
def test_default_chunk_counts_states_so_wide_steps_keep_the_torch_path(monkeypatch, states):
    # kv = 6 gives 64 predecessors per group: a chunk of `states` states holds states // 64 groups
    # (at least one), never the kv = 4 default of 256 groups, which spilled registers on the H100.
    from yaqa.quantizers import trellis_triton

    monkeypatch.setitem(trellis_triton.TUNING, "states", states)
    L, k, V = 8, 3, 2
    g = torch.Generator().manual_seed(states)
    cb = codebook("hyb", L, V, hyb_table(L - 2, V))
    x = torch.randn(2, 12, V, generator=g)
    assert torch.equal(viterbi_triton(x, cb, L, k * V), viterbi(x, cb, L, k * V))


def test_trellis_grid_rounds_the_same_with_either_viterbi():
    g = torch.Generator().manual_seed(3)
    W = torch.randn(16, 16, generator=g)
    rows, cols = torch.arange(16), torch.arange(16)
    out = []
    for backend in ("torch", "triton"):
        q = TrellisQuantizer(bits=2, L=8, V=2, tlut_bits=5, viterbi=backend)
        out.append(q.fit(W).round(W, rows, cols))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


def test_viterbi_backend_settings_are_checked():
    with pytest.raises(ValueError, match="viterbi"):
        TrellisQuantizer(viterbi="cuda")
    with pytest.raises(ValueError, match="float32"):
        TrellisQuantizer(viterbi="triton", cost_dtype="float16")
    with pytest.raises(ValueError, match="backend"):
        viterbi(torch.zeros(1, 4, 1), torch.zeros(16, 1), 4, 1, backend="numba")


def test_triton_viterbi_skips_the_padding_of_a_graph_batch():
    g = torch.Generator().manual_seed(4)
    L, kv = 6, 2
    cb = torch.randn(1 << L, 1, generator=g)
    x = torch.randn(4, 8, 1, generator=g)
    nv = torch.tensor([3], dtype=torch.int32)
    ours = viterbi_triton(x, cb, L, kv, n_valid=nv, tiles_per_program=2)
    assert torch.equal(ours[:3], viterbi(x[:3], cb, L, kv))
    assert not ours[3].any()  # skipped: left as allocated
    steps = viterbi_tailbiting(x, cb, L, kv, backend="triton", n_valid=nv)
    assert torch.equal(steps[:3], viterbi_tailbiting(x[:3], cb, L, kv))
