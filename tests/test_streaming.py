"""Factor storage as packed triangles, old full-matrix files, streamed per-block reading."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import yaqa
from yaqa.hessians.storage import atomic_save_tensors, read_tensors
from yaqa.hessians.stream import StreamedHessians, unpack_factor
from yaqa.quantize_model import quantize

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    model = tiny_model("llama", hidden=32, intermediate=64, layers=2, vocab=64)
    ids = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    out = tmp_path_factory.mktemp("hs")
    yaqa.collect_hessians(model, ids, batch_size=2, out_dir=out, progress=False)
    ref = yaqa.collect_hessians(model, ids, batch_size=2, progress=False)  # held in memory
    return model, ids, out, ref


def test_collecting_into_a_directory_returns_the_stored_factors_block_by_block(stored, tmp_path):
    """With out_dir nothing stays in memory: the result reads the files back lazily, and its
    factors equal the in-memory collection's bit for bit (fp32 storage is lossless)."""
    model, ids, _, ref = stored
    got = yaqa.collect_hessians(model, ids, batch_size=2, out_dir=tmp_path, progress=False)
    assert isinstance(got, StreamedHessians) and got.reads == 0 and set(got) == set(ref)
    for name, r in ref.items():
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(got[name], k), getattr(r, k)), (name, k)
    assert got.reads == 2
    # a subset of the blocks: block 1 is reused from the files, and only its layers are there
    again = yaqa.collect_hessians(model, ids, batch_size=2, out_dir=tmp_path, progress=False,
                                  blocks=[1])
    assert set(again) == {n for n in ref if n.startswith("model.layers.1.")}
    with pytest.raises(KeyError):
        again["model.layers.0.self_attn.q_proj"]
    assert torch.equal(again["model.layers.1.mlp.down_proj"].H_in,
                       ref["model.layers.1.mlp.down_proj"].H_in)


def test_stored_factors_are_packed_triangles_and_load_back_exactly(stored):
    model, _, out, ref = stored
    tensors, meta = read_tensors(out / "block_0000.safetensors")
    assert meta["storage_dtype"] == "float32"
    h = tensors["self_attn.q_proj.H_in"]
    assert h.shape == (32 * 33 // 2,)
    loaded = yaqa.load_hessians(out, model)
    for name, r in ref.items():
        for k in ("H_in", "H_out", "H_x"):
            assert torch.equal(getattr(loaded[name], k), getattr(r, k)), (name, k)


def test_full_matrix_files_of_earlier_versions_still_load(stored, tmp_path):
    model, _, out, ref = stored
    for f in out.iterdir():
        if f.is_file():
            (tmp_path / f.name).write_bytes(f.read_bytes())
    for f in tmp_path.glob("block_*.safetensors"):
        tensors, meta = read_tensors(f)
        full = {k: unpack_factor(v) if v.dim() == 1 else v for k, v in tensors.items()}
        meta.pop("storage_dtype")
        atomic_save_tensors(f, full, meta)
        assert read_tensors(f)[0]["self_attn.q_proj.H_in"].shape == (32, 32)
    loaded = yaqa.load_hessians(tmp_path, model)
    for name, r in ref.items():
        assert torch.equal(loaded[name].H_out, r.H_out)


def test_streamed_hessians_hold_one_block_and_round_like_loaded_ones(stored):
    model, _, out, ref = stored
    streamed = yaqa.load_hessians(out, model, stream=True)
    assert isinstance(streamed, StreamedHessians) and set(streamed) == set(ref)
    a = tiny_model("llama", hidden=32, intermediate=64, layers=2, vocab=64)
    b = tiny_model("llama", hidden=32, intermediate=64, layers=2, vocab=64)
    quantize(a, ref, method="yaqa", quantizer="int4", group_size=16, progress=False)
    quantize(b, streamed, method="yaqa", quantizer="int4", group_size=16, progress=False)
    assert streamed.reads == 2  # each block file read once, in order
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bf16_storage_halves_the_files_at_bf16_error(stored, tmp_path):
    model, ids, out, ref = stored
    yaqa.collect_hessians(model, ids, batch_size=2, out_dir=tmp_path, progress=False,
                          storage_dtype="bfloat16")
    f32 = (out / "block_0001.safetensors").stat().st_size
    b16 = (tmp_path / "block_0001.safetensors").stat().st_size
    assert b16 < 0.6 * f32
    loaded = yaqa.load_hessians(tmp_path, model)
    for name, r in ref.items():
        err = (loaded[name].H_in - r.H_in).norm() / r.H_in.norm()
        assert 0 < err < 5e-3
    with pytest.raises(ValueError, match="storage dtype"):
        yaqa.collect_hessians(model, ids, batch_size=2, progress=False, storage_dtype="fp8")
