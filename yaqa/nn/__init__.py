from .quantized_linear import QuantizedLinear, set_dense_cache

__all__ = ["QuantizedLinear", "set_dense_cache"]
