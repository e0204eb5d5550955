"""Matmuls against packed int-k weights: Triton kernels on CUDA, row-block dequantization on CPU.

Weight layout (the checkpoint's, unchanged since format v1): codes of the ``m x n`` matrix,
row-major, packed little-endian in chunks of ``CPC`` codes filling ``NB`` bytes (4 bits: 2 codes
per byte; 2 bits: 4; 8 bits: 1; 3 bits: 8 codes per 3 bytes).  A row is ``n·bits/8`` bytes and
starts on a chunk boundary whenever ``n`` is a multiple of 8.  Value of a code ``q`` in group
``G`` of row ``r``: ``(q - zero[r, G]) * scale[r, G]`` with fp16 scales and integer zero points.

- Decode (few activation rows): a fused GEMV, :func:`_gemv_kernel`.  Each program reads a tile of
  packed bytes once, unpacks in registers, and accumulates ``Σ_G s·(Σ q·x − z·Σ x)``, so the zero
  point costs one multiply per group rather than one per weight.  Split-K with fp32 atomics keeps
  all SMs busy on the short (1024-row) projections.
- Prefill (many rows): the weight is memory-cheap next to the matmul's arithmetic, so one kernel
  dequantizes it to a temporary bf16/fp16 matrix and cuBLAS does the GEMM.
- CPU: dequantize a block of rows at a time and matmul; peak extra memory is one block.

Both GPU entry points are ``torch.library`` custom ops, so ``torch.compile`` and CUDA graphs treat
them as opaque calls.
"""

from __future__ import annotations

import functools
import math

import torch

# Activation rows up to which the fused GEMV beats dequantize + cuBLAS (each row re-reads the
# weight tile from L1/L2; beyond this the GEMM's tensor cores win).
GEMV_MAX_ROWS = 8
KERNEL_GROUPS = (32, 64, 128)
KERNEL_BITS = (2, 3, 4, 8)


def chunk(bits: int) -> tuple[int, int]:
    """(codes per chunk, bytes per chunk) of the packing."""
    cb = math.lcm(bits, 8)
    return cb // bits, cb // 8


def unpack_rows(qweight: torch.Tensor, bits: int, n: int, r0: int, r1: int) -> torch.Tensor:
    """Codes of rows ``r0:r1`` (int32, ``(r1-r0) x n``) without unpacking the rest."""
    cpc, nb = chunk(bits)
    if n % cpc:
        from .packing import unpack_codes

        start, stop = r0 * n, r1 * n
        lo, hi = (start // cpc) * nb, -(-stop // cpc) * nb
        flat = unpack_codes(qweight[lo:hi], bits, (hi - lo) // nb * cpc)
        off = start - (start // cpc) * cpc
        return flat[off:off + stop - start].reshape(r1 - r0, n)
    row_bytes = n // cpc * nb
    b = qweight[r0 * row_bytes:r1 * row_bytes].reshape(r1 - r0, -1)
    if nb == 1:
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=b.device)
        codes = (b.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(r1 - r0, n).to(torch.int32)
    words = b.reshape(r1 - r0, -1, nb).to(torch.int32)
    words = sum(words[..., i] << (8 * i) for i in range(nb))
    shifts = torch.arange(0, cpc * bits, bits, dtype=torch.int32, device=b.device)
    return ((words.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(r1 - r0, n)


def dequantize_rows(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group: int, n: int, r0: int, r1: int) -> torch.Tensor:
    """Float32 weight rows ``r0:r1``, exactly as :meth:`IntGrid.dequantize` computes them."""
    q = unpack_rows(qweight, bits, n, r0, r1).float().reshape(r1 - r0, n // group, group)
    s = scale[r0:r1].float().unsqueeze(-1)
    z = zero[r0:r1].float().unsqueeze(-1)
    return ((q - z) * s).reshape(r1 - r0, n)


def cpu_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int, group: int, m: int, n: int, block_rows: int | None = None) -> torch.Tensor:
    """``x @ W^T`` dequantizing ``W`` in row blocks (any device; the CPU path)."""
    rb = block_rows or max(1, (1 << 20) // n)
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape[0], m, dtype=x.dtype, device=x.device)
    for r0 in range(0, m, rb):
        r1 = min(m, r0 + rb)
        W = dequantize_rows(qweight, scale, zero, bits, group, n, r0, r1).to(x.dtype)
        torch.matmul(x2, W.T, out=out[:, r0:r1])
    return out.reshape(*x.shape[:-1], m)


# ---------------------------------------------------------------------------------------------
# Triton


_TRITON_OK: bool | None = None


def triton_available() -> bool:
    # A plain global, not lru_cache: torch.compile traces this on every compiled forward.
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            _TRITON_OK = torch.cuda.is_available()
        except ImportError:
            _TRITON_OK = False
    return _TRITON_OK


def kernel_supports(bits: int, group: int, m: int, n: int) -> bool:
    cpc, _ = chunk(bits)
    return (bits in KERNEL_BITS and group in KERNEL_GROUPS and n % 128 == 0 and n % group == 0
            and n % cpc == 0)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    configs = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w)
        for bn, bk, sk, w in [(16, 256, 4, 4), (32, 256, 2, 4), (64, 256, 1, 4), (16, 512, 8, 4),
                              (32, 128, 8, 4), (8, 512, 4, 4)]
    ]

    def prune(configs, named_args, **kwargs):
        K = named_args["K"]
        return [c for c in configs if K % c.kwargs["BLOCK_K"] == 0]

    @triton.autotune(configs=configs, key=["N", "K", "BITS", "GROUP"], reset_to_zero=["y_ptr"],
                     prune_configs_by={"early_config_prune": prune})
    @triton.jit
    def gemv_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_x, stride_y,
                    BITS: tl.constexpr, CPC: tl.constexpr, NB: tl.constexpr,
                    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    SPLIT_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        row = tl.program_id(2)
        BC: tl.constexpr = BLOCK_K // CPC  # chunks per tile
        NG: tl.constexpr = BLOCK_K // GROUP  # every config has BLOCK_K >= 128 >= GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        row_bytes = (K // CPC) * NB
        n_groups = K // GROUP
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(pid_k, K // BLOCK_K, SPLIT_K):
            chunks = t * BC + tl.arange(0, BC)
            base = qw_ptr + rows[:, None].to(tl.int64) * row_bytes + chunks[None, :] * NB
            word = tl.load(base, mask=rmask[:, None], other=0).to(tl.int32)
            for b in tl.static_range(1, NB):
                word |= tl.load(base + b, mask=rmask[:, None], other=0).to(tl.int32) << (8 * b)
            p = tl.zeros((BLOCK_N, BC), dtype=tl.float32)
            xs = tl.zeros((BC,), dtype=tl.float32)
            for j in tl.static_range(CPC):
                xj = tl.load(x_ptr + row * stride_x + chunks * CPC + j).to(tl.float32)
                qj = ((word >> (BITS * j)) & MASK).to(tl.float32)
                p += qj * xj[None, :]
                xs += xj
            pg = tl.sum(tl.reshape(p, (BLOCK_N, NG, BC // NG)), axis=2)
            xg = tl.sum(tl.reshape(xs, (NG, BC // NG)), axis=1)
            g = (t * BLOCK_K) // GROUP + tl.arange(0, NG)
            sz = rows[:, None] * n_groups + g[None, :]
            s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            acc += tl.sum(s * (pg - z * xg[None, :]), axis=1)
        if SPLIT_K == 1:
            tl.store(y_ptr + row * stride_y + rows, acc, mask=rmask)
        else:
            tl.atomic_add(y_ptr + row * stride_y + rows, acc, mask=rmask, sem="relaxed")

    @triton.jit
    def dequant_kernel(qw_ptr, s_ptr, z_ptr, w_ptr, N, K, BITS: tl.constexpr,
                       CPC: tl.constexpr, NB: tl.constexpr, GROUP: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < N
        row_bytes = (K // CPC) * NB
        chunk_idx = cols // CPC
        j = cols % CPC
        base = qw_ptr + rows[:, None].to(tl.int64) * row_bytes + chunk_idx[None, :] * NB
        word = tl.load(base, mask=rmask[:, None], other=0).to(tl.int32)
        for b in tl.static_range(1, NB):
            word |= tl.load(base + b, mask=rmask[:, None], other=0).to(tl.int32) << (8 * b)
        q = ((word >> (BITS * j[None, :])) & MASK).to(tl.float32)
        sz = rows[:, None] * (K // GROUP) + (cols // GROUP)[None, :]
        s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        w = (q - z) * s
        tl.store(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 w.to(w_ptr.dtype.element_ty), mask=rmask[:, None])

    return triton, gemv_kernel, dequant_kernel


def _gemv(x2: torch.Tensor, qweight, scale, zero, bits: int, group: int, m: int, n: int):
    triton, gemv_kernel, _ = _kernels()
    cpc, nb = chunk(bits)
    y = torch.zeros(x2.shape[0], m, dtype=torch.float32, device=x2.device)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_N"]), meta["SPLIT_K"], x2.shape[0]

    gemv_kernel[grid](x2, qweight, scale, zero, y, m, n, x2.stride(0), y.stride(0), BITS=bits,
                      CPC=cpc, NB=nb, GROUP=group)
    return y.to(x2.dtype)


def dequantize_cuda(qweight, scale, zero, bits: int, group: int, m: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    triton, _, dequant_kernel = _kernels()
    cpc, nb = chunk(bits)
    W = torch.empty(m, n, dtype=dtype, device=qweight.device)
    bn, bk = 32, 128
    dequant_kernel[(triton.cdiv(m, bn), n // bk)](qweight, scale, zero, W, m, n, BITS=bits,
                                                  CPC=cpc, NB=nb, GROUP=group, BLOCK_N=bn,
                                                  BLOCK_K=bk, num_warps=4)
    return W


@torch.library.custom_op("yaqa::intk_matmul", mutates_args=())
def intk_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int, group: int, m: int, n: int) -> torch.Tensor:
    """``x @ W^T`` for packed int-k ``W`` (m x n) on CUDA; x: (..., n) in bf16/fp16/fp32."""
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = _gemv(x2, qweight, scale, zero, bits, group, m, n)
    else:
        W = dequantize_cuda(qweight, scale, zero, bits, group, m, n, x.dtype)
        y = x2 @ W.T
    return y.reshape(*x.shape[:-1], m)


@intk_matmul.register_fake
def _(x, qweight, scale, zero, bits, group, m, n):
    return x.new_empty(*x.shape[:-1], m)
