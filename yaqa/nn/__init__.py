from .quantized_linear import QuantizedLinear

__all__ = ["QuantizedLinear"]
