"""Model families (adapters) and loading."""

from .adapters import (FAMILIES, Family, ModelAdapter, UnsupportedModelError, freeze,
                       get_adapter, input_embeddings)

__all__ = ["FAMILIES", "Family", "ModelAdapter", "UnsupportedModelError", "freeze",
           "get_adapter", "input_embeddings"]
