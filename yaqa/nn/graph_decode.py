"""Greedy batch-1 decoding with a static KV cache, one whole decode step replayed as a CUDA graph.

At batch 1 a 4-bit 8B model reads about 4 GB per token, 1.5 ms on an H100: Python, kernel
launches and ``generate``'s per-token bookkeeping cost more than that.  :class:`GraphDecoder` runs
the model's own modules (embedding, norms, the possibly packed linears, LM head) in a fixed
decode step (rotary embedding, cache write and attention over a preallocated cache, all indexed
by a position held on the device), so the step has no host synchronisation and no shape changes:
it is captured once as a CUDA graph and replayed per token, and the argmax stays on the device.
On CPU the same step runs eagerly (the tests check it against ``generate``).

Llama-style decoders only (Llama, Mistral without sliding window, Qwen2): pre-norm blocks with
``q/k/v/o_proj`` and a gated ``gate/up/down_proj`` MLP, standard rotary embedding.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# Norms computing w · (x / rms(x)) with x rounded to the input dtype first (not Gemma's 1 + w).
_PLAIN_RMSNORM = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class GraphDecoder:
    """Greedy decoding of a Llama-style ``*ForCausalLM`` at batch 1, up to ``max_len`` positions.

    ``graph=None`` captures a CUDA graph when the model is on CUDA.  :meth:`generate` returns the
    same tokens as ``model.generate(do_sample=False)`` up to float rounding.  ``fold_silu=True``
    computes silu(gate)·up inside packed down projections instead of the separate SiLU-mul
    kernel (off by default: slower on the H100, see below); ``dense_head`` forces the
    Triton GEMV for a 16-bit LM head on (True) or off (False) instead of timing it against
    cuBLAS once (None).
    """

    def __init__(self, model: torch.nn.Module, max_len: int, graph: bool | None = None,
                 fused: bool | None = None, stack_linears: bool | None = None,
                 fold_silu: bool = False, dense_head: bool | None = None):
        cfg = model.config
        body = getattr(model, "model", None)
        layers = getattr(body, "layers", None)
        if layers is None or not hasattr(model, "lm_head"):
            raise ValueError(f"GraphDecoder needs a *ForCausalLM with model.layers, got "
                             f"{type(model).__name__}")
        for layer in layers:
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            if (attn is None or mlp is None or any(not hasattr(attn, n) for n in _ATTN)
                    or any(not hasattr(mlp, n) for n in _MLP) or hasattr(attn, "q_norm")
                    or getattr(attn, "sliding_window", None)):
                raise ValueError(f"GraphDecoder supports Llama-style blocks only, not "
                                 f"{type(layer).__name__}")
        self.model, self.layers = model, layers
        self.max_len = max_len
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        emb = body.embed_tokens.weight
        # An int8 embedding (yaqa.nn.int8) holds int8 weights; the stream's dtype is its output's.
        dev, dt = emb.device, getattr(body.embed_tokens, "compute_dtype", emb.dtype)
        shape = (1, self.kv_heads, max_len, self.head_dim)
        self.k = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
        self.v = [torch.zeros(shape, device=dev, dtype=dt) for _ in layers]
        self.tok = torch.zeros(1, 1, dtype=torch.long, device=dev)  # this step's input token
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)     # its position
        self.positions = torch.arange(max_len, device=dev)
        inv_freq = body.rotary_emb.inv_freq
        self.inv_freq = inv_freq.to(device=dev, dtype=torch.float32)
        self.rope_scale = float(getattr(body.rotary_emb, "attention_scaling", 1.0))
        self.use_graph = dev.type == "cuda" if graph is None else graph
        self._pos = 0  # host mirror of `pos`: a write past the cache must fail here, not on device
        self._graph: torch.cuda.CUDAGraph | None = None
        self.next_token = torch.zeros(1, dtype=torch.long, device=dev)
        # The fused small-op kernels (one launch each for norm, rotary + cache write + attention,
        # gated activation) where Triton runs and the model is plain Llama-shaped; else torch ops.
        self.fused = fused if fused is not None else self._can_fuse(cfg)
        if self.fused:
            from .decode_kernels import attention_split, attention_workspace

            self._attn_split = attention_split(max_len)
            self._attn_ws = attention_workspace(self.heads, self.head_dim, self._attn_split, dev)
            self._argmax_ws = None  # sized by the first step's logits
        # Packed incoherent q/k/v (and gate/up) read the same input: their three (two) input
        # rotations run as one launch, with the sign vectors stacked here once.
        from .quantized_linear import shared_input_signs

        self._signs = [(shared_input_signs([getattr(layer.self_attn, n) for n in _ATTN[:3]]),
                        shared_input_signs([layer.mlp.gate_proj, layer.mlp.up_proj]))
                       for layer in layers]
        # And beyond that, their GEMVs as one launch each (:mod:`.stacked`): the layers' packed
        # buffers become views of one stacked buffer per group (no extra memory).  By default
        # where the Triton kernels run; stack_linears=False keeps one launch per layer.
        from . import kernels
        from .stacked import StackedLinears

        if stack_linears is None:
            stack_linears = kernels.use_triton(emb)
        self._stacks = [(StackedLinears.build([getattr(layer.self_attn, n) for n in _ATTN[:3]]),
                         StackedLinears.build([layer.mlp.gate_proj, layer.mlp.up_proj]))
                        if stack_linears else (None, None) for layer in layers]
        self.stacked = sum(s is not None for pair in self._stacks for s in pair)
        # The fused step's packed int-k down projections compute silu(gate)·up inside their GEMV
        # (with incoherence: inside their input rotation), QuantizedLinear.forward_silu_mul: no
        # activation launch, no write and re-read of the 14336-wide row.  Off by default: on the
        # H100 every program of the down GEMV recomputes the activation of its K-slice, and the
        # folded GEMV took 29.0 us against 22.7 for the SiLU-mul kernel + GEMV (decode 0.93x,
        # bench/results/inference-cuda.md); through the input rotation it was even (1.00x).
        from .quantized_linear import QuantizedLinear

        self.fold_silu = fold_silu
        self._fold = [fold_silu and isinstance(layer.mlp.down_proj, QuantizedLinear)
                      for layer in layers]
        # An unquantized 16-bit LM head at batch 1: the Triton GEMV (.kernels_dense) where a
        # one-time measurement on this GPU finds it faster than cuBLAS (dense_head=None), or as
        # forced (True/False).  Fused steps only (Triton present).
        self.dense_head = False
        head = model.lm_head
        if self.fused and type(head) is torch.nn.Linear and head.bias is None:
            from . import kernels_dense

            if kernels_dense.supports(head.weight):
                if dense_head is None:
                    dense_head = (head.weight.is_cuda and not kernels._interpreting()
                                  and kernels_dense.faster_than_cublas(head.weight)[0])
                self.dense_head = bool(dense_head)

    def _can_fuse(self, cfg) -> bool:
        from . import kernels

        if not kernels.use_triton(self.tok.new_empty(0, dtype=torch.float32)):
            return False
        from . import decode_kernels

        norms = [self.model.model.norm] + [m for layer in self.layers for m in
                                           (layer.input_layernorm, layer.post_attention_layernorm)]
        return (decode_kernels.supported(self.heads, self.kv_heads, self.head_dim)
                and getattr(cfg, "hidden_act", None) == "silu"
                and all(type(n).__name__ in _PLAIN_RMSNORM and hasattr(n, "variance_epsilon")
                        for n in norms))

    @torch.no_grad()
    def _step(self) -> None:
        """One token: reads ``tok``/``pos``, writes the greedy ``next_token``, advances ``pos``."""
        if self.fused:
            try:
                return self._fused_step()
            except Exception as e:  # a Triton build error: this machine runs the torch ops
                from . import kernels

                if kernels._interpreting() or torch.cuda.is_current_stream_capturing():
                    raise
                line = str(e).strip().splitlines()
                kernels.FALLBACKS.append(f"fused decode step: {type(e).__name__}: "
                                         f"{line[-1][:300] if line else ''}")
                log.warning("fused decode kernels failed, using torch ops: %s",
                            kernels.FALLBACKS[-1])
                self.fused = False  # the failed step wrote at most this position's cache
        body, H, K, D = self.model.model, self.heads, self.kv_heads, self.head_dim
        h = body.embed_tokens(self.tok)
        freqs = self.pos.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(h.dtype)
        sin = (emb.sin() * self.rope_scale).to(h.dtype)
        mask = (self.positions <= self.pos).view(1, 1, 1, self.max_len)
        for i, layer in enumerate(self.layers):
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q, k, v = self._linears(i, 0, [a.q_proj, a.k_proj, a.v_proj], x)
            q = q.view(1, 1, H, D).transpose(1, 2)
            k = k.view(1, 1, K, D).transpose(1, 2)
            v = v.view(1, 1, K, D).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            self.k[i].index_copy_(2, self.pos, k)
            self.v[i].index_copy_(2, self.pos, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask,
                                               enable_gqa=H != K)
            h = h + a.o_proj(o.transpose(1, 2).reshape(1, 1, H * D))
            mlp = layer.mlp
            if self._stacks[i][1] is not None:
                g, u = self._linears(i, 1, [mlp.gate_proj, mlp.up_proj],
                                     layer.post_attention_layernorm(h))
                h = h + mlp.down_proj(mlp.act_fn(g) * u)
            else:
                h = h + mlp(layer.post_attention_layernorm(h))
        logits = self.model.lm_head(body.norm(h))
        self.next_token.copy_(logits[0, -1].argmax(-1, keepdim=True))
        self.tok.copy_(self.next_token.view(1, 1))
        self.pos.add_(1)

    def _linears(self, i: int, which: int, mods, x) -> list[torch.Tensor]:
        """The outputs of layer ``i``'s q/k/v (``which`` 0) or gate/up (1), all reading ``x``:
        one stacked GEMV, else one shared input rotation, else layer by layer."""
        from .quantized_linear import rotate_shared_input

        stack, signs = self._stacks[i][which], self._signs[i][which]
        if stack is not None:
            return stack(x)
        if signs is not None:
            return rotate_shared_input(mods, signs, x)
        return [m(x) for m in mods]

    @torch.no_grad()
    def _fused_step(self) -> None:
        """:meth:`_step` with the small ops fused (:mod:`.decode_kernels`): per layer two
        norm launches, one rotary + cache write + attention, one activation (none where the
        down projection's GEMV or input rotation computes it), and the linears (with incoherence: one input
        rotation for q/k/v, one for gate/up); the head (cuBLAS or :mod:`.kernels_dense`'s GEMV);
        one argmax."""
        from .decode_kernels import (add_rmsnorm, argmax_token, argmax_workspace, rope_attention,
                                     silu_mul)

        body, H, D = self.model.model, self.heads, self.head_dim
        h = body.embed_tokens(self.tok)
        first = self.layers[0].input_layernorm
        h, x = add_rmsnorm(h, None, first.weight, first.variance_epsilon)
        for i, layer in enumerate(self.layers):
            a, mlp = layer.self_attn, layer.mlp
            o = rope_attention(*self._linears(i, 0, [a.q_proj, a.k_proj, a.v_proj], x),
                               self.k[i], self.v[i], self.pos, self.inv_freq, self.rope_scale,
                               self._attn_split, self._attn_ws)
            norm = layer.post_attention_layernorm
            h, x = add_rmsnorm(h, a.o_proj(o.view(1, 1, H * D)), norm.weight,
                               norm.variance_epsilon)
            g, u = self._linears(i, 1, [mlp.gate_proj, mlp.up_proj], x)
            down = mlp.down_proj
            d = (down.forward_silu_mul(g, u) if self._fold[i] and down.folds_silu(g)
                 else down(silu_mul(g, u)))
            norm = self.layers[i + 1].input_layernorm if i + 1 < len(self.layers) else body.norm
            h, x = add_rmsnorm(h, d, norm.weight, norm.variance_epsilon)
        head = self.model.lm_head
        if self.dense_head and x.dtype == head.weight.dtype:
            from .kernels_dense import dense_matmul

            logits = dense_matmul(x, head.weight)
        else:
            logits = head(x)
        if self._argmax_ws is None:
            self._argmax_ws = argmax_workspace(logits.numel(), logits.device)
        argmax_token(logits, self.tok, self.next_token, self._argmax_ws)
        self.pos.add_(1)

    def _capture(self) -> None:
        # Warm up off the capture stream first: it compiles and autotunes the Triton kernels, and
        # lets the caching allocator settle.  The warm-up's cache writes are harmless: a position
        # is always written before the mask lets attention read it.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._warm_up(2)
        torch.cuda.current_stream().wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._step()
        self.pos.zero_()

    def _warm_up(self, steps: int) -> None:
        """Run ``steps`` throw-away steps and put back the token and position they consumed.

        Each step feeds its argmax back into ``tok``, so without the restore the first real step
        after a capture would read a warm-up token instead of the prompt's."""
        tok, pos = self.tok.clone(), self.pos.clone()
        for _ in range(steps):
            self._step()
        self.tok.copy_(tok)
        self.pos.copy_(pos)

    def step(self) -> None:
        if self._pos >= self.max_len:
            raise ValueError(f"decoding past max_len={self.max_len}")
        self._pos += 1
        if self.use_graph:
            if self._graph is None:
                self._capture()
            self._graph.replay()
        else:
            self._step()

    def reset(self) -> None:
        self.pos.zero_()
        self._pos = 0

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> None:
        """Feed ``prompt`` (1-D or ``1 x T`` token ids) one position at a time; then
        ``next_token`` holds the greedy continuation."""
        ids = prompt.reshape(-1).to(self.tok.device)
        if ids.numel() == 0 or ids.numel() >= self.max_len:
            raise ValueError(f"prompt of {ids.numel()} tokens does not fit max_len={self.max_len}")
        self.reset()
        for t in ids:
            self.tok.copy_(t.view(1, 1))
            self.step()

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Greedy continuation: ``1 x (T + new_tokens)`` ids, like ``model.generate``."""
        ids = prompt.reshape(1, -1)
        if ids.shape[1] + new_tokens > self.max_len:
            raise ValueError(f"{ids.shape[1]} + {new_tokens} tokens exceed max_len={self.max_len}")
        self.prefill(ids)
        out = [self.next_token.clone()]
        for _ in range(new_tokens - 1):
            self.step()  # the input token is the previous step's argmax, already on the device
            out.append(self.next_token.clone())
        return torch.cat([ids.to(self.tok.device), torch.stack(out, dim=1)], dim=1)

    def decode(self, steps: int) -> None:
        """``steps`` further greedy tokens with no host work per token (for timing)."""
        for _ in range(steps):
            self.step()
