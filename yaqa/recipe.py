"""What a quantization method *is*: one :class:`Recipe`, defined once, and a registry of names.

A recipe holds everything that decides the quantized weights: the rounding algorithm, which
Hessians it needs, the quantizer, incoherence, tile size, damping and seed.  The CLI, the pipeline
and the library all start from :func:`get_recipe`, so defaults live here and nowhere else, and a
recipe's :meth:`~Recipe.identity` (a hash of all its fields) keys stored work automatically:
adding a field to the dataclass adds it to every identity.

    r = get_recipe("gptq", quantizer="int3", group_size=128)
    r.rounding, r.hessian          # "ldlq", "hx"
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from typing import Any

from .store import identity_hash

ROUNDINGS = ("rtn", "ldlq", "yaqa")
# none: no calibration; hx: the plain input Hessian E[xᵀx] (forward passes only);
# A / B: YAQA's Kronecker sketches of the KL Hessian (A per token, B per sequence)
HESSIANS = ("none", "hx", "A", "B")

# The one set of defaults (library, `yaqa quantize`, `yaqa run`).
DEFAULT_BITS = 4
DEFAULT_GROUP_SIZE = 64
DEFAULT_INCOHERENCE = True
DEFAULT_BLOCK_SIZE = 16
DEFAULT_SIGMA = 0.01
POWER_ITERS = {"A": 2, "B": 1}  # Sketch A: 4 passes; Sketch B: one pass
DEFAULT_DTYPE = "float32"  # model dtype while collecting and rounding (load_model, CLI, run)


class RecipeError(ValueError):
    """An unknown method name or an impossible combination of recipe fields."""


@dataclass(frozen=True)
class Recipe:
    name: str
    rounding: str                    # rtn | ldlq | yaqa
    hessian: str = "none"            # none | hx | A | B
    power_iters: int = 1             # Sketch A: H_out updates (2x passes); Sketch B: ALS steps
    quantizer: str = f"int{DEFAULT_BITS}"  # a make_quantizer name: int2..int8, trellis2..4, mxfp4, nvfp4
    group_size: int | None = DEFAULT_GROUP_SIZE  # None: one scale per output row
    symmetric: bool = False
    scale_search: str = "maxabs"
    incoherence: bool | str = DEFAULT_INCOHERENCE  # True = "per-layer", "shared", "block"
    block_size: int = DEFAULT_BLOCK_SIZE  # tile of the LDL/YAQA feedback
    # YAQA only: tile height along the outputs (H_out's feedback); None: block_size
    block_size_out: int | None = None
    sigma: float = DEFAULT_SIGMA     # relative damping of the Hessian factors
    seed: int = 0                    # incoherence signs and sampled labels
    # Sketch B only: label draws per sequence (their mean is each sequence's term; D× the passes)
    label_draws: int = 1
    # YAQA only: shrink the Sketch-B factors towards LDLQ's (auto | auto-out | off | an amount)
    shrinkage: str = "auto"
    # LDLQ/YAQA with int-k: rounds of ±1 code steps after rounding that lower its proxy loss
    # (yaqa.rounding.refine); 0 = off
    refine: int = 0
    # NVFP4: one global scale per group of linears that vLLM fuses (q/k/v, gate/up), so the
    # export serves in vLLM.  None: the quantizer's default (on for nvfp4, off for the others).
    fused_global_scale: bool | None = None

    def __post_init__(self) -> None:
        if self.rounding not in ROUNDINGS:
            raise RecipeError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.hessian not in HESSIANS:
            raise RecipeError(f"hessian must be one of {HESSIANS}, got {self.hessian!r}")
        needs = {"rtn": ("none",), "ldlq": ("hx", "A", "B"), "yaqa": ("A", "B")}[self.rounding]
        if self.hessian not in needs:
            raise RecipeError(f"{self.rounding} rounding needs Hessians {needs}, "
                              f"not {self.hessian!r}")
        from .hessians.shrinkage import Shrinkage

        try:  # one spelling per setting, so equal settings give equal identities
            shrink = str(Shrinkage.parse(self.shrinkage)) if self.rounding == "yaqa" else "off"
        except ValueError as e:
            raise RecipeError(str(e)) from None
        object.__setattr__(self, "shrinkage", shrink)

        from .incoherence import incoherence_mode

        try:
            mode = incoherence_mode(self.incoherence)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        # Stored as before for the two original settings, so their identities do not change.
        object.__setattr__(self, "incoherence", {None: False, "per-layer": True}.get(mode, mode))
        # None stands for the quantizer's default (on for nvfp4 only), so a recipe whose
        # quantizer is replaced gets the new quantizer's default, and equal settings compare equal.
        if self.fused_global_scale is not None and \
                bool(self.fused_global_scale) == (str(self.quantizer).lower() == "nvfp4"):
            object.__setattr__(self, "fused_global_scale", None)
        if self.power_iters < 1:
            raise RecipeError(f"power_iters must be >= 1, got {self.power_iters}")
        from .hessians.config import check_label_draws

        try:
            check_label_draws(self.label_draws, self.hessian)
        except ValueError as e:
            raise RecipeError(f"{self.name}: {e}") from None
        if self.block_size < 1:
            raise RecipeError(f"block_size must be >= 1, got {self.block_size}")
        if self.block_size_out is not None:
            if isinstance(self.block_size_out, bool) or not isinstance(self.block_size_out, int) \
                    or self.block_size_out < 1:
                raise RecipeError(f"block_size_out must be an integer >= 1 or None, got "
                                  f"{self.block_size_out!r}")
            if self.block_size_out == self.block_size:  # square tiles: one spelling per setting
                object.__setattr__(self, "block_size_out", None)
            elif self.rounding != "yaqa":
                raise RecipeError(f"{self.name}: block_size_out sets YAQA's output-side tiles; "
                                  f"{self.rounding} rounding has no output feedback")
        if not isinstance(self.refine, int) or isinstance(self.refine, bool) or self.refine < 0:
            raise RecipeError(f"refine must be an integer >= 0 (rounds), got {self.refine!r}")
        if self.refine and self.rounding == "rtn":
            raise RecipeError(f"{self.name}: refine needs LDLQ or YAQA rounding, not RTN")
        if self.refine and not str(self.quantizer).lower().startswith("int"):
            raise RecipeError(f"{self.name}: refine needs an int-k quantizer (codes stepped by "
                              f"±1), not {self.quantizer!r}; use refine 0")
        if not self.sigma >= 0:
            raise RecipeError(f"sigma must be >= 0, got {self.sigma}")
        if self.group_size is not None and self.group_size < 1:
            raise RecipeError(f"group_size must be positive or None, got {self.group_size}")
        try:
            self.make_quantizer()
        except ValueError as e:
            raise RecipeError(str(e)) from None

    @property
    def sketch(self) -> str | None:
        """The YAQA sketch to collect ("A"/"B"), or None."""
        return self.hessian if self.hessian in ("A", "B") else None

    @property
    def fused_scale(self) -> bool:
        """Whether the linears that vLLM fuses share one NVFP4 global scale."""
        if self.fused_global_scale is None:
            return str(self.quantizer).lower() == "nvfp4"
        return bool(self.fused_global_scale)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """The fields that decide the result (the display name does not)."""
        d = self.to_dict()
        d.pop("name")
        # Only where it is on: recipes without a fused global scale (every one before the
        # option existed) keep their identities.
        d.pop("fused_global_scale")
        if self.fused_scale:
            d["fused_global_scale"] = True
        if self.label_draws == 1:  # likewise: one draw keeps every earlier identity
            d.pop("label_draws")
        if self.refine == 0:  # and no refinement
            d.pop("refine")
        if self.block_size_out is None:  # and square tiles
            d.pop("block_size_out")
        return d

    def identity_hash(self) -> str:
        return identity_hash(self.identity())

    def make_quantizer(self):
        from .quantizers import make_quantizer

        return make_quantizer(self.quantizer, group_size=self.group_size,
                              symmetric=self.symmetric, scale_search=self.scale_search,
                              fused_global_scale=self.fused_global_scale)


# name -> recipe; aliases map to the same recipe under the canonical name
_REGISTRY: dict[str, Recipe] = {}
_ALIASES: dict[str, str] = {}


def register_recipe(recipe: Recipe, *aliases: str) -> Recipe:
    """Add a named method (``yaqa quantize --method NAME`` picks it up)."""
    key = recipe.name.lower()
    _REGISTRY[key] = recipe
    for a in aliases:
        _ALIASES[a.lower()] = key
    return recipe


register_recipe(Recipe("rtn", "rtn"))
register_recipe(Recipe("ldlq", "ldlq", "hx"), "gptq")
register_recipe(Recipe("yaqa-a", "yaqa", "A", power_iters=POWER_ITERS["A"]))
register_recipe(Recipe("yaqa-b", "yaqa", "B", power_iters=POWER_ITERS["B"]), "yaqa")


def recipe_names(aliases: bool = True) -> tuple[str, ...]:
    return tuple(_REGISTRY) + (tuple(_ALIASES) if aliases else ())


def canonical_name(name: str) -> str:
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise RecipeError(f"unknown method {name!r}; choose from {', '.join(recipe_names())}")
    return key


# Rounds of refinement (yaqa.rounding.refine) that a YAQA recipe gets when none are asked for,
# by the device that rounds.  On a GPU they cost +0.8 min on Llama-3.1-8B shapes (rounding
# itself 1.4 min, the whole run about 10 min; bench/results/refine_speed_cuda_coupled.md) and
# take YAQA-B from about 0.67x to 0.61-0.63x LDLQ's KL at 1024 x 512
# (bench/results/quality_shrinkage_ship_*.md).  On CPU they cost about 0.4 s per SmolLM2 linear,
# which the default run has no room for.  LDLQ is left unrefined, as GPTQ tools ship it
# (refined only when asked), so it stays the baseline users know.
AUTO_REFINE_ROUNDS = {"cuda": 32}


def _device_type(device: Any) -> str:
    import torch

    if device is None or str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device, int) and not isinstance(device, bool):
        return "cuda"  # an index: torch reads 0 as cuda:0
    return torch.device(device).type  # "cuda:1" -> "cuda"


def default_refine(recipe: Recipe, device: Any) -> int:
    """Refinement rounds for ``recipe`` when the caller leaves ``refine`` unset: YAQA rounding
    with an int-k quantizer on a CUDA device gets ``AUTO_REFINE_ROUNDS["cuda"]``; everything
    else (LDLQ, RTN, trellis/FP4, CPU) 0.  ``device``: where rounding runs (``"auto"``/None:
    CUDA when available)."""
    if recipe.rounding != "yaqa" or not str(recipe.quantizer).lower().startswith("int"):
        return 0
    return AUTO_REFINE_ROUNDS.get(_device_type(device), 0)


def with_default_refine(recipe: Recipe, refine: int | None, device: Any) -> Recipe:
    """``recipe`` with ``refine`` as asked, or :func:`default_refine`'s rounds when None."""
    if refine is not None:
        return recipe
    rounds = default_refine(recipe, device)
    return recipe.replace(refine=rounds) if rounds != recipe.refine else recipe


def get_recipe(name: str, *, bits: int | None = None, power_iters: int | None = None,
               label_draws: int | None = None, refine: int | None = None,
               **overrides: Any) -> Recipe:
    """The registered recipe ``name`` (case-insensitive), with ``overrides`` applied.

    ``bits=3`` is short for ``quantizer="int3"``.  ``power_iters`` applies to the sketches (A and
    B) and is ignored by recipes without one, so a run over several methods can pass one value;
    ``label_draws`` likewise reaches the Sketch-B recipes only, ``refine`` the LDLQ/YAQA ones.
    ``group_size=None`` means one scale per output row; leave a field out to keep its default.
    """
    base = _REGISTRY[canonical_name(name)]
    changes = dict(overrides)
    if bits is not None:
        changes["quantizer"] = f"int{bits}"
    if power_iters is not None and base.sketch is not None:
        changes["power_iters"] = power_iters
    if label_draws is not None and base.hessian == "B":
        changes["label_draws"] = label_draws
    if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int)
                               or refine < 0):
        raise RecipeError(f"refine must be an integer >= 0 (rounds), got {refine!r}")
    if refine is not None and base.rounding != "rtn":
        changes["refine"] = refine
    unknown = set(changes) - {f.name for f in dataclasses.fields(Recipe)}
    if unknown:
        raise RecipeError(f"unknown recipe fields {sorted(unknown)}")
    return base.replace(**changes)
