"""The Triton GEMV for a 16-bit LM head, run by Triton's CPU interpreter against torch.

Skipped where Triton is not installed or a GPU is present (bench/check_kernels.py covers the GPU).
"""

import pytest
import torch

from triton_interpreter import kernels_rebuilt, require_interpreter

require_interpreter()

from yaqa.nn import kernels, kernels_dense  # noqa: E402
from yaqa.nn.graph_decode import GraphDecoder  # noqa: E402

from tiny_models import tiny_model  # noqa: E402


interpreter = kernels_rebuilt(kernels_dense._kernels)


# 200 rows: the last row block is masked; K=384 with BLOCK_K 256: the last K step is masked;
# K=512: no mask along K.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,rows", [(200, 384, 1), (64, 512, 3)])
def test_dense_gemv_equals_the_matmul(m, n, rows, dtype):
    g = torch.Generator().manual_seed(m + n)
    W = (torch.randn(m, n, generator=g) * 0.05).to(dtype)
    x = torch.randn(rows, n, generator=g).to(dtype)
    y = kernels_dense.dense_matmul(x, W)
    ref = x.float() @ W.float().T
    assert y.shape == (rows, m) and y.dtype == dtype
    # fp32 sums rounded once: within one rounding of the output dtype.
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-3)
    # A forced tile with several row blocks and K steps gives the same values.
    y2 = kernels_dense.dense_gemv(x, W, tile=(8, 128, 4, 1))
    torch.testing.assert_close(y2.float(), ref, rtol=1e-2, atol=1e-3)


def test_dense_gemv_support_rules():
    W = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert kernels_dense.supports(W)
    assert kernels_dense.supports(W, torch.zeros(1, 64, dtype=torch.bfloat16))
    assert not kernels_dense.supports(W, torch.zeros(1, 64))  # activation of another dtype
    assert not kernels_dense.supports(W.float())  # fp32: cuBLAS
    assert not kernels_dense.supports(W.T)  # not contiguous
    assert not kernels_dense.supports(torch.zeros(16, 60, dtype=torch.bfloat16))  # 16-byte rows


def test_decoder_runs_the_bf16_head_by_the_triton_gemv(monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    model = tiny_model("llama", layers=1, dtype=torch.bfloat16)
    prompt = torch.randint(1, 128, (1, 3), generator=torch.Generator().manual_seed(5))
    calls = []
    op = kernels_dense.dense_matmul

    def counted(x, w):
        calls.append(w.shape)
        return op(x, w)

    monkeypatch.setattr(kernels_dense, "dense_matmul", counted)
    # On CPU the default is cuBLAS's stand-in (no measurement without a GPU): forced here.
    assert not GraphDecoder(model, max_len=16).dense_head
    dec = GraphDecoder(model, max_len=16, dense_head=True)
    assert dec.dense_head
    tokens = dec.generate(prompt, 4)
    assert calls and all(s == model.lm_head.weight.shape for s in calls)
    assert torch.equal(tokens, GraphDecoder(model, max_len=16, dense_head=False).generate(prompt, 4))
