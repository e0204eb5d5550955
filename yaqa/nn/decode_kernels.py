"""Fused Triton kernels for the small ops of a batch-1 decode step (used by :mod:`.graph_decode`).

At batch 1 the step's matmuls read ~4 GB in ~1.5 ms, while the ops around them are tiny but many:
transformers' RMSNorm is 6-7 elementwise kernels, the rotary embedding and cache write another
~14, attention with a mask and grouped KV heads a few more, the gated MLP two.  Inside a CUDA
graph each kernel still costs 2-3 µs of launch gap, so ~40 of them per layer add ~3 ms per
token on a 32-layer model, as much as the weights.  Here each group is one kernel:

- :func:`add_rmsnorm`: residual add + RMSNorm (+ weight), one read and two writes of the row;
- :func:`rope_cache`: rotary embedding of q and k, and the k/v cache write at the position held
  on the device;
- :func:`decode_attention`: one program per query head over the cached positions up to the
  device-held position (online softmax in fp32), grouped KV heads by indexing;
- :func:`silu_mul`: ``silu(gate) * up``.

They round like the eager ops where it is cheap (the normalised row to the model dtype before the
weight multiply; cos/sin to the model dtype), otherwise compute in fp32 and round once, so
tokens match the eager step up to float rounding.  Batch 1, one position per step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rmsnorm(h_ptr, d_ptr, w_ptr, hout_ptr, out_ptr, eps, N: tl.constexpr,
                 BLOCK: tl.constexpr, HAS_D: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    if HAS_D:
        # The residual add, rounded to the stream's dtype as torch's add does.
        d = tl.load(d_ptr + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + d.to(tl.float32)).to(hout_ptr.dtype.element_ty)
        tl.store(hout_ptr + offs, h, mask=mask)
    x = h.to(tl.float32)
    var = tl.sum(x * x, axis=0) / N
    n = (x * (1.0 / tl.sqrt(var + eps))).to(h_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (w * n).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_cache(q_ptr, k_ptr, v_ptr, qout_ptr, kc_ptr, vc_ptr, pos_ptr, inv_ptr, rope_scale,
                L, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr):
    HALF: tl.constexpr = D // 2
    pos = tl.load(pos_ptr)
    j = tl.arange(0, HALF)
    f = pos.to(tl.float32) * tl.load(inv_ptr + j)
    dt = q_ptr.dtype.element_ty
    c = (tl.cos(f) * rope_scale).to(dt).to(tl.float32)
    s = (tl.sin(f) * rope_scale).to(dt).to(tl.float32)
    # q as (H, D/2) halves: [q1, q2] -> [q1·c − q2·s, q2·c + q1·s] (rotate_half convention).
    hq = tl.arange(0, H)[:, None] * D + j[None, :]
    q1 = tl.load(q_ptr + hq).to(tl.float32)
    q2 = tl.load(q_ptr + hq + HALF).to(tl.float32)
    tl.store(qout_ptr + hq, (q1 * c[None, :] - q2 * s[None, :]).to(dt))
    tl.store(qout_ptr + hq + HALF, (q2 * c[None, :] + q1 * s[None, :]).to(dt))
    hk = tl.arange(0, KV)[:, None] * D + j[None, :]
    k1 = tl.load(k_ptr + hk).to(tl.float32)
    k2 = tl.load(k_ptr + hk + HALF).to(tl.float32)
    # Cache (1, KV, L, D): head h's row for this position.
    ck = tl.arange(0, KV)[:, None] * (L * D) + pos * D + j[None, :]
    ct = kc_ptr.dtype.element_ty
    tl.store(kc_ptr + ck, (k1 * c[None, :] - k2 * s[None, :]).to(ct))
    tl.store(kc_ptr + ck + HALF, (k2 * c[None, :] + k1 * s[None, :]).to(ct))
    tl.store(vc_ptr + ck, tl.load(v_ptr + hk).to(ct))
    tl.store(vc_ptr + ck + HALF, tl.load(v_ptr + hk + HALF).to(ct))


@triton.jit
def _decode_attention(q_ptr, kc_ptr, vc_ptr, o_ptr, pos_ptr, sm_scale, L,
                      GROUP: tl.constexpr, D: tl.constexpr, BLOCK_L: tl.constexpr):
    h = tl.program_id(0)
    kvh = h // GROUP
    pos = tl.load(pos_ptr).to(tl.int32)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + h * D + d).to(tl.float32) * sm_scale
    base = kvh * L * D
    m = tl.full((), float("-inf"), tl.float32)
    l_sum = tl.zeros((), tl.float32)
    acc = tl.zeros((D,), tl.float32)
    start = tl.zeros((), tl.int32)
    while start <= pos:  # only the filled part of the cache (a while: its bound is on the device)
        t = start + tl.arange(0, BLOCK_L)
        valid = t <= pos
        kv = base + t[:, None] * D + d[None, :]
        k = tl.load(kc_ptr + kv, mask=valid[:, None], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.sum(k * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new)
        v = tl.load(vc_ptr + kv, mask=valid[:, None], other=0.0).to(tl.float32)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
        start += BLOCK_L
    tl.store(o_ptr + h * D + d, (acc / l_sum).to(o_ptr.dtype.element_ty))


@triton.jit
def _silu_mul(g_ptr, u_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)  # act_fn's rounding
    tl.store(out_ptr + offs, (a * u).to(out_ptr.dtype.element_ty), mask=mask)


def add_rmsnorm(h: torch.Tensor, d: torch.Tensor | None, weight: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h + d, rmsnorm(h + d) * weight)`` for one row (``d=None``: no add)."""
    n = h.shape[-1]
    out = torch.empty(h.shape, dtype=torch.result_type(weight, h), device=h.device)
    hout = torch.empty_like(h) if d is not None else h
    block = triton.next_power_of_2(n)
    _add_rmsnorm[(1,)](h, d if d is not None else h, weight, hout, out, eps, N=n, BLOCK=block,
                       HAS_D=d is not None, num_warps=8 if block >= 2048 else 4)
    return hout, out


def rope_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
               rope_scale: float) -> torch.Tensor:
    """Rotary-embedded q (``heads x head_dim``); rotated k and v written to the caches at ``pos``."""
    kv, L, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    H = q.numel() // D
    qout = torch.empty(H, D, dtype=q.dtype, device=q.device)
    _rope_cache[(1,)](q, k, v, qout, k_cache, v_cache, pos, inv_freq, rope_scale, L, H=H, KV=kv,
                      D=D, num_warps=4)
    return qout


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     pos: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query row per head (``heads x head_dim``) over cache positions
    ``0..pos`` (causal for the newest token), grouped KV heads by index."""
    H, D = q.shape
    kv, L = k_cache.shape[1], k_cache.shape[2]
    o = torch.empty_like(q)
    _decode_attention[(H,)](q, k_cache, v_cache, o, pos, D**-0.5, L, GROUP=H // kv, D=D,
                            BLOCK_L=64, num_warps=4)
    return o


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(g)
    n = g.numel()
    _silu_mul[(triton.cdiv(n, 1024),)](g, u, out, n, BLOCK=1024, num_warps=4)
    return out


def supported(heads: int, kv_heads: int, head_dim: int) -> bool:
    """Power-of-two head counts and head size (tile shapes), whole query groups."""
    def pow2(v):
        return v >= 1 and v & (v - 1) == 0

    return pow2(heads) and pow2(kv_heads) and pow2(head_dim) and head_dim >= 16 \
        and heads % kv_heads == 0
