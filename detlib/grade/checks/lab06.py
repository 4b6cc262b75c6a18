"""Lab 06 (attention): online softmax, the split merge, fixed-size splits.

The checks are registered in the order the lab presents the exercises.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import torch

from detlib.attention import lab
from detlib.grade.harness import CheckFailed, call, expect_close, expect_tensor
from detlib.grade.spec import exercise

_split_state = lab.split_state.__wrapped__  # unguarded: the checks build split states with it
_fixed_size_splits = lab.fixed_size_splits.__wrapped__


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The float64 answer: the full score matrix at once."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.T / math.sqrt(q.shape[-1]), dim=-1) @ v


def _tolerance(dtype: torch.dtype) -> tuple[float, float]:
    return (1e-10, 1e-10) if dtype == torch.float64 else (2e-5, 2e-5)


@exercise("06", "online_softmax_attention", points=2,
          replaces=("detlib.attention.lab.online_softmax_attention", "detlib.attention.lab.split_state"), timeout_s=60,
          hint="keep m (running max), l (running sum of exp(s - m)) and acc per row; for each block of keys "
               "rescale l and acc by exp(m_old - m_new) before adding the block; return acc / l")
def check_online_softmax_attention(online_softmax_attention: Callable[..., torch.Tensor]) -> None:
    """``online_softmax_attention(q, k, v, block_n)`` equals softmax attention, for any block size."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    cases = [(1, 1, 4, 1), (5, 37, 8, 7), (16, 64, 16, 16), (3, 100, 32, 64), (4, 20, 8, 200)]
    for dtype in (torch.float64, torch.float32):
        for m, n, d, block in cases:
            q, k, v = (torch.randn(rows, d, generator=gen, dtype=dtype) for rows in (m, n, n))
            what = f"online_softmax_attention(q [{m}, {d}], k/v [{n}, {d}], block_n={block}), {dtype} (seed {seed})"
            got = expect_tensor(call(online_softmax_attention, q, k, v, block), shape=(m, d), dtype=dtype, what=what)
            rtol, atol = _tolerance(dtype)
            expect_close(got, _softmax_attention(q, k, v), rtol=rtol, atol=atol, what=what)
    q, k, v = (torch.randn(4, 16, generator=gen) * 40 for _ in range(3))  # scores in the thousands
    what = f"scores in the thousands (exp would overflow without the running max; seed {seed})"
    got = expect_tensor(call(online_softmax_attention, q, k, v, 8), shape=(4, 16), dtype=torch.float32, what=what)
    expect_close(got, _softmax_attention(q, k, v), rtol=1e-4, atol=1e-4, what=what,
                 hint="subtract the running maximum before exp, and rescale what you summed when it grows")


def _states(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[tuple[int, int]], block: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    parts = []
    for lo, hi in bounds:
        m, l, acc = _split_state(q, k[lo:hi], v[lo:hi], block)
        parts.append((m, l, acc))
    return tuple(torch.stack(p) for p in zip(*parts))  # type: ignore[return-value]


@exercise("06", "merge_splits", points=2, replaces=("detlib.attention.lab.merge_splits",), timeout_s=60,
          hint="rescale every split to the largest maximum M with w = exp(m - M) (weight 0 where m is -inf), "
               "then divide the weighted sum of acc by the weighted sum of l")
def check_merge_splits(merge_splits: Callable[..., torch.Tensor]) -> None:
    """``merge_splits(m, l, acc)`` turns the states of several splits into the attention output."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for dtype in (torch.float64, torch.float32):
        for m_rows, n, d, bounds in [(1, 10, 4, [(0, 10)]), (3, 40, 8, [(0, 16), (16, 32), (32, 40)]),
                                     (5, 50, 16, [(0, 7), (7, 50)]), (2, 64, 8, [(i, i + 4) for i in range(0, 64, 4)])]:
            q, k, v = (torch.randn(r, d, generator=gen, dtype=dtype) for r in (m_rows, n, n))
            k[: n // 2] *= 3  # the splits' maxima differ a lot
            m, l, acc = _states(q, k, v, bounds, 4)
            what = f"merge_splits of {len(bounds)} split(s) of {n} keys, {dtype} (seed {seed})"
            got = expect_tensor(call(merge_splits, m, l, acc), shape=(m_rows, d), dtype=dtype, what=what)
            rtol, atol = _tolerance(dtype)
            expect_close(got, _softmax_attention(q, k, v), rtol=rtol, atol=atol, what=what)
    q, k, v = (torch.randn(2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    m, l, acc = _states(q, k, v, [(0, 8)], 4)
    empty = (torch.full_like(m, float("-inf")), torch.zeros_like(l), torch.zeros_like(acc))
    what = f"a split that saw no key (m = -inf, l = 0, acc = 0) next to a real one (seed {seed})"
    got = expect_tensor(call(merge_splits, torch.cat([empty[0], m]), torch.cat([empty[1], l]),
                             torch.cat([empty[2], acc])), shape=(2, 8), dtype=torch.float64, what=what)
    expect_close(got, _softmax_attention(q, k, v), rtol=1e-10, atol=1e-10, what=what,
                 hint="exp(-inf - M) is 0, but -inf - (-inf) is NaN: give an empty split weight 0 explicitly")


@exercise("06", "fixed_size_splits", points=1, replaces=("detlib.attention.lab.fixed_size_splits",), timeout_s=30,
          hint="cut at 0, split_size, 2*split_size, ...; only the last split may be shorter; no keys, no splits")
def check_fixed_size_splits(fixed_size_splits: Callable[[int, int], list[tuple[int, int]]]) -> None:
    """``fixed_size_splits(kv_len, split_size)``: cuts at 0, split_size, 2*split_size, ... whatever kv_len is."""
    cases = [(0, 4), (1, 4), (4, 4), (9, 4), (100, 32), (5, 16), (257, 256), (1000, 1)]
    for kv_len, size in cases:
        got = call(fixed_size_splits, kv_len, size)
        want = _fixed_size_splits(kv_len, size)
        try:
            as_pairs = [(int(lo), int(hi)) for lo, hi in got]
        except (TypeError, ValueError):
            raise CheckFailed(f"fixed_size_splits({kv_len}, {size}) returned {got!r}: expected a list of (start, end) "
                              "pairs") from None
        if as_pairs != want:
            shown = as_pairs if len(as_pairs) <= 6 else as_pairs[:3] + ["..."] + as_pairs[-2:]
            raise CheckFailed(f"fixed_size_splits({kv_len}, {size}) gave {shown}, expected "
                              f"{want if len(want) <= 6 else want[:3] + ['...'] + want[-2:]}",
                              "cut from position 0 every split_size keys; only the last split is shorter")
