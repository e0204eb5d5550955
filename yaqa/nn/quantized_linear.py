"""QuantizedLinear: a linear layer stored as packed integer codes plus its grid, and run packed.

With incoherence processing the codes describe ``W' = V W U^T`` (random Hadamard on both sides),
and the layer runs ``y = x W^T = ((x U^T) W'^T) V``: the activations are rotated with the fast
Hadamard transform (:mod:`.hadamard`) and the matmul reads the packed codes.

Forward paths, chosen per call:

- int-k grids on CUDA (bits 2/3/4/8, groups 32/64/128): the Triton kernels of :mod:`.kernels`
  (fused dequantize-GEMV for decode, dequantize + cuBLAS for prefill);
- int-k grids elsewhere: dequantize a block of rows at a time and matmul (memory stays packed);
- any other :class:`~yaqa.quantizers.FittedGrid` (the generic path): ``grid.dequantize(codes)`` for
  the whole matrix, then a matmul; the dense weight is a temporary.

A dense weight cache is opt-in (``dense_cache=True`` or :func:`set_dense_cache`): it trades memory
for the fastest CPU forward, and then ``mode="fold"`` (default) undoes the transforms on the
weight once, ``mode="rotate"`` keeps rotating activations.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import kernels
from .hadamard import _sylvester, apply_factors, factors
from .packing import pack_codes, packed_nbytes, unpack_codes
from ..quantizers import FittedGrid, IntGrid, IntQuantizer, Quantizer


def _transform_cls():
    from ..incoherence import IncoherenceTransform

    return IncoherenceTransform


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, quantizer: Quantizer, *,
                 bias: bool = False, incoherence: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 dense_cache: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.quantizer = quantizer
        self.bits = quantizer.bits
        self.incoherence = incoherence
        shape = (out_features, in_features)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(out_features * in_features,
                                                                  self.bits), dtype=torch.uint8,
                                                    device=device))
        # Placeholders with the right shapes, so an empty module can receive a saved state dict.
        with torch.device("cpu"):  # also when built inside a meta-device context
            probe = quantizer.grid_from_state(shape, quantizer.placeholder_state(shape))
        self._grid_keys = tuple(probe.state_dict())
        for k, v in probe.state_dict().items():
            self.register_buffer(f"grid_{k}", v.to(device))
        self._tf_keys: tuple[str, ...] = ()
        if incoherence:
            with torch.device("cpu"):
                tf = _transform_cls()(out_features, in_features, seed=0)
            self._tf_keys = tuple(tf.state_dict())
            for k, v in tf.state_dict().items():
                self.register_buffer(f"tf_{k}", v.to(device))
            self._register_hadamard(device, dtype)
            # The folded sign vectors derive from tf_sign_*: rebuild them whenever those load.
            self.register_load_state_dict_post_hook(_refresh_hadamard)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = dtype
        self.mode = "fold"
        self.dense_cache = dense_cache
        self._cache: tuple | None = None

    def _register_hadamard(self, device, dtype) -> None:
        # ±1 Kronecker factors of Had_n (inputs) and Had_m^T (outputs), derived from the shape,
        # not saved; as buffers they follow .to() and stay device-resident for compiled graphs.
        # Block mode (incoherence "block"): one Sylvester block H_b applied to each run of b
        # consecutive features, read from the stored transform once here, never per forward.
        # The random signs and the 1/sqrt(n) normalisation are folded into one vector per side,
        # in the compute dtype: one elementwise pass per side and no per-call casts.
        block = getattr(self, "tf_block", None)
        self._had_block = int(block) if block is not None and not block.is_meta else 0
        for name in [k for k in self._buffers if k.startswith(("had_in_", "had_out_"))]:
            del self._buffers[name]
        if self._had_block:
            H = torch.tensor(_sylvester(self._had_block), dtype=dtype, device=device)
            self.register_buffer("had_in_0", H, persistent=False)
            self.register_buffer("had_out_0", H.clone(), persistent=False)
            self._had_in = self._had_out = 1
            din = dout = self._had_block
        else:
            self._had_in = len(factors(self.in_features))
            for i, H in enumerate(factors(self.in_features, False, dtype, device)):
                self.register_buffer(f"had_in_{i}", H, persistent=False)
            for i, H in enumerate(factors(self.out_features, True, dtype, device)):
                self.register_buffer(f"had_out_{i}", H, persistent=False)
            self._had_out = i + 1
            din, dout = self.in_features, self.out_features
        for side, sign, d in (("in", self.tf_sign_in, din), ("out", self.tf_sign_out, dout)):
            if sign.is_meta:
                sign = torch.ones(sign.shape, device=device)  # refreshed by materialize_hadamard
            # 1/sqrt(d) joins the ±1 signs only where it is a power of two (d = 4^k), so that the
            # 16-bit vector stays exact; otherwise it stays a float32 scalar.
            scale = 1.0 / math.sqrt(d)
            exact = math.frexp(scale)[0] == 0.5
            v = sign.to(device=device, dtype=torch.float64) * (scale if exact else 1.0)
            self.register_buffer(f"had_{side}_sign", v.to(dtype), persistent=False)
            setattr(self, f"_had_{side}_scale", 1.0 if exact else scale)

    def _hadamard(self, x: torch.Tensor, side: str) -> torch.Tensor:
        count = self._had_in if side == "in" else self._had_out
        Hs = [getattr(self, f"had_{side}_{i}") for i in range(count)]
        if not self._had_block:
            return apply_factors(x, Hs, normalize=False)
        b = self._had_block
        return (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ Hs[0].to(x.dtype)).reshape(x.shape)

    def materialize_hadamard(self) -> None:
        """Rebuild the derived Hadamard buffers next to ``qweight`` (after a meta-device load)."""
        if self.incoherence:
            dtype = self.bias.dtype if self.bias is not None else self.compute_dtype
            if dtype is None or not dtype.is_floating_point:
                dtype = torch.float32
            self._register_hadamard(self.qweight.device, dtype)

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, grid: FittedGrid, quantizer: Quantizer, *,
                   transform=None, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        m, n = codes.shape
        mod = cls(n, m, quantizer, bias=bias is not None, incoherence=transform is not None,
                  dtype=dtype, device=codes.device)
        mod.qweight.copy_(pack_codes(codes, quantizer.bits))
        for k, v in grid.state_dict().items():
            getattr(mod, f"grid_{k}").copy_(v)
        if transform is not None:
            for k, v in transform.state_dict().items():
                getattr(mod, f"tf_{k}").copy_(v)
            mod.materialize_hadamard()  # the stored transform may be block Hadamard
        if bias is not None:
            mod.bias.data.copy_(bias.detach().to(dtype))
        return mod

    # -- views ------------------------------------------------------------------------------
    def grid(self) -> FittedGrid:
        state = {k: getattr(self, f"grid_{k}") for k in self._grid_keys}
        return self.quantizer.grid_from_state((self.out_features, self.in_features), state)

    def transform(self):
        if not self.incoherence:
            return None
        return _transform_cls().from_state_dict({k: getattr(self, f"tf_{k}") for k in self._tf_keys})

    def codes(self) -> torch.Tensor:
        m, n = self.out_features, self.in_features
        return unpack_codes(self.qweight, self.bits, m * n).reshape(m, n)

    def transformed_weight(self) -> torch.Tensor:
        """Dequantized weight in the basis it was rounded in (float32)."""
        return self.grid().dequantize(self.codes())

    def dequantized_weight(self) -> torch.Tensor:
        """Dense float32 weight in the original basis (for export or inspection)."""
        Wp = self.transformed_weight()
        tf = self.transform()
        return Wp if tf is None else tf.inverse_weight(Wp)

    def int_params(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpacked ``(codes int32 m x n, scale float32 m x G, zero int32 m x G)`` of an int-k layer.

        Value ``(codes - zero) * scale`` per group of ``quantizer.group_size`` input columns, in
        the transformed basis when ``incoherence`` is set (signs: :meth:`transform`).
        """
        if not self.is_int:
            raise TypeError(f"int_params needs an int-k layer, this one is {self.quantizer.config()}")
        return (self.codes(), self.grid_scale.float(), self.grid_zero.to(torch.int32))

    @property
    def is_int(self) -> bool:
        return isinstance(self.quantizer, IntQuantizer)

    @property
    def group_size(self) -> int | None:
        return self.quantizer._group(self.in_features) if self.is_int else None

    # -- forward ----------------------------------------------------------------------------
    def _prepared(self, device: torch.device, dtype: torch.dtype):
        if self.mode not in ("fold", "rotate"):
            raise ValueError(f"QuantizedLinear.mode must be 'fold' or 'rotate', got {self.mode!r}")
        key = (device, dtype, self.mode)
        if self._cache is None or self._cache[0] != key:
            tf = self.transform()
            if self.mode == "fold" or tf is None:
                W, tf = self.dequantized_weight(), None
            else:
                W = self.transformed_weight()
            self._cache = (key, W.to(device=device, dtype=dtype), tf)
        return self._cache[1], self._cache[2]

    def clear_cache(self) -> None:
        self._cache = None

    def _apply(self, fn, *args, **kwargs):
        self._cache = None  # moving devices or dtypes invalidates the dense weight
        # model.half()/.float()/.to(dtype) must move the packed tensors but keep their storage
        # dtypes (fp16 scales, integer codes): they are the format, not the compute dtype.
        keep = {k: b.dtype for k, b in self._buffers.items()
                if b is not None and not k.startswith("had_")}
        out = super()._apply(fn, *args, **kwargs)
        for k, dt in keep.items():
            b = self._buffers[k]
            if b is not None and b.dtype != dt:
                self._buffers[k] = b.to(dt)
        return out

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W'^T`` reading the packed codes (W' in the transformed basis)."""
        m, n = self.out_features, self.in_features
        if self.is_int:
            g = self.group_size
            if kernels.use_triton(x) and kernels.kernel_supports(self.bits, g, m, n):
                return kernels.intk_matmul(x, self.qweight, self.grid_scale, self.grid_zero,
                                           self.bits, g, m, n)
            return kernels.cpu_matmul(x, self.qweight, self.grid_scale, self.grid_zero,
                                      self.bits, g, m, n)
        return torch.nn.functional.linear(x, self.transformed_weight().to(x.dtype))

    def _fused_rotation(self, x: torch.Tensor, side: str) -> int:
        """Factor count (2 or 3) when one fused Triton launch can rotate ``x``, else 0: decode-
        sized inputs on CUDA, instead of a sign multiply, 2-3 GEMMs and copies."""
        count = self._had_in if side == "in" else self._had_out
        if not (not self._had_block and count in (2, 3)
                and x.numel() <= kernels.GEMV_MAX_ROWS * x.shape[-1] and kernels.use_triton(x)):
            return 0
        sizes = tuple(getattr(self, f"had_{side}_{i}").shape[0] for i in range(count))
        ok = kernels.rotate2_supports(sizes) if count == 2 else kernels.rotate3_supports(sizes)
        return count if ok else 0

    def _fused_rotate(self, x: torch.Tensor, side: str, count: int,
                      sign: torch.Tensor | None = None,
                      up: torch.Tensor | None = None) -> torch.Tensor:
        # up: rotate silu(x)·up, the activation computed by the rotation kernel.
        Hs = [getattr(self, f"had_{side}_{i}") for i in range(count)]
        sign = getattr(self, f"had_{side}_sign") if sign is None else sign
        scale = getattr(self, f"_had_{side}_scale")
        op = kernels.hadamard_rotate2 if count == 2 else kernels.hadamard_rotate3
        return op(x, sign, *Hs, side == "in", scale, up)

    def _rotate_in(self, x: torch.Tensor) -> torch.Tensor:
        if count := self._fused_rotation(x, "in"):
            return self._fused_rotate(x, "in", count)
        y = self._hadamard(x * self.had_in_sign.to(x.dtype), "in")
        return y if self._had_in_scale == 1.0 else y * self._had_in_scale

    def _rotate_out(self, y: torch.Tensor) -> torch.Tensor:
        if count := self._fused_rotation(y, "out"):
            return self._fused_rotate(y, "out", count)
        y = self._hadamard(y, "out") * self.had_out_sign.to(y.dtype)
        return y if self._had_out_scale == 1.0 else y * self._had_out_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dense_cache:
            return self.forward_rotated(self._rotate_in(x) if self.incoherence else x)
        Wp, tf = self._prepared(x.device, x.dtype)
        if tf is not None:
            x = tf.input(x)
        y = torch.nn.functional.linear(x, Wp)
        if tf is not None:
            y = tf.output(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def forward_rotated(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` for an input already rotated by this layer's input transform
        (``x·U^T``, e.g. by :func:`rotate_shared_input`)."""
        y = self._packed_matmul(x)
        if self.incoherence:
            y = self._rotate_out(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def folds_silu(self, gate: torch.Tensor) -> bool:
        """Whether :meth:`forward_silu_mul` computes the activation inside one of this layer's
        kernels for a ``gate`` like this one: decode-sized, Triton, int-k; without incoherence
        in the packed GEMV (the kernels must take the shape), with incoherence in the fused
        input rotation (which mixes all of K, so the activation must be complete before it)."""
        if not (self.is_int and not self.dense_cache and kernels.use_triton(gate)
                and gate.numel() <= kernels.GEMV_MAX_ROWS * self.in_features):
            return False
        if self.incoherence:
            return bool(self._fused_rotation(gate, "in"))
        return kernels.kernel_supports(self.bits, self.group_size, self.out_features,
                                       self.in_features)

    def forward_silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``self(silu(gate) · up)``, a gated MLP's down projection.  Where :meth:`folds_silu`,
        the GEMV (or with incoherence the input rotation) computes the activation while loading
        its input, rounded as the separate activation kernel rounds it, so no activation launch
        writes and re-reads it; otherwise the activation, then :meth:`forward`."""
        if not self.folds_silu(gate):
            return self(kernels.silu_mul_reference(gate, up))
        if self.incoherence:
            xr = self._fused_rotate(gate, "in", self._fused_rotation(gate, "in"), up=up)
            return self.forward_rotated(xr)
        y = kernels.intk_matmul_silu(gate, up, self.qweight, self.grid_scale, self.grid_zero,
                                     self.bits, self.group_size, self.out_features,
                                     self.in_features)
        return y + self.bias.to(y.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, quantizer={self.quantizer.config()}, "
                f"incoherence={self.incoherence}, dense_cache={self.dense_cache}")


def _refresh_hadamard(module: "QuantizedLinear", incompatible_keys) -> None:
    if not (module.qweight.is_meta or module.tf_sign_in.is_meta):
        module.materialize_hadamard()


def set_dense_cache(model: nn.Module, enabled: bool = True) -> int:
    """Turn the dense weight cache of every QuantizedLinear in ``model`` on or off; returns how many.

    On: each layer keeps a dense copy of its weight after the first forward (fastest on CPU,
    memory of the unquantized model).  Off (the default): layers run from the packed codes.
    """
    count = 0
    for mod in model.modules():
        if isinstance(mod, QuantizedLinear):
            mod.dense_cache = enabled
            mod.clear_cache()
            count += 1
    return count



def shared_input_signs(mods: list[nn.Module]) -> torch.Tensor | None:
    """The input sign vectors of layers that read the same activations, stacked ``(r, n)`` for
    :func:`rotate_shared_input`; None unless all are packed incoherent layers of one input size
    with the Kronecker (not block) Hadamard."""
    if len(mods) < 2 or not all(
            isinstance(m, QuantizedLinear) and m.incoherence and not m.dense_cache
            and not m._had_block and m.in_features == mods[0].in_features for m in mods):
        return None
    return torch.stack([m.had_in_sign for m in mods]).contiguous()


def rotate_shared_input(mods: list["QuantizedLinear"], signs: torch.Tensor,
                        x: torch.Tensor) -> list[torch.Tensor]:
    """``[m(x) for m in mods]`` with the input rotations in one fused launch where it applies
    (decode-sized ``x`` on the Triton path): q/k/v, or gate/up, share their input."""
    first = mods[0]
    count = first._fused_rotation(x, "in")
    if not count or x.numel() != x.shape[-1]:
        return [m(x) for m in mods]
    xr = first._fused_rotate(x, "in", count, signs)
    return [m.forward_rotated(xr[i].view_as(x)) for i, m in enumerate(mods)]
