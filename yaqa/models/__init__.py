"""Model families (adapters) and loading."""

from .adapters import (FAMILIES, Family, ModelAdapter, UnsupportedModelError, freeze,
                       get_adapter, input_embeddings)

__all__ = ["FAMILIES", "Family", "ModelAdapter", "UnsupportedModelError", "freeze",
           "get_adapter", "input_embeddings"]
from .loading import (DEFAULT_MODEL, ModelNotFoundError, cache_dir, load_model,  # noqa: E402
                      resolve_device, resolve_dtype)

__all__ += ["DEFAULT_MODEL", "ModelNotFoundError", "cache_dir", "load_model", "resolve_device",
            "resolve_dtype"]
