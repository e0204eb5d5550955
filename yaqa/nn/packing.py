"""Bit-packing of k-bit integer codes into bytes (little-endian within each chunk).

Codes are packed in chunks of ``lcm(k, 8) / k`` values that fill ``lcm(k, 8) / 8`` bytes exactly,
so 2-, 4- and 8-bit codes pack 4, 2 and 1 per byte and 3-bit codes pack 8 per 3 bytes, with no
wasted bits except the padding of the last chunk.
"""

from __future__ import annotations

import math

import torch


def _chunk(bits: int) -> tuple[int, int]:
    chunk_bits = math.lcm(bits, 8)
    return chunk_bits // bits, chunk_bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    per_chunk, nbytes = _chunk(bits)
    return -(-numel // per_chunk) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten ``codes`` (integers in ``[0, 2^bits)``) into a uint8 tensor of packed bits."""
    if not 1 <= bits <= 8:
        raise ValueError(f"can pack 1..8-bit codes, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes out of range for {bits}-bit packing")
    per_chunk, nbytes = _chunk(bits)
    pad = (-flat.numel()) % per_chunk
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    chunks = flat.reshape(-1, per_chunk)
    shifts = torch.arange(per_chunk, device=flat.device, dtype=torch.int64) * bits
    words = (chunks << shifts).sum(dim=1)  # at most 56 bits: fits int64
    byte_shifts = torch.arange(nbytes, device=flat.device, dtype=torch.int64) * 8
    return ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes as int32."""
    per_chunk, nbytes = _chunk(bits)
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(f"packed buffer has {packed.numel()} bytes, expected "
                         f"{packed_nbytes(numel, bits)} for {numel} {bits}-bit codes")
    b = packed.to(torch.int64).reshape(-1, nbytes)
    byte_shifts = torch.arange(nbytes, device=packed.device, dtype=torch.int64) * 8
    words = (b << byte_shifts).sum(dim=1)
    shifts = torch.arange(per_chunk, device=packed.device, dtype=torch.int64) * bits
    codes = (words.unsqueeze(1) >> shifts) & (2**bits - 1)
    return codes.reshape(-1)[:numel].to(torch.int32)
