"""Data-parallel collection (2 gloo processes on CPU) equals a single-process run."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import yaqa
from yaqa.hessians import run_collection

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402

SEED = 3


def _data() -> torch.Tensor:
    # 7 sequences in micro-batches of 2: 4 micro-batches, so one rank gets one more than the other
    return torch.randint(0, 128, (7, 10), generator=torch.Generator().manual_seed(5))


def _run(sketch: str, power_iters: int, out_dir: str | None,
         label_draws: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_model("llama", dtype=torch.float64)
    hs = yaqa.collect_hessians(model, _data(), sketch=sketch, power_iters=power_iters, seed=SEED,
                               dtype=torch.float64, batch_size=2, out_dir=out_dir,
                               checkpoint_every=2 if out_dir else None, progress=False,
                               label_draws=label_draws)
    return {n: {"H_in": h.H_in, "H_out": h.H_out, "H_x": h.H_x,
                "n": torch.tensor([h.n_seqs, h.n_tokens]),
                "stats": torch.tensor([(h.shrinkage or {}).get(k, 0.0)
                                       for k in ("mean_sq", "mean_sq_out")])}
            for n, h in hs.items()}


def _worker(rank: int, world: int, port: int, out: str, ckpt_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        res = {"B": _run("B", 1, None), "A": _run("A", 2, None), "B_ckpt": _run("B", 1, ckpt_dir),
               "B_draws": _run("B", 1, None, label_draws=2)}
        # the store's path: the last pass's factors streamed off one linear at a time
        run_collection(tiny_model("llama", dtype=torch.float64), _data(),
                       f"{ckpt_dir}_streamed", sketch="B", seed=SEED, dtype=torch.float64,
                       batch_size=2, checkpoint_every=2, progress=False)
        torch.save(res, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp / "res"), str(tmp / "ckpt")),
                       nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp / f"res.rank{r}") for r in range(2)], tmp


def _assert_close(a, b, tol=1e-12):
    assert set(a) == set(b)
    for name in a:
        for k in ("H_in", "H_out", "H_x"):
            err = ((a[name][k] - b[name][k]).norm() / b[name][k].norm()).item()
            assert err < tol, (name, k, err)
        assert torch.equal(a[name]["n"], b[name]["n"])


@pytest.mark.parametrize("sketch,power_iters", [("B", 1), ("A", 2)])
def test_two_gloo_ranks_equal_one_process(two_rank_results, sketch, power_iters):
    (r0, r1), _ = two_rank_results
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run(sketch, power_iters, None)
    finally:
        torch.set_num_threads(old)
    _assert_close(r0[sketch], single)
    _assert_close(r1[sketch], single)  # every rank ends with the reduced factors
    assert int(single["model.layers.0.mlp.up_proj"]["n"][0]) == 7


def test_two_rank_run_with_checkpoints_writes_the_single_process_factors(two_rank_results):
    (r0, _), tmp = two_rank_results
    _assert_close(r0["B_ckpt"], r0["B"])
    model = tiny_model("llama", dtype=torch.float64)
    loaded = yaqa.load_hessians(tmp / "ckpt", model)
    for name, h in loaded.items():
        assert torch.equal(h.H_in, r0["B_ckpt"][name]["H_in"])
        assert (h.n_seqs, h.n_tokens) == (7, 70)


def test_two_ranks_with_two_label_draws_equal_one_process(two_rank_results):
    (r0, r1), _ = two_rank_results
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run("B", 1, None, label_draws=2)
    finally:
        torch.set_num_threads(old)
    for r in (r0, r1):
        _assert_close(r["B_draws"], single)
        for name in single:  # the in and out noise statistics are reduced too
            assert torch.allclose(r["B_draws"][name]["stats"], single[name]["stats"],
                                  rtol=1e-12), name
            assert (single[name]["stats"] > 0).all()


def test_two_rank_streamed_collection_writes_the_same_files(two_rank_results):
    import hashlib

    _, tmp = two_rank_results
    digest = {d: {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                  for p in sorted((tmp / d).glob("*")) if p.is_file()}
              for d in ("ckpt", "ckpt_streamed")}
    assert len(digest["ckpt"]) == 3 and digest["ckpt_streamed"] == digest["ckpt"]
