"""Matmuls against packed int-k weights: Triton kernels on CUDA, row-block dequantization on CPU.

Weight layout (the checkpoint's, unchanged since format v1): codes of the ``m x n`` matrix,
row-major, packed little-endian in chunks of ``CPC`` codes filling ``NB`` bytes (4 bits: 2 codes
per byte; 2 bits: 4; 8 bits: 1; 3 bits: 8 codes per 3 bytes).  A row is ``n·bits/8`` bytes and
starts on a chunk boundary whenever ``n`` is a multiple of 8.  Value of a code ``q`` in group
``G`` of row ``r``: ``(q - zero[r, G]) * scale[r, G]`` with fp16 scales and integer zero points.

- Decode (few activation rows): a fused GEMV.  2/4/8-bit codes are read as int32 words (a row's
  codes are whole words whenever ``n`` is a multiple of 128), so each program streams contiguous
  vector loads; 3-bit chunks are assembled from bytes.  Codes become floats by their bits (no
  int-to-float conversions), and each program accumulates ``Σ_G s·(Σ q·x − z·Σ x)``, so the zero
  point costs one multiply per group rather than one per weight.  Split-K: a program covers a
  slice of K, so even a 1024-row layer has enough loads in flight; the last program of an output
  block to finish adds the partial sums (fp32 workspace, atomic counter) and writes the output.
  Configs come from an autotune on large layers at their first call, a shape rule otherwise.
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


# GEMV configs: (rows per program, K per step, split-K, warps, stages, unpack as a 3-D tile).
# The autotuner tries them on large layers at the first call; smaller layers, the interpreter
# and captures of untuned shapes get :func:`_default_tile`.  YAQA_GEMV_CONFIG="8,512,2,4,1,0"
# forces one everywhere (a quick experiment without editing this list).
#
# Split-K (several programs per output block, each over a slice of K) multiplies the number of
# loads in flight, which a batch-1 GEMV needs to approach the memory bandwidth: a 1024 x 4096
# int4 layer is only 2 MB, 16 KB per SM.  The partial sums go to an fp32 workspace and the last
# program of a block to arrive (an atomic counter) adds them in a fixed order, writes the output
# and resets the counter: one launch, no zero-fill, no cast kernel, deterministic.
_GEMV_CONFIGS = (
    # 2-D tiles: each thread loads its words' activations as strided scalars, so many rows per
    # program (large BLOCK_N) amortize them.
    (8, 512, 2, 4, 1, False), (16, 512, 4, 8, 1, False), (32, 256, 2, 4, 1, False),
    (32, 256, 4, 4, 1, False), (32, 512, 4, 8, 1, False), (64, 128, 4, 4, 1, False),
    (64, 256, 4, 8, 1, False), (32, 256, 4, 4, 3, False), (64, 512, 4, 4, 1, False),
    (128, 256, 4, 4, 1, False), (64, 256, 8, 4, 1, False),
    # The H100's first autotune picked the largest split above (64, 256, 8) for every Llama
    # shape, so the list goes further there: more splits, more rows, pipelined loads (2-3
    # stages only pay where a slice has several BLOCK_K steps: split 4-8 of K=14336).
    (64, 256, 16, 4, 1, False), (32, 256, 8, 4, 1, False), (32, 256, 16, 4, 1, False),
    (64, 256, 8, 4, 2, False), (64, 256, 4, 4, 3, False), (64, 256, 8, 8, 1, False),
    (128, 256, 8, 8, 1, False), (128, 256, 16, 8, 1, False), (64, 128, 8, 4, 1, False),
    (64, 128, 16, 4, 1, False), (128, 128, 8, 4, 1, False), (128, 128, 16, 4, 2, False),
    # The second H100 autotune again picked the largest split for K=4096 (q/o: 64x256x16, k/v:
    # 32x256x16) and pipelined 2-3 stages for K=14336: one step of 128 per program (split 32),
    # one wide step of 512, and 3 stages over 128-wide steps.
    (64, 128, 32, 4, 1, False), (32, 128, 32, 4, 1, False), (64, 512, 8, 4, 1, False),
    (64, 128, 16, 4, 3, False),
    # 3-D tiles: activations as 16-byte vectors, the weight words moved into their layout.
    # (Splits 1-2 were never picked on the H100; dropped to keep the autotune short.)
    (16, 256, 4, 4, 1, True), (32, 256, 4, 8, 1, True), (64, 128, 4, 8, 1, True),
)
# Split-K workspace size: the largest split any config (or a forced one) may use.
MAX_SPLIT = max(c[2] for c in _GEMV_CONFIGS)
# Layers smaller than this (codes) use the default tile: autotuning costs more than it saves.
AUTOTUNE_MIN_CODES = 1 << 22
# 2- and 4-bit words: decode two codes per shift into fp32 mantissas (kernels_gemv.mantissa_pair)
# rather than one code per shift plus a float subtraction.  A module switch so that benchmarks
# can time both in one process.
PAIRED_DECODE = True
_TARGET_PROGRAMS = 528  # 4 per SM of an H100: enough loads in flight, little reduction work


def _parse_config(text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 6 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"YAQA_GEMV_CONFIG must be 6 integers 'BLOCK_N,BLOCK_K,SPLIT_K,warps,"
                         f"stages,unpack3d', got {text!r}")
    bn, bk, sk, w, st, u = map(int, parts)
    for name, v in (("BLOCK_N", bn), ("BLOCK_K", bk), ("SPLIT_K", sk), ("warps", w)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"YAQA_GEMV_CONFIG: {name} must be a power of two, got {v}")
    return bn, bk, sk, w, max(1, st), bool(u)


def forced_config() -> tuple | None:
    """The GEMV config from ``YAQA_GEMV_CONFIG``, or None (autotune / shape rule)."""
    import os

    text = os.environ.get("YAQA_GEMV_CONFIG", "").strip()
    return _parse_config(text) if text else None


def config_fits(cfg: tuple, bits: int, group: int, n: int, bounds: tuple[int, ...] = ()) -> bool:
    """Whether a GEMV config tiles a K of ``n`` exactly (no masks along K in the kernel), and
    its BLOCK_N divides the row ``bounds`` between stacked layers that read different inputs."""
    bn, bk, sk = cfg[:3]
    cpw = 32 // bits if 32 % bits == 0 else 8
    return (bk >= group and bk % group == 0 and bk % cpw == 0 and n % (bk * sk) == 0
            and all(b % bn == 0 for b in bounds))


def _default_tile(m: int, n: int, group: int, bits: int = 4,
                  bounds: tuple[int, ...] = ()) -> tuple:
    bn = 32 if m >= 4096 else 16 if m >= 1024 else 8 if m >= 256 else 4
    while bn > 1 and any(b % bn for b in bounds):
        bn //= 2
    bk = max(group, next(b for b in (256, 128) if n % b == 0))
    sk = 1
    # Split K while the grid is short of ~4 programs per SM and each slice keeps 2+ steps.
    while (-(-m // bn) * sk * 2 <= _TARGET_PROGRAMS and n % (bk * sk * 2) == 0
           and n // (bk * sk * 2) >= 2 and sk * 2 <= MAX_SPLIT):  # the workspace's bound
        sk *= 2
    return bn, bk, sk, 4, 1, False


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    from .kernels_gemv import gemv_bytes, gemv_words

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
    def rotate2_kernel(x_ptr, u_ptr, s_ptr, h1_ptr, h2_ptr, y_ptr, stride_x, stride_y, stride_s,
                       scale, D1: tl.constexpr, D2: tl.constexpr, SIGN_FIRST: tl.constexpr,
                       IEEE: tl.constexpr, SILU: tl.constexpr):
        # One activation row as a D1 x D2 tile X: (H1 ⊗ H2) vec(X) = H1 X H2^T, two tensor-core
        # dots in registers, with the sign/scale vector applied before (inputs) or after
        # (outputs): one launch instead of a multiply, two GEMMs and a copy.  SILU: X is
        # silu(gate)·up from the gate (x_ptr) and up (u_ptr) rows, as in the GEMV's load_act.
        row = tl.program_id(0)
        i = tl.arange(0, D1)
        j = tl.arange(0, D2)
        offs = i[:, None] * D2 + j[None, :]
        X = tl.load(x_ptr + row * stride_x + offs)
        if SILU:
            g = X.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(X.dtype).to(tl.float32)
            X = (act * tl.load(u_ptr + row * stride_x + offs).to(tl.float32)).to(X.dtype)
        S = tl.load(s_ptr + row * stride_s + offs)
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
    def rotate3_kernel(x_ptr, u_ptr, s_ptr, ha_ptr, hb_ptr, hc_ptr, y_ptr, stride_x, stride_y,
                       stride_s, scale,
                       A: tl.constexpr, AP: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
                       SIGN_FIRST: tl.constexpr, PREC: tl.constexpr, SILU: tl.constexpr):
        # (HA ⊗ HB ⊗ HC) on a row viewed as an A x B x C tensor, A (e.g. a Paley 28) padded to
        # the power of two AP with zero rows: HC on the last axis, HB on the middle one (by a
        # permute), HA on the first, each one tensor-core dot.
        row = tl.program_id(0)
        a = tl.arange(0, AP)
        bc = tl.arange(0, B * C)
        offs = a[:, None] * (B * C) + bc[None, :]
        amask = (a < A)[:, None]
        X = tl.load(x_ptr + row * stride_x + offs, mask=amask, other=0)
        if SILU:  # as in rotate2_kernel (padding rows: silu(0)·0 = 0)
            g = X.to(tl.float32)
            act = (g / (1.0 + tl.exp(-g))).to(X.dtype).to(tl.float32)
            U = tl.load(u_ptr + row * stride_x + offs, mask=amask, other=0).to(tl.float32)
            X = (act * U).to(X.dtype)
        S = tl.load(s_ptr + row * stride_s + offs, mask=amask, other=0)
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

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "UNPACK_3D": u},
                             num_warps=w, num_stages=st)
               for bn, bk, sk, w, st, u in _GEMV_CONFIGS]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        K, bits, group = args["K"], args["BITS"], args["GROUP"]
        bounds = (args["SEG1"], args["SEG2"]) if args["stride_seg"] else ()
        keep = [c for c in configs if config_fits(
            (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.kwargs["SPLIT_K"]), bits, group, K,
            bounds)]
        return keep or [configs[0]]

    key = ["N", "M", "K", "BITS", "GROUP", "SEG1", "SEG2", "stride_seg", "SILU", "PAIRED"]
    gemv_tuned = triton.autotune(configs=configs, key=key,
                                 prune_configs_by={"early_config_prune": prune},
                                 do_bench=short_bench)(gemv_words)
    return (triton, gemv_words, gemv_tuned, gemv_bytes, dequant_words, dequant_bytes,
            rotate2_kernel, rotate3_kernel)


def short_bench(fn, quantiles):
    """The autotuners' timing: each config runs a few microseconds, and Triton's default 25 +
    100 ms per config would add seconds per layer shape to the first decode step."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


def autotuned_rows(triton, kernel, configs):
    """A row-streaming GEMV (the int8 and bf16 heads) with ``EVEN_K`` set from its shape and
    autotuned over ``(BLOCK_N, BLOCK_K, warps, stages)`` configs, keyed on ``(N, K)``."""
    cfgs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=st)
            for bn, bk, w, st in configs]
    even = triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})(kernel)
    return triton.autotune(configs=cfgs, key=["N", "K"], do_bench=short_bench)(even)


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


def _use_tuned(x: torch.Tensor, m: int, n: int, shape_key: tuple) -> bool:
    # Autotuning times candidate launches: not for small layers (the default tile is as good and
    # compiling candidates costs seconds), and inside a CUDA graph capture only once it is done
    # (an eager call first, as CUDA-graph users warm up anyway); else the default tile.
    if m * n < AUTOTUNE_MIN_CODES or not x.is_cuda or _interpreting():
        return False
    return (not torch.cuda.is_current_stream_capturing()
            or shape_key in _TUNED)


# Split-K workspaces per device: (fp32 partial sums, int32 arrival counters, all zero between
# launches).  Never freed or replaced while in use: a captured CUDA graph keeps their addresses,
# so a larger one is added next to the old ones, never in place of them.
_WORKSPACES: dict[torch.device, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def _capturing(dev: torch.device) -> bool:
    return dev.type == "cuda" and torch.cuda.is_current_stream_capturing()


def gemv_workspace(dev: torch.device, partials: int = 0,
                   counters: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A split-K workspace of at least ``partials`` floats and ``counters`` counters on ``dev``,
    or None when only a new allocation would do and a CUDA graph is being captured."""
    spaces = _WORKSPACES.setdefault(dev, [])
    if spaces and spaces[-1][0].numel() >= partials and spaces[-1][1].numel() >= counters:
        return spaces[-1]
    if _capturing(dev):
        return None
    ws = torch.empty(max(partials, 1 << 18), dtype=torch.float32, device=dev)
    cnt = torch.zeros(max(counters, 1 << 14), dtype=torch.int32, device=dev)
    spaces.append((ws, cnt))
    return spaces[-1]


def gemv(x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
         bits: int, group: int, m: int, n: int, tile: tuple | None = None,
         bounds: tuple[int, ...] = (), per_segment: bool = False,
         up: torch.Tensor | None = None) -> torch.Tensor:
    """``x2 @ W^T`` for a contiguous ``(rows, n)`` activation by the fused GEMV, in ``x2.dtype``.

    ``tile``: force one ``(BLOCK_N, BLOCK_K, SPLIT_K, warps, stages, unpack 3-D)`` config, as
    ``YAQA_GEMV_CONFIG`` does for every call; otherwise large layers on CUDA are autotuned.

    Stacked layers (``W`` = several layers' rows, one after the other): ``bounds`` are the first
    rows of the 2nd and 3rd layer.  With ``per_segment``, ``x2`` holds one input row per layer
    (``len(bounds) + 1`` rows, e.g. each layer's own input rotation) and the output is one row
    ``(1, m)``; otherwise every layer reads each row of ``x2``.

    ``up``: the input is ``silu(x2) · up`` (a gated MLP's down projection reading the gate and up
    outputs; :func:`silu_mul_reference`), computed by the GEMV as it loads its K slice, so no
    separate activation kernel writes and re-reads it.  ``x2`` and ``up`` may be views with
    contiguous rows of one stride (the two halves of the stacked gate/up output).
    """
    triton, gemv_words, gemv_tuned, gemv_bytes = _kernels()[:4]
    silu = up is not None
    if silu:
        if bounds or up.shape != x2.shape or up.dtype != x2.dtype:
            raise ValueError(f"GEMV: silu(gate)·up needs gate and up of one shape and dtype and "
                             f"no stacked bounds, got {tuple(x2.shape)} {x2.dtype}, "
                             f"{tuple(up.shape)} {up.dtype}, bounds {bounds}")
        if (x2.stride(-1) != 1 or up.stride(-1) != 1
                or (x2.shape[0] > 1 and up.stride(0) != x2.stride(0))):
            x2, up = x2.contiguous(), up.contiguous()
    else:
        up = x2  # unused by the kernels
    if len(bounds) > 2 or list(bounds) != sorted(bounds) or any(not 0 < b < m for b in bounds):
        raise ValueError(f"GEMV: bounds must be at most 2 increasing rows inside (0, {m}), "
                         f"got {bounds}")
    if per_segment:
        if x2.shape[0] != len(bounds) + 1:
            raise ValueError(f"GEMV: {len(bounds) + 1} stacked layers need as many input rows, "
                             f"got {x2.shape[0]}")
        rows, stride_seg, align = 1, x2.stride(0), tuple(bounds)
    else:
        rows, stride_seg, align = x2.shape[0], 0, ()
    seg1, seg2 = (tuple(bounds) + (m, m))[:2]
    y = torch.empty(rows, m, dtype=x2.dtype, device=x2.device)
    # fp32 activations keep the per-code decode: the paired one carries offsets of 2^2B·x
    # through the sums, which costs ~1e-4 relative (far below a 16-bit output's rounding).
    paired = PAIRED_DECODE and bits <= 4 and x2.dtype != torch.float32
    key = (bits, group, m, n, rows, x2.dtype, align, silu, paired)
    shape_key = (m, n, rows, bits, group, x2.dtype, align, silu, paired)
    forced = tile or forced_config()
    if forced is not None and not config_fits(forced, bits, group, n, align):
        if tile is not None:
            raise ValueError(f"GEMV config {tile} does not tile K={n} (group {group}, {bits} bits)"
                             f" or the layer bounds {align}")
        forced = None  # the env config does not fit this layer: its usual config
    # The most any config needs, so the autotuner never outgrows the workspace mid-tuning.
    max_split = max([MAX_SPLIT] + ([forced[2]] if forced else []))
    ws = gemv_workspace(x2.device, rows * max_split * m, rows * m)
    if ws is None:
        # First GEMV on this device inside a CUDA-graph capture: no workspace can be made now.
        log.warning("packed GEMV first called inside a CUDA graph capture: dequantize + matmul "
                    "for this call (run one eager step before capturing)")
        W = dequantize_cuda(qweight, scale, zero, bits, group, m, n, x2.dtype)
        if silu:
            return silu_mul_reference(x2, up) @ W.T
        if not per_segment:
            return x2 @ W.T
        edges = (0, *bounds, m)
        return torch.cat([x2[i:i + 1] @ W[a:b].T for i, (a, b) in
                          enumerate(zip(edges[:-1], edges[1:]))], dim=1)
    partials, counters = ws
    common = (partials, counters, m, rows, x2.stride(0), y.stride(0), seg1, seg2, stride_seg, n)

    def words_default():
        bn, bk, sk, w, st, u = forced or _default_tile(m, n, group, bits, align)
        gemv_words[(triton.cdiv(m, bn), sk, rows)](
            x2, up, qweight.view(torch.int32), scale, zero, y, *common, BITS=bits, GROUP=group,
            BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, UNPACK_3D=u, SILU=silu, PAIRED=paired,
            num_warps=w, num_stages=st)

    def words_tuned():
        def grid(meta):
            return triton.cdiv(m, meta["BLOCK_N"]), meta["SPLIT_K"], rows

        gemv_tuned[grid](x2, up, qweight.view(torch.int32), scale, zero, y, *common, BITS=bits,
                         GROUP=group, SILU=silu, PAIRED=paired)
        _TUNED.add(shape_key)

    def words():
        if forced is None and _use_tuned(x2, m, n, shape_key):
            _guarded("gemv_tuned", key, words_tuned, words_default)
        else:
            words_default()

    def chunks():
        cpc, nb = chunk(bits)
        bn, bk, sk = (8 if m >= 2048 else 4), 256 if n % 256 == 0 else 128, 1
        while bn > 1 and any(b % bn for b in align):
            bn //= 2
        if forced is not None and forced[1] % cpc == 0:
            bn, bk, sk = forced[:3]
        while (triton.cdiv(m, bn) * sk * 2 <= _TARGET_PROGRAMS and n % (bk * sk * 2) == 0
               and forced is None and sk * 2 <= MAX_SPLIT):
            sk *= 2
        gemv_bytes[(triton.cdiv(m, bn), sk, rows)](
            x2, up, qweight, scale, zero, y, *common, BITS=bits, CPC=cpc, NB=nb, GROUP=group,
            BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=sk, SILU=silu, num_warps=4)

    if _word_layout(bits, qweight):
        _guarded("gemv_words", key, words, chunks)
    else:
        chunks()
    return y


def gemv_config(bits: int, group: int, m: int, n: int, rows: int = 1,
                dtype: torch.dtype = torch.bfloat16, segmented: bool = False,
                silu: bool = False) -> dict | None:
    """The config the autotuner picked for a layer shape (after its first call), for reports.
    ``segmented``: of stacked layers that each read their own input row (incoherence);
    ``silu``: of the down projection with silu(gate)·up folded in (``gemv(up=...)``)."""
    gemv_tuned = _kernels()[2]
    for k, cfg in getattr(gemv_tuned, "cache", {}).items():
        if (tuple(k[:5]) == (m, rows, n, bits, group) and bool(k[7]) == segmented
                and bool(k[8]) == silu
                and bool(k[9]) == (PAIRED_DECODE and bits <= 4 and dtype != torch.float32)):
            return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return None


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


def silu_mul_reference(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) · u`` rounded as :func:`decode_kernels.silu_mul` and the folded GEMV round it:
    silu in fp32, rounded to the dtype (act_fn's output), times ``u`` in fp32, rounded."""
    gf = g.float()
    a = (gf / (1.0 + torch.exp(-gf))).to(g.dtype).float()
    return (a * u.float()).to(g.dtype)


@torch.library.custom_op("yaqa::intk_matmul_silu", mutates_args=())
def intk_matmul_silu(gate: torch.Tensor, up: torch.Tensor, qweight: torch.Tensor,
                     scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, m: int,
                     n: int) -> torch.Tensor:
    """``(silu(gate) · up) @ W^T`` for packed int-k ``W`` (a gated MLP's down projection) at
    decode: the GEMV computes the activation while loading its input (:func:`gemv` ``up=``).
    ``gate``/``up``: ``(..., n)``, at most :data:`GEMV_MAX_ROWS` rows; larger inputs take the
    activation, then :func:`packed_matmul`."""
    g2, u2 = gate.reshape(-1, n), up.reshape(-1, n)
    if g2.shape[0] > GEMV_MAX_ROWS:
        y = packed_matmul(silu_mul_reference(g2, u2), qweight, scale, zero, bits, group, m, n)
    else:
        y = gemv(g2, qweight, scale, zero, bits, group, m, n, up=u2)
    return y.reshape(*gate.shape[:-1], m)


@intk_matmul_silu.register_fake
def _(gate, up, qweight, scale, zero, bits, group, m, n):
    return gate.new_empty(*gate.shape[:-1], m)


# ---------------------------------------------------------------------------------------------
# Hadamard rotation of a few activation rows


def rotate2_supports(sizes: tuple[int, ...]) -> bool:
    """Two power-of-two Kronecker factors of 16..128 (4096 = 64·64, 1024 = 32·32, ...)."""
    return len(sizes) == 2 and all(16 <= d <= 128 and d & (d - 1) == 0 for d in sizes)


def _rotation_rows(x: torch.Tensor, sign: torch.Tensor):
    """Rows to rotate and their strides: ``x`` (..., n) and ``sign`` (n,) rotate each row of x;
    one row of x and ``sign`` (r, n) give r rotations of that row, one per sign vector (the
    inputs of several layers reading the same activations, in one launch); r rows of x and
    ``sign`` (r, n) rotate row i with sign i (the outputs of stacked layers of one size)."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if sign.dim() == 2 and sign.shape[0] > 1:
        if x2.shape[0] == sign.shape[0] and x2.shape[0] > 1:
            # One row per sign vector: several layers' outputs of one size in one launch.
            return x2, x2.shape[0], x2.stride(0), n, (sign.shape[0], n)
        if x2.shape[0] != 1:
            raise ValueError(f"several sign vectors rotate one activation row (or one row "
                             f"each), got {x2.shape[0]} rows for {sign.shape[0]} signs")
        return x2, sign.shape[0], 0, n, (sign.shape[0], n)
    return x2, x2.shape[0], x2.stride(0), 0, x.shape


def _silu_rows(x2: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate rows, up rows) of one row stride for a rotation of silu(gate)·up (``up`` None: the
    rotation of ``x2`` itself; ``x2`` stands in for the unused up pointer)."""
    if up is None:
        return x2, x2
    u2 = up.reshape(-1, up.shape[-1])
    if u2.shape != x2.shape or u2.dtype != x2.dtype:
        raise ValueError(f"rotation of silu(gate)·up needs gate and up of one shape and dtype, "
                         f"got {tuple(x2.shape)} {x2.dtype}, {tuple(u2.shape)} {u2.dtype}")
    if not u2.is_contiguous():
        u2 = u2.contiguous()
    if x2.shape[0] > 1 and u2.stride(0) != x2.stride(0):
        x2, u2 = x2.contiguous(), u2.contiguous()
    return x2, u2


def _unfused_rotation(x2, s, Hs, sign_first, scale, rows, u2=None):
    from .hadamard import apply_factors

    if u2 is not None:
        x2 = silu_mul_reference(x2, u2)
    if x2.shape[0] != rows:
        x2 = x2.expand(rows, -1)
    y = (apply_factors(x2 * s, Hs, normalize=False) if sign_first
         else apply_factors(x2, Hs, normalize=False) * s)
    return y * scale if scale != 1.0 else y


def rotate2(x: torch.Tensor, sign: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor,
            sign_first: bool, scale: float = 1.0, up: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of ``x`` times ``scale·(H1 ⊗ H2)^T``, with ``sign`` (a ±1 vector, possibly with an
    exact power-of-two scale folded in) applied before (``sign_first``) or after; by the fused
    Triton kernel.  A ``(r, n)`` ``sign`` with one row of ``x`` gives the r rotations ``(r, n)``.
    ``up``: rotate ``silu(x)·up`` instead (:func:`silu_mul_reference`'s rounding), computed by
    the kernel as it loads the row (a down projection's input rotation)."""
    rotate2_kernel = _kernels()[6]
    x2, rows, stride_x, stride_s, shape = _rotation_rows(x, sign)
    x2, u2 = _silu_rows(x2, up)
    n = x2.shape[-1]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    d1, d2 = h1.shape[0], h2.shape[0]
    s = sign.to(x.dtype).contiguous()

    def fused():
        rotate2_kernel[(rows,)](x2, u2, s, h1, h2, y, stride_x, y.stride(0), stride_s, scale,
                                D1=d1, D2=d2, SIGN_FIRST=sign_first,
                                IEEE=x.dtype == torch.float32, SILU=up is not None, num_warps=4)
        return y

    def unfused():
        return _unfused_rotation(x2, s, [h1, h2], sign_first, scale, rows,
                                 u2 if up is not None else None)

    return _guarded("rotate2", (d1, d2, sign_first, x.dtype, up is not None), fused,
                    unfused).reshape(shape)


@torch.library.custom_op("yaqa::hadamard_rotate2", mutates_args=())
def hadamard_rotate2(x: torch.Tensor, sign: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor,
                     sign_first: bool, scale: float = 1.0,
                     up: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rotate2` as an op that ``torch.compile`` keeps opaque and CUDA graphs capture."""
    return rotate2(x, sign, h1, h2, sign_first, scale, up)


def _rotation_shape(x, sign):
    if sign.dim() == 2 and sign.shape[0] > 1:
        return (sign.shape[0], x.shape[-1])
    return x.shape


@hadamard_rotate2.register_fake
def _(x, sign, h1, h2, sign_first, scale=1.0, up=None):
    return x.new_empty(_rotation_shape(x, sign))


def rotate3_supports(sizes: tuple[int, ...]) -> bool:
    """Three factors: any first one up to 64 (Paley), then powers of two of 16..128
    (14336 = 28·32·16)."""
    if len(sizes) != 3:
        return False
    a, b, c = sizes
    return a <= 64 and all(16 <= d <= 128 and d & (d - 1) == 0 for d in (b, c)) and b * c <= 1024


def rotate3(x: torch.Tensor, sign: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor,
            hc: torch.Tensor, sign_first: bool, scale: float = 1.0,
            up: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rotate2` for three Kronecker factors."""
    rotate3_kernel = _kernels()[7]
    x2, rows, stride_x, stride_s, shape = _rotation_rows(x, sign)
    x2, u2 = _silu_rows(x2, up)
    n = x2.shape[-1]
    y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    A, B, C = ha.shape[0], hb.shape[0], hc.shape[0]
    AP = max(16, 1 << (A - 1).bit_length())
    s = sign.to(x.dtype).contiguous()

    def fused():
        rotate3_kernel[(rows,)](x2, u2, s, ha, hb, hc, y, stride_x, y.stride(0), stride_s,
                                scale, A=A, AP=AP, B=B, C=C, SIGN_FIRST=sign_first,
                                PREC="ieee" if x.dtype == torch.float32 else None,
                                SILU=up is not None, num_warps=8)
        return y

    def unfused():
        return _unfused_rotation(x2, s, [ha, hb, hc], sign_first, scale, rows,
                                 u2 if up is not None else None)

    return _guarded("rotate3", (A, B, C, sign_first, x.dtype, up is not None), fused,
                    unfused).reshape(shape)


@torch.library.custom_op("yaqa::hadamard_rotate3", mutates_args=())
def hadamard_rotate3(x: torch.Tensor, sign: torch.Tensor, ha: torch.Tensor, hb: torch.Tensor,
                     hc: torch.Tensor, sign_first: bool, scale: float = 1.0,
                     up: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rotate3` as an op that ``torch.compile`` keeps opaque and CUDA graphs capture."""
    return rotate3(x, sign, ha, hb, hc, sign_first, scale, up)


@hadamard_rotate3.register_fake
def _(x, sign, ha, hb, hc, sign_first, scale=1.0, up=None):
    return x.new_empty(_rotation_shape(x, sign))
