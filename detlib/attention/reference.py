"""Float64 references of the attention computations, for tests and checks (slow, exact enough)."""

from __future__ import annotations

import math

import torch

from detlib.attention.cache import IntsLike, KVCache, host_ints


def reference_attention(q: torch.Tensor, cache: KVCache, cu_seqlens: IntsLike, slots: IntsLike,
                        kv_lens: IntsLike, *, scale: float | None = None) -> torch.Tensor:
    """What :func:`~detlib.attention.invariant_attention` computes, in float64 with torch ops (on the CPU)."""
    cu = host_ints("cu_seqlens", cu_seqlens)
    slot_list = host_ints("slots", slots)
    kv = host_ints("kv_lens", kv_lens)
    n_heads, head_dim = q.shape[1], q.shape[2]
    group = n_heads // cache.n_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(len(cu) - 1):
        nq, nk = cu[b + 1] - cu[b], kv[b]
        if nq == 0:
            continue
        qb = q[cu[b]:cu[b + 1]].double().cpu().transpose(0, 1)  # [H, nq, D]
        k = cache.k_cache[slot_list[b], :, :nk].double().cpu().repeat_interleave(group, 0)  # [H, nk, D]
        v = cache.v_cache[slot_list[b], :, :nk].double().cpu().repeat_interleave(group, 0)
        s = qb @ k.transpose(1, 2) * scale
        pos = torch.arange(nk - nq, nk)
        s = s.masked_fill(torch.arange(nk)[None, :] > pos[:, None], float("-inf"))
        out[cu[b]:cu[b + 1]] = (torch.softmax(s, -1) @ v).transpose(0, 1)
    return out
