"""Layers that read one input (q/k/v, gate/up) as one packed GEMV launch at decode.

At batch 1 a Llama-3.1-8B step launches 7 GEMVs per layer, and the small ones (k/v: 1024 rows,
2 MB of int4) cannot fill an H100 alone.  :class:`StackedLinears` concatenates the packed rows of
layers that share their input (same bits, group and input size) into one buffer, once, and runs
them as one GEMV whose output is split per layer:

- without incoherence every layer reads the same activation row, so the stack is simply a taller
  matrix;
- with incoherence each layer rotates the input with its own signs: the shared input rotation
  (:func:`~yaqa.nn.quantized_linear.rotate_shared_input`'s kernel) writes one rotated row per
  layer, and the GEMV's programs pick their layer's row from their first output row (the kernel's
  ``SEG1/SEG2/stride_seg``), so one launch still covers all of them.  Layers of one output size
  (k and v, gate and up) also share their output-rotation launch, each row with its own signs.

Memory: the stacked codes, scales and zero points *replace* the layers' own buffers, which
become views into them, so nothing is duplicated and each layer still runs alone (prefill).  A
checkpoint saved from the CPU while layers are stacked would hold shared storage (safetensors
refuses it): stack for decoding, after moving the model to its device (``model.to()`` splits the
views again and :meth:`StackedLinears.__call__` falls back to the layers).
"""

from __future__ import annotations

import logging

import torch

from . import kernels
from .quantized_linear import QuantizedLinear, shared_input_signs

log = logging.getLogger(__name__)

_BUFFERS = ("qweight", "grid_scale", "grid_zero")


class StackedLinears:
    """``[m(x) for m in mods]`` for 2-3 packed int-k layers reading ``x``, by one GEMV launch.

    Build with :meth:`build` (None where the layers cannot be stacked).  Outside the Triton decode
    path (CPU, prefill-sized inputs, block Hadamard) it calls the layers one by one.
    """

    def __init__(self, mods: list[QuantizedLinear]):
        self.mods = list(mods)
        first = mods[0]
        self.bits, self.group, self.n = first.bits, first.group_size, first.in_features
        self.incoherence = first.incoherence
        sizes = [m.out_features for m in mods]
        self.m = sum(sizes)
        self.edges = tuple(int(sum(sizes[:i])) for i in range(len(sizes) + 1))
        self.bounds = self.edges[1:-1]
        self.signs = shared_input_signs(self.mods) if self.incoherence else None
        # Output rotations: consecutive layers of one output size (k/v, gate/up) share one
        # launch, each output row with its own signs: (first, last + 1, stacked signs or None).
        self.out_runs = []
        i = 0
        while i < len(mods):
            j = i + 1
            while j < len(mods) and mods[j].out_features == mods[i].out_features:
                j += 1
            signs = (torch.stack([m.had_out_sign for m in mods[i:j]]).contiguous()
                     if self.incoherence and j - i > 1 and not mods[i]._had_block else None)
            self.out_runs.append((i, j, signs))
            i = j
        self.buffers, self._starts = {}, {}
        for name in _BUFFERS:
            parts = [getattr(m, name) for m in mods]
            stacked = torch.cat(parts, dim=0)
            self.buffers[name] = stacked
            self._starts[name] = starts = []
            start = 0
            for m, p in zip(mods, parts):
                # The layer's buffer becomes a view of the stack: one copy in memory.
                m._buffers[name] = stacked[start:start + p.shape[0]]
                starts.append(start)
                start += p.shape[0]

    @classmethod
    def build(cls, mods: list) -> "StackedLinears | None":
        """The stack of ``mods``, or None unless they are 2-3 packed int-k layers with one input
        size, bits and group size, on one device, all with incoherence (Kronecker Hadamard, so
        their input rotations run as one launch) or all without, and the kernels take them."""
        if not 2 <= len(mods) <= 3 or not all(isinstance(m, QuantizedLinear) for m in mods):
            return None
        first = mods[0]
        if not all(m.is_int and not m.dense_cache and m.bits == first.bits
                   and m.group_size == first.group_size and m.in_features == first.in_features
                   and m.incoherence == first.incoherence
                   and m.qweight.device == first.qweight.device
                   and all(getattr(m, b).dtype == getattr(first, b).dtype for b in _BUFFERS)
                   for m in mods):
            return None
        m_total = sum(m.out_features for m in mods)
        if not kernels.kernel_supports(first.bits, first.group_size, m_total, first.in_features):
            return None
        if first.incoherence and shared_input_signs(mods) is None:
            return None
        cached = getattr(first, "_stack", None)
        if cached is not None and cached.mods == list(mods) and cached.intact():
            return cached
        stack = cls(mods)
        for m in mods:
            m._stack = stack
        log.debug("stacked %d layers into one %d x %d GEMV", len(mods), m_total, first.in_features)
        return stack

    def intact(self) -> bool:
        """Whether every layer's buffers are still views of the stack (``.to()`` splits them)."""
        for name in _BUFFERS:
            base = self.buffers[name]
            for m, a in zip(self.mods, self._starts[name]):
                b = getattr(m, name)
                if b.device != base.device or b.data_ptr() != base[a:].data_ptr():
                    return False
        return True

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def applies(self, x: torch.Tensor) -> bool:
        """Whether ``x`` takes the one-launch path (else the layers run one by one)."""
        rows = x.numel() // self.n
        if not (kernels.use_triton(x) and rows <= kernels.GEMV_MAX_ROWS
                and self.buffers["qweight"].device == x.device):
            return False
        if self.incoherence:
            return rows == 1 and bool(self.mods[0]._fused_rotation(x, "in"))
        return True

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.applies(x) or not self.intact():
            return [m(x) for m in self.mods]
        first = self.mods[0]
        if self.incoherence:
            xr = first._fused_rotate(x, "in", first._fused_rotation(x, "in"), self.signs)
            y = stacked_matmul(xr, *self._packed(), list(self.bounds), True)
        else:
            y = stacked_matmul(x.reshape(-1, self.n), *self._packed(), list(self.bounds), False)
        lead = x.shape[:-1]
        outs = []
        for i, j, signs in self.out_runs:
            size = self.mods[i].out_features
            block = y[:, self.edges[i]:self.edges[j]]
            count = signs is not None and self.mods[i]._fused_rotation(block, "out")
            if count:
                # One launch rotates every layer of the run (row r with layer r's signs).
                rot = self.mods[i]._fused_rotate(block.reshape(j - i, size), "out", count, signs)
                parts = [rot[r].reshape(*lead, size) for r in range(j - i)]
            else:
                parts = [block[:, r * size:(r + 1) * size].reshape(*lead, size)
                         for r in range(j - i)]
                parts = [m._rotate_out(p) if m.incoherence else p
                         for m, p in zip(self.mods[i:j], parts)]
            for m, p in zip(self.mods[i:j], parts):
                outs.append(p + m.bias.to(p.dtype) if m.bias is not None else p)
        return outs

    def _packed(self):
        return (self.buffers["qweight"], self.buffers["grid_scale"], self.buffers["grid_zero"],
                self.bits, self.group, self.m, self.n)


@torch.library.custom_op("yaqa::intk_matmul_stacked", mutates_args=())
def stacked_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                   zero: torch.Tensor, bits: int, group: int, m: int, n: int, bounds: list[int],
                   per_segment: bool) -> torch.Tensor:
    """``x @ W^T`` for stacked packed layers (:func:`kernels.gemv` with ``bounds``): ``x`` is
    ``(rows, n)``, or with ``per_segment`` one row per layer; the output is ``(rows, m)`` or
    ``(1, m)``.  Opaque to ``torch.compile``, captured by CUDA graphs."""
    x = x if x.is_contiguous() else x.contiguous()
    return kernels.gemv(x, qweight, scale, zero, bits, group, m, n, bounds=tuple(bounds),
                        per_segment=per_segment)


@stacked_matmul.register_fake
def _(x, qweight, scale, zero, bits, group, m, n, bounds, per_segment):
    return x.new_empty(1 if per_segment else x.shape[0], m)
