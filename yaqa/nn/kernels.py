"""Matmuls against packed int-k weights: Triton kernels on CUDA, row-block dequantization on CPU.

Weight layout (the checkpoint's, unchanged since format v1): codes of the ``m x n`` matrix,
row-major, packed little-endian in chunks of ``CPC`` codes filling ``NB`` bytes (4 bits: 2 codes
per byte; 2 bits: 4; 8 bits: 1; 3 bits: 8 codes per 3 bytes).  A row is ``n·bits/8`` bytes and
starts on a chunk boundary whenever ``n`` is a multiple of 8.  Value of a code ``q`` in group
``G`` of row ``r``: ``(q - zero[r, G]) * scale[r, G]`` with fp16 scales and integer zero points.

- Decode (few activation rows): a fused GEMV.  2/4/8-bit codes are read as int32 words (a row's
  codes are whole words whenever ``n`` is a multiple of 128), so each program streams contiguous
  vector loads; 3-bit chunks are assembled from bytes.  Each program owns a few output features
  and the whole reduction, and accumulates ``Σ_G s·(Σ q·x − z·Σ x)``, so the zero point costs one
  multiply per group rather than one per weight.  No split-K, no atomics: the output is written
  once, in the activation dtype.  Tiles come from a small autotune on large layers, a shape rule
  otherwise.
- Prefill (many rows): the weight is memory-cheap next to the matmul's arithmetic, so one kernel
  dequantizes it to a temporary bf16/fp16 matrix (from the caching allocator, so the same block
  is reused layer after layer) and cuBLAS does the GEMM.
- CPU: dequantize a block of rows at a time and matmul; peak extra memory is one block.

The GPU entry point is one ``torch.library`` custom op, so ``torch.compile`` and CUDA graphs treat
it as an opaque call.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

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


def row_block_matmul(x: torch.Tensor, m: int, n: int,
                     rows: Callable[[int, int], torch.Tensor], block_rows: int) -> torch.Tensor:
    """``x @ W^T`` for an ``m x n`` weight that ``rows(r0, r1)`` dequantizes one block of rows at
    a time, so no more than ``block_rows`` dense rows exist at once."""
    x2 = x.reshape(-1, n)
    out = torch.empty(x2.shape[0], m, dtype=x.dtype, device=x.device)
    for r0 in range(0, m, block_rows):
        r1 = min(m, r0 + block_rows)
        torch.matmul(x2, rows(r0, r1).to(x.dtype).T, out=out[:, r0:r1])
    return out.reshape(*x.shape[:-1], m)


def cpu_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
               bits: int, group: int, m: int, n: int, block_rows: int | None = None) -> torch.Tensor:
    """``x @ W^T`` dequantizing ``W`` in row blocks (any device; the CPU path)."""
    return row_block_matmul(
        x, m, n, lambda r0, r1: dequantize_rows(qweight, scale, zero, bits, group, n, r0, r1),
        block_rows or max(1, (1 << 20) // n))


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


# Tests set this to run the Triton paths on CPU tensors under TRITON_INTERPRET=1.
FORCE_TRITON = False


def use_triton(x: torch.Tensor) -> bool:
    """Whether ``x``'s packed matmuls and rotations go to the Triton kernels."""
    return FORCE_TRITON or (x.is_cuda and triton_available())


def kernel_supports(bits: int, group: int, m: int, n: int) -> bool:
    cpc, _ = chunk(bits)
    return (bits in KERNEL_BITS and group in KERNEL_GROUPS and n % 128 == 0 and n % group == 0
            and n % cpc == 0)


def _word_layout(bits: int, qweight: torch.Tensor) -> bool:
    """2/4/8-bit codes: a little-endian int32 word holds ``32 // bits`` whole codes, in order.

    The bytes must start on a word boundary to be read as int32 (a view into a larger buffer
    may not); otherwise the byte kernels read them.
    """
    return 32 % bits == 0 and qweight.storage_offset() % 4 == 0


# GEMV tiles tried by the autotuner on large layers: (rows per program, K per step, warps,
# unpack as a 3-D tile or code by code); smaller layers get :func:`_default_tile`.
# No split-K: even the 1024-row projections give 128+ programs of a few rows each, which keeps
# every SM busy without the fp32 atomics, the zero-fill and the cast back that split-K needs.
_GEMV_CONFIGS = ((8, 512, 4, False), (4, 512, 4, False), (16, 256, 4, False), (8, 1024, 8, False),
                 (8, 512, 4, True), (16, 256, 4, True))
# Layers smaller than this (codes) use the default tile: autotuning costs more than it saves.
AUTOTUNE_MIN_CODES = 1 << 22


def _default_tile(m: int, n: int, group: int) -> tuple[int, int, int, bool]:
    bn = 16 if m >= 8192 else 8 if m >= 2048 else 4
    bk = max(group, next(b for b in (512, 256, 128) if n % b == 0))
    return bn, bk, 4, False


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_words(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, stride_x, stride_y, K: tl.constexpr,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, UNPACK_3D: tl.constexpr):
        # One program: BLOCK_N output features of one activation row, the whole K.  The packed
        # weight is read as int32 words (8 int4 codes each), so each row of the tile is one
        # contiguous, vectorizable load of BLOCK_K·BITS/8 bytes.
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        CPW: tl.constexpr = 32 // BITS
        BW: tl.constexpr = BLOCK_K // CPW
        NG: tl.constexpr = BLOCK_K // GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        n_groups = K // GROUP
        shifts = tl.arange(0, CPW) * BITS
        wrow = qw_ptr + rows[:, None].to(tl.int64) * (K // CPW)
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(0, K // BLOCK_K):
            w = tl.load(wrow + t * BW + tl.arange(0, BW)[None, :], mask=rmask[:, None], other=0)
            if UNPACK_3D:
                # Codes as a (rows, words, codes-per-word) tile against x as (words, codes).
                xt = tl.load(x_ptr + row * stride_x + t * BLOCK_K
                             + tl.arange(0, BLOCK_K)).to(tl.float32)
                q = ((w[:, :, None] >> shifts[None, None, :]) & MASK).to(tl.float32)
                p = tl.sum(q * tl.reshape(xt, (BW, CPW))[None, :, :], axis=2)   # per word
                xg = tl.sum(tl.reshape(xt, (NG, GROUP)), axis=1)
            else:
                # Code j of every word against a strided slice of x (L1-resident): 2-D tiles only.
                p = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
                xs = tl.zeros((BW,), dtype=tl.float32)
                for j in tl.static_range(CPW):
                    xj = tl.load(x_ptr + row * stride_x + t * BLOCK_K + tl.arange(0, BW) * CPW
                                 + j).to(tl.float32)
                    p += ((w >> (BITS * j)) & MASK).to(tl.float32) * xj[None, :]
                    xs += xj
                xg = tl.sum(tl.reshape(xs, (NG, BW // NG)), axis=1)
            pg = tl.sum(tl.reshape(p, (BLOCK_N, NG, BW // NG)), axis=2)            # per group
            sz = rows[:, None] * n_groups + (t * NG + tl.arange(0, NG))[None, :]
            s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            # Σ_G s·(Σ q·x − z·Σ x): the zero point costs one multiply per group, not per weight.
            acc += tl.sum(s * (pg - z * xg[None, :]), axis=1)
        tl.store(y_ptr + row * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def gemv_bytes(x_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, N, stride_x, stride_y, K: tl.constexpr,
                   BITS: tl.constexpr, CPC: tl.constexpr, NB: tl.constexpr,
                   GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Any chunk layout (3 bits: 8 codes in 3 bytes), assembled from byte loads.
        pid_n = tl.program_id(0)
        row = tl.program_id(1)
        BC: tl.constexpr = BLOCK_K // CPC
        NG: tl.constexpr = BLOCK_K // GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        row_bytes = (K // CPC) * NB
        n_groups = K // GROUP
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for t in range(0, K // BLOCK_K):
            chunks = t * BC + tl.arange(0, BC)
            base = qw_ptr + rows[:, None].to(tl.int64) * row_bytes + chunks[None, :] * NB
            word = tl.load(base, mask=rmask[:, None], other=0).to(tl.int32)
            for b in tl.static_range(1, NB):
                word |= tl.load(base + b, mask=rmask[:, None], other=0).to(tl.int32) << (8 * b)
            p = tl.zeros((BLOCK_N, BC), dtype=tl.float32)
            xs = tl.zeros((BC,), dtype=tl.float32)
            for j in tl.static_range(CPC):
                xj = tl.load(x_ptr + row * stride_x + chunks * CPC + j).to(tl.float32)
                p += ((word >> (BITS * j)) & MASK).to(tl.float32) * xj[None, :]
                xs += xj
            pg = tl.sum(tl.reshape(p, (BLOCK_N, NG, BC // NG)), axis=2)
            xg = tl.sum(tl.reshape(xs, (NG, BC // NG)), axis=1)
            sz = rows[:, None] * n_groups + (t * NG + tl.arange(0, NG))[None, :]
            s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
            acc += tl.sum(s * (pg - z * xg[None, :]), axis=1)
        tl.store(y_ptr + row * stride_y + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def dequant_words(qw_ptr, s_ptr, z_ptr, w_ptr, N, K: tl.constexpr, BITS: tl.constexpr,
                      GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # BLOCK_N x BLOCK_K weights per program: contiguous word loads in, one scale and zero
        # per group broadcast in registers, contiguous 16-bit stores out.
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        CPW: tl.constexpr = 32 // BITS
        BW: tl.constexpr = BLOCK_K // CPW
        NG: tl.constexpr = BLOCK_K // GROUP
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        w = tl.load(qw_ptr + rows[:, None].to(tl.int64) * (K // CPW) + pid_k * BW
                    + tl.arange(0, BW)[None, :], mask=rmask[:, None], other=0)
        q = (w[:, :, None] >> (tl.arange(0, CPW) * BITS)[None, None, :]) & MASK
        q = tl.reshape(q, (BLOCK_N, NG, GROUP)).to(tl.float32)
        sz = rows[:, None] * (K // GROUP) + (pid_k * NG + tl.arange(0, NG))[None, :]
        s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        v = tl.reshape((q - z[:, :, None]) * s[:, :, None], (BLOCK_N, BLOCK_K))
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 v.to(w_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def dequant_bytes(qw_ptr, s_ptr, z_ptr, w_ptr, N, K: tl.constexpr, BITS: tl.constexpr,
                      CPC: tl.constexpr, NB: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        MASK: tl.constexpr = (1 << BITS) - 1
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        rmask = rows < N
        row_bytes = (K // CPC) * NB
        base = qw_ptr + rows[:, None].to(tl.int64) * row_bytes + (cols // CPC)[None, :] * NB
        word = tl.load(base, mask=rmask[:, None], other=0).to(tl.int32)
        for b in tl.static_range(1, NB):
            word |= tl.load(base + b, mask=rmask[:, None], other=0).to(tl.int32) << (8 * b)
        q = ((word >> (BITS * (cols % CPC))[None, :]) & MASK).to(tl.float32)
        sz = rows[:, None] * (K // GROUP) + (cols // GROUP)[None, :]
        s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
        tl.store(w_ptr + rows[:, None].to(tl.int64) * K + cols[None, :],
                 ((q - z) * s).to(w_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def rotate2_kernel(x_ptr, s_ptr, h1_ptr, h2_ptr, y_ptr, stride_x, stride_y, scale,
                       D1: tl.constexpr, D2: tl.constexpr, SIGN_FIRST: tl.constexpr,
                       IEEE: tl.constexpr):
        # One activation row as a D1 x D2 tile X: (H1 ⊗ H2) vec(X) = H1 X H2^T, two tensor-core
        # dots in registers, with the sign/scale vector applied before (inputs) or after
        # (outputs): one launch instead of a multiply, two GEMMs and a copy.
        row = tl.program_id(0)
        i = tl.arange(0, D1)
        j = tl.arange(0, D2)
        offs = i[:, None] * D2 + j[None, :]
        X = tl.load(x_ptr + row * stride_x + offs)
        S = tl.load(s_ptr + offs)
        if SIGN_FIRST:
            X = X * S
        H1 = tl.load(h1_ptr + i[:, None] * D1 + i[None, :]).to(X.dtype)
        H2T = tl.load(h2_ptr + j[None, :] * D2 + j[:, None]).to(X.dtype)
        if IEEE:
            Y = tl.dot(H1, X, input_precision="ieee")
            Y = tl.dot(Y, H2T, input_precision="ieee")
        else:
            Y = tl.dot(H1, X).to(X.dtype)  # rounded like the unfused path's 16-bit GEMM output
            Y = tl.dot(Y, H2T)
        Y = Y * scale
        if not SIGN_FIRST:
            Y = Y * S.to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, Y.to(y_ptr.dtype.element_ty))

    @triton.jit
    def rotate3_kernel(x_ptr, s_ptr, ha_ptr, hb_ptr, hc_ptr, y_ptr, stride_x, stride_y, scale,
                       A: tl.constexpr, AP: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                       SIGN_FIRST: tl.constexpr, PREC: tl.constexpr):
        # (HA ⊗ HB ⊗ HC) on a row viewed as an A x B x C tensor, A (e.g. a Paley 28) padded to
        # the power of two AP with zero rows: HC on the last axis, HB on the middle one (by a
        # permute), HA on the first, each one tensor-core dot.
        row = tl.program_id(0)
        a = tl.arange(0, AP)
        bc = tl.arange(0, B * C)
        offs = a[:, None] * (B * C) + bc[None, :]
        amask = (a < A)[:, None]
        X = tl.load(x_ptr + row * stride_x + offs, mask=amask, other=0)
        S = tl.load(s_ptr + offs, mask=amask, other=0)
        if SIGN_FIRST:
            X = X * S
        dt = X.dtype
        b = tl.arange(0, B)
        c = tl.arange(0, C)
        HCT = tl.load(hc_ptr + c[None, :] * C + c[:, None]).to(dt)
        HBT = tl.load(hb_ptr + b[None, :] * B + b[:, None]).to(dt)
        HA = tl.load(ha_ptr + a[:, None] * A + a[None, :], mask=amask & (a < A)[None, :],
                     other=0).to(dt)
        Y = tl.dot(tl.reshape(X, (AP * B, C)), HCT, input_precision=PREC).to(dt)
        Y = tl.permute(tl.reshape(Y, (AP, B, C)), (0, 2, 1))
        Y = tl.dot(tl.reshape(Y, (AP * C, B)), HBT, input_precision=PREC).to(dt)
        Y = tl.reshape(tl.permute(tl.reshape(Y, (AP, C, B)), (0, 2, 1)), (AP, B * C))
        Y = tl.dot(HA, Y, input_precision=PREC) * scale
        if not SIGN_FIRST:
            Y = Y * S.to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, Y.to(y_ptr.dtype.element_ty), mask=amask)

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "UNPACK_3D": u}, num_warps=w)
               for bn, bk, w, u in _GEMV_CONFIGS]

    def prune(configs, named_args, **kwargs):
        K, group = named_args["K"], kwargs.get("GROUP", named_args.get("GROUP"))
        return [c for c in configs if K % c.kwargs["BLOCK_K"] == 0
                and c.kwargs["BLOCK_K"] >= group]

    gemv_tuned = triton.autotune(configs=configs, key=["N", "K", "BITS", "GROUP"],
                                 prune_configs_by={"early_config_prune": prune})(gemv_words)
    return (triton, gemv_words, gemv_tuned, gemv_bytes, dequant_words, dequant_bytes,
            rotate2_kernel, rotate3_kernel)


# Kernels that failed to build on this machine and were replaced by a slower path, as
# "name key: error" lines (bench/check_kernels.py fails on any).
FALLBACKS: list[str] = []
_BROKEN: set[tuple] = set()


def _guarded(name: str, key: tuple, fast, slow):
    """``fast()``, or ``slow()`` from now on for this key if ``fast`` fails to build or launch.

    A Triton version or GPU that rejects one of the newer kernels then still runs, on the
    older kernel or on torch ops, and says so once.
    """
    if (name, key) not in _BROKEN:
        try:
            return fast()
        except Exception as e:  # compile errors and resource limits have no common base class
            if _interpreting():
                raise
            _BROKEN.add((name, key))
            msg = str(e).strip().splitlines()
            FALLBACKS.append(f"{name} {key}: {type(e).__name__}: {msg[-1][:300] if msg else ''}")
            log.warning("Triton kernel %s failed for %s, using a slower path: %s", name, key,
                        FALLBACKS[-1])
    return slow()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_TUNED: set[tuple] = set()  # layer shapes whose autotuning is done (safe inside a CUDA graph)


def _use_tuned(x: torch.Tensor, bits: int, group: int, m: int, n: int) -> bool:
    # Autotuning times candidate launches: not for small layers (the default tile is as good and
    # compiling candidates costs seconds), and inside a CUDA graph capture only once it is done
    # (an eager call first, as CUDA-graph users warm up anyway); else the default tile.
    if m * n < AUTOTUNE_MIN_CODES or not x.is_cuda or _interpreting():
        return False
    return (not torch.cuda.is_current_stream_capturing()
            or (m, n, bits, group, x.dtype) in _TUNED)


def gemv(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         bits: int, group: int, m: int, n: int, tile: tuple | None = None) -> torch.Tensor:
    """``x2 @ W^T`` for a contiguous ``(rows, n)`` activation by the fused GEMV, in ``x2.dtype``.

    ``tile``: force one ``(rows per program, K per step, warps, unpack 3-D)`` (tests).
    """
    triton, gemv_words, gemv_tuned, gemv_bytes = _kernels()[:4]
    y = torch.empty(x2.shape[0], m, dtype=x2.dtype, device=x2.device)
    key = (bits, group, m, n, x2.dtype)

    def words_default():
        bn, bk, w, u = tile or _default_tile(m, n, group)
        gemv_words[(triton.cdiv(m, bn), x2.shape[0])](
            x2, qweight.view(torch.int32), scale, zero, y, m, x2.stride(0), y.stride(0), n,
            BITS=bits, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, UNPACK_3D=u, num_warps=w)

    def words_tuned():
        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_N"]), x2.shape[0]

        gemv_tuned[grid](x2, qweight.view(torch.int32), scale, zero, y, m, x2.stride(0),
                         y.stride(0), n, BITS=bits, GROUP=group)
        _TUNED.add((m, n, bits, group, x2.dtype))

    def words():
        if tile is None and _use_tuned(x2, bits, group, m, n):
            _guarded("gemv_tuned", key, words_tuned, words_default)
        else:
            words_default()

    def chunks():
        cpc, nb = chunk(bits)
        bn, bk = (8 if m >= 2048 else 4), 256 if n % 256 == 0 else 128
        gemv_bytes[(triton.cdiv(m, bn), x2.shape[0])](
            x2, qweight, scale, zero, y, m, x2.stride(0), y.stride(0), n, BITS=bits, CPC=cpc,
            NB=nb, GROUP=group, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)

    if _word_layout(bits, qweight):
        _guarded("gemv_words", key, words, chunks)
    else:
        chunks()
    return y


def dequantize_cuda(qweight, scale, zero, bits: int, group: int, m: int, n: int,
                    dtype: torch.dtype) -> torch.Tensor:
    """The dense ``m x n`` weight in ``dtype`` (for cuBLAS at prefill)."""
    triton, _, _, _, dequant_words, dequant_bytes = _kernels()[:6]
    W = torch.empty(m, n, dtype=dtype, device=qweight.device)

    def words():
        bn, bk = 32, max(256 if n % 256 == 0 else 128, group)
        dequant_words[(triton.cdiv(m, bn), n // bk)](
            qweight.view(torch.int32), scale, zero, W, m, n, BITS=bits, GROUP=group,
            BLOCK_N=bn, BLOCK_K=bk, num_warps=4)

    def chunks():
        cpc, nb = chunk(bits)
        bn, bk = 32, 128
        dequant_bytes[(triton.cdiv(m, bn), n // bk)](
            qweight, scale, zero, W, m, n, BITS=bits, CPC=cpc, NB=nb, GROUP=group, BLOCK_N=bn,
            BLOCK_K=bk, num_warps=4)

    if _word_layout(bits, qweight):
        _guarded("dequant_words", (bits, group, n, dtype), words, chunks)
    else:
        chunks()
    return W


def packed_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bits: int, group: int, m: int, n: int) -> torch.Tensor:
    """``x @ W^T`` by the Triton kernels (any device Triton can launch on, incl. the interpreter)."""
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if x2.shape[0] <= GEMV_MAX_ROWS:
        y = gemv(x2, qweight, scale, zero, bits, group, m, n)
    else:
        y = x2 @ dequantize_cuda(qweight, scale, zero, bits, group, m, n, x.dtype).T
    return y.reshape(*x.shape[:-1], m)


@torch.library.custom_op("yaqa::intk_matmul", mutates_args=())
def intk_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                bits: int, group: int, m: int, n: int) -> torch.Tensor:
    """``x @ W^T`` for packed int-k ``W`` (m x n) on CUDA; x: (..., n) in bf16/fp16/fp32.

    An opaque op to ``torch.compile`` (no graph break, no tracing into Triton), and free of host
    synchronisation, so CUDA graphs capture it.
    """
    return packed_matmul(x, qweight, scale, zero, bits, group, m, n)


@intk_matmul.register_fake
def _(x, qweight, scale, zero, bits, group, m, n):
    return x.new_empty(*x.shape[:-1], m)


# ---------------------------------------------------------------------------------------------
# Hadamard rotation of a few activation rows


def rotate2_supports(sizes: tuple[int, ...]) -> bool:
    """Two power-of-two Kronecker factors of 16..128 (4096 = 64·64, 1024 = 32·32, ...)."""
    return len(sizes) == 2 and all(16 <= d <= 128 and d & (d - 1) == 0 for d in sizes)


def rotate2(x: torch.Tensor, sign: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor,
            sign_first: bool, scale: float = 1.0) -> torch.Tensor:
    """Rows of ``x`` times ``scale·(H1 ⊗ H2)^T``, with ``sign`` (a ±1 vector, possibly with an
    exact power-of-two scale folded in) applied before (``sign_first``) or after; by the fused
    Triton kernel."""
    rotate2_kernel = _kernels()[6]
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    d1, d2 = h1.shape[0], h2.shape[0]
    s = sign.to(x.dtype)

    def fused():
        rotate2_kernel[(x2.shape[0],)](x2, s, h1, h2, y, x2.stride(0), y.stride(0), scale,
                                       D1=d1, D2=d2,
                                       SIGN_FIRST=sign_first, IEEE=x.dtype == torch.float32,
                                       num_warps=4)
        return y

    def unfused():
        from .hadamard import apply_factors

        Hs = [h1, h2]
        y = (apply_factors(x2 * s, Hs, normalize=False) if sign_first
             else apply_factors(x2, Hs, normalize=False) * s)
        return y * scale if scale != 1.0 else y

    return _guarded("rotate2", (d1, d2, sign_first, x.dtype), fused, unfused).reshape(x.shape)


@torch.library.custom_op("yaqa::hadamard_rotate2", mutates_args=())
def hadamard_rotate2(x: torch.Tensor, sign: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor,
                     sign_first: bool, scale: float = 1.0) -> torch.Tensor:
    """:func:`rotate2` as an op that ``torch.compile`` keeps opaque and CUDA graphs capture."""
    return rotate2(x, sign, h1, h2, sign_first, scale)


@hadamard_rotate2.register_fake
def _(x, sign, h1, h2, sign_first, scale=1.0):
    return torch.empty_like(x)


def rotate3_supports(sizes: tuple[int, ...]) -> bool:
    """Three factors: any first one up to 64 (Paley), then powers of two of 16..128
    (14336 = 28·32·16)."""
    if len(sizes) != 3:
        return False
    a, b, c = sizes
    return a <= 64 and all(16 <= d <= 128 and d & (d - 1) == 0 for d in (b, c)) and b * c <= 1024


def rotate3(x: torch.Tensor, sign: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor,
            hc: torch.Tensor, sign_first: bool, scale: float = 1.0) -> torch.Tensor:
    """:func:`rotate2` for three Kronecker factors."""
    rotate3_kernel = _kernels()[7]
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    y = torch.empty_like(x2)
    A, B, C = ha.shape[0], hb.shape[0], hc.shape[0]
    AP = max(16, 1 << (A - 1).bit_length())
    s = sign.to(x.dtype)

    def fused():
        rotate3_kernel[(x2.shape[0],)](x2, s, ha, hb, hc, y, x2.stride(0), y.stride(0), scale, A=A,
                                       AP=AP, B=B, C=C, SIGN_FIRST=sign_first,
                                       PREC="ieee" if x.dtype == torch.float32 else None,
                                       num_warps=8)
        return y

    def unfused():
        from .hadamard import apply_factors

        Hs = [ha, hb, hc]
        y = (apply_factors(x2 * s, Hs, normalize=False) if sign_first
             else apply_factors(x2, Hs, normalize=False) * s)
        return y * scale if scale != 1.0 else y

    return _guarded("rotate3", (A, B, C, sign_first, x.dtype), fused, unfused).reshape(x.shape)


@torch.library.custom_op("yaqa::hadamard_rotate3", mutates_args=())
def hadamard_rotate3(x: torch.Tensor, sign: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor,
                     hc: torch.Tensor, sign_first: bool, scale: float = 1.0) -> torch.Tensor:
    """:func:`rotate3` as an op that ``torch.compile`` keeps opaque and CUDA graphs capture."""
    return rotate3(x, sign, ha, hb, hc, sign_first, scale)


@hadamard_rotate3.register_fake
def _(x, sign, ha, hb, hc, sign_first, scale=1.0):
    return torch.empty_like(x)
