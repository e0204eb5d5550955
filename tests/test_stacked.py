"""Stacked layers (q/k/v, gate/up as one packed GEMV), run by Triton's CPU interpreter against
the layers one by one.

Skipped where Triton is not installed or a GPU is present (bench/check_kernels.py covers the GPU).
"""

import pytest
import torch

from triton_interpreter import kernels_rebuilt, require_interpreter

require_interpreter()

import yaqa  # noqa: E402
from yaqa.nn import QuantizedLinear, kernels  # noqa: E402
from yaqa.nn.graph_decode import GraphDecoder  # noqa: E402
from yaqa.nn.stacked import StackedLinears  # noqa: E402
from yaqa.quantizers import IntQuantizer  # noqa: E402
from yaqa.rounding import round_weight  # noqa: E402

from tiny_models import tiny_model  # noqa: E402


interpreter = kernels_rebuilt(kernels._kernels)  # build the kernels under the interpreter


def _layers(bits, group, sizes, n, incoherence, bias=False):
    q = IntQuantizer(bits=bits, group_size=group)
    mods = []
    for seed, m in enumerate(sizes):
        torch.manual_seed(seed)
        res = round_weight(torch.randn(m, n) * 0.05, None, None, q, method="rtn",
                           incoherence=seed + 3 if incoherence else False, return_details=True)
        b = torch.randn(m) * 0.1 if bias else None
        mods.append(QuantizedLinear.from_codes(res.codes, res.grid, q, transform=res.transform,
                                               bias=b))
    return mods


@pytest.mark.parametrize("incoherence", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_stacked_layers_give_the_outputs_of_the_layers_one_by_one(bits, group, incoherence,
                                                                   monkeypatch):
    # q/k/v-like: 40 + 24 + 24 rows, so the kernel's row blocks must respect the layer bounds.
    n = 256
    mods = _layers(bits, group, (40, 24, 24), n, incoherence, bias=True)
    x = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(bits + group))
    with torch.no_grad():
        ref = [m(x) for m in mods]  # the CPU path: row-block dequantize + matmul
    before = sum(m.qweight.numel() + m.grid_scale.numel() + m.grid_zero.numel() for m in mods)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    stack = StackedLinears.build(mods)
    assert stack is not None and stack.bounds == (40, 64) and stack.applies(x)
    # The layers' buffers are views into the stack: the packed bytes exist once.
    assert sum(b.numel() for b in stack.buffers.values()) == before
    base = stack.buffers["qweight"]
    for m in mods:
        assert m.qweight.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
    with torch.no_grad():
        outs = stack(x)
        alone = [m(x) for m in mods]  # each layer alone still works on its view
    for y, r, a in zip(outs, ref, alone):
        assert y.shape == r.shape
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_two_stacked_layers_over_several_rows_without_incoherence(monkeypatch):
    mods = _layers(4, 128, (48, 48), 256, False)  # gate/up-like
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [m(x) for m in mods]
        monkeypatch.setattr(kernels, "FORCE_TRITON", True)
        outs = StackedLinears.build(mods)(x)
    for y, r in zip(outs, ref):
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-4)


def test_layers_that_cannot_stack_are_refused():
    assert StackedLinears.build(_layers(4, 64, (32,), 256, False)) is None  # one layer
    a = _layers(4, 64, (32, 32), 256, False)
    b = _layers(4, 128, (32,), 256, False)
    assert StackedLinears.build([a[0], b[0]]) is None  # group sizes differ
    c = _layers(4, 64, (32,), 256, True)
    assert StackedLinears.build([a[0], c[0]]) is None  # incoherence on one only
    assert StackedLinears.build([a[0], torch.nn.Linear(256, 8)]) is None
    assert StackedLinears.build(a) is not None


def test_gemv_bounds_are_checked_and_configs_respect_them():
    assert kernels.config_fits((64, 256, 4), 4, 128, 4096, (4096, 5120))
    assert not kernels.config_fits((128, 256, 4), 4, 128, 4096, (4096, 5184))
    assert kernels._default_tile(88, 256, 64, 4, (40, 64))[0] == 4
    assert kernels._default_tile(5000, 256, 64, 4, (4096, 4104))[0] == 8
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="input rows"):
        kernels.gemv(x, torch.zeros(64 * 128, dtype=torch.uint8), torch.ones(64, 2).half(),
                     torch.zeros(64, 2, dtype=torch.uint8), 4, 128, 64, 256, bounds=(16, 32),
                     per_segment=True)
    with pytest.raises(ValueError, match="bounds"):
        kernels.gemv(x, torch.zeros(64 * 128, dtype=torch.uint8), torch.ones(64, 2).half(),
                     torch.zeros(64, 2, dtype=torch.uint8), 4, 128, 64, 256, bounds=(32, 16))


@pytest.mark.parametrize("family,bits,incoherence", [("llama", 4, False), ("qwen2", 3, True)])
def test_graph_decoder_tokens_are_unchanged_by_stacking(family, bits, incoherence, monkeypatch):
    model = tiny_model(family, hidden=128, intermediate=256, layers=2)
    yaqa.quantize(model, method="rtn", quantizer=f"int{bits}", group_size=32,
                  incoherence=incoherence, progress=False)
    prompt = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=0)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    # Few programs (the interpreter is slow); 64 rows divide the q/k/v and gate/up bounds.
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "64,128,1,4,1,0")
    plain = GraphDecoder(model, max_len=16, stack_linears=False)
    assert plain.stacked == 0
    tokens = plain.generate(prompt, 5)
    dec = GraphDecoder(model, max_len=16)
    assert dec.stacked == 4  # q/k/v and gate/up of both layers
    assert torch.equal(dec.generate(prompt, 5), tokens)
    assert torch.equal(tokens, ref)


def test_layers_of_one_output_size_share_their_output_rotation(monkeypatch):
    # 512 + 256 + 256 rows, all sizes with a fused rotation: the input rotation, q's output
    # rotation and one for k and v together: 3 launches instead of 4.
    mods = _layers(4, 64, (512, 256, 256), 256, True, bias=True)
    x = torch.randn(1, 1, 256, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = [m(x) for m in mods]
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    stack = StackedLinears.build(mods)
    assert [(i, j, s is not None) for i, j, s in stack.out_runs] == [(0, 1, False), (1, 3, True)]
    calls = []
    rotate2 = kernels.rotate2

    def counting(x, sign, *args):
        calls.append(tuple(sign.shape))
        return rotate2(x, sign, *args)

    monkeypatch.setattr(kernels, "rotate2", counting)
    with torch.no_grad():
        outs = stack(x)
    assert calls == [(3, 256), (512,), (2, 256)]
    for y, r in zip(outs, ref):
        torch.testing.assert_close(y, r, rtol=1e-4, atol=1e-4)
