"""A fused Triton Viterbi for the bitshift trellis (the torch Viterbi in ``trellis.py`` is the
reference and the CPU path).

The torch Viterbi materialises all 2^L state costs of a step, then reduces them: per step and
tile it writes and reads 2^L floats, over ten kernels.  Only the 2^(L-kV) group minima
``M[l] = min_h cost(h R + l)`` carry information from one step to the next (state ``l P + b``'s
cost is ``M[l]`` plus its own error), so this kernel keeps just those: one program walks all T
steps of its tiles, and per step computes, for every group ``l'``, the minimum over its ``P``
predecessor states ``h R + l'`` of ``M_prev[(h R + l') >> kV] + |x_t|^2 + |c|^2 - 2 x_t.c``,
writing the new minimum (16 KB per tile for L = 16, kV = 4: it stays in L2) and a uint8
back-pointer.  The arithmetic is the torch Viterbi's, term for term and in the same order.

A bar.sync between steps orders one step's stores before the next step's loads within the
program; those loads bypass L1 (``.cg``) so they always see the stores.

Rounding matches torch's addcmul on CUDA, ``fma(-2, round(x c), cost)``: the product is rounded
before it meets the sum, and scaling by -2 is exact, so fused or not, ``cn + (x c) * -2`` gives
the same float.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch Viterbi serves every device without it
    triton = None


# Speed knobs of the forward kernel (never the result): states per chunk (a chunk is P x groups:
# the P = 2^kV predecessors of each of its groups), tiles per program (they share each codeword
# load), warps.  The chunk is counted in states, not groups, because the kernel holds a whole
# chunk in registers: 256 groups x P = 16 suits kV = 4, but at kV = 8 (trellis4) the same 256
# groups are 65536 states, and the spills made trellis4 ~10x slower than trellis2 on the H100.
# bench/trellis_speed.py --tune picks the knobs on a GPU.
TUNING = {"states": 4096, "tiles_per_program": 1, "num_warps": 8}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _viterbi_steps(x_ptr, cbt_ptr, cn_ptr, xn_ptr, m_ptr, back_ptr, nv_ptr, B, T: tl.constexpr,
                       V: tl.constexpr, L: tl.constexpr, KV: tl.constexpr,
                       BLOCK: tl.constexpr, NT: tl.constexpr):
        R: tl.constexpr = 1 << (L - KV)
        P: tl.constexpr = 1 << KV
        S: tl.constexpr = 1 << L
        pid = tl.program_id(0)
        if pid * NT >= tl.load(nv_ptr):  # padding of a replayed CUDA graph: nobody reads it
            return
        offs_l = tl.arange(0, BLOCK)
        offs_h = tl.arange(0, P)
        for t in range(T):
            src = t % 2
            dst = 1 - src
            for c in range(0, R, BLOCK):
                lo = c + offs_l
                # (P, BLOCK): column lo holds the P states that lead to group lo (contiguous rows)
                s = offs_h[:, None] * R + lo[None, :]
                g = s >> KV  # group of each predecessor's own predecessors: where its cost lives
                cn = tl.load(cn_ptr + s)
                c0 = tl.load(cbt_ptr + s)
                if V == 2:
                    c1 = tl.load(cbt_ptr + S + s)
                for j in tl.static_range(NT):
                    b = pid * NT + j
                    xb = x_ptr + (b * T + t) * V
                    x0 = tl.load(xb)
                    e = cn + (x0 * c0) * -2.0
                    if V == 2:
                        x1 = tl.load(xb + 1)
                        e = e + (x1 * c1) * -2.0
                    a = tl.load(m_ptr + (b * 2 + src) * R + g, cache_modifier=".cg")
                    a = a + tl.load(xn_ptr + b * T + t)
                    cost = e + a
                    best, idx = tl.min(cost, axis=0, return_indices=True,
                                       return_indices_tie_break_left=True)
                    tl.store(m_ptr + (b * 2 + dst) * R + lo, best)
                    tl.store(back_ptr + (t * B + b).to(tl.int64) * R + lo, idx.to(tl.uint8))
            tl.debug_barrier()

    @triton.jit
    def _traceback(back_ptr, last_ptr, out_ptr, nv_ptr, B, T: tl.constexpr, L: tl.constexpr,
                   KV: tl.constexpr):
        R: tl.constexpr = 1 << (L - KV)
        b = tl.program_id(0)
        if b >= tl.load(nv_ptr):
            return
        low = tl.load(last_ptr + b)
        s = tl.load(back_ptr + ((T - 1) * B + b).to(tl.int64) * R + low).to(tl.int64) * R + low
        tl.store(out_ptr + b * T + T - 1, s)
        for i in range(1, T):
            t = T - i
            low = s >> KV
            s = tl.load(back_ptr + ((t - 1) * B + b).to(tl.int64) * R + low).to(tl.int64) * R + low
            tl.store(out_ptr + b * T + t - 1, s)


def viterbi_triton(x: torch.Tensor, cb: torch.Tensor, L: int, kv: int,
                   start_low: torch.Tensor | None = None, end_low: torch.Tensor | None = None,
                   block: int | None = None, tiles_per_program: int | None = None,
                   num_warps: int | None = None, n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract and result as :func:`yaqa.quantizers.trellis.viterbi` with float32 costs.

    ``block`` groups per chunk (default: :data:`TUNING`'s states per chunk over the ``2^kv``
    predecessors of a group) and ``tiles_per_program`` (tiles sharing each codeword load) are
    tuning knobs (default :data:`TUNING`); they change the speed, never the result.
    ``n_valid`` (a one-element int32 tensor on the device), when given, says that only the first
    ``n_valid`` sequences matter: the kernels skip the rest (a CUDA graph's padding), whose output
    rows are then left unset.
    """
    tiles_per_program = TUNING["tiles_per_program"] if tiles_per_program is None else tiles_per_program
    num_warps = TUNING["num_warps"] if num_warps is None else num_warps
    if triton is None:
        raise RuntimeError("the Triton Viterbi needs the triton package (pip install triton)")
    B, T, V = x.shape
    if V not in (1, 2):
        raise ValueError(f"the Triton Viterbi takes 1 or 2 values per step, got {V}")
    S, P = 1 << L, 1 << kv
    R = S >> kv
    dev = x.device
    dt = torch.float32
    cbt = cb.to(device=dev, dtype=dt)
    cn = cbt.pow(2).sum(1).contiguous()  # as the torch Viterbi computes |c|^2
    cbt = cbt.t().contiguous()  # (V, S): one column per value
    nt = max(1, int(tiles_per_program))
    Bp = -(-B // nt) * nt  # padded tiles compute garbage that nobody reads
    xs = torch.zeros(Bp, T, V, device=dev, dtype=dt)
    xs[:B] = x.to(dt)
    xn = xs.pow(2).sum(-1).contiguous()
    m = torch.empty(Bp, 2, R, device=dev, dtype=dt)
    if start_low is None:
        m[:, 0].zero_()
    else:
        m[:, 0].fill_(torch.finfo(dt).max / 16)
        m[:B, 0].scatter_(1, start_low.to(dev).view(B, 1), 0.0)
        m[B:, 0].zero_()
    back = torch.empty(T, Bp, R, device=dev, dtype=torch.uint8)
    nv = torch.full((1,), B, device=dev, dtype=torch.int32) if n_valid is None else n_valid
    if block is None:
        block = max(1, TUNING["states"] // P)
    blk = min(int(block), R)
    _viterbi_steps[(Bp // nt,)](xs, cbt, cn, xn, m, back, nv, Bp, T, V=V, L=L, KV=kv, BLOCK=blk,
                                NT=nt, num_warps=num_warps)
    final = m[:B, T % 2]
    if end_low is None:
        last = final.argmin(1)
    else:
        last = end_low.to(dev).to(torch.int64).view(B)
    out = torch.zeros(B, T, device=dev, dtype=torch.int64)
    _traceback[(B,)](back, last.contiguous(), out, nv, Bp, T, L=L, KV=kv, num_warps=1)
    return out
