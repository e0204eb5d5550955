"""Running sums for the Kronecker factors of one linear layer ``y = x W^T`` (pure tensor code).

Notation (docs/yaqa-notes.md): W is m×n, a micro-batch gives inputs X [b, T, n] and output
gradients G [b, T, m]; the per-sequence weight gradient is ∇W_b = G_b^T X_b.

* Sketch B, first pass: ``H_in += Σ_b ∇W_b^T ∇W_b``, ``H_out += Σ_b ∇W_b ∇W_b^T``.
  Later passes are ALS steps ``H_in ← Σ_b ∇W_b^T Ĥ_out ∇W_b`` (Ĥ = H / ||H||_F²) and likewise.
* Sketch A: ``H_out += Σ_t (x_t Ĥ_in x_t^T) g_t^T g_t`` or ``H_in += Σ_t (g_t Ĥ_out g_t^T) x_t^T x_t``.
* Plain GPTQ Hessian: ``H_x += Σ_t x_t^T x_t``.
* Several label draws (``label_draws`` D > 1, Sketch B): each sequence arrives as D consecutive
  rows with identical X_b and the gradients G_{b,d} of D label draws; its terms are the draw
  means ``(1/D) Σ_d ∇W_{b,d}^T ∇W_{b,d}`` (and the mirror image), and it still counts as one
  sample. With ``G_cat = [G_{b,1}, …, G_{b,D}]`` (features side by side), ``G_cat G_cat^T =
  Σ_d G_{b,d} G_{b,d}^T``: the Gram route then needs one ``X^T S_G X`` per sequence.

Sums stay sums until :meth:`LayerAccumulator.end_pass` divides by the sample count; only the lower
block triangle of each symmetric sum is accumulated (see :func:`sym_addmm`), and only that part is
stored: a flat buffer holding each rectangle of :func:`sym_blocks` contiguously (see
:func:`packed_layout`), about half of n×n. The end of a pass unpacks it into the full symmetric
factor.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .shrinkage import seq_sq_norms_direct, seq_sq_norms_of_gram_product

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "full", "tf32", "mixed", "bf16")
PASS_KINDS = ("hx", "b", "b_iter", "a_out", "a_in")

# Diagonal ("leaf") tiles of a symmetric sum are computed whole; everything below them is computed
# once, as few large rectangles (see sym_addmm). 512 leaves do 1/2 + 512/(2n) of the full product's
# flops (56% at n=4096, 52% at 14336) in ~2n/512 GEMMs; "tiles" is the earlier scheme (2048-wide
# square tiles, 75% / 57%), kept selectable so bench/hessians.py can compare both in one run.
_SYM_TILE = 512
SYM_SCHEMES = ("recursive", "tiles")
_SYM_SCHEME = "recursive"
_OLD_TILE = 2048
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def resolve_precision(precision: str, device: torch.device, dtype: torch.dtype) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if dtype == torch.float64:
        return "full"  # asking for fp64 sums means asking for fp64 products too
    if precision == "auto":
        # bf16 operands, fp32 sums: on SmolLM2 the factors stay within 2e-4 (H_in) / 1.7e-3
        # (H_out) of fp32 and the YAQA-B KL does not move (bench/results/stats_precision_cpu.md)
        return "bf16" if device.type == "cuda" else "full"
    return precision


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """TF32 on or off inside this block only; the model's own matmuls are left as set."""
    mm = torch.backends.cuda.matmul
    # torch >= 2.9 refuses a mix of its legacy (allow_tf32) and new (fp32_precision) switches
    attr, value = (("fp32_precision", "tf32" if enabled else "ieee")
                   if hasattr(mm, "fp32_precision") else ("allow_tf32", enabled))
    old = getattr(mm, attr)
    setattr(mm, attr, value)
    try:
        yield
    finally:
        setattr(mm, attr, old)


class Products:
    """Matrix products at a precision per level, accumulated or returned in ``acc_dtype``.

    Levels: "first" multiplies two activations (X, G) as they come from the model; bf16×bf16
    products are exact in fp32, so bf16 tensor cores with fp32 accumulation lose nothing there.
    "mid" multiplies an fp32 intermediate (a T×T Gram, a frozen factor) with an activation;
    "final" is the large symmetric product accumulated into a factor (X^T Y, G^T Z, D^T D).
    TF32 rounds the fp32 operand to 10 mantissa bits (rel. 5e-4 per element, zero mean), bf16 to
    8 bits (twice the tensor-core rate); "full" keeps fp32/fp64. Per precision mode:

        mode    first   mid     final
        full    full    full    full
        tf32    bf16TC  tf32    tf32
        mixed   bf16TC  tf32    bf16
        bf16    bf16TC  bf16    bf16

    (bf16TC: bf16 tensor cores with fp32 output when both operands are bf16/fp16, else TF32.)
    Every product accumulates in fp32 (or fp64); a bf16 operand is an fp32 result rounded once.
    On CPU, bf16 levels are emulated exactly that way (operands rounded to bf16, products in
    fp32), so CPU runs measure the same rounding as the GPU.
    bench/hessians.py measures speed and error of each mode against fp64.
    """

    MODES = {"full": ("full", "full", "full"), "tf32": ("first", "tf32", "tf32"),
             "mixed": ("first", "tf32", "bf16"), "bf16": ("first", "bf16", "bf16")}

    def __init__(self, precision: str, acc_dtype: torch.dtype, device: torch.device):
        self.precision = precision
        self.acc_dtype = acc_dtype
        self.cuda = device.type == "cuda"
        self._out_dtype_ok = self.cuda  # torch's mm(out_dtype=fp32) exists for bf16/fp16 on CUDA only
        self._fused_ok: bool | None = None if self.cuda else False  # addmm(out_dtype=) in place
        self._fused_bmm_ok: bool | None = None if self.cuda else False  # and baddbmm
        self._how = dict(zip(("first", "mid", "final"), self.MODES[precision]))
        # One mode wants one TF32 setting for all its fp32 products ("full": IEEE everywhere;
        # the others: TF32 wherever an operand is fp32), so the flag is set once per update in
        # :meth:`scope`, never per product.
        self._tf32 = precision != "full"

    def scope(self) -> contextlib.AbstractContextManager:
        """Where this mode's products run: sets the (process-wide) TF32 flag for exactly the
        statistics code of one update, restored before the model computes again."""
        return tf32_matmuls(self._tf32) if self.cuda else contextlib.nullcontext()

    def same_operand(self, a: str, b: str) -> bool:
        return self._how[a] == self._how[b] and self._how[a] != "first"

    def operand(self, t: Tensor, level: str) -> Tensor:
        """``t`` in the dtype the product of ``level`` consumes (convert once, slice many times)."""
        how = self._how[level]
        if how == "full":
            return t.to(self.acc_dtype)
        if how == "bf16":
            return t if t.dtype in _LOW_PRECISION else t.to(torch.bfloat16)
        if how == "tf32":
            return t.float()
        return t

    def gemm_operand(self, t: Tensor, level: str) -> Tensor:
        """:meth:`operand`, and on CPU a bf16 operand already widened to fp32 (exactly): the
        emulated product then slices it many times without converting each slice."""
        t = self.operand(t, level)
        if not self.cuda and t.dtype in _LOW_PRECISION:
            return t.to(self.acc_dtype)
        return t

    def _result_dtype(self, level: str | None) -> torch.dtype:
        how = self._how[level] if level is not None else "full"
        return {"bf16": torch.bfloat16, "tf32": torch.float32}.get(how, self.acc_dtype)

    def mm(self, a: Tensor, b: Tensor, level: str, for_level: str | None = None) -> Tensor:
        """``a @ b`` (or a batched product) at ``level``.

        ``for_level``: the level that consumes the result; it comes back in that level's operand
        dtype straight from the product (a bf16 consumer gets the fp32-accumulated sum rounded
        once, never an fp32 copy to convert). Default: ``acc_dtype``.
        """
        a, b = self.operand(a, level), self.operand(b, level)
        want = self._result_dtype(for_level)
        f = torch.bmm if a.dim() == 3 else torch.mm
        if self._how[level] == "full":
            return f(a, b).to(want)
        if a.dtype != b.dtype:  # "first" with one fp32 operand: TF32 (bf16 is exact in TF32)
            a, b = a.float(), b.float()
        if a.dtype in _LOW_PRECISION:
            if not self.cuda:
                return f(a.float(), b.float()).to(want)  # exact products, fp32 sums: as on GPU
            if want == a.dtype:
                return f(a, b)  # tensor cores accumulate in fp32 and round once on output
            if self._out_dtype_ok:
                try:
                    return f(a, b, out_dtype=torch.float32).to(want)
                except (RuntimeError, TypeError) as e:
                    log.info("bf16 products with fp32 output unavailable (%s); using TF32", e)
                    self._out_dtype_ok = False
            a, b = a.float(), b.float()
        return f(a, b).to(want)

    def addmm_(self, acc: Tensor, a: Tensor, b: Tensor, level: str) -> None:
        """``acc += a @ b`` in place (``acc`` may be a view into a larger sum), no temporaries
        where the device allows; operands must already be :meth:`operand` of ``level``."""
        self._accumulate(acc, a, b, level, batched=False)

    def baddbmm_(self, acc: Tensor, a: Tensor, b: Tensor, level: str) -> None:
        """:meth:`addmm_` for a batch: ``acc[i] += a[i] @ b[i]`` (``acc`` may be strided
        blocks of a larger sum)."""
        self._accumulate(acc, a, b, level, batched=True)

    def _accumulate(self, acc: Tensor, a: Tensor, b: Tensor, level: str, batched: bool) -> None:
        inplace = Tensor.baddbmm_ if batched else Tensor.addmm_
        if a.dtype != b.dtype or (a.dtype in _LOW_PRECISION and not self.cuda):
            a, b = a.to(acc.dtype), b.to(acc.dtype)
        if a.dtype not in _LOW_PRECISION:
            inplace(acc, a if a.dtype == acc.dtype else a.to(acc.dtype),
                    b if b.dtype == acc.dtype else b.to(acc.dtype))
            return
        # whether the fused low-precision product into fp32 works is checked once per kind
        if batched and self._fused_bmm_ok is None:
            self._fused_bmm_ok = _fused_addmm_works(acc.device, a.dtype, batched=True)
        elif not batched and self._fused_ok is None:
            self._fused_ok = _fused_addmm_works(acc.device, a.dtype)
        if self._fused_bmm_ok if batched else self._fused_ok:
            (torch.baddbmm if batched else torch.addmm)(acc, a, b, out_dtype=torch.float32, out=acc)
        elif self._out_dtype_ok and acc.dtype == torch.float32:
            acc.add_(self.mm(a, b, level))
        else:
            inplace(acc, a.to(acc.dtype), b.to(acc.dtype))


def _fused_addmm_works(device: torch.device, dtype: torch.dtype, batched: bool = False) -> bool:
    """Whether ``addmm(acc, a, b, out_dtype=fp32, out=acc)`` (``baddbmm`` when ``batched``) of
    low-precision operands updates a strided view of an fp32 sum correctly here: a strided
    block, or strided diagonal blocks (checked once on small tensors)."""
    what = "baddbmm" if batched else "addmm"
    try:
        g = torch.Generator(device=device).manual_seed(0)
        big = torch.randn(48, 48, device=device, generator=g)
        want = big.clone()
        if batched:
            a = torch.randn(3, 16, 40, device=device, generator=g).to(dtype)
            b = torch.randn(3, 40, 16, device=device, generator=g).to(dtype)
            for i in range(3):
                want[16 * i:16 * i + 16, 16 * i:16 * i + 16] += (a[i].double() @ b[i].double()).float()
            view = big.as_strided((3, 16, 16), (16 * 49, 48, 1))
            torch.baddbmm(view, a, b, out_dtype=torch.float32, out=view)
        else:
            a = torch.randn(24, 40, device=device, generator=g).to(dtype)
            b = torch.randn(40, 16, device=device, generator=g).to(dtype)
            want[24:, 8:24] += a.double().mm(b.double()).float()
            view = big[24:, 8:24]
            torch.addmm(view, a, b, out_dtype=torch.float32, out=view)
        ok = bool(torch.allclose(big, want, rtol=1e-4, atol=1e-3))
    except (RuntimeError, TypeError) as e:
        log.info("fused bf16 %s into fp32 sums unavailable (%s); product + add", what, e)
        return False
    if not ok:
        log.info("fused bf16 %s into a strided fp32 view is wrong here; product + add", what)
    return ok


def sym_tiles(n: int) -> list[tuple[int, int]]:
    """The diagonal tiles of an n×n symmetric sum: computed whole, symmetrised by mirror_lower."""
    k = max(1, round(n / (_SYM_TILE if _SYM_SCHEME == "recursive" else _OLD_TILE)))
    edges = [round(i * n / k) for i in range(k + 1)]
    return list(zip(edges[:-1], edges[1:]))


def sym_blocks(n: int) -> tuple[tuple[int, int, int, int], ...]:
    """Rectangles (r0, r1, c0, c1) that together cover the lower block triangle of n×n exactly.

    "recursive": split the tiles in two halves, one GEMM for the lower-left rectangle, recurse
    into both halves (a blocked SYRK); "tiles": one GEMM per lower tile.
    """
    # every update of every layer asks again: computed once per (size, scheme)
    return _sym_blocks(n, _SYM_SCHEME, _SYM_TILE, _OLD_TILE)


@functools.lru_cache(maxsize=64)
def _sym_blocks(n: int, scheme: str, tile: int,
                old_tile: int) -> tuple[tuple[int, int, int, int], ...]:
    tiles = sym_tiles(n)
    if scheme == "tiles":
        return tuple((i0, i1, j0, j1) for i, (i0, i1) in enumerate(tiles)
                     for j0, j1 in tiles[:i + 1])
    out: list[tuple[int, int, int, int]] = []

    def split(lo: int, hi: int) -> None:  # tiles[lo:hi]
        if hi - lo == 1:
            out.append((tiles[lo][0], tiles[lo][1], tiles[lo][0], tiles[lo][1]))
            return
        mid = (lo + hi) // 2
        out.append((tiles[mid][0], tiles[hi - 1][1], tiles[lo][0], tiles[mid - 1][1]))
        split(lo, mid)
        split(mid, hi)

    split(0, len(tiles))
    return tuple(out)


# Symmetric sums live packed (the rectangles sym_addmm writes, nothing else): a block's sums take
# about half the memory, so the memory plan fits about twice the blocks in one pass. False keeps
# full n×n sums (the earlier layout; bench/scale.py --packed-sums off compares both).
_PACKED_SUMS = True


@dataclass(frozen=True)
class PackedLayout:
    """Where each rectangle of :func:`sym_blocks` (n) lives in a flat packed buffer.

    ``offsets[i]``: start of ``sym_blocks(n)[i]``, stored row-major and contiguous. With equal
    diagonal leaves (:func:`_uniform_leaf`), the leaves come first, in order along the diagonal,
    so ``buf[:k*t*t].view(k, t, t)`` is the batch the leaves' batched GEMM adds into; the other
    rectangles follow in sym_blocks order.
    """

    n: int
    blocks: tuple[tuple[int, int, int, int], ...]
    offsets: tuple[int, ...]
    numel: int
    leaf: int | None  # the uniform leaf size t, or None

    def view(self, buf: Tensor, i: int) -> Tensor:
        r0, r1, c0, c1 = self.blocks[i]
        o = self.offsets[i]
        return buf[o:o + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)

    def leaves(self, buf: Tensor) -> Tensor:
        """The diagonal leaves as one contiguous [k, t, t] batch (uniform leaves only)."""
        t = self.leaf
        k = self.n // t
        return buf[:k * t * t].view(k, t, t)


def packed_layout(n: int) -> PackedLayout:
    """The packed layout of an n×n symmetric sum under the current blocking scheme."""
    return _packed_layout(n, _SYM_SCHEME, _SYM_TILE, _OLD_TILE)


@functools.lru_cache(maxsize=64)
def _packed_layout(n: int, scheme: str, tile: int, old_tile: int) -> PackedLayout:
    blocks = _sym_blocks(n, scheme, tile, old_tile)
    t = _uniform_leaf_of(blocks, n)
    order = list(range(len(blocks)))
    if t is not None:  # leaves first, by position on the diagonal; the rest keep their order
        order.sort(key=lambda i: (0, blocks[i][0]) if blocks[i][0] == blocks[i][2] else (1, 0))
    offsets = [0] * len(blocks)
    o = 0
    for i in order:
        r0, r1, c0, c1 = blocks[i]
        offsets[i] = o
        o += (r1 - r0) * (c1 - c0)
    return PackedLayout(n, blocks, tuple(offsets), o, t)


def sum_shape(n: int) -> tuple[int, ...]:
    """The shape of an n×n symmetric sum as accumulated: packed (1-D) or the full square."""
    return (packed_layout(n).numel,) if _PACKED_SUMS else (n, n)


def sym_zeros(n: int, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """A zero symmetric sum of size n for :func:`sym_addmm`, in the shape of :func:`sum_shape`."""
    return torch.zeros(sum_shape(n), dtype=dtype, device=device)


def pack_sym(full: Tensor) -> Tensor:
    """The lower block triangle of an n×n matrix in the packed layout (what sym_addmm wrote)."""
    n = full.shape[0]
    if full.dim() != 2 or full.shape[1] != n:
        raise ValueError(f"pack_sym takes a square matrix, got shape {tuple(full.shape)}")
    lay = packed_layout(n)
    out = torch.empty(lay.numel, dtype=full.dtype, device=full.device)
    for i, (r0, r1, c0, c1) in enumerate(lay.blocks):
        lay.view(out, i).copy_(full[r0:r1, c0:c1])
    return out


def scatter_sym(buf: Tensor, n: int) -> Tensor:
    """A packed sum as an n×n matrix: its lower block triangle, zeros above (the full layout
    of a sum in the middle of a pass)."""
    lay = _checked_layout(buf, n)
    out = torch.zeros(n, n, dtype=buf.dtype, device=buf.device)
    for i, (r0, r1, c0, c1) in enumerate(lay.blocks):
        out[r0:r1, c0:c1] = lay.view(buf, i)
    return out


def unpack_sym(buf: Tensor, n: int) -> Tensor:
    """A finished packed sum as the full symmetric n×n matrix: the same values, bit for bit,
    as accumulating into a full matrix and :func:`mirror_lower`."""
    lay = _checked_layout(buf, n)
    out = torch.empty(n, n, dtype=buf.dtype, device=buf.device)  # every element is written
    for i, (r0, r1, c0, c1) in enumerate(lay.blocks):
        out[r0:r1, c0:c1] = lay.view(buf, i)
    return mirror_lower(out)


def _checked_layout(buf: Tensor, n: int) -> PackedLayout:
    lay = packed_layout(n)
    if buf.dim() != 1 or buf.numel() != lay.numel:
        raise ValueError(f"a packed {n}x{n} sum has {lay.numel} values, got a tensor of shape "
                         f"{tuple(buf.shape)} (written with another blocking scheme?)")
    return lay


def sym_flop_fraction(n: int) -> float:
    """Flops of :func:`sym_addmm` relative to the full n×n product."""
    return sum((r1 - r0) * (c1 - c0) for r0, r1, c0, c1 in sym_blocks(n)) / (n * n)


def sym_addmm(acc: Tensor, a: Tensor, b: Tensor, prod: Products, level: str) -> None:
    """``acc += a^T b`` for a product known to be symmetric, lower block triangle only.

    a, b: [K, n]. Only the rectangles of :func:`sym_blocks` are multiplied (about half the flops
    of the full product for large n). ``acc`` is either packed (1-D, :func:`packed_layout`: each
    rectangle a contiguous view) or a full n×n matrix, whose upper half :func:`mirror_lower`
    restores; both receive the same products in the same order.
    """
    a, b = prod.gemm_operand(a, level), prod.gemm_operand(b, level)
    n = a.shape[1]
    packed = acc.dim() == 1
    lay = packed_layout(n) if packed else None
    t = _uniform_leaf(n) if _BATCH_LEAVES and (packed or acc.is_contiguous()) else None
    # in place into views of the sum: one GEMM per rectangle, no product temporaries
    for i, (r0, r1, c0, c1) in enumerate(sym_blocks(n)):
        if t is None or r0 != c0:
            view = lay.view(acc, i) if packed else acc[r0:r1, c0:c1]
            prod.addmm_(view, a[:, r0:r1].T, b[:, c0:c1], level)
    if t is not None:
        # the diagonal leaves are equal squares at a constant stride through the sum, the
        # operands' column slices likewise: one batched GEMM for all of them instead of one
        # small GEMM each (small outputs leave most of a GPU idle)
        k, K = n // t, a.shape[0]
        diag = (lay.leaves(acc) if packed else
                acc.as_strided((k, t, t), (t * (n + 1), n, 1), acc.storage_offset()))
        at = a.as_strided((k, t, K), (t * a.stride(1), a.stride(1), a.stride(0)),
                          a.storage_offset())
        bt = b.as_strided((k, K, t), (t * b.stride(1), b.stride(0), b.stride(1)),
                          b.storage_offset())
        prod.baddbmm_(diag, at, bt, level)


# batch the diagonal leaves of sym_addmm into one GEMM (bench/scale.py --leaf-batch off compares)
_BATCH_LEAVES = True


def _uniform_leaf(n: int) -> int | None:
    """The leaf size when sym_addmm's diagonal leaves are equal squares tiling n (else None)."""
    return packed_layout(n).leaf


def _uniform_leaf_of(blocks: tuple[tuple[int, int, int, int], ...], n: int) -> int | None:
    leaves = [(r0, r1) for r0, r1, c0, c1 in blocks if r0 == c0]
    t = leaves[0][1] - leaves[0][0]
    ok = len(leaves) > 1 and all(r0 == i * t and r1 == r0 + t
                                 for i, (r0, r1) in enumerate(sorted(leaves)))
    return t if ok and t * len(leaves) == n else None


GRAM_SCHEMES = ("syrk", "full")
_GRAM_SCHEME = "syrk"


def sym_gram(a: Tensor, prod: Products, level: str, for_level: str) -> Tensor:
    """``a a^T`` per sequence ([b, T, k] -> [b, T, T]), multiplying only the lower block triangle.

    The T×T Grams of the Gram route (G G^T, X X^T) are symmetric: the rectangles of
    :func:`sym_blocks` (T) cost 5/8 of the full product at T = 2048 (4 tiles) and are written
    with their mirror images. Each output element is the same dot product as in the full
    product, so the result differs from it only by the summation order inside the GEMMs.
    """
    T = a.shape[1]
    blocks = sym_blocks(T)
    if _GRAM_SCHEME == "full" or len(blocks) == 1:
        return prod.mm(a, a.transpose(1, 2), level, for_level=for_level)
    out: Tensor | None = None
    for r0, r1, c0, c1 in blocks:
        p = prod.mm(a[:, r0:r1], a[:, c0:c1].transpose(1, 2), level, for_level=for_level)
        if out is None:
            out = torch.empty(a.shape[0], T, T, dtype=p.dtype, device=p.device)
        out[:, r0:r1, c0:c1] = p
        if r0 != c0:  # a lower rectangle: its mirror fills the upper triangle
            out[:, c0:c1, r0:r1] = p.transpose(1, 2)
    return out


def mirror_lower(acc: Tensor) -> Tensor:
    """In place: copy the lower block triangle to the upper one and symmetrise diagonal tiles."""
    tiles = sym_tiles(acc.shape[0])
    for i, (i0, i1) in enumerate(tiles):
        for j0, j1 in tiles[:i]:
            acc[j0:j1, i0:i1] = acc[i0:i1, j0:j1].T
        d = acc[i0:i1, i0:i1]
        d.copy_((d + d.T) / 2)
    return acc


def choose_route(T: int, m: int, n: int) -> str:
    """"gram" (through the T×T Grams of a sequence) or "direct" (through ∇W_b), by flop count."""
    gram = 4 * T * T * (m + n) + 2 * T * (n * n + m * m)
    direct = 2 * T * m * n + 2 * m * n * (m + n)
    return "gram" if gram <= direct else "direct"


class ProductCache:
    """Products that depend on X alone (X^T X, X X^T), shared by layers fed the same input.

    q/k/v (and gate/up) read one tensor; their backward calls arrive one after another, so a
    two-entry cache keyed on the storage is enough. Holding a reference to X keeps its memory
    from being reused by another tensor while the key is alive.
    """

    def __init__(self, size: int = 2):
        self.size = size
        self._entries: list[tuple[tuple, Tensor, dict[str, Any]]] = []
        # n×n products are recycled: fresh large allocations page-fault on CPU every step
        self._pool: dict[tuple, list[Tensor]] = {}

    @staticmethod
    def _key(x: Tensor) -> tuple:
        return (x.untyped_storage().data_ptr(), x.storage_offset(), tuple(x.shape),
                tuple(x.stride()), x.dtype, x._version)

    def get(self, x: Tensor, what: str, compute: Callable[[], Tensor],
            user: LayerAccumulator | None = None) -> Tensor:
        key = self._key(x)
        for k, ref, vals in self._entries:
            if k == key and ref is not None:
                if what not in vals:
                    vals[what] = compute()
                if user is not None:
                    vals.setdefault("users", []).append(user)
                return vals[what]
        vals = {what: compute()}
        if user is not None:
            vals["users"] = [user]
        if self.size == 0:
            return vals[what]
        self._entries.append((key, x, vals))
        for _, _, old in self._entries[: -self.size]:
            self._recycle(old)
        del self._entries[: -self.size]
        return vals[what]

    def zeros(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A zero symmetric sum of size n (:func:`sym_zeros`), recycled where one is free."""
        free = self._pool.get((sum_shape(n), dtype, device))
        return free.pop().zero_() if free else sym_zeros(n, dtype, device)

    def _recycle(self, vals: dict[str, Any]) -> None:
        users = vals.get("users", [])
        for u in users:
            # learnt once: a layer whose input nobody shares accumulates E[x^T x] in place
            u.hx_shared = len(users) > 1
        for k, t in vals.items():
            if k == "xtx":
                self._pool.setdefault((tuple(t.shape), t.dtype, t.device), []).append(t)

    def clear(self) -> None:
        for _, _, vals in self._entries:
            self._recycle(vals)
        self._entries.clear()

    def release(self) -> None:
        self.clear()
        self._pool.clear()


class LayerAccumulator:
    """Sums, counts and finished factors of one linear layer across the passes of a sketch."""

    def __init__(self, n: int, m: int, *, device: torch.device, dtype: torch.dtype = torch.float32,
                 precision: str = "auto", route: str = "auto", collect_hx: bool = True,
                 label_draws: int = 1):
        self.n, self.m = n, m
        if label_draws < 1:
            raise ValueError(f"label_draws must be >= 1, got {label_draws}")
        self.label_draws = label_draws
        self.device, self.dtype = torch.device(device), dtype
        self.precision = resolve_precision(precision, self.device, dtype)
        self.prod = Products(self.precision, dtype, self.device)
        if route not in ("auto", "gram", "direct"):
            raise ValueError(f"route must be 'auto', 'gram' or 'direct', got {route!r}")
        self.route = route
        self.collect_hx = collect_hx
        self.hx_shared: bool | None = None  # does another layer read the same input tensor?
        self.kind: str | None = None
        self.sums: dict[str, Tensor] = {}
        self.counts = {"seqs": 0, "tokens": 0}
        self.factors: dict[str, Tensor] = {}  # finished means: H_x, H_in, H_out
        self._frozen: Tensor | None = None    # the other factor / ||.||_F², fixed during an ALS pass

    # -- pass bookkeeping -------------------------------------------------------------------
    def sum_names(self, kind: str) -> tuple[str, ...]:
        # "seq_sq": Σ_b ‖S_b‖²_F, the per-sequence noise statistic of yaqa.hessians.shrinkage;
        # with several label draws ‖S_in,b‖ ≠ ‖S_out,b‖, so each side has its own
        stats = ("seq_sq",) if self.label_draws == 1 else ("seq_sq_in", "seq_sq_out")
        return {"hx": ("H_x",), "b": ("H_in", "H_out") + stats
                + (("H_x",) if self.collect_hx else ()),
                "b_iter": ("H_in", "H_out"), "a_out": ("H_out",), "a_in": ("H_in",)}[kind]

    def begin_pass(self, kind: str) -> None:
        if kind not in PASS_KINDS:
            raise ValueError(f"unknown pass kind {kind!r}")
        if self.label_draws > 1 and kind in ("a_out", "a_in"):
            raise ValueError("label_draws > 1 applies to Sketch B only")
        self.kind = kind
        self.counts = {"seqs": 0, "tokens": 0}
        # symmetric sums packed (sym_zeros); the 1×1 statistics stay plain matrices
        self.sums = {s: torch.zeros(1, 1, device=self.device, dtype=self.dtype)
                     if s in _STATISTICS else sym_zeros(self._size(s), self.dtype, self.device)
                     for s in self.sum_names(kind)}
        self._frozen = None
        if kind == "a_out":
            self._frozen = _unit_frobenius(self.factors["H_in"])
        elif kind == "a_in":
            self._frozen = _unit_frobenius(self.factors["H_out"])
        elif kind == "b_iter":
            # both factors move at once, each from the other's previous value: two interleaved
            # ALS chains with the same fixed point, at the cost of one pass per step
            self._frozen_in = _unit_frobenius(self.factors["H_in"])
            self._frozen_out = _unit_frobenius(self.factors["H_out"])
            self._prev_in_norm = self.factors["H_in"].norm()

    def _size(self, name: str) -> int:
        return 1 if name in _STATISTICS else {"H_x": self.n, "H_in": self.n, "H_out": self.m}[name]

    def end_pass(self) -> None:
        """Turn this pass's (already reduced) sums into means and store them as factors."""
        seqs, tokens = max(self.counts["seqs"], 1), max(self.counts["tokens"], 1)
        per_seq = self.kind in ("b", "b_iter")
        for name in list(self.sums):
            # one at a time, each packed sum freed once unpacked: the finished full factor is
            # the only n×n matrix this makes
            s = self.sums.pop(name)
            s = unpack_sym(s, self._size(name)) if s.dim() == 1 else mirror_lower(s)
            # H_in/H_out sum every draw's term: the draw mean per sequence divides by D too
            draws = self.label_draws if name in ("H_in", "H_out") else 1
            s /= tokens if (name == "H_x" or not per_seq) else seqs * draws
            self.factors[name] = s
        if self.kind == "hx":
            self.factors["H_in"] = self.factors["H_x"]  # Sketch A starts from E[x^T x]
        if self.kind == "b_iter":
            # H_out is the least-squares partner of the *previous* H_in; giving the new H_in (a
            # better direction) the previous norm keeps the pair's product at that optimum,
            # which at the fixed point is exactly the nearest Kronecker product
            h = self.factors["H_in"]
            h *= self._prev_in_norm / h.norm().clamp_min(torch.finfo(h.dtype).tiny)
        self.sums, self._frozen = {}, None
        for k in ("_frozen_in", "_frozen_out", "_prev_in_norm"):
            self.__dict__.pop(k, None)

    # -- updates ------------------------------------------------------------------------------
    def update_forward(self, X: Tensor) -> None:
        """Forward-only pass: the plain Hessian from inputs alone."""
        with self.prod.scope():
            self._update_forward(X)

    def update_backward(self, X: Tensor, G: Tensor, cache: ProductCache | None = None) -> None:
        """One micro-batch of layer inputs X [b, T, n] and output gradients G [b, T, m].

        With ``label_draws`` D > 1 (Sketch B), b = s·D rows: the D draws of each of s sequences
        in consecutive rows, whose X rows are copies of one another (the first is used)."""
        with self.prod.scope():
            self._update_backward(X, G, cache)

    def _update_forward(self, X: Tensor) -> None:
        b, T, n = X.shape
        x = X.reshape(b * T, n)
        sym_addmm(self.sums["H_x"], x, x, self.prod, "first")
        self.counts["seqs"] += b
        self.counts["tokens"] += b * T

    def _update_backward(self, X: Tensor, G: Tensor, cache: ProductCache | None) -> None:
        b, T, n = X.shape
        m = G.shape[-1]
        cache = cache if cache is not None else ProductCache(0)
        kind, prod = self.kind, self.prod
        draws = self.label_draws
        Xd = X  # every row (for D > 1: each sequence's copies)
        if draws > 1:
            if b % draws:
                raise ValueError(f"{b} rows are not whole sequences of {draws} label draws")
            b //= draws
            X = X.reshape(b, draws, T, n)[:, 0]  # one copy per sequence: H_x and the Gram route
        x2, g2 = X.reshape(b * T, n), G.reshape(-1, m)
        if "H_x" in self.sums:
            if self.hx_shared is False:
                sym_addmm(self.sums["H_x"], x2, x2, prod, "first")
            else:
                self.sums["H_x"] += cache.get(X, "xtx", lambda: _full_gram(x2, prod, cache),
                                              user=self)
        if kind == "b":
            route = self.route if self.route != "auto" else choose_route(T, m, n)
            if route == "gram":
                self._gram_step(X, G, None, None, cache)
            else:
                # [b·D, m, n] per-sequence (per-draw) ∇W_b, in the dtype the final products consume
                D = prod.mm(G.transpose(1, 2), Xd, "first", for_level="final")
                rows = D.shape[0]
                sym_addmm(self.sums["H_in"], D.reshape(rows * m, n), D.reshape(rows * m, n),
                          prod, "final")
                Dt = D.transpose(1, 2).reshape(rows * n, m)
                sym_addmm(self.sums["H_out"], Dt, Dt, prod, "final")
                if draws == 1:
                    self.sums["seq_sq"] += seq_sq_norms_direct(D).sum().to(self.dtype)
                else:
                    # S_in,b = (1/D) Σ_d ∇W_d^T ∇W_d = (1/D) V^T V with V the ∇W_d stacked
                    # (rows); S_out,b = (1/D) C C^T with C = [∇W_1 … ∇W_D] (columns)
                    V = D.reshape(b, draws * m, n)
                    C = D.reshape(b, draws, m, n).transpose(1, 2).reshape(b, m, draws * n)
                    self.sums["seq_sq_in"] += (seq_sq_norms_direct(V).sum()
                                               / draws ** 2).to(self.dtype)
                    self.sums["seq_sq_out"] += (seq_sq_norms_direct(C).sum()
                                                / draws ** 2).to(self.dtype)
        elif kind == "b_iter":
            self._gram_step(X, G, self._frozen_in, self._frozen_out, cache)
        elif kind in ("a_out", "a_in") and draws > 1:
            raise ValueError("label_draws > 1 applies to Sketch B only")
        elif kind == "a_out":
            w = (prod.mm(x2, self._frozen, "mid") * x2).sum(-1)  # x_t Ĥ_in x_t^T
            sym_addmm(self.sums["H_out"], g2, w[:, None] * g2, prod, "final")
        elif kind == "a_in":
            w = (prod.mm(g2, self._frozen, "mid") * g2).sum(-1)  # g_t Ĥ_out g_t^T
            sym_addmm(self.sums["H_in"], x2, w[:, None] * x2, prod, "final")
        else:
            raise RuntimeError(f"pass kind {kind!r} collects nothing in backward")
        self.counts["seqs"] += b
        self.counts["tokens"] += b * T

    def _gram_step(self, X: Tensor, G: Tensor, Hin: Tensor | None, Hout: Tensor | None,
                   cache: ProductCache) -> None:
        """Through T×T Grams: ∇W_b^T M ∇W_b = X_b^T (G_b M G_b^T) X_b, and the mirror image.

        With M = I (first Sketch-B pass) this costs 4T²(m+n) + 2T(n²+m²) per sequence instead of
        2Tmn + 2mn(m+n): cheaper whenever the context is shorter than the layer is wide.

        X: one [b, T, n] per sequence; G: [b·D, T, m], the D label draws of a sequence in
        consecutive rows. Then ``S_G = G_cat M G_cat^T`` sums the draws' T×T Grams.
        """
        b, T, n = X.shape
        m = G.shape[-1]
        draws = G.shape[0] // b
        prod = self.prod
        X0, G0 = X, G  # as the model gave them: first-level products and the cache key
        if prod.same_operand("mid", "final"):  # one conversion serves both levels
            X, G = prod.operand(X, "mid"), prod.operand(G, "mid")
        Gc = _side_by_side(G, b) if draws > 1 else G
        if Hout is None:
            SG = sym_gram(_side_by_side(G0, b) if draws > 1 else G0, prod, "first",
                          for_level="mid")
        else:
            GH = prod.mm(G.reshape(b * draws * T, m), Hout, "mid", for_level="mid")
            GH = _side_by_side(GH.reshape(b * draws, T, m), b) if draws > 1 else GH.reshape(b, T, m)
            SG = prod.mm(GH, Gc.transpose(1, 2), "mid", for_level="mid")
            del GH
        Y = prod.mm(SG, X, "mid", for_level="final").reshape(b * T, n)
        sym_addmm(self.sums["H_in"], X.reshape(b * T, n), Y, prod, "final")
        del Y
        if Hin is None:
            SX = cache.get(X0, "xxt", lambda: sym_gram(X0, prod, "first", for_level="mid"))
        else:
            SX = prod.mm(prod.mm(X.reshape(b * T, n), Hin, "mid", for_level="mid")
                         .reshape(b, T, n), X.transpose(1, 2), "mid", for_level="mid")
        stats = Hin is None and Hout is None and self.kind == "b"
        if stats:
            M = prod.mm(SX, SG, "mid")  # fp32: the statistic squares it
            if draws == 1:
                self.sums["seq_sq"] += seq_sq_norms_of_gram_product(M).sum().to(self.dtype)
            else:  # ‖S_in,b‖² = tr((X X^T · Σ_d G_d G_d^T)²) / D²
                self.sums["seq_sq_in"] += (seq_sq_norms_of_gram_product(M).sum()
                                           / draws ** 2).to(self.dtype)
            del M
        del SG
        Z = prod.mm(SX, Gc, "mid", for_level="final")
        if draws > 1:  # back to one row block per draw, as G's rows are
            Z = Z.reshape(b, T, draws, m).transpose(1, 2)
        Z = Z.reshape(b * draws * T, m)
        if stats and draws > 1:
            self.sums["seq_sq_out"] += (self._out_statistic(Z, G, b)
                                        / draws ** 2).to(self.dtype)
        sym_addmm(self.sums["H_out"], G.reshape(b * draws * T, m), Z, prod, "final")

    def _out_statistic(self, Z: Tensor, G: Tensor, b: int) -> Tensor:
        """``Σ_b ‖Σ_d G_d^T X X^T G_d‖²_F`` from Z_d = X X^T G_d: with the draws stacked along
        time (Z_s, G_s: [D·T, m]), ``U = Z_s G_s^T`` has blocks X X^T G_d G_e^T and the norm is
        ``tr(U²)``. One sequence at a time: U is (D·T)²."""
        m = G.shape[-1]
        Zs, Gs = Z.reshape(b, -1, m), G.reshape(b, -1, m)
        total = torch.zeros((), dtype=torch.float64, device=Z.device)
        for i in range(b):
            U = self.prod.mm(Zs[i:i + 1], Gs[i:i + 1].transpose(1, 2), "mid")
            total += seq_sq_norms_of_gram_product(U).sum()
        return total

    # -- state ---------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, Tensor]:
        out = {f"sum.{k}": v for k, v in self.sums.items()}
        for k, v in self.factors.items():
            if k == "H_in" and "H_x" in self.factors and v is self.factors["H_x"]:
                continue  # aliased after pass 0 of Sketch A; restored on load
            out[f"factor.{k}"] = v
        return out

    def load_state_tensors(self, tensors: Mapping[str, Tensor], kind: str | None,
                           counts: dict[str, int]) -> None:
        # by name, one tensor at a time: a lazy mapping reads each only here
        self.factors = {k[len("factor."):]: tensors[k].to(self.device, self.dtype)
                        for k in tensors if k.startswith("factor.")}
        if "H_x" in self.factors and "H_in" not in self.factors:
            self.factors["H_in"] = self.factors["H_x"]
        if kind is not None:
            self.begin_pass(kind)
            for k in tensors:
                if k.startswith("sum."):
                    name = k[len("sum."):]
                    self.sums[name].copy_(self._as_sum(name, tensors[k]))
            self.counts = dict(counts)

    def _as_sum(self, name: str, t: Tensor) -> Tensor:
        """A checkpointed sum in this accumulator's layout: checkpoints of earlier versions hold
        full n×n sums (lower block triangle filled, zeros above), newer ones packed sums."""
        want, n = self.sums[name], self._size(name)
        if t.shape == want.shape:
            return t
        if name not in _STATISTICS and t.dim() == 2 and tuple(t.shape) == (n, n):
            return pack_sym(t.to(want.device))
        if name not in _STATISTICS and t.dim() == 1 and t.numel() == packed_layout(n).numel:
            return scatter_sym(t.to(want.device), n)
        raise ValueError(f"checkpointed sum {name} has shape {tuple(t.shape)}, neither "
                         f"{tuple(want.shape)} nor another layout of a {n}x{n} sum (written "
                         "with another blocking scheme?); collect this group again with a fresh "
                         "out_dir or overwrite=True")


# the 1×1 noise statistics of yaqa.hessians.shrinkage (one for both sides, or one per side)
_STATISTICS = ("seq_sq", "seq_sq_in", "seq_sq_out")


def _side_by_side(G: Tensor, b: int) -> Tensor:
    """[b·D, T, m] with a sequence's D draws in consecutive rows -> [b, T, D·m] (``G_cat``)."""
    rows, T, m = G.shape
    return G.reshape(b, rows // b, T, m).transpose(1, 2).reshape(b, T, rows // b * m)


def _full_gram(x2: Tensor, prod: Products, cache: ProductCache) -> Tensor:
    out = cache.zeros(x2.shape[1], prod.acc_dtype, x2.device)
    sym_addmm(out, x2, x2, prod, "first")
    return out


def _unit_frobenius(h: Tensor) -> Tensor:
    """H / ||H||_F²: the least-squares step of the nearest-Kronecker-product ALS."""
    return h / h.pow(2).sum().clamp_min(torch.finfo(h.dtype).tiny)
