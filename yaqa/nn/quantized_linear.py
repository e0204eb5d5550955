"""QuantizedLinear: a linear layer stored as packed integer codes plus its grid.

With incoherence processing the codes describe ``W' = V W U^T`` (random Hadamard on both sides),
so there are two exact ways to run the layer:

- ``mode="fold"`` (default): dequantize once and undo the transforms on the weight,
  ``W = V^T W' U``, then a plain matmul.  Fastest with dense kernels, on CPU especially.
- ``mode="rotate"``: keep ``W'`` and rotate the activations instead,
  ``y = x W^T = ((x U^T) W'^T) V``, with the fast Hadamard transform (O(n log n) per token);
  the form a fused low-bit kernel would use.

Either way the dense weight is cached on first use: these modules trade memory for a simple,
exact, device-agnostic forward; fused low-bit kernels are a separate concern.
"""

from __future__ import annotations

import torch
from torch import nn

from .packing import pack_codes, packed_nbytes, unpack_codes
from ..quantizers import FittedGrid, Quantizer


def _transform_cls():
    from ..incoherence import IncoherenceTransform

    return IncoherenceTransform


class QuantizedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, quantizer: Quantizer, *,
                 bias: bool = False, incoherence: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
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
        probe = quantizer.grid_from_state(shape, quantizer.placeholder_state(shape))
        self._grid_keys = tuple(probe.state_dict())
        for k, v in probe.state_dict().items():
            self.register_buffer(f"grid_{k}", v.to(device))
        self._tf_keys: tuple[str, ...] = ()
        if incoherence:
            tf = _transform_cls()(out_features, in_features, seed=0)
            self._tf_keys = tuple(tf.state_dict())
            for k, v in tf.state_dict().items():
                self.register_buffer(f"tf_{k}", v.to(device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self.compute_dtype = dtype
        self.mode = "fold"
        self._cache: tuple | None = None

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
        return super()._apply(fn, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Wp, tf = self._prepared(x.device, x.dtype)
        if tf is not None:
            x = tf.input(x)
        y = torch.nn.functional.linear(x, Wp)
        if tf is not None:
            y = tf.output(y)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, quantizer={self.quantizer.config()}, "
                f"incoherence={self.incoherence}")
