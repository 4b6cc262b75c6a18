"""The two attention kernels lab 06 starts from, written to be read, and why they disagree.

* :func:`flash_prefill`: FlashAttention-style causal attention. A program takes a tile of queries,
  walks the keys block by block and keeps, per query row, a running maximum ``m``, a running sum of
  exponentials ``l`` and an unnormalised output ``acc`` (the *online softmax*): the scores never sit
  in memory all at once.
* :func:`split_kv_decode`: flash-decoding. One new query per sequence has too little work to fill a
  GPU, so the cache is cut into ``num_splits`` pieces, each program reduces one piece to a partial
  state, and a second kernel merges the partials with log-sum-exp. ``num_splits`` is picked from the
  batch size and the length (:func:`choose_num_splits`), so the same token's output changes with how
  many other sequences are decoded with it, and differs from the prefill of the same token.

(``reduce_max``/``reduce_sum`` are ``tl.max``/``tl.sum``, shortcut under the interpreter.)

The invariant cure, one fixed split SIZE and the same block boundaries in every phase, is
:func:`detlib.attention.invariant_attention`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from detlib._inputs import check_float_tensor, kernel_operand
from detlib.attention._tl import dot, reduce_max, reduce_sum
from detlib.backend import is_interpreter

LOG2E = 1.4426950408889634
H100_SMS = 132  # the GPU the course's numbers come from; the interpreter pretends to be one


@triton.jit
def _flash_prefill_kernel(q_ptr, k_ptr, v_ptr, o_ptr, seq_len, qk_scale,
                          stride_b, stride_h, stride_l, n_heads,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                          FIXED_ORDER: tl.constexpr):
    """Causal attention of queries ``tile*BLOCK_M ..`` of one (batch, head), online softmax over keys."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    base = (bh // n_heads) * stride_b + (bh % n_heads) * stride_h
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + base + rows[:, None] * stride_l + offs_d[None, :], mask=rows[:, None] < seq_len, other=0.0)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of each row's scores
    l = tl.full([BLOCK_M], 0.0, tl.float32)  # running sum of exp(score - m)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)  # running sum of exp(score - m) * v
    last_key = tl.minimum((tile + 1) * BLOCK_M, seq_len)  # causal: no row of the tile sees further
    for start in range(0, last_key, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + base + keys[None, :] * stride_l + offs_d[:, None], mask=keys[None, :] < seq_len, other=0.0)
        v = tl.load(v_ptr + base + keys[:, None] * stride_l + offs_d[None, :], mask=keys[:, None] < seq_len, other=0.0)
        s = dot(q, kt, FIXED_ORDER) * qk_scale
        s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))
        m_new = tl.maximum(m, reduce_max(s, 1))
        alpha = tl.exp2(m - m_new)  # rescales what was summed under the old maximum
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + reduce_sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FIXED_ORDER)
        m = m_new
    out = acc / l[:, None]
    tl.store(o_ptr + base + rows[:, None] * stride_l + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rows[:, None] < seq_len)


def _check_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_dims: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float_tensor(name, t)
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [batch, heads, len, head_dim], got {tuple(k.shape)}, {tuple(v.shape)}")
    if q.dim() != q_dims or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        want = "[batch, heads, len, head_dim]" if q_dims == 4 else "[batch, heads, head_dim]"
        raise ValueError(f"q must be {want} with k's batch, heads and head_dim; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {d}")


def flash_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, block_m: int = 16, block_n: int = 16
                  ) -> torch.Tensor:
    """Causal attention of ``q, k, v``: ``[batch, heads, len, head_dim]``, one pass, online softmax."""
    _check_dense(q, k, v, 4)
    if q.shape != k.shape:
        raise ValueError(f"prefill attends a sequence to itself: q {tuple(q.shape)} must match k {tuple(k.shape)}")
    batch, heads, seq_len, d = q.shape
    qk, kk, vk = kernel_operand(q), kernel_operand(k), kernel_operand(v)
    out = torch.empty_like(qk)
    grid = (triton.cdiv(seq_len, block_m), batch * heads)
    _flash_prefill_kernel[grid](qk, kk, vk, out, seq_len, LOG2E / math.sqrt(d),
                                qk.stride(0), qk.stride(1), qk.stride(2), heads,
                                BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d, FIXED_ORDER=is_interpreter())
    return out.to(q.dtype)


@triton.jit
def _split_partial_kernel(q_ptr, k_ptr, v_ptr, kv_len_ptr, part_acc_ptr, part_ml_ptr, split_len, qk_scale,
                          stride_kb, stride_kh, stride_kl, n_heads, n_splits,
                          BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FIXED_ORDER: tl.constexpr):
    """Partial state (m, l, acc) of one query over keys ``split*split_len ..`` of its sequence."""
    bh = tl.program_id(0)
    split = tl.program_id(1)
    kv_len = tl.load(kv_len_ptr + bh // n_heads)
    kv_base = (bh // n_heads) * stride_kb + (bh % n_heads) * stride_kh
    offs_d = tl.arange(0, HEAD_DIM)
    # the query as a 16-row tile (tensor cores need at least 16 rows); only row 0 is real
    q = tl.load(q_ptr + bh * HEAD_DIM + offs_d[None, :] + tl.full([16, 1], 0, tl.int32))
    m = tl.full([16], float("-inf"), tl.float32)
    l = tl.full([16], 0.0, tl.float32)
    acc = tl.full([16, HEAD_DIM], 0.0, tl.float32)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, kv_len)
    for start in range(lo, hi, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kt = tl.load(k_ptr + kv_base + keys[None, :] * stride_kl + offs_d[:, None], mask=keys[None, :] < hi, other=0.0)
        v = tl.load(v_ptr + kv_base + keys[:, None] * stride_kl + offs_d[None, :], mask=keys[:, None] < hi, other=0.0)
        s = dot(q, kt, FIXED_ORDER) * qk_scale
        s = tl.where(keys[None, :] < hi, s, float("-inf"))
        m_new = tl.maximum(m, reduce_max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + reduce_sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, FIXED_ORDER)
        m = m_new
    row0 = tl.arange(0, 16) == 0
    slot = bh * n_splits + split
    tl.store(part_acc_ptr + slot * HEAD_DIM + offs_d[None, :] + tl.full([16, 1], 0, tl.int32), acc, mask=row0[:, None])
    tl.store(part_ml_ptr + 2 * slot + tl.full([16], 0, tl.int32), m, mask=row0)
    tl.store(part_ml_ptr + 2 * slot + 1 + tl.full([16], 0, tl.int32), l, mask=row0)


@triton.jit
def _lse_merge_kernel(part_acc_ptr, part_ml_ptr, o_ptr, n_splits,
                      SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr):
    """out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s, with M the largest m_s (log-sum-exp)."""
    bh = tl.program_id(0)
    s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = s < n_splits
    m = tl.load(part_ml_ptr + 2 * (bh * n_splits + s), mask=ok, other=float("-inf"))
    l = tl.load(part_ml_ptr + 2 * (bh * n_splits + s) + 1, mask=ok, other=0.0)
    acc = tl.load(part_acc_ptr + (bh * n_splits + s)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
    m_max = reduce_max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_max))  # an empty split weighs nothing
    out = reduce_sum(acc * w[:, None], 0) / reduce_sum(l * w, 0)
    tl.store(o_ptr + bh * HEAD_DIM + offs_d, out.to(o_ptr.dtype.element_ty))


def choose_num_splits(batch: int, heads: int, kv_len: int, *, num_sms: int = H100_SMS, block_n: int = 16) -> int:
    """How many pieces flash-decoding cuts each sequence's cache into: enough programs to fill the GPU.

    Aims at about two programs per SM, never fewer keys per split than one block: so a longer cache
    or a smaller batch gives more splits, and the same token is reduced in a different order.
    """
    if min(batch, heads, kv_len) < 1:
        raise ValueError(f"batch, heads and kv_len must be positive, got {batch}, {heads}, {kv_len}")
    wanted = math.ceil(2 * num_sms / (batch * heads))
    return max(1, min(wanted, math.ceil(kv_len / block_n)))


def split_bounds(kv_len: int, num_splits: int, block_n: int) -> list[tuple[int, int]]:
    """Where :func:`split_kv_decode` cuts ``kv_len`` keys into ``num_splits`` pieces (block-aligned)."""
    size = math.ceil(math.ceil(kv_len / num_splits) / block_n) * block_n
    return [(lo, min(lo + size, kv_len)) for lo in range(0, kv_len, size)]


def split_kv_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_lens: list[int] | None = None, *,
                    num_splits: int | None = None, block_n: int = 16) -> torch.Tensor:
    """Attention of one new query per sequence over its cache, flash-decoding style.

    ``q``: ``[batch, heads, head_dim]``; ``k``, ``v``: ``[batch, heads, max_len, head_dim]``; sequence ``b``
    sees its first ``kv_lens[b]`` keys (all of them by default).  ``num_splits`` (default: from
    :func:`choose_num_splits` for this batch) pieces of equal, block-aligned size are reduced in
    parallel and merged with log-sum-exp.
    """
    _check_dense(q, k, v, 3)
    batch, heads, max_len, d = k.shape
    lens = [max_len] * batch if kv_lens is None else [int(n) for n in kv_lens]
    if len(lens) != batch or not all(1 <= n <= max_len for n in lens):
        raise ValueError(f"kv_lens must hold {batch} lengths in 1..{max_len}, got {lens}")
    if num_splits is None:
        num_splits = choose_num_splits(batch, heads, max(lens), block_n=block_n)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    split_len = split_bounds(max(lens), num_splits, block_n)[0][1]
    n_splits = math.ceil(max(lens) / split_len)
    qk, kk, vk = kernel_operand(q), kernel_operand(k), kernel_operand(v)
    part_acc = torch.empty((batch * heads, n_splits, d), dtype=torch.float32, device=q.device)
    part_ml = torch.empty((batch * heads, n_splits, 2), dtype=torch.float32, device=q.device)
    lens_t = torch.tensor(lens, dtype=torch.int32, device=q.device)
    fixed = is_interpreter()
    _split_partial_kernel[(batch * heads, n_splits)](
        qk, kk, vk, lens_t, part_acc, part_ml, split_len, LOG2E / math.sqrt(d),
        kk.stride(0), kk.stride(1), kk.stride(2), heads, n_splits,
        BLOCK_N=block_n, HEAD_DIM=d, FIXED_ORDER=fixed)
    out = torch.empty_like(qk)
    _lse_merge_kernel[(batch * heads,)](part_acc, part_ml, out, n_splits,
                                        SPLITS_POW2=triton.next_power_of_2(n_splits), HEAD_DIM=d)
    return out.to(q.dtype)
