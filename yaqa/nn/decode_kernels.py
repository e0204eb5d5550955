"""Fused Triton kernels for the small ops of a batch-1 decode step (used by :mod:`.graph_decode`).

At batch 1 the step's matmuls read ~4 GB in ~1.5 ms, while the ops around them are tiny but many:
transformers' RMSNorm is 6-7 elementwise kernels, the rotary embedding and cache write another
~14, attention with a mask and grouped KV heads a few more, the gated MLP two.  Inside a CUDA
graph each kernel still costs 2-3 µs of launch gap, so ~40 of them per layer add ~3 ms per
token on a 32-layer model, as much as the weights.  Here each group is one kernel:

- :func:`add_rmsnorm`: residual add + RMSNorm (+ weight), one read and two writes of the row;
- :func:`rope_attention`: rotary embedding of q and k, the k/v cache write at the position held
  on the device, and attention over the cached positions up to that position (online softmax
  in fp32; a head's cache blocks split over several programs, merged by the last to finish),
  grouped KV heads by indexing;
- :func:`silu_mul`: ``silu(gate) * up``;
- :func:`argmax_token`: the greedy token, written as the next step's input.

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
def _rope_attention(q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, ws_ptr, cnt_ptr, pos_ptr, inv_ptr,
                    rope_scale, sm_scale, L, GROUP: tl.constexpr, D: tl.constexpr,
                    BLOCK_L: tl.constexpr, SPLIT: tl.constexpr):
    # Program (h, sp): query head h over cache blocks sp, sp + SPLIT, ... (flash-decoding: the
    # blocks of one head are read in parallel instead of one after the other).  Every program
    # rotates its q and its KV head's new k itself (a few hundred flops), so the rotary
    # embedding and the cache write need no launch of their own.  The new position's k/v stay in
    # registers: programs read only positions < pos from the cache, and program (first head of
    # the group, 0) writes position pos, so no program reads a row another one is writing.
    h = tl.program_id(0)
    sp = tl.program_id(1)
    kvh = h // GROUP
    HALF: tl.constexpr = D // 2
    d = tl.arange(0, D)
    partner = (d + HALF) % D
    # rotate_half convention: [x1, x2] -> [x1·c − x2·s, x2·c + x1·s], as one D-vector.
    sign = tl.where(d < HALF, -1.0, 1.0)
    q = tl.load(q_ptr + h * D + d).to(tl.float32)
    qp = tl.load(q_ptr + h * D + partner).to(tl.float32)
    k = tl.load(k_ptr + kvh * D + d).to(tl.float32)
    kp = tl.load(k_ptr + kvh * D + partner).to(tl.float32)
    ct = kc_ptr.dtype.element_ty
    v_new = tl.load(v_ptr + kvh * D + d).to(ct)
    pos = tl.load(pos_ptr).to(tl.int32)
    f = pos.to(tl.float32) * tl.load(inv_ptr + d % HALF)
    dt = q_ptr.dtype.element_ty
    c = (tl.cos(f) * rope_scale).to(dt).to(tl.float32)
    s = (tl.sin(f) * rope_scale).to(dt).to(tl.float32)
    q = (q * c + sign * qp * s).to(dt).to(tl.float32) * sm_scale  # rounded as the eager q
    k_new = (k * c + sign * kp * s).to(ct)
    base = kvh * L * D  # cache (1, KV, L, D)
    if (h % GROUP == 0) & (sp == 0):
        tl.store(kc_ptr + base + pos * D + d, k_new)
        tl.store(vc_ptr + base + pos * D + d, v_new)
    # Online softmax; program (h, 0) starts from the new position (exact, in registers), the
    # others from nothing (m = -inf: every block they read has a valid position, so no NaN).
    first = sp == 0
    m = tl.where(first, tl.sum(k_new.to(tl.float32) * q, axis=0), float("-inf"))
    l_sum = tl.where(first, 1.0, 0.0)
    acc = tl.where(first, v_new.to(tl.float32), 0.0)
    start = sp * BLOCK_L
    while start < pos:  # only the filled part of the cache (a while: its bound is on the device)
        t = start + tl.arange(0, BLOCK_L)
        valid = t < pos
        kv = base + t[:, None] * D + d[None, :]
        kt = tl.load(kc_ptr + kv, mask=valid[:, None], other=0.0).to(tl.float32)
        vt = tl.load(vc_ptr + kv, mask=valid[:, None], other=0.0).to(tl.float32)
        sc = tl.where(valid, tl.sum(kt * q[None, :], axis=1), float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, axis=0))
        alpha = tl.exp(m - m_new)
        p = tl.exp(sc - m_new)
        acc = acc * alpha + tl.sum(p[:, None] * vt, axis=0)
        l_sum = l_sum * alpha + tl.sum(p, axis=0)
        m = m_new
        start += SPLIT * BLOCK_L
    out = o_ptr + h * D + d
    if SPLIT == 1:
        tl.store(out, (acc / l_sum).to(o_ptr.dtype.element_ty))
    else:
        # Partials (acc, m, l) to the workspace; the head's last program to arrive merges them
        # in a fixed order and resets the counter (CUDA-graph replays need no zero-fill).
        W: tl.constexpr = D + 2
        part = ws_ptr + (h * SPLIT + sp) * W
        tl.store(part + d, acc)
        tl.store(part + D, m)
        tl.store(part + D + 1, l_sum)
        tl.debug_barrier()  # every thread's partials are written before the release
        arrived = tl.atomic_add(cnt_ptr + h, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            rows = ws_ptr + (h * SPLIT + tl.arange(0, SPLIT)) * W
            ms = tl.load(rows + D, cache_modifier=".cg")  # from L2: other SMs wrote them
            ls = tl.load(rows + D + 1, cache_modifier=".cg")
            accs = tl.load(rows[:, None] + d[None, :], cache_modifier=".cg")
            w = tl.exp(ms - tl.max(ms, axis=0))  # split 0 always holds a position: finite max
            o = tl.sum(w[:, None] * accs, axis=0) / tl.sum(w * ls, axis=0)
            tl.store(out, o.to(o_ptr.dtype.element_ty))
            tl.atomic_xchg(cnt_ptr + h, 0, sem="relaxed", scope="gpu")


@triton.jit
def _argmax(x_ptr, N, tok_ptr, next_ptr, val_ptr, idx_ptr, cnt_ptr, BLOCK: tl.constexpr,
            P: tl.constexpr):
    # Program i: the first index of the maximum of block i; the last program to arrive reduces
    # the blocks' (max, index) pairs in a fixed order, writes the token to both outputs and
    # resets the counter.  Ties go to the lowest index, as torch.argmax.
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < N, other=float("-inf")).to(tl.float32)
    mx = tl.max(x, axis=0)
    tl.store(val_ptr + pid, mx)
    tl.store(idx_ptr + pid, tl.min(tl.where(x == mx, offs, N), axis=0))
    tl.debug_barrier()
    arrived = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == tl.num_programs(0) - 1:
        ps = tl.arange(0, P)
        pm = ps < tl.num_programs(0)
        vals = tl.load(val_ptr + ps, mask=pm, other=float("-inf"), cache_modifier=".cg")
        idxs = tl.load(idx_ptr + ps, mask=pm, other=N, cache_modifier=".cg")
        best = tl.min(tl.where(vals == tl.max(vals, axis=0), idxs, N), axis=0).to(tl.int64)
        tl.store(tok_ptr, best)
        tl.store(next_ptr, best)
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


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


ATTENTION_BLOCK = 64  # cache positions per step of a program
MAX_ATTENTION_SPLIT = 16


def attention_split(max_len: int) -> int:
    """Programs per query head for a cache of ``max_len`` positions: one block each where that
    takes at most 16 (a power of two: the merge's tile)."""
    blocks = -(-max_len // ATTENTION_BLOCK)
    return min(triton.next_power_of_2(max(blocks, 1)), MAX_ATTENTION_SPLIT)


def attention_workspace(heads: int, head_dim: int, split: int,
                        device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 partials, zeroed int32 per-head counters) for :func:`rope_attention`; one serves
    every layer (their launches run one after the other), and must outlive a captured graph."""
    return (torch.empty(heads * split * (head_dim + 2), dtype=torch.float32, device=device),
            torch.zeros(heads, dtype=torch.int32, device=device))


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor,
                   rope_scale: float, split: int = 1,
                   workspace: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Attention output (``heads x head_dim``) of this position's q, k, v (contiguous rows of
    ``heads·head_dim`` and ``kv_heads·head_dim``): rotary embedding of q and k, k and v written to
    the caches at ``pos``, softmax attention over cache positions ``0..pos`` (causal for the
    newest token), grouped KV heads by index.  One launch of ``heads x split`` programs, each
    over every ``split``-th block of the cache (:func:`attention_split`; ``split > 1`` needs
    :func:`attention_workspace`, made here when not given)."""
    kv, L, D = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    H = q.numel() // D
    if split < 1 or split & (split - 1):
        raise ValueError(f"attention split must be a power of two, got {split}")
    if workspace is None:
        workspace = attention_workspace(H, D, split, q.device)
    ws, cnt = workspace
    if ws.numel() < H * split * (D + 2) or cnt.numel() < H:
        raise ValueError("attention workspace too small for this split")
    o = torch.empty(H, D, dtype=q.dtype, device=q.device)
    _rope_attention[(H, split)](q, k, v, k_cache, v_cache, o, ws, cnt, pos, inv_freq, rope_scale,
                                D**-0.5, L, GROUP=H // kv, D=D, BLOCK_L=ATTENTION_BLOCK,
                                SPLIT=split, num_warps=4)
    return o


def _argmax_grid(n: int) -> tuple[int, int, int]:
    """(block, programs, programs rounded up to a power of two): ~128 programs of >= 1024."""
    block = max(1024, triton.next_power_of_2(-(-n // 128)))
    programs = -(-n // block)
    return block, programs, triton.next_power_of_2(programs)


def argmax_workspace(n: int, device) -> tuple[torch.Tensor, ...]:
    """(block maxima, block indices, a zeroed counter) for :func:`argmax_token` over ``n``
    logits; kept for the decoder's life (a captured graph holds its addresses)."""
    p = _argmax_grid(n)[2]
    return (torch.empty(p, dtype=torch.float32, device=device),
            torch.empty(p, dtype=torch.int32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


def argmax_token(logits: torch.Tensor, tok: torch.Tensor, next_token: torch.Tensor,
                 workspace: tuple[torch.Tensor, ...] | None = None) -> None:
    """The greedy token of one contiguous row of ``logits`` (the first index of its maximum, as
    ``torch.argmax``; NaNs are not handled), written into both int64 ``tok`` and ``next_token``:
    one launch instead of a reduction and two copies."""
    logits = logits.reshape(-1)
    n = logits.numel()
    block, programs, p = _argmax_grid(n)
    ws = workspace if workspace is not None else argmax_workspace(n, logits.device)
    _argmax[(programs,)](logits, n, tok, next_token, *ws, BLOCK=block, P=p, num_warps=4)


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
