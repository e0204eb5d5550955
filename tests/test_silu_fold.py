"""silu(gate)·up folded into the down projection's packed GEMV, run by Triton's CPU interpreter
against the unfused path (the separate activation kernel, then the GEMV).

Skipped where Triton is not installed or a GPU is present (bench/check_kernels.py covers the GPU).
"""

import pytest
import torch

from triton_interpreter import kernels_rebuilt, require_interpreter

require_interpreter()

import yaqa  # noqa: E402
from yaqa.nn import QuantizedLinear, kernels  # noqa: E402
from yaqa.nn import decode_kernels as dk  # noqa: E402
from yaqa.nn.graph_decode import GraphDecoder  # noqa: E402
from yaqa.nn.stacked import StackedLinears  # noqa: E402
from yaqa.quantizers import IntQuantizer  # noqa: E402
from yaqa.rounding import round_weight  # noqa: E402

from tiny_models import tiny_model  # noqa: E402


interpreter = kernels_rebuilt(kernels._kernels)


def _layer(bits, group, m, n, seed=0, incoherence=False, bias=False):
    q = IntQuantizer(bits=bits, group_size=group)
    torch.manual_seed(seed)
    res = round_weight(torch.randn(m, n) * 0.05, None, None, q, method="rtn",
                       incoherence=seed + 3 if incoherence else False, return_details=True)
    b = torch.randn(m) * 0.1 if bias else None
    return QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform, bias=b)


def _gate_up(rows, n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # Gate values over silu's whole range (large negative ones round to -0 in 16 bits).
    gate = (torch.randn(rows, n, generator=g) * 3).to(dtype)
    up = torch.randn(rows, n, generator=g).to(dtype)
    return gate, up


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits,group,m,n", [(4, 128, 48, 512), (4, 32, 40, 256),
                                            (2, 64, 24, 256), (3, 128, 32, 256),
                                            (8, 64, 16, 384)])
def test_folded_gemv_equals_the_activation_kernel_then_the_gemv(bits, group, m, n, dtype):
    down = _layer(bits, group, m, n, seed=bits + group)
    gate, up = _gate_up(1, n, dtype, seed=m)
    args = (down.qweight, down.grid_scale, down.grid_zero, bits, group, m, n)
    unfused = kernels.gemv(dk.silu_mul(gate, up), *args)
    folded = kernels.gemv(gate, *args, up=up)
    # The same activation values, rounded the same way, through the same tile: bit-equal.
    assert torch.equal(folded, unfused)
    dense = kernels.dequantize_rows(*args[:5], n, 0, m)
    ref = torch.nn.functional.silu(gate.float()) * up.float() @ dense.T
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(folded.float(), ref, rtol=tol, atol=tol)
    # Which input gets the silu matters: the swapped order is a different result.
    swapped = kernels.gemv(up, *args, up=gate)
    assert not torch.allclose(swapped.float(), ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("tile", [(16, 128, 2, 4, 1, False), (16, 128, 1, 4, 1, True)])
def test_folded_gemv_over_several_rows_and_forced_tiles(tile):
    # Split-K and the 3-D unpacking each load the activation their own way.
    down = _layer(4, 64, 32, 256, seed=1)
    gate, up = _gate_up(3, 256, torch.bfloat16, seed=4)
    args = (down.qweight, down.grid_scale, down.grid_zero, 4, 64, 32, 256)
    folded = kernels.gemv(gate, *args, tile=tile, up=up)
    assert torch.equal(folded, kernels.gemv(dk.silu_mul(gate, up), *args, tile=tile))


def test_folded_gemv_reads_the_two_halves_of_the_stacked_gate_up_output(monkeypatch):
    # gate/up as one stacked GEMV: gate and up are views into one (1, 2·n) row, the down
    # projection reads them in place; with a bias on the down projection.
    n, hidden = 256, 128
    gate_l, up_l = _layer(4, 64, n, hidden, seed=5), _layer(4, 64, n, hidden, seed=6)
    down = _layer(4, 128, hidden, n, seed=7, bias=True)
    x = torch.randn(1, 1, hidden, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    stack = StackedLinears.build([gate_l, up_l])
    assert stack is not None
    with torch.no_grad():
        g, u = stack(x)
        assert g.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()
        assert down.folds_silu(g)
        folded = down.forward_silu_mul(g, u)
        unfused = down(dk.silu_mul(g, u))
        wrong_half = down(dk.silu_mul(u, g))
    assert folded.shape == unfused.shape == (1, 1, hidden)
    assert torch.equal(folded, unfused)
    assert not torch.equal(folded, wrong_half)


def test_cpu_down_projections_take_the_activation_then_the_layer():
    n, hidden = 256, 64
    plain = _layer(4, 128, hidden, n, seed=2)
    gate, up = _gate_up(1, n, torch.float32, seed=9)
    with torch.no_grad():
        # CPU (no Triton): the row-block path with the reference activation.
        assert not plain.folds_silu(gate)
        torch.testing.assert_close(plain.forward_silu_mul(gate, up),
                                   plain(torch.nn.functional.silu(gate) * up))


# 256 = 16·16 (two Hadamard factors), 7168 = 28·16·16 (a Paley factor: three).  float32 only: the
# interpreter's 16-bit tl.dot returns garbage (the rotation kernels' bf16 path is checked on the
# GPU by bench/check_kernels.py).
@pytest.mark.parametrize("n", [256, 7168])
def test_incoherent_down_projection_folds_the_activation_into_its_input_rotation(n, monkeypatch):
    dtype = torch.float32
    # The rotation mixes all of K, so silu(gate)·up must be whole before it: the input rotation
    # computes it while loading the row, bit-equal to the activation kernel then the rotation.
    hidden = 64
    down = _layer(4, 64, hidden if n == 256 else 16, n, seed=2, incoherence=True).to(dtype)
    gate, up = _gate_up(1, n, dtype, seed=9)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    count = down._fused_rotation(gate, "in")
    assert down.folds_silu(gate) and count == (2 if n == 256 else 3)
    with torch.no_grad():
        act = dk.silu_mul(gate, up)
        rotated = down._fused_rotate(gate, "in", count, up=up)
        assert torch.equal(rotated, down._fused_rotate(act, "in", count))
        assert not torch.equal(rotated, down._fused_rotate(up, "in", count, up=gate))
        if n == 256:  # the layer's GEMV over K=7168 is slow to interpret
            assert torch.equal(down.forward_silu_mul(gate, up), down(act))
            g3, u3 = _gate_up(3, n, dtype, seed=10)  # several rows
            torch.testing.assert_close(down.forward_silu_mul(g3, u3), down(dk.silu_mul(g3, u3)),
                                       rtol=1e-5, atol=1e-5)
        # The torch stand-in of the rotation kernels (their fallback path).
        sign = down.had_in_sign
        Hs = [getattr(down, f"had_in_{i}") for i in range(count)]
        ref = kernels._unfused_rotation(act.reshape(1, n), sign.to(dtype), Hs, True,
                                        down._had_in_scale, 1)
        torch.testing.assert_close(rotated.reshape(1, n), ref, rtol=1e-5, atol=1e-5)
        back = kernels._unfused_rotation(gate.reshape(1, n), sign.to(dtype), Hs, True,
                                         down._had_in_scale, 1, up.reshape(1, n))
        torch.testing.assert_close(back, ref, rtol=1e-6, atol=1e-6)  # torch's exp vs Triton's


def test_mismatched_gate_and_up_are_refused():
    down = _layer(4, 128, 16, 256)
    gate, up = _gate_up(1, 256, torch.float32, seed=0)
    args = (down.qweight, down.grid_scale, down.grid_zero, 4, 128, 16, 256)
    with pytest.raises(ValueError, match="gate and up"):
        kernels.gemv(gate, *args, up=up[:, :128])
    with pytest.raises(ValueError, match="gate and up"):
        kernels.gemv(gate, *args, up=up.double())


@pytest.mark.parametrize("incoherence", [False, True])
def test_decoder_with_the_folded_down_projection_gives_the_unfolded_tokens(incoherence,
                                                                           monkeypatch):
    # bf16 where the GEMV folds (its rounding matters); float32 with incoherence (the
    # interpreter's 16-bit tl.dot in the rotation kernels is not trustworthy).
    model = tiny_model("llama", hidden=128, intermediate=256, layers=1,
                       dtype=torch.float32 if incoherence else torch.bfloat16)
    yaqa.quantize(model, method="rtn", quantizer="int4", group_size=64, incoherence=incoherence,
                  progress=False)
    prompt = torch.randint(1, 128, (1, 2), generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "64,128,1,4,1,0")  # few programs: fast to interpret
    calls = {"fold": 0, "act": 0}
    fold_op, act = kernels.intk_matmul_silu, dk.silu_mul
    rot2 = kernels.rotate2

    def counted_fold(*a):
        calls["fold"] += 1
        return fold_op(*a)

    def counted_act(*a):
        calls["act"] += 1
        return act(*a)

    def counted_rotation(x, sign, *a):
        calls["fold"] += len(a) > 4 and a[4] is not None  # the up argument: a folded rotation
        return rot2(x, sign, *a)

    monkeypatch.setattr(kernels, "intk_matmul_silu", counted_fold)
    monkeypatch.setattr(kernels, "rotate2", counted_rotation)
    monkeypatch.setattr(dk, "silu_mul", counted_act)
    folded = GraphDecoder(model, max_len=16, fold_silu=True).generate(prompt, 3)
    # 2 steps of prompt + 2 more: every step folds (the GEMV, or the incoherent input rotation).
    assert (calls["fold"], calls["act"]) == (4, 0)
    unfolded = GraphDecoder(model, max_len=16, fold_silu=False).generate(prompt, 3)
    assert (calls["fold"], calls["act"]) == (4, 4)
    assert torch.equal(folded, unfolded)
