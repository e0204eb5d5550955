"""A QTIP-style bitshift trellis quantizer (Tseng et al., arXiv 2406.11235).

Each aligned 16x16 tile of the (transformed, scaled) weight is one sequence of 256 values, read
row-major and grouped into ``T = 256 / V`` steps of ``V`` values.  A shift register of ``L`` bits
walks along the sequence; every step shifts in ``k V`` new bits,

    s_t = ((s_{t-1} << kV) | b_t) mod 2^L,

and the ``V`` values of step ``t`` are the codeword of state ``s_t``.  So a tile costs exactly
``256 k`` bits, and which 2^L codewords exist is fixed by a *code*:

- ``1mad``: one multiply-add (an LCG step) hashes the state to 32 bits; the sum of its four bytes
  is nearly Gaussian by the central limit theorem (V = 1).
- ``3inst``: an LCG step, then an AND and an XOR turn each 16-bit half into an fp16 number with a
  random sign, a 2-bit random exponent and a random mantissa; the sum of the two halves is the
  value (V = 1).
- ``hyb``: the hash ``s (s + 1)`` picks one row of a small table (2^Q rows of V values, k-means of
  a Gaussian) and one of its bits flips the sign of the first value (V = 1 or 2).

Encoding is Viterbi over the 2^L states, batched over every tile of one rounding call.  The
bitstream is tail-biting (it wraps around: the state before the first step is the state after
the last), so no start-up bits are wasted; following the paper, a first unconstrained Viterbi on
the sequence rotated by half finds the state at the wrap point, and a second Viterbi constrained
to start and end in it gives the bits.

Codes are stored per weight: step ``t``'s ``kV`` bits are split into ``V`` chunks of ``k`` bits,
the first value of the step taking the high chunk.  The codes tensor is therefore ``m x n`` with
``k``-bit entries like int-k codes, and packs and saves the same way.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass

import torch

from .base import check_weight, FittedGrid, Quantizer

log = logging.getLogger(__name__)

TILE = 16
CODES = ("1mad", "3inst", "hyb")
_MASK32 = (1 << 32) - 1


# ---------------------------------------------------------------------------------------------
# Codes: state -> codeword


def decode_1mad(states: torch.Tensor) -> torch.Tensor:
    """1MAD: ``x = (34038481 s + 76625530) mod 2^32``; (sum of x's bytes - 510) / 147.8."""
    x = (states.to(torch.int64) * 34038481 + 76625530) & _MASK32
    total = (x & 255) + ((x >> 8) & 255) + ((x >> 16) & 255) + ((x >> 24) & 255)
    # Four independent uniform bytes: mean 4 * 127.5, variance 4 * (256^2 - 1) / 12.
    return (total - 510).to(torch.float32) / math.sqrt(4 * (256**2 - 1) / 12)


def _fp16_bits(x: float) -> int:
    return int(torch.tensor(x, dtype=torch.float16).view(torch.int16).item()) & 0xFFFF


def decode_3inst(states: torch.Tensor) -> torch.Tensor:
    """3INST: ``x = (89226354 s + 64248484) mod 2^32``, ``(x & 0x8FFF8FFF) ^ m`` with ``m`` the
    fp16 bits of 0.922 in both halves; the value is the sum of the two fp16 halves."""
    x = (states.to(torch.int64) * 89226354 + 64248484) & _MASK32
    m = _fp16_bits(0.922)
    y = (x & 0x8FFF8FFF) ^ ((m << 16) | m)
    halves = torch.stack([(y >> 16) & 0xFFFF, y & 0xFFFF], dim=-1)
    halves = torch.where(halves >= 1 << 15, halves - (1 << 16), halves).to(torch.int16)
    return halves.view(torch.float16).to(torch.float32).sum(-1)


def hyb_index_sign(states: torch.Tensor, L: int, Q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HYB's hash ``h = s (s + 1) mod 2^32``: table row = bits ``L-Q-1 .. L-2`` of h, sign = bit
    ``L-1`` (for L = 16, Q = 9: bits 6..14 and bit 15)."""
    s = states.to(torch.int64)
    h = (s * (s + 1)) & _MASK32
    idx = (h >> (L - Q - 1)) & ((1 << Q) - 1)
    sign = 1 - 2 * ((h >> (L - 1)) & 1)
    return idx, sign


def decode_hyb(states: torch.Tensor, table: torch.Tensor, L: int) -> torch.Tensor:
    """HYB codewords ``(..., V)``: the hashed table row, first value's sign flipped by the hash."""
    Q = int(math.log2(table.shape[0]))
    idx, sign = hyb_index_sign(states, L, Q)
    vals = table.to(torch.float32)[idx.to(table.device)].clone()
    vals[..., 0] *= sign.to(vals)
    return vals


@functools.lru_cache(maxsize=8)
def hyb_table(Q: int, V: int, seed: int = 0) -> torch.Tensor:
    """The 2^Q x V table: k-means of a Gaussian sample (deterministic), stored in fp16.

    The table is saved with every checkpoint, so loading never depends on recomputing it.
    """
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(32 << Q, V, generator=gen, dtype=torch.float32)
    C = X[torch.randperm(X.shape[0], generator=gen)[: 1 << Q]].clone()
    for _ in range(15):  # Lloyd iterations
        a = (C.pow(2).sum(1) - 2 * X @ C.T).argmin(1)
        sums = torch.zeros_like(C).index_add_(0, a, X)
        cnt = torch.bincount(a, minlength=C.shape[0]).unsqueeze(1)
        C = torch.where(cnt > 0, sums / cnt.clamp(min=1), C)
    return C.to(torch.float16)


def codebook(code: str, L: int, V: int, table: torch.Tensor | None = None) -> torch.Tensor:
    """All 2^L codewords, ``(2^L, V)`` float32 (row = state)."""
    states = torch.arange(1 << L, dtype=torch.int64)
    if code == "1mad":
        return decode_1mad(states).unsqueeze(1)
    if code == "3inst":
        return decode_3inst(states).unsqueeze(1)
    if code == "hyb":
        if table is None:
            raise ValueError("the hyb code needs its table")
        return decode_hyb(states, table, L)
    raise ValueError(f"unknown trellis code {code!r}; expected one of {CODES}")


# ---------------------------------------------------------------------------------------------
# Viterbi


def viterbi(x: torch.Tensor, cb: torch.Tensor, L: int, kv: int,
            start_low: torch.Tensor | None = None, end_low: torch.Tensor | None = None,
            cost_dtype: torch.dtype = torch.float32, backend: str = "torch",
            n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Minimum squared-error state path through the bitshift trellis, batched over sequences.

    ``x``: ``(B, T, V)`` targets; ``cb``: ``(2^L, V)`` codewords; ``kv`` bits enter per step.
    ``start_low``/``end_low`` (``(B,)`` ints in ``[0, 2^(L-kv))``), when given, force the low
    ``L - kv`` bits of the state before the first step / after the last step (the only bits of
    the start state that matter).  Returns the states ``s_1 .. s_T`` as ``(B, T)`` int64.

    Per step: one strided min over the 2^kv predecessors of each state group (plus its argmin,
    kept as uint8 back-pointers), and one or two fused multiply-adds over all 2^L states.  No
    host synchronisation, so the whole function can be captured in a CUDA graph.

    ``backend="triton"`` runs the fused kernel of :mod:`.trellis_triton` instead (float32 costs
    only): the same arithmetic and tie-breaking, hence the same path.  ``n_valid`` (Triton only, a
    device int32 scalar) lets it skip the padded tail of a batch.
    """
    if backend == "triton":
        if cost_dtype != torch.float32:
            raise ValueError(f"the Triton Viterbi keeps float32 costs, got {cost_dtype}")
        from .trellis_triton import viterbi_triton

        return viterbi_triton(x, cb, L, kv, start_low, end_low, n_valid=n_valid)
    if backend != "torch":
        raise ValueError(f"Viterbi backend must be 'torch' or 'triton', got {backend!r}")
    B, T, V = x.shape
    S, P = 1 << L, 1 << kv
    R = S >> kv  # states sharing their low L - kv bits form one predecessor group
    dev = x.device
    cbt = cb.to(device=dev, dtype=cost_dtype)
    c_cols = [cbt[:, v].reshape(1, R, P) for v in range(V)]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2: the |x|^2 term is per sequence, added on the small
    # (B, R) minima, so the big arrays need only the fused -2 x.c + |c|^2 and costs stay true
    # (non-negative, small), which keeps float16 costs usable.
    cnorm = cbt.pow(2).sum(1).reshape(1, R, P)
    xs = x.to(cost_dtype)
    xnorm = xs.pow(2).sum(-1)  # (B, T)
    back = torch.zeros(T, B, R, dtype=torch.uint8, device=dev)
    if start_low is None:
        best_prev = torch.zeros(B, R, dtype=cost_dtype, device=dev)
    else:
        big = torch.finfo(cost_dtype).max / 16
        best_prev = torch.full((B, R), big, dtype=cost_dtype, device=dev)
        best_prev.scatter_(1, start_low.to(dev).view(B, 1), 0.0)
    cost = None
    for t in range(T):
        if t > 0:
            # State s = h R + l is followed by l P + b: the predecessors of group l are h = 0..P-1.
            best_prev, idx = cost.view(B, P, R).min(dim=1)
            back[t] = idx
        best_prev = best_prev + xnorm[:, t:t + 1]
        xt = xs[:, t]
        cost = torch.addcmul(cnorm, xt[:, 0].view(B, 1, 1), c_cols[0], value=-2)
        for v in range(1, V):
            cost.addcmul_(xt[:, v].view(B, 1, 1), c_cols[v], value=-2)
        cost += best_prev.unsqueeze(-1)  # (B, R, P): row l holds the P successors of group l
    # The best final state, ties broken towards the lowest group l, then the lowest h (codewords
    # repeat, so exact ties are common): the same choice as the Triton Viterbi's.
    best_prev, idx = cost.view(B, P, R).min(dim=1)
    low = best_prev.argmin(1) if end_low is None else end_low.to(dev).to(torch.int64).view(B)
    last = torch.add(low, idx.gather(1, low.unsqueeze(1)).squeeze(1), alpha=R)
    out = [last]
    s = last
    for t in range(T - 1, 0, -1):
        low = s >> kv
        s = torch.add(low, back[t].gather(1, low.unsqueeze(1)).squeeze(1), alpha=R)
        out.append(s)
    return torch.stack(out[::-1], dim=1)


def path_states(steps: torch.Tensor, L: int, kv: int) -> torch.Tensor:
    """States of a tail-biting bitstream: ``steps`` ``(B, T)`` holds each step's ``kv`` bits; the
    state after step t is the last L bits of the circular stream ending there."""
    s = torch.zeros_like(steps, dtype=torch.int64)
    for i in range(-(-L // kv)):
        s = s | (torch.roll(steps.to(torch.int64), i, dims=-1) << (kv * i))
    return s & ((1 << L) - 1)


def viterbi_tailbiting(x: torch.Tensor, cb: torch.Tensor, L: int, kv: int,
                       cost_dtype: torch.dtype = torch.float32,
                       backend: str = "torch", n_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Tail-biting encode (the paper's two-pass heuristic); returns step bits ``(B, T)``.

    Pass 1 runs unconstrained on the sequence rotated by half, so the wrap point sits mid-sequence
    where the best path is well determined; pass 2 forces start and end through its state.
    """
    T = x.shape[1]
    half = T // 2
    rot = viterbi(torch.roll(x, -half, dims=1), cb, L, kv, cost_dtype=cost_dtype, backend=backend,
                  n_valid=n_valid)
    low = rot[:, half - 1] & ((1 << (L - kv)) - 1)  # rotated index half-1 = original step T
    states = viterbi(x, cb, L, kv, start_low=low, end_low=low, cost_dtype=cost_dtype,
                     backend=backend, n_valid=n_valid)
    return states & ((1 << kv) - 1)


class _GraphedTailbiting:
    """Replays CUDA graphs of :func:`viterbi_tailbiting`, one per (padded) batch size.

    Eager Viterbi launches ~10 small kernels per step, ~2500 per tile batch; at the edges of a
    YAQA wavefront (a few tiles per step) launch overhead, not the work, sets the time.  A graph
    replays them all from one launch.  Batches are padded to a power of two (capped at the
    quantizer's chunk) so a handful of graphs serve every wavefront step (the Triton kernels read
    the true count from the device and skip the padding); codewords are copied into a static
    buffer, so one graph serves every layer.  If capture fails, rounding falls
    back to eager mode (same code, same results) with a warning.
    """

    def __init__(self) -> None:
        self.graphs: dict[tuple, tuple] = {}
        self.failed = False

    def __call__(self, x: torch.Tensor, cb: torch.Tensor, L: int, kv: int,
                 cost_dtype: torch.dtype, cap: int, backend: str = "torch") -> torch.Tensor:
        B = x.shape[0]
        bucket = min(1 << (B - 1).bit_length(), max(cap, B))
        key = (bucket, x.shape[1], x.shape[2], L, kv, cost_dtype, x.device, backend)
        if key not in self.graphs:
            self.graphs[key] = self._capture(key, cb.shape)
        g, sx, scb, snv, out = self.graphs[key]
        sx[:B].copy_(x)
        scb.copy_(cb)
        snv.fill_(B)
        g.replay()
        return out[:B].clone()

    @staticmethod
    def _capture(key: tuple, cb_shape: torch.Size) -> tuple:
        bucket, T, V, L, kv, dt, dev, backend = key
        sx = torch.zeros(bucket, T, V, device=dev)
        scb = torch.zeros(cb_shape, device=dev)
        snv = torch.full((1,), bucket, device=dev, dtype=torch.int32)  # the Triton kernels skip padding
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            viterbi_tailbiting(sx, scb, L, kv, dt, backend, snv)  # warm-up (and compile) outside the capture
        torch.cuda.current_stream(dev).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = viterbi_tailbiting(sx, scb, L, kv, dt, backend, snv)
        log.debug("captured a trellis Viterbi CUDA graph for %d tiles", bucket)
        return g, sx, scb, snv, out


_GRAPHS = _GraphedTailbiting()
_TRITON_FAILED = False  # set when viterbi="auto" met a broken Triton install


def viterbi_tailbiting_exact(x: torch.Tensor, cb: torch.Tensor, L: int, kv: int) -> torch.Tensor:
    """Exact tail-biting optimum: one constrained Viterbi per wrap state (2^(L-kv) of them).

    Only for small L (tests, tiny codes): the work is 2^(L-kv) times the heuristic's.
    """
    B, T, V = x.shape
    R = 1 << (L - kv)
    xr = x.repeat_interleave(R, 0)
    lows = torch.arange(R, device=x.device).repeat(B)
    states = viterbi(xr, cb, L, kv, start_low=lows, end_low=lows, cost_dtype=torch.float64)
    vals = cb.to(x.device, torch.float64)[states]
    err = (vals - xr.to(torch.float64)).pow(2).sum((1, 2)).view(B, R)
    best = err.argmin(1) + R * torch.arange(B, device=x.device)
    return states[best] & ((1 << kv) - 1)


# ---------------------------------------------------------------------------------------------
# Quantizer and grid


@dataclass
class TrellisQuantizer(Quantizer):
    """k bits per weight with an L-bit bitshift trellis over 16x16 tiles.

    ``scale``: ``"tensor"`` (one scale per matrix, as in QTIP) or ``"row"`` (one per output row).
    The scaled weight has RMS ``scale_override`` times the codebook's RMS (QTIP uses 0.9).
    ``max_batch_bytes`` bounds the Viterbi's memory (back-pointers + costs) per chunk of tiles;
    ``cost_dtype="float16"`` halves the Viterbi's memory traffic at some cost in path accuracy;
    ``cuda_graphs`` replays the Viterbi as CUDA graphs on GPUs (results are the same);
    ``viterbi``: ``"torch"``, ``"triton"`` (the fused kernel, float32 costs; the same paths) or
    ``"auto"`` (Triton on CUDA when it is installed and costs are float32, else torch).
    """

    bits: int = 2
    L: int = 16
    V: int = 2
    code: str = "hyb"
    tlut_bits: int = 9
    scale: str = "tensor"
    scale_override: float = 0.9
    cost_dtype: str = "float32"
    max_batch_bytes: int = 1 << 30
    cuda_graphs: bool = True
    viterbi: str = "auto"

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"trellis code must be one of {CODES}, got {self.code!r}")
        if self.V not in (1, 2):
            raise ValueError(f"trellis V (weights per step) must be 1 or 2, got {self.V}")
        if self.code in ("1mad", "3inst") and self.V != 1:
            raise ValueError(f"the {self.code} code decodes one value per state; use V=1")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"trellis bits per weight must be in 1..8, got {self.bits}")
        if not self.bits * self.V < self.L <= 24:
            raise ValueError(f"trellis needs k*V < L <= 24, got k={self.bits} V={self.V} L={self.L}")
        if self.code == "hyb" and not 1 <= self.tlut_bits <= self.L - 2:
            raise ValueError(f"hyb table bits must be in 1..L-2, got {self.tlut_bits}")
        if self.scale not in ("tensor", "row"):
            raise ValueError(f"trellis scale must be 'tensor' or 'row', got {self.scale!r}")
        if self.cost_dtype not in ("float32", "float16", "float64"):
            raise ValueError(f"cost_dtype must be float32, float16 or float64, got {self.cost_dtype!r}")
        if self.viterbi not in ("auto", "torch", "triton"):
            raise ValueError(f"trellis viterbi must be 'auto', 'torch' or 'triton', got {self.viterbi!r}")
        if self.viterbi == "triton" and self.cost_dtype != "float32":
            raise ValueError("the Triton Viterbi keeps float32 costs; use cost_dtype='float32'")
        if TILE * TILE % self.V or (TILE * TILE // self.V) * self.bits * self.V < self.L:
            raise ValueError("a 256-weight tile must fill the trellis state at least once")

    def _table(self) -> torch.Tensor | None:
        return hyb_table(self.tlut_bits, self.V) if self.code == "hyb" else None

    def check_shape(self, out_features: int, in_features: int) -> None:
        if out_features % TILE or in_features % TILE:
            raise ValueError(f"the trellis quantizer encodes 16x16 tiles; weight "
                             f"{out_features}x{in_features} is not a multiple of 16 in both "
                             "dimensions")

    def fit(self, W: torch.Tensor) -> "TrellisGrid":
        m, n = check_weight(W)
        self.check_shape(m, n)
        table = self._table()
        cb = codebook(self.code, self.L, self.V, table)
        cb_rms = float(cb.pow(2).mean().sqrt())
        Wf = W.detach().float()
        rms = Wf.pow(2).mean(1).sqrt() if self.scale == "row" else Wf.pow(2).mean().sqrt().expand(m)
        scale = rms / (cb_rms * self.scale_override)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).contiguous()
        return TrellisGrid((m, n), self, scale.cpu(), table, cb)

    def config(self) -> dict:
        cfg = asdict(self)
        cfg["format"] = "trellis"
        return cfg

    def placeholder_state(self, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
        state = {"scale": torch.zeros(shape[0], dtype=torch.float32)}
        if self.code == "hyb":
            state["tlut"] = torch.zeros(1 << self.tlut_bits, self.V, dtype=torch.float16)
        return state

    def grid_from_state(self, shape: tuple[int, int], state: dict[str, torch.Tensor]) -> "TrellisGrid":
        table = state["tlut"].to(torch.float16).cpu() if self.code == "hyb" else None
        cb = codebook(self.code, self.L, self.V, table)
        return TrellisGrid(tuple(shape), self, state["scale"].float().cpu(), table, cb)


class TrellisGrid(FittedGrid):
    joint = (TILE, TILE)

    def __init__(self, shape: tuple[int, int], q: TrellisQuantizer, scale: torch.Tensor,
                 table: torch.Tensor | None, cb: torch.Tensor):
        self.shape = shape
        self.q = q
        self.scale = scale  # (m,) float32
        self.table = table
        self._cb = {cb.device: cb}

    def codebook(self, device: torch.device) -> torch.Tensor:
        if device not in self._cb:
            self._cb[device] = next(iter(self._cb.values())).to(device)
        return self._cb[device]

    @property
    def steps(self) -> int:
        return TILE * TILE // self.q.V

    # -- tiles <-> matrix ---------------------------------------------------------------------
    @staticmethod
    def _to_tiles(x: torch.Tensor) -> torch.Tensor:
        *lead, r, c = x.shape
        t = x.reshape(*lead, r // TILE, TILE, c // TILE, TILE).transpose(-3, -2)
        return t.reshape(-1, TILE * TILE)

    @staticmethod
    def _from_tiles(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        *lead, r, c = shape
        x = t.reshape(*lead, r // TILE, c // TILE, TILE, TILE).transpose(-3, -2)
        return x.reshape(shape)

    def _steps_to_codes(self, steps: torch.Tensor) -> torch.Tensor:
        k, V = self.q.bits, self.q.V
        parts = [(steps >> (k * (V - 1 - v))) & ((1 << k) - 1) for v in range(V)]
        return torch.stack(parts, -1).reshape(steps.shape[0], -1)

    def _codes_to_steps(self, codes: torch.Tensor) -> torch.Tensor:
        k, V = self.q.bits, self.q.V
        c = codes.to(torch.int64).reshape(codes.shape[0], -1, V)
        steps = torch.zeros_like(c[..., 0])
        for v in range(V):
            steps = steps | (c[..., v] << (k * (V - 1 - v)))
        return steps

    def _decode_tiles(self, codes: torch.Tensor) -> torch.Tensor:
        """``(N, 256)`` per-weight codes -> ``(N, 256)`` codebook values (unscaled)."""
        states = path_states(self._codes_to_steps(codes), self.q.L, self.q.bits * self.q.V)
        return self.codebook(codes.device)[states].reshape(codes.shape[0], -1)

    def _chunk(self) -> int:
        q = self.q
        R = 1 << (q.L - q.bits * q.V)
        per_tile = self.steps * R + 4 * 4 * (1 << q.L)  # back-pointers + a few cost arrays
        return max(1, q.max_batch_bytes // per_tile)

    def encode_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 256)`` scaled targets -> ``(N, 256)`` per-weight k-bit codes (int64)."""
        q = self.q
        cb = self.codebook(x.device)
        dt = getattr(torch, q.cost_dtype)
        out = []
        step = self._chunk()
        # Viterbi on a few small tiles is thousands of tiny ops; on a loaded CPU the OpenMP barriers
        # of each cost 100x the work (16 ms vs 17 us per step measured with 2 threads at load 8).
        from ..rounding.threads import single_thread_if  # rounding imports quantizers

        with single_thread_if(x.device.type == "cpu" and (x.shape[0] << q.L) <= 1 << 20):
            for i in range(0, x.shape[0], step):
                xi = x[i:i + step].reshape(-1, self.steps, q.V)
                out.append(self._steps_to_codes(self._viterbi(xi, cb, dt, step)))
        return torch.cat(out) if out else x.new_zeros(0, TILE * TILE, dtype=torch.int64)

    def _backend(self, dev: torch.device, dt: torch.dtype) -> str:
        if self.q.viterbi != "auto":
            return self.q.viterbi
        from . import trellis_triton

        return ("triton" if dev.type == "cuda" and dt == torch.float32 and trellis_triton.available()
                and not _TRITON_FAILED else "torch")

    def _viterbi(self, x: torch.Tensor, cb: torch.Tensor, dt: torch.dtype, cap: int) -> torch.Tensor:
        q = self.q
        kv = q.bits * q.V
        backend = self._backend(x.device, dt)
        if x.device.type == "cuda" and q.cuda_graphs and not _GRAPHS.failed:
            try:
                return _GRAPHS(x, cb, q.L, kv, dt, cap, backend)
            except Exception as e:  # capture is an optimisation; eager mode is the same code
                _GRAPHS.failed = True
                log.warning("trellis: CUDA graph capture failed (%s); using eager Viterbi", e)
        try:
            return viterbi_tailbiting(x, cb, q.L, kv, dt, backend)
        except Exception as e:
            if backend != "triton" or q.viterbi != "auto":
                raise
            # "auto" promised a working Viterbi, not Triton: its torch twin gives the same codes.
            global _TRITON_FAILED
            _TRITON_FAILED = True
            log.warning("trellis: the Triton Viterbi failed (%s); using the torch Viterbi", e)
            return viterbi_tailbiting(x, cb, q.L, kv, dt, "torch")

    # -- FittedGrid ---------------------------------------------------------------------------
    def round(self, values, rows, cols):
        *lead, r, c = values.shape
        if r % TILE or c % TILE:
            raise ValueError(f"the trellis rounds whole 16x16 tiles; got a {r}x{c} block")
        dev = values.device
        rows = rows.to(dev).expand(*lead, r)
        cols = cols.to(dev).expand(*lead, c)
        # One fused check (a single host sync): every run of 16 indices is consecutive and starts
        # at a multiple of 16.
        step = torch.arange(TILE, device=dev)
        starts_r, starts_c = rows[..., ::TILE], cols[..., ::TILE]
        aligned = ((starts_r % TILE == 0).all() & (starts_c % TILE == 0).all()
                   & (rows == (starts_r.unsqueeze(-1) + step).reshape(rows.shape)).all()
                   & (cols == (starts_c.unsqueeze(-1) + step).reshape(cols.shape)).all())
        if not bool(aligned):
            raise ValueError("the trellis rounds aligned 16x16 tiles; rows and columns must be "
                             "consecutive runs starting at multiples of 16")
        s = self.scale.to(dev)[rows].unsqueeze(-1)  # (..., r, 1)
        x = values.float() / s
        codes = self.encode_tiles(self._to_tiles(x))
        vals = self._from_tiles(self._decode_tiles(codes), values.shape) * s
        return vals.to(values.dtype), self._from_tiles(codes, values.shape).to(torch.int32)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        m, n = self.shape
        vals = self._from_tiles(self._decode_tiles(self._to_tiles(codes)), torch.Size((m, n)))
        return vals * self.scale.to(codes.device).unsqueeze(-1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"scale": self.scale.float()}
        if self.table is not None:
            state["tlut"] = self.table.to(torch.float16)
        return state
