"""The three ideas of lab 06 in plain torch: online softmax, the split merge, fixed-size splits.

These are the references of the lab's exercises (the grader forbids calling them from the learner's
code); the kernels in :mod:`detlib.attention.teaching` and :mod:`detlib.attention.invariant` do the same
arithmetic tile by tile.  Everything here works on one head: ``q`` is ``[M, D]``, ``k`` and ``v`` are
``[N, D]``, and scores are scaled by ``1/sqrt(D)``.
"""

from __future__ import annotations

import math

import torch

from detlib.grade import reference


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q @ k.T / sqrt(D)``, each score summed over ``D`` on its own (no row depends on another)."""
    return (q[:, None, :] * k[None, :, :]).sum(-1) / math.sqrt(q.shape[-1])


@reference
def split_state(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Online softmax of ``q`` over keys ``k`` in blocks of ``block_n``: the state ``(m, l, acc)``.

    ``m`` [M]: the largest score seen; ``l`` [M]: the sum of ``exp(score - m)``; ``acc`` [M, D]: the sum of
    ``exp(score - m) * v``.  ``acc / l`` is the attention output; with no keys, ``m = -inf``, ``l = 0``.
    """
    m = torch.full((q.shape[0],), float("-inf"), dtype=q.dtype)
    l = torch.zeros(q.shape[0], dtype=q.dtype)
    acc = torch.zeros(q.shape, dtype=q.dtype)
    for start in range(0, k.shape[0], block_n):
        s = _scores(q, k[start:start + block_n])
        m_new = torch.maximum(m, s.max(dim=1).values)
        alpha = torch.exp(m - m_new)  # what was summed under the old maximum, rescaled
        p = torch.exp(s - m_new[:, None])
        l = l * alpha + p.sum(1)
        acc = acc * alpha[:, None] + (p[:, :, None] * v[None, start:start + block_n]).sum(1)
        m = m_new
    return m, l, acc


@reference
def online_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v``, reading the keys one block of ``block_n`` at a time."""
    _, l, acc = split_state(q, k, v, block_n)
    return acc / l[:, None]


@reference
def merge_splits(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """Merge the states of ``S`` splits (``m``, ``l``: ``[S, M]``; ``acc``: ``[S, M, D]``) into the output.

    Log-sum-exp: rescale every split to the largest maximum, then divide the summed accumulators by
    the summed ``l``.  A split that saw no key (``m = -inf``) weighs nothing.
    """
    m_max = m.max(dim=0).values
    w = torch.exp(m - m_max[None, :])
    w = torch.where(torch.isneginf(m), torch.zeros_like(w), w)
    return (acc * w[:, :, None]).sum(0) / (l * w).sum(0)[:, None]


def even_splits(kv_len: int, num_splits: int) -> list[tuple[int, int]]:
    """Cut ``kv_len`` keys into ``num_splits`` near-equal pieces: where the cuts fall depends on ``kv_len``."""
    size = math.ceil(kv_len / num_splits)
    return [(lo, min(lo + size, kv_len)) for lo in range(0, kv_len, size)]


@reference
def fixed_size_splits(kv_len: int, split_size: int) -> list[tuple[int, int]]:
    """Cut ``kv_len`` keys into pieces of ``split_size`` from position 0: the cuts never move."""
    return [(lo, min(lo + split_size, kv_len)) for lo in range(0, kv_len, split_size)]


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[tuple[int, int]],
                    block_n: int) -> torch.Tensor:
    """Attention of ``q`` over ``k``, ``v`` cut at ``bounds``: one state per split, then the merge."""
    states = [split_state(q, k[lo:hi], v[lo:hi], block_n) for lo, hi in bounds]
    return merge_splits(*(torch.stack(parts) for parts in zip(*states)))
