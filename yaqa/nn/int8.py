"""Int8 input embedding and LM head: one symmetric scale per row, kept int8 in memory.

A large vocabulary makes the embedding and the head a big share of a quantized model
(Llama-3.1-8B: 2 x 128,256 x 4,096 values, 2.1 GB in bf16 next to about 4.5 GB of int4
linears).  Stored as int8 with a float32 scale per row (per token for the embedding, per
output row for the head), they take about half of that.

- :class:`Int8Embedding` dequantizes only the rows it looks up.
- :class:`Int8Linear` (the head): at decode on CUDA (a few activation rows) one Triton GEMV
  that reads each int8 byte once (:mod:`.kernels_int8`); otherwise (CPU, prefill) it
  dequantizes a block of rows at a time and multiplies, so memory stays int8; on CUDA the
  blocks are larger (fewer launches), the arithmetic the same.
- A tied head shares the embedding's ``weight`` parameter (and reads its scales), so a
  checkpoint stores them once, and transformers ties them as it ties a 16-bit embedding.

``weight`` is an int8 ``nn.Parameter`` (never trainable) because transformers ties parameters
only, and ``model.dtype`` skips it as non-floating; ``weight_scale`` is a float32 buffer, so it
neither changes ``model.dtype`` nor follows ``model.to(torch.bfloat16)``.

Value of row ``r``: ``weight[r].float() * weight_scale[r]``, with ``weight`` in [-127, 127].
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from . import kernels
from .kernels import row_block_matmul

# The values of ``embeddings=`` (save_quantized, quantize_one) and ``--embeddings``.
EMBEDDING_FORMATS = ("auto", "int8")
# Elements of the head dequantized at once: CPU keeps the temporary small (cache-sized work);
# CUDA wants few, large launches.
CPU_BLOCK = 1 << 20
CUDA_BLOCK = 1 << 26


def parse_embeddings(value: str | None) -> str:
    """``"auto"`` (the dtype of the other unquantized tensors) or ``"int8"``; None is "auto"."""
    v = "auto" if value is None else str(value).lower()
    if v not in EMBEDDING_FORMATS:
        raise ValueError(f"unknown embeddings format {value!r}; use 'auto' (the checkpoint's "
                         "16-bit dtype) or 'int8' (one scale per row)")
    return v


def quantize_rows(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 rows: ``(q int8, scale float32)`` with ``q[r] * scale[r] ≈ W[r]``.

    Round to nearest with ``scale = max|W[r]| / 127``; an all-zero row gets scale 0."""
    W = W.detach().float()
    scale = W.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(W / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Float32 rows ``q * scale`` (the definition every forward reproduces)."""
    return q.float() * scale.float()[..., None]


class _Int8Rows(nn.Module):
    """Shared storage rules: the int8 ``weight`` and the float32 ``weight_scale`` keep their
    dtypes through ``model.to(dtype)``/``.half()``, while ``compute_dtype`` (of the outputs)
    follows such casts."""

    def _init_rows(self, rows: int, cols: int, dtype: torch.dtype, device) -> None:
        self.weight = nn.Parameter(torch.zeros(rows, cols, dtype=torch.int8, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.zeros(rows, dtype=torch.float32, device=device))
        self.compute_dtype = dtype

    def _set_rows(self, q: torch.Tensor, scale: torch.Tensor) -> None:
        self.weight = nn.Parameter(q, requires_grad=False)
        self.weight_scale = scale

    def _apply(self, fn, *args, **kwargs):
        keep = {k: b.dtype for k, b in self._buffers.items() if b is not None}
        out = super()._apply(fn, *args, **kwargs)
        for k, dt in keep.items():
            b = self._buffers.get(k)
            if b is not None and b.dtype != dt:
                self._buffers[k] = b.to(dt)
        # The activations' dtype follows a dtype cast of the model (a probe shows what fn does).
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """Dense float32 weight (inspection, export, references)."""
        return dequantize_rows(self.weight, self.weight_scale)


class Int8Embedding(_Int8Rows):
    """``nn.Embedding`` stored int8 with one scale per token; looks up and dequantizes rows only.

    ``embed_scale``: a constant multiplier some families (Gemma 3) apply after the lookup."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, padding_idx: int | None = None,
                 embed_scale: float | None = None, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.embed_scale = embed_scale
        self._init_rows(num_embeddings, embedding_dim, dtype, device)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> "Int8Embedding":
        scale = getattr(emb, "scalar_embed_scale", None)
        if scale is None and isinstance(getattr(emb, "embed_scale", None), (int, float)):
            scale = emb.embed_scale
        mod = cls(emb.num_embeddings, emb.embedding_dim, padding_idx=emb.padding_idx,
                  embed_scale=None if scale is None else float(scale), dtype=emb.weight.dtype,
                  device=emb.weight.device)
        mod._set_rows(*quantize_rows(emb.weight))
        return mod

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = dequantize_rows(self.weight.index_select(0, flat),
                               self.weight_scale.index_select(0, flat))
        out = rows.to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:  # as the family's own module: the scale cast first
            out = out * torch.tensor(self.embed_scale).to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row scales"
                + (f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""))


class Int8Linear(_Int8Rows):
    """Weight-only int8 linear (the LM head): one symmetric scale per output row.

    ``tied_to``: an :class:`Int8Embedding` whose ``weight`` this head shares and whose scales it
    reads (it then has no ``weight_scale`` of its own, so nothing is stored twice)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 tied_to: Int8Embedding | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if tied_to is not None:
            if (tied_to.num_embeddings, tied_to.embedding_dim) != (out_features, in_features):
                raise ValueError(f"a tied head must be {tied_to.num_embeddings}x"
                                 f"{tied_to.embedding_dim}, got {out_features}x{in_features}")
            self.weight = tied_to.weight
            self.compute_dtype = dtype
        else:
            self._init_rows(out_features, in_features, dtype, device)
        # A plain attribute, not a submodule: the embedding is registered where it lives.
        object.__setattr__(self, "tied_to", tied_to)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def scales(self) -> torch.Tensor:
        return self.tied_to.weight_scale if self.tied_to is not None else self.weight_scale

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_rows(self.weight, self.scales())

    @classmethod
    def from_float(cls, lin: nn.Linear) -> "Int8Linear":
        mod = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                  dtype=lin.weight.dtype, device=lin.weight.device)
        mod._set_rows(*quantize_rows(lin.weight))
        if lin.bias is not None:
            mod.bias.data.copy_(lin.bias.detach())
        return mod

    @classmethod
    def tied(cls, emb: Int8Embedding, bias: torch.Tensor | None = None) -> "Int8Linear":
        """A head that shares ``emb``'s int8 tensors (tied word embeddings)."""
        mod = cls(emb.embedding_dim, emb.num_embeddings, bias=bias is not None,
                  dtype=emb.compute_dtype, device=emb.weight.device, tied_to=emb)
        if bias is not None:
            mod.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return mod

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        scales = self.scales()
        if x.numel() <= kernels.GEMV_MAX_ROWS * n and kernels.use_triton(x):
            from . import kernels_int8  # decode: one GEMV launch, each int8 byte read once

            gemv = kernels_int8.supports(self.weight, scales)
        else:
            gemv = False
        if gemv:
            out = kernels_int8.int8_matmul(x, self.weight, scales)
        else:
            out = row_block_matmul(x, m, n, lambda r0, r1: dequantize_rows(self.weight[r0:r1],
                                                                           scales[r0:r1]),
                                   max(1, (CUDA_BLOCK if x.is_cuda else CPU_BLOCK) // n))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int8 per-row scales, bias={self.bias is not None}")


# -- whole models ---------------------------------------------------------------------------------

def _targets(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None, bool]:
    """(input embedding, LM head or None when quantized/absent, tied)."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not isinstance(head, (nn.Linear, Int8Linear)):
        head = None  # quantized with the linears (--include-head), or a family's own head
    tied = head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None)
    return emb, head, tied


def has_int8_embeddings(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Embedding, Int8Linear)) for m in model.modules())


def quantize_embeddings(model: nn.Module) -> dict[str, dict]:
    """Store ``model``'s input embedding and (unquantized) LM head as int8, in place.

    A tied head shares the embedding's int8 tensors.  Returns the specs of :func:`embedding_specs`.
    """
    emb, head, tied = _targets(model)
    if not isinstance(emb, (nn.Embedding, Int8Embedding)):
        raise TypeError(f"int8 embeddings need an nn.Embedding input embedding, this model has "
                        f"{type(emb).__name__}")
    if isinstance(emb, nn.Embedding):
        new_emb = Int8Embedding.from_float(emb)
        model.set_input_embeddings(new_emb)
        emb = new_emb
    if isinstance(head, nn.Linear):
        model.set_output_embeddings(Int8Linear.tied(emb, head.bias) if tied
                                    else Int8Linear.from_float(head))
    return embedding_specs(model)


def embedding_specs(model: nn.Module) -> dict[str, dict]:
    """What a checkpoint records to rebuild the int8 modules of ``model`` on the meta device."""
    specs: dict[str, dict] = {}
    emb_name = None
    for name, m in model.named_modules():
        if isinstance(m, Int8Embedding):
            emb_name = name
            specs[name] = {"kind": "embedding", "num_embeddings": m.num_embeddings,
                           "embedding_dim": m.embedding_dim, "padding_idx": m.padding_idx,
                           "embed_scale": m.embed_scale}
    for name, m in model.named_modules():
        if isinstance(m, Int8Linear):
            tied = emb_name is not None and m.tied_to is model.get_submodule(emb_name)
            specs[name] = {"kind": "linear", "in_features": m.in_features,
                           "out_features": m.out_features, "bias": m.bias is not None,
                           "tied_to": emb_name if tied else None}
    return specs


@contextlib.contextmanager
def int8_embeddings_view(model: nn.Module) -> Iterator[dict[str, dict]]:
    """Temporarily give ``model`` int8 embedding/head modules (for saving), then restore the
    original modules; yields the specs."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    try:
        yield quantize_embeddings(model)
    finally:
        model.set_input_embeddings(emb)
        if head is not None:
            model.set_output_embeddings(head)


def build_int8_modules(model: nn.Module, specs: dict[str, dict], *,
                       dtype: torch.dtype | None = None, device="meta") -> int:
    """Swap the named modules of ``model`` for empty int8 ones (loading; see :mod:`yaqa.hf`)."""
    from ..io.checkpoint import CheckpointError

    built: dict[str, Int8Embedding] = {}
    for name, spec in sorted(specs.items(), key=lambda kv: kv[1].get("kind") != "embedding"):
        try:
            old = model.get_submodule(name)
        except AttributeError as e:
            raise CheckpointError(f"checkpoint stores {name!r} as int8, which this model "
                                  "lacks") from e
        old_w = getattr(old, "weight", None)
        dt = dtype or (old_w.dtype if old_w is not None and old_w.is_floating_point()
                       else torch.get_default_dtype())
        kind = spec.get("kind")
        if kind == "embedding":
            mod = Int8Embedding(spec["num_embeddings"], spec["embedding_dim"],
                                padding_idx=spec.get("padding_idx"),
                                embed_scale=spec.get("embed_scale"), dtype=dt, device=device)
            built[name] = mod
        elif kind == "linear":
            src = spec.get("tied_to")
            if src is not None and src not in built:
                raise CheckpointError(f"{name} is tied to {src!r}, which is not an int8 "
                                      "embedding of this checkpoint")
            mod = Int8Linear(spec["in_features"], spec["out_features"], bias=spec["bias"],
                             dtype=dt, device=device, tied_to=built.get(src))
        else:
            raise CheckpointError(f"{name}: unknown int8 module kind {kind!r}")
        if old_w is not None and tuple(old_w.shape) != tuple(mod.weight.shape):
            raise CheckpointError(f"{name}: checkpoint shape {tuple(mod.weight.shape)} != "
                                  f"model's {tuple(old_w.shape)}")
        model.set_submodule(name, mod)
    return len(specs)


def check_tied(model: nn.Module, specs: dict[str, dict]) -> None:
    """After loading: every tied int8 head still shares its embedding's weight."""
    from ..io.checkpoint import CheckpointError

    for name, spec in specs.items():
        src = spec.get("tied_to")
        if spec.get("kind") == "linear" and src:
            if model.get_submodule(name).weight is not model.get_submodule(src).weight:
                raise CheckpointError(f"{name} should share {src}'s weight, but the loaded model "
                                      "has two tensors (is tie_word_embeddings off in "
                                      "config.json?)")
