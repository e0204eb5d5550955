"""The fused decode-step kernels, run by Triton's CPU interpreter against the torch ops they replace.

Skipped where Triton is not installed or a GPU is present (bench/check_kernels.py covers the GPU).
"""


import pytest
import torch
import torch.nn.functional as F

from triton_interpreter import require_interpreter

require_interpreter()

import yaqa  # noqa: E402
from yaqa.nn import decode_kernels as dk  # noqa: E402
from yaqa.nn import kernels  # noqa: E402
from yaqa.nn.graph_decode import GraphDecoder, _rotate_half  # noqa: E402

from tiny_models import tiny_model  # noqa: E402


def test_add_rmsnorm_equals_the_residual_add_and_the_transformers_norm():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5)  # 96: not a power of two, the tile is masked
    norm.weight.data = torch.randn(96, generator=g)
    h, d = torch.randn(1, 1, 96, generator=g), torch.randn(1, 1, 96, generator=g)
    h2, x = dk.add_rmsnorm(h, d, norm.weight, norm.variance_epsilon)
    torch.testing.assert_close(h2, h + d)
    torch.testing.assert_close(x, norm(h + d), rtol=1e-5, atol=1e-5)
    same, x0 = dk.add_rmsnorm(h, None, norm.weight, norm.variance_epsilon)
    assert same is h
    torch.testing.assert_close(x0, norm(h), rtol=1e-5, atol=1e-5)


# pos 0: the new position alone; 70: two cache blocks of 64, the second masked.  split 1: one
# program per head; 2: one block each; 4: two programs of each head with no block (merged in).
@pytest.mark.parametrize("pos,split", [(0, 1), (0, 4), (70, 1), (70, 2), (70, 4)])
def test_rope_attention_equals_rotate_half_cache_write_and_sdpa_with_grouped_heads(pos, split):
    g = torch.Generator().manual_seed(1)
    H, KV, D, L = 8, 2, 32, 80
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    kc, vc = torch.randn(1, KV, L, D, generator=g), torch.randn(1, KV, L, D, generator=g)
    q, k, v = (torch.randn(n * D, generator=g) for n in (H, KV, KV))
    p = torch.tensor([pos])
    ref_k, ref_v = kc.clone(), vc.clone()
    ws = dk.attention_workspace(H, D, split, "cpu")
    o = dk.rope_attention(q, k, v, kc, vc, p, inv_freq, 0.9, split, ws)
    assert not ws[1].any()  # the merging programs reset the counters
    f = pos * inv_freq
    cos, sin = torch.cat((f, f)).cos() * 0.9, torch.cat((f, f)).sin() * 0.9

    def rot(t, n):
        t = t.view(n, D)
        return t * cos + _rotate_half(t) * sin

    ref_k[0, :, pos], ref_v[0, :, pos] = rot(k, KV), v.view(KV, D)
    torch.testing.assert_close(kc, ref_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(vc, ref_v)  # only this position's rows written
    mask = (torch.arange(L) <= pos).view(1, 1, 1, L)
    ref = F.scaled_dot_product_attention(rot(q, H).view(1, H, 1, D), ref_k, ref_v,
                                         attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(o, ref.view(H, D), rtol=1e-5, atol=1e-5)
    o2 = dk.rope_attention(q, k, v, kc, vc, p, inv_freq, 0.9, split, ws)  # reused workspace
    torch.testing.assert_close(o2, o, rtol=1e-6, atol=1e-6)


def test_attention_split_covers_the_cache_in_at_most_16_programs():
    assert [dk.attention_split(n) for n in (1, 64, 65, 168, 1024, 100000)] == [1, 1, 2, 4, 16, 16]
    with pytest.raises(ValueError, match="power of two"):
        dk.rope_attention(*(torch.zeros(4) for _ in range(3)), torch.zeros(1, 1, 8, 4),
                          torch.zeros(1, 1, 8, 4), torch.tensor([0]), torch.ones(2), 1.0, 3)


@pytest.mark.parametrize("n", [700, 5000])  # one program; five (a masked last block)
def test_argmax_token_is_the_first_index_of_the_maximum(n):
    g = torch.Generator().manual_seed(n)
    tok, nxt = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
    ws = dk.argmax_workspace(n, "cpu")
    for trial in range(3):
        x = torch.randn(1, 1, n, generator=g).bfloat16()
        if trial:  # ties, within a block and across blocks: the lowest index wins
            top = x.max() + 1
            x[0, 0, [n - 1, n // 2 + trial, n // 2]] = top
        dk.argmax_token(x, tok, nxt, ws)
        assert tok.item() == nxt.item() == x.view(-1).argmax().item()
        assert ws[2].item() == 0  # counter reset for the next launch


def test_silu_mul_equals_the_gated_activation():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 1, 1500, generator=g), torch.randn(1, 1, 1500, generator=g)
    torch.testing.assert_close(dk.silu_mul(a, b), F.silu(a) * b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_decode_step_gives_the_tokens_of_the_torch_step(family, monkeypatch):
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    # Attention over 15 positions in blocks of 4, two programs per head: each reads two blocks.
    monkeypatch.setattr(dk, "ATTENTION_BLOCK", 4)
    monkeypatch.setattr(dk, "MAX_ATTENTION_SPLIT", 2)
    model = tiny_model(family, layers=2)
    prompt = torch.randint(1, 128, (1, 5), generator=torch.Generator().manual_seed(0))
    fused = GraphDecoder(model, max_len=32)
    assert fused.fused and fused._attn_split == 2
    assert torch.equal(fused.generate(prompt, 10),
                       GraphDecoder(model, max_len=32, fused=False).generate(prompt, 10))


def test_fused_decode_step_on_a_packed_model_with_incoherence(monkeypatch):
    # GEMV, fused Hadamard rotations and fused small ops together, against generate's tokens.
    model = tiny_model("llama", hidden=128, intermediate=256, layers=2)
    yaqa.quantize(model, method="rtn", quantizer="int4", group_size=32, incoherence=True,
                  progress=False)
    prompt = torch.randint(1, 128, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    monkeypatch.setattr(kernels, "FORCE_TRITON", True)
    monkeypatch.setenv("YAQA_GEMV_CONFIG", "64,128,1,4,1,0")  # few programs: the interpreter is slow
    assert torch.equal(GraphDecoder(model, max_len=16).generate(prompt, 6), ref)
