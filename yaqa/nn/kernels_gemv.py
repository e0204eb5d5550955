"""Triton GEMV kernels for packed int-k weights (batch-1 decode); called by :mod:`.kernels`.

Module-level ``@triton.jit`` functions, so the kernels can call the shared helpers (Triton's
interpreter does not see closure variables).  Imported only once Triton is known to be present.
"""

import triton
import triton.language as tl


@triton.jit
def codes_to_float(c):
    # c in [0, 256) as float32 through its bits: 2^23 + c minus 2^23, exact.  An OR and a
    # float add instead of an int-to-float conversion, which runs at a quarter of the rate
    # on H100 and would cap a 4-bit GEMV below the memory bandwidth.
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

@triton.jit
def mantissa_pair(w, i: tl.constexpr, BITS: tl.constexpr):
    # Codes 2i and 2i+1 of int32 words (BITS ≤ 4 bits each) as two fp32 tensors, after one
    # shift that puts code 2i on mantissa bits [23−2B, 23−B) and code 2i+1 on [23−B, 23);
    # OR-ing in the exponent of 1.0 makes them 1 + q·2^−2B and 1 + q·2^−B, exactly.  Against
    # codes_to_float per code this saves a shift per pair and the float subtraction per code,
    # which matters because a 4-bit GEMV spends more issue slots on decoding than on loads.
    # The constant 1 is taken back per group: Σ f·(2^2B·x) = Σ q·x + 2^2B·Σ x.
    SH: tl.constexpr = 23 - 2 * BITS - 2 * i * BITS
    if SH >= 0:
        v = w << SH
    else:
        v = w >> (-SH)
    MASK: tl.constexpr = (1 << BITS) - 1
    lo = ((v & (MASK << (23 - 2 * BITS))) | 0x3F800000).to(tl.float32, bitcast=True)
    hi = ((v & (MASK << (23 - BITS))) | 0x3F800000).to(tl.float32, bitcast=True)
    return lo, hi

@triton.jit
def load_act(x_ptrs, u_ptrs, SILU: tl.constexpr):
    # The GEMV's input values in fp32.  SILU: the input is silu(gate)·up of a gated MLP, read
    # from the gate and up rows at the same offsets and computed here, for the down projection:
    # in fp32, rounded as decode_kernels.silu_mul rounds (act_fn's output to the activation
    # dtype, then the product), so the folded GEMV sees exactly the values the separate
    # kernel would have written.
    x = tl.load(x_ptrs)
    if SILU:
        dt = x.dtype
        g = x.to(tl.float32)
        a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
        return (a * tl.load(u_ptrs).to(tl.float32)).to(dt).to(tl.float32)
    return x.to(tl.float32)

@triton.jit
def group_epilogue(pg, xg, s_ptr, z_ptr, rows, rmask, n_groups, g0, NG: tl.constexpr):
    # Σ_G s·(Σ q·x − z·Σ x) over NG groups from g0, for BLOCK_N rows: the zero point costs
    # one multiply per group rather than one per weight, and each scale and zero point is
    # loaded once.
    sz = rows[:, None] * n_groups + (g0 + tl.arange(0, NG))[None, :]
    s = tl.load(s_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
    z = tl.load(z_ptr + sz, mask=rmask[:, None], other=0).to(tl.float32)
    return tl.sum(s * (pg - z * xg[None, :]), axis=1)

@triton.jit
def segment_offset(first_row, SEG1, SEG2, stride_seg):
    # Stacked layers: output rows [0, SEG1) read input segment 0, [SEG1, SEG2) segment 1, the
    # rest segment 2, stride_seg elements apart (0: all read the same input).  The host makes
    # BLOCK_N divide both boundaries, so a program's rows lie in one segment.
    seg = (first_row >= SEG1).to(tl.int32) + (first_row >= SEG2).to(tl.int32)
    return seg * stride_seg

@triton.jit
def store_or_reduce(acc, y_ptr, ws_ptr, cnt_ptr, rows, rmask, N, stride_y,
                    SPLIT_K: tl.constexpr):
    # SPLIT_K == 1: write the output.  Else: this program's partial sums go to the fp32
    # workspace [row, split, N]; the last program of the block to arrive adds the SPLIT_K
    # partials in a fixed order (deterministic), writes the output, and resets the counter
    # for the next launch (so CUDA-graph replays need no zero-fill).
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    out = y_ptr + row * stride_y + rows
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=rmask)
    else:
        part = ws_ptr + row * (SPLIT_K * N)
        tl.store(part + pid_k * N + rows, acc, mask=rmask)
        tl.debug_barrier()  # every thread's partials are written before the release
        count = cnt_ptr + row * tl.num_programs(0) + pid_n
        arrived = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            ks = tl.arange(0, SPLIT_K)
            p = tl.load(part + ks[:, None] * N + rows[None, :], mask=rmask[None, :],
                        other=0.0, cache_modifier=".cg")  # from L2: other SMs wrote them
            tl.store(out, tl.sum(p, axis=0).to(y_ptr.dtype.element_ty), mask=rmask)
            tl.atomic_xchg(count, 0, sem="relaxed", scope="gpu")

@triton.jit
def gemv_words(x_ptr, u_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, M, stride_x,
               stride_y, SEG1, SEG2, stride_seg, K: tl.constexpr, BITS: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SPLIT_K: tl.constexpr, UNPACK_3D: tl.constexpr, SILU: tl.constexpr,
               PAIRED: tl.constexpr = False):
    # Program (n, k, row): BLOCK_N output features of activation row `row`, over the k-th
    # of SPLIT_K slices of K.  The packed weight is read as int32 words (8 int4 codes each),
    # so each row of the tile is one contiguous load of BLOCK_K·BITS/8 bytes.
    # SEG1/SEG2/stride_seg: the weight may be several layers' rows stacked (q/k/v, gate/up),
    # each layer reading its own input row (incoherence: its own rotation of the shared input);
    # see :func:`segment_offset`.  SILU: x is the gate and u_ptr the up rows of a gated MLP
    # (same strides), and the input is silu(gate)·up (:func:`load_act`); else u_ptr is unused.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    CPW: tl.constexpr = 32 // BITS
    BW: tl.constexpr = BLOCK_K // CPW
    NG: tl.constexpr = BLOCK_K // GROUP
    MASK: tl.constexpr = (1 << BITS) - 1
    KS: tl.constexpr = K // SPLIT_K
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    k0 = pid_k * KS
    shifts = tl.arange(0, CPW) * BITS
    wrow = qw_ptr + rows[:, None].to(tl.int64) * (K // CPW) + k0 // CPW
    xoff = row * stride_x + segment_offset(pid_n * BLOCK_N, SEG1, SEG2, stride_seg) + k0
    xrow = x_ptr + xoff
    urow = u_ptr + xoff
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, KS // BLOCK_K):
        w = tl.load(wrow + t * BW + tl.arange(0, BW)[None, :], mask=rmask[:, None], other=0)
        if UNPACK_3D:
            # Codes as a (rows, words, codes-per-word) tile against x as (words, codes).
            # x is loaded as a (1, words, codes) tile of 16-byte vectors, so a thread holds a
            # word's codes and their activations together and the per-word sum stays in
            # registers (the weight tile is moved into that layout once per step).
            o3 = (t * BLOCK_K + tl.arange(0, BW)[None, :, None] * CPW
                  + tl.arange(0, CPW)[None, None, :])
            x3 = load_act(xrow + o3, urow + o3, SILU)
            q = codes_to_float((w[:, :, None] >> shifts[None, None, :]) & MASK)
            p = tl.sum(q * x3, axis=2)                                      # per word
            xw = tl.sum(x3, axis=2)                                         # (1, words)
            xg = tl.sum(tl.reshape(xw, (NG, BW // NG)), axis=1)
        elif PAIRED:
            # Codes 2i and 2i+1 of every word against strided slices of x, both decoded after
            # one shift (see :func:`mantissa_pair`): a shift per two codes, a mask-and-or and
            # an FMA per code.  p gathers Σ q·x plus the offsets Σ (2^2B·x_lo + 2^B·x_hi),
            # which `off` collects once per tile (not per row) and the group sums take back.
            p = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
            xs = tl.zeros((BW,), dtype=tl.float32)
            off = tl.zeros((BW,), dtype=tl.float32)
            for i in tl.static_range(CPW // 2):
                o0 = t * BLOCK_K + tl.arange(0, BW) * CPW + 2 * i
                x0 = load_act(xrow + o0, urow + o0, SILU)
                x1 = load_act(xrow + o0 + 1, urow + o0 + 1, SILU)
                f0, f1 = mantissa_pair(w, i, BITS)
                x0s = x0 * (1 << (2 * BITS))
                x1s = x1 * (1 << BITS)
                p = tl.fma(f0, x0s[None, :], p)
                p = tl.fma(f1, x1s[None, :], p)
                xs += x0 + x1
                off += x0s + x1s
            xg = tl.sum(tl.reshape(xs, (NG, BW // NG)), axis=1)
            p = p - off[None, :]
        else:
            # Code j of every word against a strided slice of x (L1-resident): 2-D tiles only.
            p = tl.zeros((BLOCK_N, BW), dtype=tl.float32)
            xs = tl.zeros((BW,), dtype=tl.float32)
            for j in tl.static_range(CPW):
                oj = t * BLOCK_K + tl.arange(0, BW) * CPW + j
                xj = load_act(xrow + oj, urow + oj, SILU)
                p += codes_to_float((w >> (BITS * j)) & MASK) * xj[None, :]
                xs += xj
            xg = tl.sum(tl.reshape(xs, (NG, BW // NG)), axis=1)
        pg = tl.sum(tl.reshape(p, (BLOCK_N, NG, BW // NG)), axis=2)            # per group
        acc += group_epilogue(pg, xg, s_ptr, z_ptr, rows, rmask, K // GROUP,
                              (k0 + t * BLOCK_K) // GROUP, NG)
    store_or_reduce(acc, y_ptr, ws_ptr, cnt_ptr, rows, rmask, N, stride_y, SPLIT_K)

@triton.jit
def gemv_bytes(x_ptr, u_ptr, qw_ptr, s_ptr, z_ptr, y_ptr, ws_ptr, cnt_ptr, N, M, stride_x,
               stride_y, SEG1, SEG2, stride_seg, K: tl.constexpr, BITS: tl.constexpr,
               CPC: tl.constexpr, NB: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
               SILU: tl.constexpr):
    # Any chunk layout (3 bits: 8 codes in 3 bytes), assembled from byte loads; SILU as in
    # :func:`gemv_words`.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = tl.program_id(2)
    BC: tl.constexpr = BLOCK_K // CPC
    NG: tl.constexpr = BLOCK_K // GROUP
    MASK: tl.constexpr = (1 << BITS) - 1
    KS: tl.constexpr = K // SPLIT_K
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    k0 = pid_k * KS
    row_bytes = (K // CPC) * NB
    xoff = row * stride_x + segment_offset(pid_n * BLOCK_N, SEG1, SEG2, stride_seg)
    xrow = x_ptr + xoff
    urow = u_ptr + xoff
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for t in range(0, KS // BLOCK_K):
        chunks = (k0 + t * BLOCK_K) // CPC + tl.arange(0, BC)
        base = qw_ptr + rows[:, None].to(tl.int64) * row_bytes + chunks[None, :] * NB
        word = tl.load(base, mask=rmask[:, None], other=0).to(tl.int32)
        for b in tl.static_range(1, NB):
            word |= tl.load(base + b, mask=rmask[:, None], other=0).to(tl.int32) << (8 * b)
        p = tl.zeros((BLOCK_N, BC), dtype=tl.float32)
        xs = tl.zeros((BC,), dtype=tl.float32)
        for j in tl.static_range(CPC):
            xj = load_act(xrow + chunks * CPC + j, urow + chunks * CPC + j, SILU)
            p += codes_to_float((word >> (BITS * j)) & MASK) * xj[None, :]
            xs += xj
        pg = tl.sum(tl.reshape(p, (BLOCK_N, NG, BC // NG)), axis=2)
        xg = tl.sum(tl.reshape(xs, (NG, BC // NG)), axis=1)
        acc += group_epilogue(pg, xg, s_ptr, z_ptr, rows, rmask, K // GROUP,
                              (k0 + t * BLOCK_K) // GROUP, NG)
    store_or_reduce(acc, y_ptr, ws_ptr, cnt_ptr, rows, rmask, N, stride_y, SPLIT_K)
