"""Randomized Hadamard transforms for incoherence processing (both sides of a weight).

An orthonormal Hadamard matrix of order ``n = K * 2^p`` is built as ``(Had_K ⊗ H_{2^p}) / sqrt(n)``:
``H_{2^p}`` is the Sylvester matrix, applied with the butterfly (fast Walsh–Hadamard transform,
O(n log n) per vector), and ``Had_K`` is a small dense Hadamard matrix from a Paley construction:

* Paley I:  ``q ≡ 3 (mod 4)`` a prime power gives order ``q + 1``;
* Paley II: ``q ≡ 1 (mod 4)`` a prime power gives order ``2 (q + 1)``.

For each size the smallest usable ``K`` is chosen (``K = 1`` for powers of two), so the dense part
costs ``K`` multiply-adds per element, e.g. 28 for 14336, 148 for 18944, 344 (= 7³ + 1) for 11008.
Sizes with no construction (e.g. ``n = 2^p · 23``, which would need order 92) raise
``ValueError``; :func:`hadamard_supported` answers the question up front.

Three ways to pick the transforms of a model (:data:`INCOHERENCE_MODES`, :func:`plan_transforms`):

* ``per-layer``: independent random signs for every layer (the most incoherent; yaqa's own
  runtime only);
* ``shared``: one random-sign Hadamard per dimension and side, shared by every layer of the model,
  which is what compressed-tensors' ``random-hadamard`` transform (and vLLM) can express;
* ``block``: the plain Sylvester Hadamard in power-of-two blocks (vLLM's fast ``hadamard`` kernel).
  Random signs are kept only where they cancel exactly between two neighbouring layers and so never
  have to run online: ``up_proj`` outputs / ``down_proj`` inputs (the gate product is elementwise)
  and ``v_proj`` outputs / ``o_proj`` inputs (attention mixes tokens, not channels).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from typing import Any, Iterable

import numpy as np
import torch

__all__ = [
    "INCOHERENCE_MODES",
    "IncoherenceTransform",
    "block_hadamard_size",
    "incoherence_mode",
    "plan_transforms",
    "sign_partner",
    "hadamard_supported",
    "hadamard_factor",
    "hadamard_matrix",
    "hadamard_transform",
    "fwht",
]

# Largest dense factor we are willing to build: its cost is K multiply-adds per element, and the
# Paley matrix itself takes K² memory.  Beyond this the transform would stop being "fast".
MAX_DENSE_ORDER = 4096


# ---------------------------------------------------------------------------------------------
# Finite fields GF(p^k) just large enough for Paley's quadratic-residue construction


def _is_prime(p: int) -> bool:
    if p < 2:
        return False
    if p % 2 == 0:
        return p == 2
    r = int(math.isqrt(p))
    return all(p % d for d in range(3, r + 1, 2))


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` for a prime ``p``, else None."""
    if q < 2:
        return None
    for p in range(2, int(math.isqrt(q)) + 1):
        if q % p == 0:
            k, r = 0, q
            while r % p == 0:
                r //= p
                k += 1
            return (p, k) if r == 1 else None
    return (q, 1)


def _poly_mulmod(a: tuple[int, ...], b: tuple[int, ...], mod: tuple[int, ...], p: int) -> tuple[int, ...]:
    """Product of two polynomials (coefficient tuples, lowest degree first) modulo a monic ``mod``."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        if ai:
            for j, bj in enumerate(b):
                prod[i + j] = (prod[i + j] + ai * bj) % p
    for d in range(len(prod) - 1, k - 1, -1):
        c = prod[d]
        if c:
            for t in range(k + 1):
                prod[d - k + t] = (prod[d - k + t] - c * mod[t]) % p
    return tuple(prod[:k])


def _irreducible(p: int, k: int) -> tuple[int, ...]:
    """A monic irreducible polynomial of degree k over GF(p), by brute force (k and p are small)."""
    for tail in itertools.product(range(p), repeat=k):
        mod = tuple(tail) + (1,)
        if mod[0] == 0:
            continue
        # A reducible polynomial of degree k has a monic factor of degree <= k/2; test them all.
        reducible = False
        for d in range(1, k // 2 + 1):
            for ftail in itertools.product(range(p), repeat=d):
                f = list(ftail) + [1]
                rem = list(mod)
                for top in range(k, d - 1, -1):
                    c = rem[top]
                    if c:
                        for t in range(d + 1):
                            rem[top - d + t] = (rem[top - d + t] - c * f[t]) % p
                if not any(rem[:d]):
                    reducible = True
                    break
            if reducible:
                break
        if not reducible:
            return mod
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")


def _quadratic_character_table(q: int) -> tuple[np.ndarray, np.ndarray]:
    """Elements of GF(q) as digit vectors (q × k) and χ(element) in {0, ±1} indexed by encoding."""
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array(list(itertools.product(range(p), repeat=k)), dtype=np.int64)[:, ::-1]
    weights = p ** np.arange(k, dtype=np.int64)
    chi = -np.ones(q, dtype=np.int64)
    chi[0] = 0
    if k == 1:
        chi[(np.arange(1, q) ** 2) % q] = 1
    else:
        mod = _irreducible(p, k)
        for row in digits[1:]:
            sq = _poly_mulmod(tuple(row), tuple(row), mod, p)
            chi[int(np.dot(sq, weights))] = 1
    return digits, chi


def _jacobsthal(q: int) -> np.ndarray:
    """Q[a, b] = χ(a − b) over GF(q)."""
    p, _ = _prime_power(q)  # type: ignore[misc]
    digits, chi = _quadratic_character_table(q)
    weights = p ** np.arange(digits.shape[1], dtype=np.int64)
    diff = (digits[:, None, :] - digits[None, :, :]) % p
    return chi[diff @ weights]


def _paley_order(K: int) -> str | None:
    """Which Paley construction builds a Hadamard matrix of order K (None: neither)."""
    q = K - 1
    if _prime_power(q) is not None and q % 4 == 3:
        return "I"
    if K % 2 == 0:
        q = K // 2 - 1
        if _prime_power(q) is not None and q % 4 == 1:
            return "II"
    return None


@functools.lru_cache(maxsize=None)
def _base_hadamard(K: int) -> np.ndarray:
    """Unnormalised ±1 Hadamard matrix of order K (K = 1, 2 or a Paley order)."""
    if K == 1:
        return np.ones((1, 1), dtype=np.int64)
    if K == 2:
        return np.array([[1, 1], [1, -1]], dtype=np.int64)
    kind = _paley_order(K)
    if kind == "I":
        q = K - 1
        S = np.zeros((K, K), dtype=np.int64)
        S[0, 1:] = 1
        S[1:, 0] = -1
        S[1:, 1:] = _jacobsthal(q)
        return S + np.eye(K, dtype=np.int64)
    if kind == "II":
        q = K // 2 - 1
        C = np.zeros((q + 1, q + 1), dtype=np.int64)
        C[0, 1:] = 1
        C[1:, 0] = 1
        C[1:, 1:] = _jacobsthal(q)
        return np.kron(C, np.array([[1, 1], [1, -1]])) + np.kron(
            np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
        )
    raise ValueError(f"no Paley construction for a Hadamard matrix of order {K}")


@functools.lru_cache(maxsize=None)
def hadamard_factor(n: int) -> tuple[int, int]:
    """``(K, 2^p)`` with ``n = K · 2^p`` and a constructible dense order ``K`` (smallest such).

    Raises ``ValueError`` when no ``K = n / 2^j`` has a construction.
    """
    if n < 1:
        raise ValueError(f"Hadamard size must be positive, got {n}")
    tried = []
    pow2 = n & -n
    # Walk K upwards: n's odd part, times 2, 4, ...; the first constructible one is cheapest.
    K = n // pow2
    while True:
        if K == 1 or K == 2 or (K % 4 == 0 and K <= MAX_DENSE_ORDER and _paley_order(K)):
            return K, n // K
        tried.append(K)
        if K == n:
            break
        K *= 2
    raise ValueError(
        f"no Hadamard matrix of order {n} available: {n} = K·2^p needs a Paley order K "
        f"(q+1 with prime power q ≡ 3 mod 4, or 2(q+1) with q ≡ 1 mod 4, K ≤ {MAX_DENSE_ORDER}); "
        f"tried K in {tried[:8]}{'…' if len(tried) > 8 else ''}. Disable incoherence processing "
        "for this layer or pad it to a supported size."
    )


def hadamard_supported(n: int) -> bool:
    try:
        hadamard_factor(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _dense_factor_tensor(K: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(_base_hadamard(K).astype(np.float64)).to(device=device, dtype=dtype)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised Walsh–Hadamard transform (Sylvester order) over the last dim (a power of two)."""
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    if x.requires_grad and torch.is_grad_enabled():  # out= below does not record a graph
        h = 1
        while h < n:
            y = y.view(-1, n // (2 * h), 2, h)
            a, b = y[:, :, 0], y[:, :, 1]
            y = torch.stack((a + b, a - b), dim=2)
            h *= 2
        return y.reshape(*lead, n)
    # The same butterflies written straight into two alternating buffers: no stack copy per
    # level (it was a third of the quantize step's Hadamard time on CPU), same values bit for bit.
    bufs = (torch.empty_like(y), torch.empty_like(y) if n > 2 else None)
    h, i = 1, 0
    while h < n:
        src = y.view(-1, n // (2 * h), 2, h)
        dst = bufs[i].view(-1, n // (2 * h), 2, h)
        torch.add(src[:, :, 0], src[:, :, 1], out=dst[:, :, 0])
        torch.sub(src[:, :, 0], src[:, :, 1], out=dst[:, :, 1])
        y, i, h = bufs[i], 1 - i, 2 * h
    return y.reshape(*lead, n)


def hadamard_transform(x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x @ Had_n.T`` (``transpose=True``: ``x @ Had_n``) over the last dim, orthonormal, fast.

    Had_n = (Had_K ⊗ H_{2^p}) / sqrt(n); only Had_K (K ≤ a few hundred) is applied densely.
    """
    n = x.shape[-1]
    K, P = hadamard_factor(n)
    if not x.is_floating_point():
        raise TypeError("hadamard_transform needs a floating-point tensor")
    lead = x.shape[:-1]
    y = x.reshape(-1, K, P)
    if P > 1:
        y = fwht(y)
    if K > 1:
        Hk = _dense_factor_tensor(K, str(x.device), x.dtype)
        # Row vector v (viewed K × P): (Had_K ⊗ H) v = Had_K · V · H^T; H part done above.
        y = torch.matmul(Hk.T if transpose else Hk, y)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device: Any = "cpu") -> torch.Tensor:
    """The dense orthonormal Had_n (for tests and small problems)."""
    return hadamard_transform(torch.eye(n, dtype=dtype, device=device)).T.contiguous()


# ---------------------------------------------------------------------------------------------


class IncoherenceTransform:
    """Two-sided randomized Hadamard transform of one linear layer ``y = x W^T`` (W: m × n).

    ``U = Had_n diag(s_U)`` acts on inputs, ``V = Had_m diag(s_V)`` on outputs, both orthonormal:
    ``W' = V W U^T``, ``H_in' = U H_in U^T``, ``H_out' = V H_out V^T`` leave the proxy loss
    ``tr(dW^T H_out dW H_in)`` unchanged, and ``x W^T == output(input(x) W'^T)``.
    """

    def __init__(self, m: int, n: int, seed: int = 0, *, sign_in: torch.Tensor | None = None,
                 sign_out: torch.Tensor | None = None, block: int | None = None) -> None:
        self.block = int(block) if block else None
        if self.block is not None:
            b = self.block
            if b & (b - 1) or m % b or n % b:
                raise ValueError(f"block Hadamard size {b} must be a power of two dividing both "
                                 f"sides of the {m}x{n} weight")
        else:
            # Fail at construction, not at first use, when a size has no Hadamard matrix.
            hadamard_factor(n)
            hadamard_factor(m)
        self.m, self.n, self.seed = int(m), int(n), seed
        if sign_in is None or sign_out is None:
            g = torch.Generator().manual_seed(int(seed))
            # Draw s_U then s_V from one stream so one seed fixes both.
            sign_in = torch.randint(0, 2, (self.n,), generator=g) * 2 - 1
            sign_out = torch.randint(0, 2, (self.m,), generator=g) * 2 - 1
        if sign_in.shape != (self.n,) or sign_out.shape != (self.m,):
            raise ValueError("sign vectors must have lengths n (inputs) and m (outputs)")
        self.sign_in = sign_in.to(torch.int8).cpu()
        self.sign_out = sign_out.to(torch.int8).cpu()
        self._sign_cache: dict[tuple, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (f"IncoherenceTransform(m={self.m}, n={self.n}, seed={self.seed}"
                f"{f', block={self.block}' if self.block else ''})")

    def _had(self, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        """The orthonormal Hadamard part over the last dim: full size, or Sylvester blocks."""
        if self.block is None:
            return hadamard_transform(x, transpose=transpose)
        b = self.block
        # Sylvester matrices are symmetric, so the transpose is the same transform.
        y = fwht(x.reshape(*x.shape[:-1], x.shape[-1] // b, b)) * (1.0 / math.sqrt(b))
        return y.reshape(x.shape)

    def _signs(self, which: str, like: torch.Tensor) -> torch.Tensor:
        # Cached per device and dtype: the forward pass must not copy them host-to-device
        # on every call.
        key = (which, like.device, like.dtype)
        if key not in self._sign_cache:
            s = self.sign_in if which == "in" else self.sign_out
            self._sign_cache[key] = s.to(device=like.device, dtype=like.dtype)
        return self._sign_cache[key]

    def _check(self, t: torch.Tensor, dims: tuple[int, ...], what: str) -> None:
        if tuple(t.shape[-len(dims):]) != dims:
            raise ValueError(f"{what}: expected trailing shape {dims}, got {tuple(t.shape)}")

    # -- weights -----------------------------------------------------------------------------
    def weight(self, W: torch.Tensor) -> torch.Tensor:
        """``V W U^T``."""
        self._check(W, (self.m, self.n), "weight")
        Z = self._had(W * self._signs("in", W))  # W U^T
        return self._had((Z * self._signs("out", Z)[:, None]).T).T  # V (W U^T)

    def inverse_weight(self, Wt: torch.Tensor) -> torch.Tensor:
        """``V^T W' U`` (undoes :meth:`weight`)."""
        self._check(Wt, (self.m, self.n), "inverse_weight")
        Z = self._had(Wt, transpose=True) * self._signs("in", Wt)  # W' U
        return self._had(Z.T, transpose=True).T * self._signs("out", Z)[:, None]

    # -- Hessian factors -----------------------------------------------------------------------
    def _sandwich(self, H: torch.Tensor, which: str) -> torch.Tensor:
        s = self._signs(which, H)
        Z = self._had(H * s)  # H M^T with M = Had diag(s)
        return self._had((Z * s[:, None]).T).T  # M (H M^T)

    def factor_in(self, H: torch.Tensor) -> torch.Tensor:
        """``U H_in U^T``."""
        self._check(H, (self.n, self.n), "factor_in")
        return self._sandwich(H, "in")

    def factor_out(self, H: torch.Tensor) -> torch.Tensor:
        """``V H_out V^T``."""
        self._check(H, (self.m, self.m), "factor_out")
        return self._sandwich(H, "out")

    # -- inference -----------------------------------------------------------------------------
    def input(self, x: torch.Tensor) -> torch.Tensor:
        """``x U^T`` over the last dim: the activations the transformed weight expects."""
        self._check(x, (self.n,), "input")
        return self._had(x * self._signs("in", x))

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """``y' V`` over the last dim: back to the original output basis."""
        self._check(y, (self.m,), "output")
        return self._had(y, transpose=True) * self._signs("out", y)

    def output_inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``y V^T``: original-basis outputs (e.g. a bias) into the rotated output basis."""
        self._check(y, (self.m,), "output_inverse")
        return self._had(y * self._signs("out", y))

    def online_matrix(self, side: str) -> torch.Tensor:
        """The unnormalised ±1 matrix ``M`` with ``x U^T = x M / sqrt(n)`` (side ``"in"``) or
        ``y' V = y' M^T / sqrt(m)`` (side ``"out"``), i.e. ``M = sqrt(size) · diag(s) Had^T``;
        for block transforms the ``block × block`` Sylvester matrix (signs excluded)."""
        size, s = (self.n, self.sign_in) if side == "in" else (self.m, self.sign_out)
        if self.block is not None:
            return fwht(torch.eye(self.block, dtype=torch.float64))
        # float32 is exact enough: every entry is ±1/sqrt(size) before rounding back to ±1.
        Had_T = hadamard_transform(torch.eye(size, dtype=torch.float32))  # rows: Had e_i -> Had^T
        return torch.round(s.to(torch.float32)[:, None] * Had_T * math.sqrt(size))

    # -- storage -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "sign_in": self.sign_in.clone(),
            "sign_out": self.sign_out.clone(),
            "shape": torch.tensor([self.m, self.n], dtype=torch.int64),
            "block": torch.tensor(self.block or 0, dtype=torch.int64),  # 0: full-size Hadamard
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "IncoherenceTransform":
        m, n = (int(v) for v in state["shape"].tolist())
        block = int(state["block"]) if "block" in state else 0  # absent before block mode existed
        return cls(m, n, seed=-1, sign_in=state["sign_in"], sign_out=state["sign_out"],
                   block=block or None)



# ---------------------------------------------------------------------------------------------
# Incoherence modes: which transform each layer of a model gets

INCOHERENCE_MODES = ("per-layer", "shared", "block")
_MODE_ALIASES = {"per-layer": "per-layer", "rht": "per-layer", "on": "per-layer",
                 "shared": "shared", "block": "block", "none": None, "off": None}
# Largest block used by default: hadacore-style kernels handle up to a few thousand.
MAX_BLOCK = 2048


def incoherence_mode(incoherence: "bool | str | None") -> str | None:
    """Normalise ``quantize(incoherence=...)``: False/None/"none" -> None, True -> "per-layer"."""
    if incoherence is None or incoherence is False:
        return None
    if incoherence is True:
        return "per-layer"
    key = str(incoherence).lower().replace("_", "-")
    if key not in _MODE_ALIASES:
        raise ValueError(f"unknown incoherence mode {incoherence!r}; choose from "
                         f"{INCOHERENCE_MODES + ('none',)}")
    return _MODE_ALIASES[key]


def block_hadamard_size(dims: Iterable[int], cap: int = MAX_BLOCK) -> int:
    """Largest power of two (<= ``cap``) dividing every size in ``dims``."""
    g = 0
    for d in dims:
        g = math.gcd(g, int(d))
    if g == 0:
        raise ValueError("no layer sizes given")
    b = g & -g
    return min(b, cap)


def _seed_of(*parts: object) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def random_signs(n: int, *key: object) -> torch.Tensor:
    """±1 vector of length ``n``, a pure function of ``key`` (reproducible across runs/resumes)."""
    g = torch.Generator().manual_seed(_seed_of(*key))
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).to(torch.int8)


# Sign pairs that cancel exactly: (layer whose output signs, layer whose input signs, kind).
_SIGN_PAIRS = (("mlp.up_proj", "mlp.down_proj", "mlp"),
               ("self_attn.v_proj", "self_attn.o_proj", "attn"))


def sign_partner(name: str) -> tuple[str, str, str] | None:
    """``(producer, consumer, kind)`` full names when ``name`` is one side of a cancelling pair."""
    for out_side, in_side, kind in _SIGN_PAIRS:
        for side in (out_side, in_side):
            if name == side or name.endswith("." + side):
                prefix = name[: len(name) - len(side)]
                return prefix + out_side, prefix + in_side, kind
    return None


def expand_kv_signs(s: torch.Tensor, n_out: int, head_dim: int) -> torch.Tensor:
    """Signs on ``v_proj`` outputs (kv heads) as seen on ``o_proj`` inputs (query heads, GQA)."""
    kv = s.numel() // head_dim
    heads = n_out // head_dim
    if kv * head_dim != s.numel() or heads * head_dim != n_out or heads % kv:
        raise ValueError(f"cannot map {s.numel()} value channels onto {n_out} attention outputs "
                         f"with head_dim {head_dim}")
    return s.view(kv, 1, head_dim).expand(kv, heads // kv, head_dim).reshape(n_out)


def plan_transforms(mode: str | None, shapes: dict[str, tuple[int, int]], seed: int = 0, *,
                    block: int | None = None, head_dim: int | None = None
                    ) -> dict[str, IncoherenceTransform | None]:
    """The transform of every layer in ``shapes`` (full name -> (out, in)) for one mode.

    ``per-layer``: signs from (seed, name).  ``shared``: signs from (seed, side, size) only, so
    every layer of a size shares one matrix per side.  ``block``: Sylvester blocks of ``block``
    (default: the largest power of two dividing all sizes), signs only on the cancelling pairs
    (:func:`sign_partner`) when both layers are present; ``v``/``o`` pairs need ``head_dim``.
    """
    mode = incoherence_mode(mode)
    if mode is None:
        return {name: None for name in shapes}
    if mode == "per-layer":
        out = {}
        for name, (m, n) in shapes.items():
            g = torch.Generator().manual_seed(_seed_of(seed, name))
            # Same stream layout as IncoherenceTransform(seed=...): s_U first, then s_V.
            s_in = torch.randint(0, 2, (n,), generator=g) * 2 - 1
            s_out = torch.randint(0, 2, (m,), generator=g) * 2 - 1
            out[name] = IncoherenceTransform(m, n, seed=-1, sign_in=s_in, sign_out=s_out)
        return out
    if mode == "shared":
        return {name: IncoherenceTransform(m, n, seed=-1,
                                           sign_in=random_signs(n, seed, "in", n),
                                           sign_out=random_signs(m, seed, "out", m))
                for name, (m, n) in shapes.items()}
    b = block or block_hadamard_size(d for mn in shapes.values() for d in mn)
    signs_in = {name: torch.ones(n, dtype=torch.int8) for name, (m, n) in shapes.items()}
    signs_out = {name: torch.ones(m, dtype=torch.int8) for name, (m, n) in shapes.items()}
    for name in shapes:
        pair = sign_partner(name)
        if pair is None or pair[0] != name or pair[1] not in shapes:
            continue
        producer, consumer, kind = pair
        s = random_signs(shapes[producer][0], seed, producer)
        if kind == "attn":
            if head_dim is None:
                continue
            signs_out[producer] = s
            signs_in[consumer] = expand_kv_signs(s, shapes[consumer][1], head_dim)
        elif shapes[producer][0] == shapes[consumer][1]:
            signs_out[producer] = signs_in[consumer] = s
    return {name: IncoherenceTransform(m, n, seed=-1, sign_in=signs_in[name],
                                       sign_out=signs_out[name], block=b)
            for name, (m, n) in shapes.items()}
