"""Benchmark Hessian collection: speed vs the model's own forward+backward, and fast-path accuracy.

GPU (default when CUDA is present): a Llama-3.1-8B-shaped slice (hidden 4096, MLP 14336,
32/8 heads, vocab 128256, random bf16 weights, --layers decoder layers) at ctx 2048, batch 2:

    python bench/hessians.py --layers 2 --out-dir bench/results
    torchrun --nproc-per-node=1 bench/hessians.py --dist-check     # NCCL path, 1 GPU

CPU: time to collect Sketch B on a SmolLM2-135M-shaped model (random weights):

    python bench/hessians.py --smollm-cpu --n-seqs 16 --ctx 512
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

from yaqa.hessians import HessianCollector, LayerAccumulator, collect_hessians
from yaqa.hessians.accumulators import choose_route, sym_flop_fraction
from yaqa.hessians.labels import sampled_label_grad
from yaqa.models import get_adapter

log = logging.getLogger("bench.hessians")


def llama_slice(layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def smollm_like(layers: int = 30) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
        max_position_embeddings=8192, tie_word_embeddings=True)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


# -- timing helpers ------------------------------------------------------------------------------

def cuda_time(fn, steps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(steps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return out


def plain_step_fn(model, ids_list):
    """Forward + backward with sampled-label CE, params frozen, no statistics: the floor."""
    blocks = get_adapter(model).blocks(model)
    for p in model.parameters():
        p.requires_grad_(False)

    def leaf(module, args, kwargs):
        return (args[0].detach().requires_grad_(),) + tuple(args[1:]), kwargs
    blocks[0].register_forward_pre_hook(leaf, with_kwargs=True)
    gen = torch.Generator(device="cuda")
    state = {"i": 0}

    def step():
        ids = ids_list[state["i"] % len(ids_list)]
        state["i"] += 1
        logits = model(input_ids=ids, use_cache=False).logits
        grad, _ = sampled_label_grad(logits.detach(), range(ids.shape[0]), 0, gen)
        logits.backward(grad)
    return step


def collector_step_fn(col: HessianCollector, ids_list):
    state = {"i": 0}

    def step():
        ids = ids_list[state["i"] % len(ids_list)]
        col.step(ids, range(state["i"] * ids.shape[0], (state["i"] + 1) * ids.shape[0]))
        state["i"] += 1
    return step


# -- flop counts ---------------------------------------------------------------------------------

def model_flops(model, b: int, T: int) -> float:
    """Matmul flops of one fwd + activation-only bwd: 4·params·tokens for linears and lm_head,
    causal attention 2bT²d forward and 4bT²d backward per layer."""
    cfg = model.config
    lin = sum(mod.weight.numel() for _, _, mod in get_adapter(model).named_linears(model))
    lin += model.lm_head.weight.numel()
    attn = 6 * b * T * T * cfg.hidden_size * cfg.num_hidden_layers
    return 4 * lin * b * T + attn


def stats_flops(model, b: int, T: int, collect_hx: bool = True) -> tuple[float, float]:
    """(dense-equivalent, executed) flops of one Sketch-B micro-batch over all linears."""
    dense = executed = 0.0
    for _, _, mod in get_adapter(model).named_linears(model):
        m, n = mod.out_features, mod.in_features

        sym = sym_flop_fraction  # fraction of a k×k symmetric product actually computed
        if choose_route(T, m, n) == "gram":
            first = 2 * T * T * (m + n)
            second = 2 * T * T * (m + n) + 2 * T * (n * n + m * m)
            second_ex = 2 * T * T * (m + n) + 2 * T * (n * n * sym(n) + m * m * sym(m))
        else:
            first = 2 * T * m * n
            second = 2 * m * n * (m + n)
            second_ex = 2 * m * n * (m * sym(m) + n * sym(n))
        hx = 2 * T * n * n if collect_hx else 0
        dense += b * (first + second + hx)
        executed += b * (first + second_ex + hx * sym(n))
    return dense, executed


# -- accuracy ------------------------------------------------------------------------------------

def capture_xg(model, ids_list):
    """(X, G) of every linear for each micro-batch, through the collector's own hooks."""
    caught = [{} for _ in ids_list]
    col = HessianCollector(model, range(len(get_adapter(model).blocks(model))))
    cur = {}

    def grab(name, x, g):
        b = cur["ids"].shape[0]
        cur["out"][name] = (x.reshape(b, -1, x.shape[-1]), g.reshape(b, -1, g.shape[-1]))
    col._on_backward = grab
    with col:
        col.begin_pass("b")
        for k, ids in enumerate(ids_list):
            cur.update(ids=ids, out=caught[k])
            col.step(ids, range(k * ids.shape[0], (k + 1) * ids.shape[0]))
    return caught


def factors_for(batches, kind: str, dtype, precision, h_in=None):
    n, m = batches[0][0].shape[-1], batches[0][1].shape[-1]
    acc = LayerAccumulator(n, m, device=batches[0][0].device, dtype=dtype, precision=precision)
    if kind == "a_out":
        acc.factors["H_in"] = h_in.to(dtype)
    acc.begin_pass(kind)
    for X, G in batches:
        acc.update_backward(X, G)
    acc.end_pass()
    return acc.factors


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def accuracy(model, ids_list, precisions) -> dict:
    """Relative Frobenius error vs fp64 of factors from 1 micro-batch and from all of them
    (rounding errors are zero-mean, so they shrink as sequences accumulate; the signal does not)."""
    caught = capture_xg(model, ids_list)
    out = {}
    for name in caught[0]:
        row = {p: {} for p in precisions}
        for nb in sorted({1, len(ids_list)}):
            batches = [c[name] for c in caught[:nb]]
            ref = factors_for(batches, "b", torch.float64, "full")
            ref_a = factors_for(batches, "a_out", torch.float64, "full", h_in=ref["H_x"])
            for p in precisions:
                f = factors_for(batches, "b", torch.float32, p)
                row[p].update({f"{k}@{nb}": rel(f[k], ref[k]) for k in ("H_in", "H_out", "H_x")})
                f = factors_for(batches, "a_out", torch.float32, p, h_in=ref["H_x"])
                row[p][f"A_H_out@{nb}"] = rel(f["H_out"], ref_a["H_out"])
                del f
            del ref, ref_a
            torch.cuda.empty_cache()
        out[name] = row
    return out


# -- per-layer microbenchmark ---------------------------------------------------------------------

def layer_micro(b: int, T: int, steps: int) -> list[dict]:
    """One layer's statistic cost vs the reference-style fp32 einsum and the layer's own
    bf16 forward + input-gradient backward."""
    rows = []
    for m, n in ((4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)):
        X = torch.randn(b, T, n, device="cuda", dtype=torch.bfloat16)
        G = torch.randn(b, T, m, device="cuda", dtype=torch.bfloat16) * 1e-2
        W = torch.randn(m, n, device="cuda", dtype=torch.bfloat16) * n ** -0.5
        row = {"m": m, "n": n, "route": choose_route(T, m, n)}
        row["layer_fwd_bwd_ms"] = 1e3 * statistics.median(
            cuda_time(lambda: (X @ W.T, G @ W), steps, 2))
        for p in ("tf32", "mixed", "bf16"):
            acc = LayerAccumulator(n, m, device="cuda", precision=p, collect_hx=False)
            acc.begin_pass("b")
            row[f"yaqa_{p}_ms"] = 1e3 * statistics.median(
                cuda_time(lambda: acc.update_backward(X, G), steps, 2))
            del acc
        Xf, Gf = X.float(), G.float()
        torch.backends.cuda.matmul.fp32_precision = "ieee"

        def reference():  # the straightforward fp32 order: ∇W_b, then both Grams of it
            Dg = torch.einsum("btm,btn->bmn", Gf, Xf)
            return torch.einsum("bmn,bmk->nk", Dg, Dg), torch.einsum("bmn,bkn->mk", Dg, Dg)
        row["einsum_fp32_ms"] = 1e3 * statistics.median(cuda_time(reference, max(2, steps // 2),
                                                                  1))
        rows.append(row)
        del X, G, W, Xf, Gf
        torch.cuda.empty_cache()
    return rows


# -- main modes ----------------------------------------------------------------------------------

def gpu_bench(args) -> dict:
    torch.manual_seed(0)
    b, T = args.batch, args.ctx
    dev = torch.cuda.get_device_properties(0)
    res = {"device": dev.name, "torch": torch.__version__, "transformers": transformers.__version__,
           "layers": args.layers, "batch": b, "ctx": T, "steps": args.steps,
           "command": " ".join(["python"] + sys.argv)}
    t0 = time.time()
    model = llama_slice(args.layers, "cuda", torch.bfloat16)
    log.info("model built in %.1fs", time.time() - t0)
    ids_list = [torch.randint(0, 128256, (b, T), device="cuda") for _ in range(args.acc_batches)]
    tokens = b * T
    mf = model_flops(model, b, T)
    sf_dense, sf_exec = stats_flops(model, b, T)
    res["model_tflop_per_step"] = mf / 1e12
    res["stats_tflop_per_step_dense"] = sf_dense / 1e12
    res["stats_tflop_per_step_executed"] = sf_exec / 1e12

    def record(label, times, peak):
        t = statistics.median(times)
        res[label] = {"s_per_step": t, "tokens_per_s": tokens / t, "peak_gib": peak / 2**30,
                      "times": times}
        log.info("%-22s %8.1f ms  %9.0f tok/s  peak %.1f GiB", label, 1e3 * t, tokens / t,
                 peak / 2**30)
        return t

    torch.cuda.reset_peak_memory_stats()
    t_plain = record("plain_fwd_bwd", cuda_time(plain_step_fn(model, ids_list), args.steps, 2),
                     torch.cuda.max_memory_allocated())
    res["plain_fwd_bwd"]["model_tflops"] = mf / t_plain / 1e12
    # plain_step_fn left a leaf hook on block 0; the collector adds its own, same effect
    for p in args.precisions:
        for hx in (True, False) if p == args.precisions[0] else (True,):
            with HessianCollector(model, range(args.layers), precision=p, collect_hx=hx) as col:
                col.begin_pass("b")
                torch.cuda.reset_peak_memory_stats()
                label = f"sketch_B_{p}" + ("" if hx else "_noHx")
                t = record(label, cuda_time(collector_step_fn(col, ids_list), args.steps, 2),
                           torch.cuda.max_memory_allocated())
                _, ex = stats_flops(model, b, T, hx)
                res[label]["x_plain"] = t / t_plain
                res[label]["stats_tflops_executed"] = ex / max(t - t_plain, 1e-9) / 1e12
            del col
            torch.cuda.empty_cache()
    with HessianCollector(model, range(args.layers), precision=args.precisions[0]) as col:
        col.begin_pass("hx")
        torch.cuda.reset_peak_memory_stats()
        record("sketch_A_pass0_forward_only",
               cuda_time(collector_step_fn(col, ids_list), args.steps, 1),
               torch.cuda.max_memory_allocated())
        col.end_pass()
        col.begin_pass("a_out")
        torch.cuda.reset_peak_memory_stats()
        t = record("sketch_A_half_iteration", cuda_time(collector_step_fn(col, ids_list),
                                                        args.steps, 2),
                   torch.cuda.max_memory_allocated())
        res["sketch_A_half_iteration"]["x_plain"] = t / t_plain
    del col
    torch.cuda.empty_cache()
    if not args.skip_accuracy:
        try:
            acc = accuracy(model, ids_list, args.precisions)
        except Exception:  # keep the timings of this (expensive) run whatever happens here
            log.exception("accuracy check failed")
            acc = {}
        res["accuracy_vs_fp64"] = acc
        for p in args.precisions:
            for nb in sorted({1, len(ids_list)}):
                worst = max((e for v in acc.values() for k, e in v[p].items()
                             if k.endswith(f"@{nb}")), default=float("nan"))
                res[f"worst_rel_err_{p}_{nb}batches"] = worst
                log.info("worst rel Frobenius error vs fp64, %-5s after %d micro-batch(es): %.2e",
                         p, nb, worst)
    if not args.skip_micro:
        del model
        torch.cuda.empty_cache()
        try:
            res["per_layer"] = layer_micro(b, T, args.steps)
        except Exception:
            log.exception("per-layer benchmark failed")
            res["per_layer"] = []
        for r in res["per_layer"]:
            log.info("layer %5dx%-5d %s: einsum %.1f ms, yaqa tf32 %.1f / mixed %.1f / bf16 %.1f "
                     "ms, layer fwd+bwd %.2f ms", r["m"], r["n"], r["route"],
                     r["einsum_fp32_ms"], r["yaqa_tf32_ms"], r["yaqa_mixed_ms"],
                     r["yaqa_bf16_ms"], r["layer_fwd_bwd_ms"])
    return res


def dist_check() -> dict:
    """Under torchrun: NCCL-reduced collection on a small model equals a local run."""
    from yaqa.hessians import maybe_init_distributed
    import torch.distributed as dist
    maybe_init_distributed()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tiny_models import tiny_model
    model = tiny_model("llama", hidden=256, intermediate=512, layers=2, vocab=1024).cuda()
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    got = collect_hessians(model, ids, sketch="B", batch_size=2, progress=False)
    backend = dist.get_backend() if dist.is_initialized() else None
    world = dist.get_world_size() if dist.is_initialized() else 1
    if dist.is_initialized():
        dist.destroy_process_group()
    ref = collect_hessians(model, ids, sketch="B", batch_size=2, progress=False)
    err = max(rel(got[n].H_in, ref[n].H_in) for n in ref)
    return {"backend": backend, "world": world, "max_rel_err_vs_local": err,
            "device": torch.cuda.get_device_name(0)}


def smollm_cpu(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    model = smollm_like()
    ids = torch.randint(0, 49152, (args.n_seqs, args.ctx), generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    with torch.no_grad():
        model(input_ids=ids[: args.batch], use_cache=False)
    t_fwd = time.time() - t0
    t0 = time.time()
    collect_hessians(model, ids, sketch="B", batch_size=args.batch, progress=True)
    t = time.time() - t0
    return {"model": "SmolLM2-135M-shaped (random weights)", "n_seqs": args.n_seqs,
            "ctx": args.ctx, "batch": args.batch, "threads": torch.get_num_threads(),
            "seconds": t, "tokens_per_s": args.n_seqs * args.ctx / t,
            "one_forward_s": t_fwd, "cpu": platform.processor() or platform.machine(),
            "load_avg": os.getloadavg()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precisions", nargs="+", default=["tf32", "mixed", "bf16"])
    ap.add_argument("--acc-batches", type=int, default=8)
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-micro", action="store_true")
    ap.add_argument("--smollm-cpu", action="store_true")
    ap.add_argument("--n-seqs", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--dist-check", action="store_true")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dist_check:
        res, name = dist_check(), "hessians_nccl"
    elif args.smollm_cpu:
        if args.ctx == 2048:
            args.ctx = 512
        res, name = smollm_cpu(args), "hessians_cpu_smollm"
    else:
        res, name = gpu_bench(args), "hessians"
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}{args.tag}.json"
    if int(os.environ.get("RANK", "0")) == 0:
        path.write_text(json.dumps(res, indent=1))
        log.info("wrote %s", path)
        print(json.dumps({k: v for k, v in res.items()
                          if k not in ("accuracy_vs_fp64", "per_layer")}, indent=1))


if __name__ == "__main__":
    main()
