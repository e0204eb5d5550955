"""Benchmark RTN / LDLQ / YAQA rounding: wall time per layer shape, and proxy-loss ratios.

    python bench/rounding.py                     # CPU: 576x1536 timing + small proxy study
    python bench/rounding.py --device cuda       # 4096², 14336x4096, 4096x14336, 576x1536
    python bench/rounding.py --check             # also CUDA-vs-CPU agreement of the codes

Times are the whole ``round_weight`` call (validation, normalisation, damping, block LDL in fp64,
grid fit, rounding, reconstruction; no proxy evaluation), median of ``--repeats`` after one warm-up,
with the device synchronised.  ``engine`` is the rounding loop alone on prepared factors.
Writes ``bench/results/rounding_<device>.{json,md}`` and merges all of them into
``bench/results/rounding.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from yaqa.quantizers import make_quantizer
from yaqa.rounding import ldlq_round, prepare_factor, round_weight, yaqa_round
from yaqa.rounding.threads import small_cpu_problem_threads

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def synthetic_factor(k: int, device: str, gen: torch.Generator, decay: float = 4.0) -> torch.Tensor:
    """PSD factor like a sketch from few samples: rank k/2, decaying spectrum, random directions."""
    r = max(k // 2, 1)
    X = torch.randn(k, r, generator=gen).to(device)
    X *= torch.exp(-decay * torch.linspace(0, 1, r, device=device))
    return X @ X.T / r


def correlated_factor(k: int, gen: torch.Generator, device: str) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    lam = torch.exp(-torch.linspace(0, 8, k, dtype=torch.float64)) + 1e-3
    return ((Q * lam) @ Q.T).to(device)


def timeit(fn, device: str, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, cuSOLVER handles
    sync(device)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(m: int, n: int, device: str, repeats: int, quant: str, group: int) -> dict:
    gen = torch.Generator().manual_seed(m * 31 + n)
    W = (torch.randn(m, n, generator=gen) * 0.02).to(device)
    Hi, Ho = synthetic_factor(n, device, gen), synthetic_factor(m, device, gen)
    q = make_quantizer(quant, group_size=group)
    row: dict = {"shape": f"{m}x{n}", "m": m, "n": n, "device": device}
    for method in ("rtn", "ldlq", "yaqa"):
        row[f"{method}_s"] = timeit(lambda: round_weight(W, Hi, Ho, q, method), device, repeats)
    row["yaqa_rht_s"] = timeit(lambda: round_weight(W, Hi, Ho, q, "yaqa", incoherence=True),
                               device, repeats)
    # The rounding loop alone, on prepared factors (what the block size and wavefront change).
    # Same threading as inside round_weight, so the parts add up to the whole.
    with small_cpu_problem_threads(W):
        pi, po = prepare_factor(Hi, 16), prepare_factor(Ho, 16)
        grid = q.fit(W)
        row["ldlq_engine_s"] = timeit(lambda: ldlq_round(W, grid, pi.A, 16), device, repeats)
        row["yaqa_engine_s"] = timeit(lambda: yaqa_round(W, grid, pi.A, po.A, 16, 16), device,
                                      repeats)
        row["prepare_s"] = timeit(lambda: (prepare_factor(Hi, 16), prepare_factor(Ho, 16)),
                                  device, 1)
    r = {k: round_weight(W, Hi, Ho, q, k, return_details=True) for k in ("rtn", "ldlq", "yaqa")}
    row["proxy_rel"] = {k: v.proxy_loss_relative for k, v in r.items()}
    del W, Hi, Ho, pi, po, r
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def proxy_study(shape: tuple[int, int], seeds: int, device: str) -> list[dict]:
    """Mean proxy losses on random PD Kronecker problems; ratios YAQA/LDLQ, LDLQ/RTN, YAQA/RTN."""
    m, n = shape
    out = []
    for quant in ("int4", "int3"):
        for inc in (False, True):
            acc = {"rtn": 0.0, "ldlq": 0.0, "yaqa": 0.0}
            for s in range(seeds):
                gen = torch.Generator().manual_seed(1000 + s)
                W = torch.randn(m, n, generator=gen).to(device)
                Hi, Ho = correlated_factor(n, gen, device), correlated_factor(m, gen, device)
                for method in acc:
                    acc[method] += round_weight(W, Hi, Ho, quant, method, group_size=128,
                                                incoherence=inc, return_details=True).proxy_loss
            out.append({
                "shape": f"{m}x{n}", "quantizer": f"{quant} g128", "incoherence": inc, "seeds": seeds,
                "yaqa/ldlq": acc["yaqa"] / acc["ldlq"], "ldlq/rtn": acc["ldlq"] / acc["rtn"],
                "yaqa/rtn": acc["yaqa"] / acc["rtn"],
            })
    return out


def cuda_check() -> dict:
    """Same problem on CPU and CUDA: fraction of equal codes (fp32 GEMMs may round differently)."""
    gen = torch.Generator().manual_seed(7)
    m, n = 256, 512
    W = torch.randn(m, n, generator=gen)
    Hi, Ho = correlated_factor(n, gen, "cpu"), correlated_factor(m, gen, "cpu")
    res = {}
    for method in ("ldlq", "yaqa"):
        a = round_weight(W, Hi, Ho, "int4", method, return_details=True)
        b = round_weight(W.cuda(), Hi.cuda(), Ho.cuda(), "int4", method, return_details=True)
        res[method] = {
            "codes_equal_fraction": (a.codes == b.codes.cpu()).float().mean().item(),
            "proxy_cpu": a.proxy_loss, "proxy_cuda": b.proxy_loss,
        }
    return res


def machine(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    # Shared CPUs distort CPU timings; keep the load next to the numbers.
    info["loadavg_1min_at_start"] = round(os.getloadavg()[0], 2)
    return info


def to_markdown(res: dict) -> str:
    mach = res["machine"]
    lines = [f"### {mach.get('gpu', mach.get('cpu', 'cpu'))} ({res['device']})", "",
             f"- command: `{res['command']}`", f"- date: {res['date']}",
             f"- torch {mach['torch']}, CPU threads {mach['cpu_threads']}, {mach.get('cpu', '')}, "
             f"1-min load average at start {mach.get('loadavg_1min_at_start', '?')}",
             f"- quantizer: {res['quantizer']}, block 16×16, σ = 0.01, synthetic rank-n/2 factors", "",
             "| shape (m×n) | RTN s | LDLQ s | YAQA s | YAQA+RHT s | LDLQ loop s | YAQA loop s | "
             "prep (2 LDL) s | rel. proxy RTN / LDLQ / YAQA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["timings"]:
        p = r["proxy_rel"]
        lines.append(
            f"| {r['shape']} | {r['rtn_s']:.3f} | {r['ldlq_s']:.3f} | {r['yaqa_s']:.3f} | "
            f"{r['yaqa_rht_s']:.3f} | {r['ldlq_engine_s']:.3f} | {r['yaqa_engine_s']:.3f} | "
            f"{r['prepare_s']:.3f} | {p['rtn']:.2e} / {p['ldlq']:.2e} / {p['yaqa']:.2e} |")
    if res.get("proxy_study"):
        lines += ["", "Proxy-loss ratios, mean over seeds, random PD Kronecker factors "
                  "(eigenvalues e^(−8t)+1e-3, random eigenvectors):", "",
                  "| shape | quantizer | RHT | YAQA/LDLQ | LDLQ/RTN | YAQA/RTN |", "|---|---|---|---|---|---|"]
        for p in res["proxy_study"]:
            lines.append(f"| {p['shape']} | {p['quantizer']} | {p['incoherence']} | {p['yaqa/ldlq']:.3f} "
                         f"| {p['ldlq/rtn']:.3f} | {p['yaqa/rtn']:.3f} |")
    if res.get("cuda_check"):
        lines += ["", f"CUDA vs CPU (256×512): `{json.dumps(res['cuda_check'])}`"]
    return "\n".join(lines) + "\n"


def merge(out_dir: Path) -> None:
    parts = sorted(out_dir.glob("rounding_*.json"))
    allres = [json.loads(p.read_text()) for p in parts]
    (out_dir / "rounding.json").write_text(json.dumps(allres, indent=2))
    md = ["# Rounding benchmark", "",
          "Produced by `bench/rounding.py`; one section per machine. Targets: 4096² YAQA < 1.2 s and "
          "14336×4096 < 5 s on an H100; 576×1536 < 2 s on a 2-core CPU.", ""]
    md += [to_markdown(r) for r in allres]
    (out_dir / "rounding.md").write_text("\n".join(md))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=None, help="e.g. 4096x4096,14336x4096")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantizer", default="int4")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--proxy-shape", default=None, help="shape of the proxy-ratio study, e.g. 512x1024")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--check", action="store_true", help="CUDA vs CPU agreement")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    dev = args.device
    cuda = dev.startswith("cuda")
    shapes = args.shapes or ("4096x4096,14336x4096,4096x14336,576x1536" if cuda else "576x1536")
    proxy_shape = args.proxy_shape or ("1024x2048" if cuda else "256x512")
    res = {"device": dev, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
           "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine(dev),
           "quantizer": f"{args.quantizer} g{args.group_size}", "timings": []}
    for shp in shapes.split(","):
        m, n = (int(x) for x in shp.lower().split("x"))
        row = bench_shape(m, n, dev, args.repeats, args.quantizer, args.group_size)
        res["timings"].append(row)
        print(f"{row['shape']:>11}  rtn {row['rtn_s']:.3f}  ldlq {row['ldlq_s']:.3f}  "
              f"yaqa {row['yaqa_s']:.3f}  yaqa+rht {row['yaqa_rht_s']:.3f}  "
              f"(loops {row['ldlq_engine_s']:.3f} / {row['yaqa_engine_s']:.3f}, prep {row['prepare_s']:.3f})",
              flush=True)
    pm, pn = (int(x) for x in proxy_shape.split("x"))
    res["proxy_study"] = proxy_study((pm, pn), args.seeds, dev)
    for p in res["proxy_study"]:
        print(f"proxy {p['shape']} {p['quantizer']} rht={p['incoherence']}: yaqa/ldlq {p['yaqa/ldlq']:.3f}  "
              f"ldlq/rtn {p['ldlq/rtn']:.3f}  yaqa/rtn {p['yaqa/rtn']:.3f}", flush=True)
    if args.check and cuda:
        res["cuda_check"] = cuda_check()
        print("cuda check", json.dumps(res["cuda_check"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if cuda else "cpu"
    (out / f"rounding_{tag}.json").write_text(json.dumps(res, indent=2))
    (out / f"rounding_{tag}.md").write_text(to_markdown(res))
    merge(out)
    print(to_markdown(res))


if __name__ == "__main__":
    main()
