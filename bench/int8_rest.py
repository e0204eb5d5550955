"""What int8 embeddings and LM head cost and save, on the embedded SmolLM2-135M-Instruct.

    python bench/int8_rest.py [--n-eval 8] [--ctx 256] [--device cpu] [--out bench/results/int8_rest_cpu.json]

Quantizes the linears with int4 RTN (g64, yaqa's default incoherence), saves the checkpoint
twice (embedding/head in the model's 16-bit dtype, and ``embeddings="int8"``), reloads both
through ``yaqa.load`` and measures on WikiText-2 test windows: checkpoint sizes, the loaded
embedding/head bytes, and KL / perplexity / top-1 against the original, plus the original with
only its embedding/head made int8.  A few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaqa  # noqa: E402
from yaqa.data import eval_windows, find_wikitext2  # noqa: E402
from yaqa.io.checkpoint import dir_size  # noqa: E402
from yaqa.nn.int8 import Int8Embedding, Int8Linear, quantize_embeddings  # noqa: E402


def embed_head_bytes(model: torch.nn.Module) -> int:
    """Bytes of the input embedding and LM head (parameters and buffers, shared ones once)."""
    mods = [model.get_input_embeddings(), model.get_output_embeddings()]
    seen, total = set(), 0
    for m in mods:
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-eval", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="bench/results/int8_rest_cpu.json")
    args = ap.parse_args()
    torch.manual_seed(0)

    model, tok = yaqa.load_model(None, dtype="float32", device=args.device)
    print(f"WikiText-2 from {find_wikitext2()}", flush=True)
    ev = eval_windows(tok, "wikitext2-test", args.ctx, args.n_eval)
    rows = {}

    def measure(name: str, m: torch.nn.Module, **extra) -> None:
        t = time.perf_counter()
        r = yaqa.evaluate.compare(model, m, ev, batch_size=4, progress=False)
        rows[name] = {"kl": r.kl, "kl_p99": r.kl_p99, "ppl": r.ppl, "ref_ppl": r.ref_ppl,
                      "top1": r.top1, "eval_s": time.perf_counter() - t,
                      "embed_head_bytes": embed_head_bytes(m), **extra}
        print(f"{name:28s} KL {r.kl:.5f}  ppl {r.ppl:.3f} (ref {r.ref_ppl:.3f})  "
              f"top1 {r.top1:.4f}  embed+head {rows[name]['embed_head_bytes'] / 1e6:.1f} MB",
              flush=True)

    only8 = copy.deepcopy(model)
    quantize_embeddings(only8)
    measure("original linears, int8 emb/head", only8)  # in float32, as evaluated
    del only8

    q = copy.deepcopy(model)
    yaqa.quantize(q, method="rtn", quantizer="int4", group_size=64, progress=False)
    with tempfile.TemporaryDirectory() as d:
        sizes = {}
        for emb in ("auto", "int8"):
            saved = yaqa.save_quantized(q, Path(d) / emb, tokenizer=tok, embeddings=emb)
            sizes[emb] = {"weights_bytes": saved.weights_bytes, "dir_bytes": dir_size(saved.path),
                          # as loaded for use: the checkpoint's dtype (bf16), not float32
                          "embed_head_bytes_loaded": embed_head_bytes(yaqa.load(saved.path))}
            loaded = yaqa.load(saved.path, device=args.device, dtype=torch.float32,
                               dense_cache=True)
            kind = {type(loaded.get_input_embeddings()).__name__,
                    type(loaded.get_output_embeddings()).__name__}
            assert (emb == "int8") == (kind <= {Int8Embedding.__name__, Int8Linear.__name__})
            measure(f"int4 RTN g64, emb/head {'int8' if emb == 'int8' else '16-bit'}", loaded,
                    **sizes[emb])
            del loaded
    for emb, s in sizes.items():
        print(f"checkpoint ({emb}): {s['weights_bytes'] / 1e6:.2f} MB model.safetensors, "
              f"{s['dir_bytes'] / 1e6:.2f} MB directory; embedding+head loaded "
              f"{s['embed_head_bytes_loaded'] / 1e6:.2f} MB")
    result = {"machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                         f"{torch.get_num_threads()} threads, torch {torch.__version__}",
              "command": " ".join(["python"] + sys.argv), "eval": f"WikiText-2 test, "
              f"{ev.shape[0]} x {ev.shape[1]} tokens", "rows": rows, "checkpoints": sizes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
