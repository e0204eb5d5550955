"""Inference speed and memory of packed int-k models against bf16, in one run.

    python bench/inference.py --device cuda                 # Llama-3.1-8B shape, ~5-7 min on an H100
    python bench/inference.py --device cpu --tiny           # smoke test of the script

Builds a Llama-3.1-8B-shaped model with random weights from its config (no download), then for
bf16, int4 g128 and int4 g128 + incoherence (RTN; speed does not depend on the rounding method):

- GPU memory after loading, and the bytes of the decoder linears alone;
- batch-1 decode tokens/s with ``generate`` and a static cache (transformers compiles the forward
  with ``torch.compile(mode="reduce-overhead")`` for static caches on CUDA; ``--no-compile`` turns
  that off);
- prefill latency of ``--prefill`` tokens;
- per-layer matrix-vector kernel bandwidth (packed bytes read / time) for the four Llama shapes,
  with the kernel's error against the dense dequantized weight.

Writes ``bench/results/inference-<device>.json`` and a markdown table next to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaqa  # noqa: E402
from yaqa.nn import QuantizedLinear  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                rope_theta=500000.0, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            tie_word_embeddings=False)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int) -> float:
    """Median wall seconds of ``fn`` (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        sync(dev)
        t = time.perf_counter()
        fn()
        sync(dev)
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def build(cfg: dict, dev, dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(dev):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def linear_bytes(model) -> int:
    total = 0
    for m in model.model.layers.modules():
        if isinstance(m, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
            total += sum(p.numel() * p.element_size() for p in m.parameters())
        elif isinstance(m, torch.nn.Linear):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def measure_model(model, dev, args) -> dict:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    res = {"memory_bytes": torch.cuda.memory_allocated() if dev.type == "cuda" else None,
           "linear_bytes": linear_bytes(model)}
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(dev)

    def gen(n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  cache_implementation="static", disable_compile=not args.compile,
                                  pad_token_id=0)

    t0 = time.perf_counter()
    gen(args.new_tokens)  # compiles (if enabled) and warms up
    res["warmup_s"] = time.perf_counter() - t0
    t_short = timed(lambda: gen(2), dev, 3)
    t_long = timed(lambda: gen(args.new_tokens), dev, 3)
    res["decode_tok_s"] = (args.new_tokens - 2) / max(t_long - t_short, 1e-9)
    long = torch.randint(0, vocab, (1, args.prefill), generator=g).to(dev)

    def prefill():
        with torch.no_grad():
            model(long, use_cache=False, logits_to_keep=1)

    res["prefill_s"] = timed(prefill, dev, 5)
    return res


def kernel_bandwidth(dev, args) -> list[dict]:
    """Matrix-vector time and GB/s of packed int4 g128 against bf16, per Llama-8B shape."""
    from yaqa.quantizers import IntQuantizer

    shapes = {"q/o_proj": (4096, 4096), "k/v_proj": (1024, 4096), "gate/up_proj": (14336, 4096),
              "down_proj": (4096, 14336)}
    if args.tiny:
        shapes = {k: (m // 16, n // 16) for k, (m, n) in shapes.items()}
    rows = []
    for name, (m, n) in shapes.items():
        for bits in args.kernel_bits:
            torch.manual_seed(0)
            W = torch.randn(m, n, device=dev) * 0.02
            q = IntQuantizer(bits=bits, group_size=128)
            grid = q.fit(W)
            _, codes = grid.round_all(W)
            ql = QuantizedLinear.from_codes(codes, grid, q, dtype=torch.bfloat16)
            dense = grid.dequantize(codes).to(torch.bfloat16)
            x = torch.randn(1, n, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                ref = x.float() @ dense.float().T
                err = ((ql(x).float() - ref).norm() / ref.norm()).item()
                t_q = _bench(lambda: ql(x), dev)
                t_d = _bench(lambda: torch.nn.functional.linear(x, dense), dev)
            qbytes = sum(b.numel() * b.element_size() for b in ql.buffers())
            rows.append({"layer": name, "shape": [m, n], "bits": bits, "rel_err": err,
                         "us_packed": t_q * 1e6, "us_bf16": t_d * 1e6,
                         "GBs_packed": qbytes / t_q / 1e9, "GBs_bf16": m * n * 2 / t_d / 1e9,
                         "speedup": t_d / t_q})
            del W, ql, dense
    return rows


def _bench(fn, dev) -> float:
    """GPU time of ``fn``: replays of a CUDA graph, so Python launch overhead is not counted
    (decode runs under CUDA graphs too)."""
    if dev.type == "cuda":
        from triton.testing import do_bench

        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                fn()
        return do_bench(graph.replay, warmup=25, rep=200, return_mode="median") / 1e3 / 20
    return timed(fn, dev, 5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer toy model (smoke test)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--variants", default="bf16,int4,int4-inc")
    ap.add_argument("--kernel-bits", type=lambda s: [int(b) for b in s.split(",")],
                    default=[4], help="bit widths for the per-layer kernel table "
                    "(each adds ~15 s of autotuning)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cfg = dict(TINY if args.tiny else LLAMA_8B)
    if args.layers:
        cfg["num_hidden_layers"] = args.layers
    if args.tiny:
        args.prefill = min(args.prefill, 256)
        args.new_tokens = min(args.new_tokens, 16)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    t_all = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "config": cfg,
              "variants": {}}
    print("kernels ...", flush=True)
    report["kernels"] = kernel_bandwidth(dev, args)
    for r in report["kernels"]:
        print(f"  {r['layer']:<13} {r['shape']} int{r['bits']}: {r['us_packed']:7.1f} us "
              f"{r['GBs_packed']:7.0f} GB/s (bf16 {r['us_bf16']:7.1f} us {r['GBs_bf16']:6.0f} GB/s)"
              f"  x{r['speedup']:.2f}  err {r['rel_err']:.1e}", flush=True)
    for variant in args.variants.split(","):
        t = time.perf_counter()
        model = build(cfg, dev, dtype)
        if variant != "bf16":
            yaqa.quantize(model, method="rtn", quantizer="int4", group_size=128,
                          incoherence=variant.endswith("-inc"), device=dev, progress=False)
        built = time.perf_counter() - t
        res = measure_model(model, dev, args)
        res["build_s"] = built
        report["variants"][variant] = res
        print(f"{variant}: {json.dumps(res)}", flush=True)
        del model
    base = report["variants"].get("bf16")
    lines = ["| variant | memory GiB | linears GiB | linears vs bf16 | decode tok/s | vs bf16 | "
             "prefill ms | vs bf16 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        mem = f"{r['memory_bytes'] / 2**30:.2f}" if r["memory_bytes"] else "-"
        rel = (lambda a, b: f"{a / b:.2f}x") if base else (lambda a, b: "-")
        lines.append(f"| {name} | {mem} | {r['linear_bytes'] / 2**30:.2f} | "
                     f"{rel(r['linear_bytes'], base['linear_bytes']) if base else '-'} | "
                     f"{r['decode_tok_s']:.1f} | "
                     f"{rel(r['decode_tok_s'], base['decode_tok_s']) if base else '-'} | "
                     f"{r['prefill_s'] * 1e3:.1f} | "
                     f"{rel(base['prefill_s'], r['prefill_s']) if base else '-'} |")
    lines += ["", "| layer | shape | bits | packed us | packed GB/s | bf16 us | bf16 GB/s | speedup |"
              " rel err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["kernels"]:
        lines.append(f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['bits']} | "
                     f"{r['us_packed']:.1f} | {r['GBs_packed']:.0f} | {r['us_bf16']:.1f} | "
                     f"{r['GBs_bf16']:.0f} | {r['speedup']:.2f} | {r['rel_err']:.1e} |")
    report["total_s"] = time.perf_counter() - t_all
    table = "\n".join(lines)
    print(table)
    out = Path(args.out or Path(__file__).parent / "results" / f"inference-{dev.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(f"`{report['command']}` on {report['device']}, torch "
                                      f"{report['torch']}, {report['total_s']:.0f} s\n\n{table}\n")
    print(f"wrote {out} ({report['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
