"""Memory attention in Triton: one fused forward and a flash-attention style backward.

The math is ``memory_attention_ref``'s (see reference.py); this file computes it without ever
materialising a score matrix:

* Forward, one program per (block of BLOCK_M queries, batch x query head): an online softmax over
  the local keys in blocks of BLOCK_N (blocks that no query of the block can see are skipped, only
  blocks crossing the causal diagonal are masked), then the memory: the shared layout in key blocks
  like the local part, the retrieved layout one entry per query at a time (each query has its own
  entries, so there is nothing to share in a matrix product). ``fusion="gate"`` keeps two softmax
  states and mixes them; ``fusion="joint"`` feeds the memory into the local state.
* Backward: ``dO`` is split into the part that flows through the local softmax and the part that
  flows through the memory softmax (weights 1 - sigmoid(g) and sigmoid(g) for gate, 1 and 1 for
  joint). One kernel gives dK, dV for a block of keys by walking the queries that see it (every query
  head of the group, so no atomics); it serves the local keys and the shared memory alike. A second
  kernel gives dQ. The gate's gradient is a per-row dot product, done in torch.

Scores are kept in base 2 (``qk_scale = scale * log2(e)``, ``exp2``); the saved log-sum-exps are
base 2 too, and +inf marks a query without memory so that ``exp2(s - lse)`` is 0 for it.
Retrieved memory is stop-gradient (it comes from a kNN index); shared memory gets gradients.

Autotuning picks block sizes per (sequence-length bucket, head dim, layout). Under Triton's
interpreter (``TRITON_INTERPRET=1``, how CI runs these kernels on CPU tensors) one small
configuration is used and matrix products run in float32: Triton 3.9's interpreter gets bfloat16
``tl.dot`` wrong, and bfloat16 products are exact in float32 anyway.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .reference import check_memory_attention_args

# Triton decides when a kernel is decorated (here, at first import) whether it runs compiled or interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
LOG2E = math.log2(math.e)


# ---------------------------------------------------------------------------------------------------------------
# Inner loops, shared by the kernels


@triton.jit
def _mma(a, b, acc, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b (acc None: a fresh product); float32 operands under the interpreter (module docstring)."""
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, valid_ptr, stride_valid,
    lo, hi, n_keys, offs_m, diagonal, offs_d, head_dim, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online-softmax state (acc [BLOCK_M, BLOCK_D], l_i, m_i [BLOCK_M]) updated with keys lo .. hi.

    q: [BLOCK_M, BLOCK_D]. Key n is visible to query row i when n < n_keys, n <= offs_m[i] + diagonal
    (CAUSAL) and valid[n] != 0 (HAS_VALID); unMASKED blocks are known to be fully visible.
    """
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < n_keys
        k = tl.load(k_ptr + cols[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :] & d_ok[:, None],
                    other=0.0)  # [BLOCK_D, BLOCK_N]
        s = _mma(q, k.to(q.dtype), None, DOT_F32, PRECISION) * qk_scale
        if MASKED:
            keep = in_range[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= offs_m[:, None] + diagonal)
            if HAS_VALID:
                keep = keep & (tl.load(valid_ptr + cols * stride_valid, mask=in_range, other=0) != 0)[None, :]
            s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays empty
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + cols[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = _mma(p.to(q.dtype), v.to(q.dtype), acc * alpha[:, None], DOT_F32, PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attend_retrieved(
    acc, l_i, m_i, q, mk_ptr, mv_ptr, stride_mkr, stride_mvr, mask_ptr, stride_maskr,
    top_k, offs_m, row_ok, offs_d, head_dim, qk_scale, HAS_MASK: tl.constexpr,
):
    """Online-softmax state updated with each query's own top_k entries, one entry per step.

    Entry j of query i is row i * top_k + j of mk/mv [seq * top_k, head_dim].
    """
    qf = q.to(tl.float32)
    tile_ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    for j in range(top_k):
        rows = offs_m * top_k + j
        mk = tl.load(mk_ptr + rows[:, None] * stride_mkr + offs_d[None, :], mask=tile_ok, other=0.0)
        s = tl.sum(qf * mk.to(tl.float32), 1) * qk_scale  # [BLOCK_M]
        keep = row_ok
        if HAS_MASK:
            keep = keep & (tl.load(mask_ptr + rows * stride_maskr, mask=row_ok, other=0) != 0)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe)
        l_i = l_i * alpha + p
        mv = tl.load(mv_ptr + rows[:, None] * stride_mvr + offs_d[None, :], mask=tile_ok, other=0.0)
        acc = acc * alpha[:, None] + p[:, None] * mv.to(tl.float32)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_block(Q, stride_qb, stride_qh, stride_qs, q_heads, group, seq, head_dim,
                 BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's BLOCK_M queries of one (batch, query head): indices, masks and q [BLOCK_M, BLOCK_D]."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // q_heads, bh % q_heads
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq
    tile_ok = row_ok[:, None] & (offs_d < head_dim)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=tile_ok,
                other=0.0)
    return start_m, bh, b, h, h // group, offs_m, offs_d, row_ok, tile_ok, q


@triton.jit
def _local_range(start_m, seq, ctx, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys [0, full) are visible to every query of the block; [full, hi) need the mask; beyond hi none."""
    if CAUSAL:
        full = (ctx - seq + start_m + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(ctx, ctx - seq + start_m + BLOCK_M)
    else:
        full = ctx // BLOCK_N * BLOCK_N
        hi = ctx
    return full, hi


# ---------------------------------------------------------------------------------------------------------------
# Autotuning


def _configs(pairs):
    if INTERPRETED:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=8 if m * n >= 128 * 64 else 4, num_stages=stages)
        for m, n in pairs for stages in (2, 3)
    ]


def _prune(configs, named_args, **meta):
    """Drop query blocks much longer than the segment and tiles that would spill registers; keep at least one.

    The forward keeps [BLOCK_M, BLOCK_D] accumulators (two with gate fusion); the dK/dV kernel keeps four
    [BLOCK_N, BLOCK_D] tiles.
    """
    seq_cap = max(16, triton.next_power_of_2(named_args["seq"]))
    two_states = meta.get("GATE") and meta.get("LAYOUT") != "none"
    tile_cap = 64 * 128 if two_states or "DK" in named_args else 128 * 128
    fits = [
        c for c in configs
        if c.kwargs["BLOCK_M"] <= seq_cap
        and max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) * meta["BLOCK_D"] <= tile_cap
    ]
    return fits or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]


_KEY = ["seq_bucket", "BLOCK_D", "LAYOUT", "GATE", "CAUSAL"]
_FORWARD_BLOCKS = [(128, 64), (128, 32), (64, 64), (64, 32), (32, 32), (16, 32)]
_BACKWARD_BLOCKS = [(64, 64), (32, 64), (64, 32), (32, 32), (16, 32)]


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@triton.autotune(configs=_configs(_FORWARD_BLOCKS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _forward(
    Q, K, V, MK, MV, MMASK, GATE_LOGITS, OUT, LSE, PARTS,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mkb, stride_mkh, stride_mkr, stride_mvb, stride_mvh, stride_mvr, stride_mmb, stride_mmh, stride_mmr,
    batch, q_heads, group, seq, ctx, mem_rows, top_k, head_dim, qk_scale, seq_bucket,
    LAYOUT: tl.constexpr, GATE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    SAVE_PARTS: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """OUT [batch, q_heads, seq, head_dim]; LSE [2, batch, q_heads, seq] base-2 log-sum-exps (local, memory;
    joint writes its one lse to both); PARTS [2, batch, q_heads, seq, head_dim] local and memory results (gate)."""
    start_m, bh, b, h, kvh, offs_m, offs_d, row_ok, tile_ok, q = _query_block(
        Q, stride_qb, stride_qh, stride_qs, q_heads, group, seq, head_dim, BLOCK_M, BLOCK_D)

    k_ptr, v_ptr = K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    full, hi = _local_range(start_m, seq, ctx, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, k_ptr, 0, 0, full, ctx,
                                   offs_m, ctx - seq, offs_d, head_dim, qk_scale, False, CAUSAL, False, BLOCK_N,
                                   DOT_F32, PRECISION)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_ptr, v_ptr, stride_kn, stride_vn, k_ptr, 0, full, hi, ctx,
                                   offs_m, ctx - seq, offs_d, head_dim, qk_scale, True, CAUSAL, False, BLOCK_N,
                                   DOT_F32, PRECISION)

    lse_ptr = LSE + bh * seq + offs_m
    out_offsets = (bh * seq + offs_m[:, None]) * head_dim + offs_d[None, :]
    if LAYOUT == "none":
        out = acc / l_i[:, None]
        tl.store(lse_ptr, m_i + tl.log2(l_i), mask=row_ok)
    else:
        if GATE:  # a second softmax state for the memory
            acc_m = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
            l_m = tl.zeros([BLOCK_M], tl.float32)
            m_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        else:  # one softmax over local and memory keys
            acc_m, l_m, m_m = acc, l_i, m_i
        mem_h = h if LAYOUT == "retrieved" else kvh
        mk_ptr, mv_ptr = MK + b * stride_mkb + mem_h * stride_mkh, MV + b * stride_mvb + mem_h * stride_mvh
        mask_ptr = MMASK + b * stride_mmb + mem_h * stride_mmh
        if LAYOUT == "retrieved":
            acc_m, l_m, m_m = _attend_retrieved(acc_m, l_m, m_m, q, mk_ptr, mv_ptr, stride_mkr, stride_mvr, mask_ptr,
                                                stride_mmr, top_k, offs_m, row_ok, offs_d, head_dim, qk_scale,
                                                HAS_MASK)
        else:
            acc_m, l_m, m_m = _attend_blocks(acc_m, l_m, m_m, q, mk_ptr, mv_ptr, stride_mkr, stride_mvr, mask_ptr,
                                             stride_mmr, 0, mem_rows, mem_rows, offs_m, 0, offs_d, head_dim,
                                             qk_scale, True, False, HAS_MASK, BLOCK_N, DOT_F32, PRECISION)
        if GATE:
            has_memory = l_m > 0
            local = acc / l_i[:, None]
            memory = acc_m / tl.where(has_memory, l_m, 1.0)[:, None]
            g = tl.sigmoid(tl.load(GATE_LOGITS + h).to(tl.float32))
            out = tl.where(has_memory[:, None], g * memory + (1 - g) * local, local)
            tl.store(lse_ptr, m_i + tl.log2(l_i), mask=row_ok)
            lse_memory = m_m + tl.log2(tl.where(has_memory, l_m, 1.0))
            tl.store(lse_ptr + batch * q_heads * seq, tl.where(has_memory, lse_memory, float("inf")), mask=row_ok)
            if SAVE_PARTS:
                tl.store(PARTS + out_offsets, local.to(PARTS.dtype.element_ty), mask=tile_ok)
                tl.store(PARTS + batch * q_heads * seq * head_dim + out_offsets,
                         memory.to(PARTS.dtype.element_ty), mask=tile_ok)
        else:
            out = acc_m / l_m[:, None]
            lse = m_m + tl.log2(l_m)
            tl.store(lse_ptr, lse, mask=row_ok)
            tl.store(lse_ptr + batch * q_heads * seq, lse, mask=row_ok)
    tl.store(OUT + out_offsets, out.to(OUT.dtype.element_ty), mask=tile_ok)


@triton.autotune(configs=_configs(_BACKWARD_BLOCKS), key=["seq_bucket", "BLOCK_D", "CAUSAL", "HAS_VALID"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _backward_kv(
    Q, DO, LSE, DELTA, K, V, VALID, DK, DV,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_validb, stride_validh, stride_validn,
    q_heads, kv_heads, group, seq, n_keys, head_dim, qk_scale, scale, seq_bucket,
    CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DK, DV [batch, kv_heads, n_keys, head_dim] for one block of keys of one kv head.

    Serves the local keys (CAUSAL: query i sees key n <= n_keys - seq + i) and the shared memory
    (VALID [batch, kv_heads, n_keys] marks present entries). DO [batch, q_heads, seq, head_dim] is the
    output gradient share that flows through this softmax; LSE, DELTA [batch, q_heads, seq] its
    log-sum-exp and rowsum(DO * that softmax's output).
    """
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1).to(tl.int64)
    b, kvh = bh // kv_heads, bh % kv_heads
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_i = tl.arange(0, BLOCK_M)
    key_ok = offs_n < n_keys
    if HAS_VALID:
        key_ok = key_ok & (tl.load(VALID + b * stride_validb + kvh * stride_validh + offs_n * stride_validn,
                                   mask=offs_n < n_keys, other=0) != 0)
    d_ok = offs_d < head_dim
    key_tile = (offs_n < n_keys)[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + kvh * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :], mask=key_tile,
                other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :], mask=key_tile,
                other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diagonal = n_keys - seq
    lo = 0
    if CAUSAL:  # queries before start_n - diagonal see none of these keys
        lo = tl.maximum(0, start_n - diagonal) // BLOCK_M * BLOCK_M
    for hh in range(group):
        h = kvh * group + hh
        q_ptr = Q + b * stride_qb + h * stride_qh
        row_base = (b * q_heads + h) * seq
        for start_m in range(lo, seq, BLOCK_M):
            offs_m = start_m + offs_i
            row_ok = offs_m < seq
            tile_ok = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :], mask=tile_ok, other=0.0)
            do = tl.load(DO + (row_base + offs_m[:, None]) * head_dim + offs_d[None, :], mask=tile_ok, other=0.0)
            lse = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf"))
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
            k_c = k.to(q.dtype)
            s = _mma(q, tl.trans(k_c), None, DOT_F32, PRECISION) * qk_scale
            keep = row_ok[:, None] & key_ok[None, :]
            if CAUSAL:
                keep = keep & (offs_n[None, :] <= offs_m[:, None] + diagonal)
            p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)  # [BLOCK_M, BLOCK_N]
            dv = _mma(tl.trans(p).to(do.dtype), do, dv, DOT_F32, PRECISION)
            dp = _mma(do, tl.trans(v.to(do.dtype)), None, DOT_F32, PRECISION)
            ds = p * (dp - delta[:, None])
            dk = _mma(tl.trans(ds).to(q.dtype), q, dk, DOT_F32, PRECISION)
    out_offsets = (bh * n_keys + offs_n[:, None]) * head_dim + offs_d[None, :]
    tl.store(DK + out_offsets, (dk * scale).to(DK.dtype.element_ty), mask=key_tile)
    tl.store(DV + out_offsets, dv.to(DV.dtype.element_ty), mask=key_tile)


@triton.jit
def _dq_blocks(
    dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_vn, valid_ptr, stride_valid, hi, n_keys, offs_m,
    diagonal, offs_d, head_dim, qk_scale, CAUSAL: tl.constexpr, HAS_VALID: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
):
    """dq [BLOCK_M, BLOCK_D] (unscaled) += the gradient through the softmax over keys 0 .. hi."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < head_dim
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        in_range = cols < n_keys
        k = tl.load(k_ptr + cols[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                    other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + cols[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None] & d_ok[None, :],
                    other=0.0).to(q.dtype)
        s = _mma(q, tl.trans(k), None, DOT_F32, PRECISION) * qk_scale
        keep = in_range[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + diagonal)
        if HAS_VALID:
            keep = keep & (tl.load(valid_ptr + cols * stride_valid, mask=in_range, other=0) != 0)[None, :]
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = _mma(do, tl.trans(v), None, DOT_F32, PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _mma(ds.to(q.dtype), k, dq, DOT_F32, PRECISION)
    return dq


@triton.autotune(configs=_configs(_BACKWARD_BLOCKS), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _backward_q(
    Q, K, V, MK, MV, MMASK, DO_L, DO_M, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mkb, stride_mkh, stride_mkr, stride_mvb, stride_mvh, stride_mvr, stride_mmb, stride_mmh, stride_mmr,
    batch, q_heads, group, seq, ctx, mem_rows, top_k, head_dim, qk_scale, scale, seq_bucket,
    LAYOUT: tl.constexpr, GATE: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_F32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """DQ [batch, q_heads, seq, head_dim]. DO_L/DO_M: the output-gradient shares of the local and memory
    softmaxes; LSE, DELTA [2, batch, q_heads, seq]: their log-sum-exps and rowsum(share * softmax output)."""
    start_m, bh, b, h, kvh, offs_m, offs_d, row_ok, tile_ok, q = _query_block(
        Q, stride_qb, stride_qh, stride_qs, q_heads, group, seq, head_dim, BLOCK_M, BLOCK_D)
    row_offsets = bh * seq + offs_m
    tile_offsets = row_offsets[:, None] * head_dim + offs_d[None, :]
    do = tl.load(DO_L + tile_offsets, mask=tile_ok, other=0.0)
    lse = tl.load(LSE + row_offsets, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_offsets, mask=row_ok, other=0.0)
    k_ptr, v_ptr = K + b * stride_kb + kvh * stride_kh, V + b * stride_vb + kvh * stride_vh
    _, hi = _local_range(start_m, seq, ctx, BLOCK_M, BLOCK_N, CAUSAL)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, stride_kn, stride_vn, k_ptr, 0, hi, ctx, offs_m, ctx - seq,
                    offs_d, head_dim, qk_scale, CAUSAL, False, BLOCK_N, DOT_F32, PRECISION)
    if LAYOUT != "none":
        rows = batch * q_heads * seq
        do = tl.load(DO_M + tile_offsets, mask=tile_ok, other=0.0)
        lse = tl.load(LSE + rows + row_offsets, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + rows + row_offsets, mask=row_ok, other=0.0)
        mem_h = h if LAYOUT == "retrieved" else kvh
        mk_ptr, mv_ptr = MK + b * stride_mkb + mem_h * stride_mkh, MV + b * stride_mvb + mem_h * stride_mvh
        mask_ptr = MMASK + b * stride_mmb + mem_h * stride_mmh
        if LAYOUT == "shared":
            dq = _dq_blocks(dq, q, do, lse, delta, mk_ptr, mv_ptr, stride_mkr, stride_mvr, mask_ptr, stride_mmr,
                            mem_rows, mem_rows, offs_m, 0, offs_d, head_dim, qk_scale, False, HAS_MASK, BLOCK_N,
                            DOT_F32, PRECISION)
        else:
            qf, dof = q.to(tl.float32), do.to(tl.float32)
            for j in range(top_k):
                entry = offs_m * top_k + j
                mk = tl.load(mk_ptr + entry[:, None] * stride_mkr + offs_d[None, :], mask=tile_ok,
                             other=0.0).to(tl.float32)
                mv = tl.load(mv_ptr + entry[:, None] * stride_mvr + offs_d[None, :], mask=tile_ok,
                             other=0.0).to(tl.float32)
                keep = row_ok
                if HAS_MASK:
                    keep = keep & (tl.load(mask_ptr + entry * stride_mmr, mask=row_ok, other=0) != 0)
                p = tl.where(keep, tl.exp2(tl.sum(qf * mk, 1) * qk_scale - lse), 0.0)
                ds = p * (tl.sum(dof * mv, 1) - delta)
                dq += ds[:, None] * mk
    tl.store(DQ + tile_offsets, (dq * scale).to(DQ.dtype.element_ty), mask=tile_ok)


# ---------------------------------------------------------------------------------------------------------------
# The autograd wrapper


def unsupported(q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None) -> str | None:
    """Why the Triton kernels cannot take these (shape-checked) inputs, or None when they can."""
    if not (q.is_cuda or (INTERPRETED and q.device.type == "cpu")):
        return (f"the Triton kernels need CUDA tensors, got {q.device} (on the CPU they run only under Triton's "
                "interpreter: set TRITON_INTERPRET=1 before memlm.kernels.fused is first imported)")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"q, k and v must share one dtype of {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head_dim must be at most {MAX_HEAD_DIM}, got {q.shape[-1]}"
    named = {"q": q, "k": k, "v": v, "mem_k": mem_k, "mem_v": mem_v, "gate": gate}
    for name, t in named.items():
        if t is not None and t.dim() > 0 and t.stride(-1) != 1:
            return (f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(t.stride())}; "
                    "call .contiguous() on it")
    for name, t in (("mem_k", mem_k), ("mem_v", mem_v)):
        if t is not None and t.dtype not in DTYPES:
            return f"{name} must have a dtype of {DTYPES}, got {t.dtype}"
    return None


def memory_attention_triton(
    q, k, v, mem_k=None, mem_v=None, mem_mask=None, gate=None, fusion="gate", scale=None, causal=True
) -> torch.Tensor:
    """``memory_attention_ref``'s function (same arguments and shapes) with the fused Triton kernels."""
    check_memory_attention_args(q, k, v, mem_k, mem_v, mem_mask, gate, fusion, causal)
    reason = unsupported(q, k, v, mem_k, mem_v, mem_mask, gate)
    if reason is not None:
        raise ValueError(reason)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mem_k is not None and mem_k.dim() == 5:  # retrieved memory is stop-gradient
        mem_k, mem_v = mem_k.detach(), mem_v.detach()
    use_gate = fusion == "gate" and mem_k is not None
    return _MemoryAttention.apply(q, k, v, mem_k, mem_v, mem_mask, gate if use_gate else None, use_gate, scale, causal)


class _Memory:
    """The memory operands as kernels see them: [batch, heads, rows, head_dim] with three strides each.

    Retrieved memory [b, q_heads, seq, top_k, d] is read as rows seq * top_k (entry j of query i is row
    i * top_k + j); shared memory [b, kv_heads, mem_len, d] as it is. The mask becomes uint8 (same bytes).
    """

    def __init__(self, q, mem_k, mem_v, mem_mask):
        self.layout = "none" if mem_k is None else "retrieved" if mem_k.dim() == 5 else "shared"
        self.top_k = mem_k.shape[3] if self.layout == "retrieved" else 0
        if self.layout == "retrieved":
            mem_k, mem_v = mem_k.flatten(2, 3), mem_v.flatten(2, 3)
            mem_mask = None if mem_mask is None else mem_mask.flatten(2, 3)
        self.k = q if mem_k is None else mem_k  # q stands in for absent operands; kernels never read it
        self.v = q if mem_v is None else mem_v
        self.mask = None if mem_mask is None else mem_mask.contiguous().view(torch.uint8)
        self.rows = 0 if mem_k is None else mem_k.shape[2]

    def strides(self) -> tuple[int, ...]:
        mask = (0, 0, 0) if self.mask is None else self.mask.stride()
        k = self.k.stride()[:3] if self.layout != "none" else (0, 0, 0)
        v = self.v.stride()[:3] if self.layout != "none" else (0, 0, 0)
        return (*k, *v, *mask)


def _launch_options(q: torch.Tensor, layout: int, use_gate: bool, causal: bool) -> dict:
    tf32 = q.dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32  # float32 stays IEEE unless allowed
    return {
        "LAYOUT": layout, "GATE": use_gate, "CAUSAL": causal, "DOT_F32": INTERPRETED,
        "PRECISION": "tf32" if tf32 else "ieee", "BLOCK_D": max(16, triton.next_power_of_2(q.shape[-1])),
    }


class _MemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mem_k, mem_v, mem_mask, gate, use_gate, scale, causal):
        batch, q_heads, seq, head_dim = q.shape
        kv_heads, ctx_len = k.shape[1], k.shape[2]
        memory = _Memory(q, mem_k, mem_v, mem_mask)
        options = _launch_options(q, memory.layout, use_gate, causal)
        out = torch.empty(batch, q_heads, seq, head_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(2, batch, q_heads, seq, dtype=torch.float32, device=q.device)
        save_parts = use_gate and any(ctx.needs_input_grad)
        parts = torch.empty(2, *out.shape, dtype=q.dtype, device=q.device) if save_parts else out
        gate_logits = q if gate is None else gate
        grid = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads)  # noqa: E731
        _forward[grid](
            q, k, v, memory.k, memory.v, q if memory.mask is None else memory.mask, gate_logits, out, lse, parts,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *memory.strides(),
            batch, q_heads, q_heads // kv_heads, seq, ctx_len, memory.rows, memory.top_k, head_dim, scale * LOG2E,
            triton.next_power_of_2(seq), HAS_MASK=memory.mask is not None, SAVE_PARTS=save_parts, **options,
        )
        ctx.save_for_backward(q, k, v, mem_k, mem_v, mem_mask, gate, out, lse, parts if save_parts else None)
        ctx.use_gate, ctx.scale, ctx.causal = use_gate, scale, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mem_k, mem_v, mem_mask, gate, out, lse, parts = ctx.saved_tensors
        batch, q_heads, seq, head_dim = q.shape
        kv_heads, ctx_len = k.shape[1], k.shape[2]
        memory = _Memory(q, mem_k, mem_v, mem_mask)
        options = _launch_options(q, memory.layout, ctx.use_gate, ctx.causal)
        grad_out = grad_out.contiguous()
        do_local = do_memory = grad_out
        grad_gate = None
        if ctx.use_gate:  # split dO between the two softmaxes; the gate's gradient is their difference
            local, memory_out = parts.float()
            has_memory = torch.isfinite(lse[1]).unsqueeze(-1)  # [b, hq, s, 1]
            g = torch.sigmoid(gate.float()).view(1, -1, 1, 1)
            w = torch.where(has_memory, g, 0.0)
            do_local, do_memory = ((1 - w) * grad_out.float()).to(q.dtype), (w * grad_out.float()).to(q.dtype)
            delta = torch.stack(((do_local.float() * local).sum(-1), (do_memory.float() * memory_out).sum(-1)))
            mixed = torch.where(has_memory, grad_out.float() * (memory_out - local), 0.0).sum((0, 2, 3))
            grad_gate = (mixed * (g * (1 - g)).view(-1)).to(gate.dtype)
        else:
            delta = (grad_out.float() * out.float()).sum(-1).expand(2, -1, -1, -1).contiguous()

        common = (q_heads, kv_heads, q_heads // kv_heads, seq)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grid_q = lambda meta: (triton.cdiv(seq, meta["BLOCK_M"]), batch * q_heads)  # noqa: E731
        _backward_q[grid_q](
            q, k, v, memory.k, memory.v, q if memory.mask is None else memory.mask, do_local, do_memory, lse, delta,
            dq, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *memory.strides(),
            batch, q_heads, q_heads // kv_heads, seq, ctx_len, memory.rows, memory.top_k, head_dim,
            ctx.scale * LOG2E, ctx.scale, triton.next_power_of_2(seq), HAS_MASK=memory.mask is not None, **options,
        )
        dk, dv = _key_grads(q, do_local, lse[0], delta[0], k, v, None, common, ctx.scale, ctx.causal, options)
        dmem_k = dmem_v = None
        if memory.layout == "shared" and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4]):
            dmem_k, dmem_v = _key_grads(q, do_memory, lse[1], delta[1], mem_k, mem_v, memory.mask, common, ctx.scale,
                                        False, options)
        return dq, dk, dv, dmem_k, dmem_v, None, grad_gate, None, None, None


def _key_grads(q, do, lse, delta, k, v, valid, common, scale, causal, options):
    """dK, dV [batch, kv_heads, n_keys, head_dim] of one softmax's keys (local, or shared memory)."""
    q_heads, kv_heads, group, seq = common
    batch, _, n_keys, head_dim = k.shape
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grid = lambda meta: (triton.cdiv(n_keys, meta["BLOCK_N"]), batch * kv_heads)  # noqa: E731
    _backward_kv[grid](
        q, do, lse, delta, k, v, q if valid is None else valid, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *((0, 0, 0) if valid is None else valid.stride()),
        q_heads, kv_heads, group, seq, n_keys, head_dim, scale * LOG2E, scale, triton.next_power_of_2(seq),
        CAUSAL=causal, HAS_VALID=valid is not None, DOT_F32=options["DOT_F32"], PRECISION=options["PRECISION"],
        BLOCK_D=options["BLOCK_D"],
    )
    return dk, dv
