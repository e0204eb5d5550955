from .int8 import Int8Embedding, Int8Linear, quantize_embeddings
from .quantized_linear import QuantizedLinear, set_dense_cache

__all__ = ["Int8Embedding", "Int8Linear", "QuantizedLinear", "quantize_embeddings",
           "set_dense_cache"]
