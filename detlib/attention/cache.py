"""The KV cache every attention phase reads: one contiguous slot per sequence.

Layout: ``k_cache`` and ``v_cache`` are ``[num_slots, n_kv_heads, max_len, head_dim]``; sequence ``b``
of a batch lives in slot ``slots[b]``, its token at position ``p`` in row ``p`` of that slot.  Prefill,
chunked prefill and decode all write their new keys and values here first (:func:`write_kv`) and then
attend over the cache, so every phase reads the same keys in the same layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from detlib._inputs import check_float_tensor

IntsLike = Sequence[int] | torch.Tensor


@dataclass
class KVCache:
    """Keys and values of up to ``num_slots`` sequences of at most ``max_len`` tokens each."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor

    def __post_init__(self) -> None:
        check_float_tensor("k_cache", self.k_cache)
        check_float_tensor("v_cache", self.v_cache)
        if self.k_cache.dim() != 4:
            raise ValueError("k_cache must be [num_slots, n_kv_heads, max_len, head_dim], "
                             f"got {tuple(self.k_cache.shape)}")
        if self.k_cache.shape != self.v_cache.shape or self.k_cache.dtype != self.v_cache.dtype:
            raise ValueError(f"k_cache {tuple(self.k_cache.shape)} {self.k_cache.dtype} and v_cache "
                             f"{tuple(self.v_cache.shape)} {self.v_cache.dtype} must match")
        if self.k_cache.device != self.v_cache.device:
            raise ValueError(f"k_cache is on {self.k_cache.device}, v_cache on {self.v_cache.device}")
        if not (self.k_cache.is_contiguous() and self.v_cache.is_contiguous()):
            raise ValueError("k_cache and v_cache must be contiguous")

    @classmethod
    def allocate(cls, num_slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> KVCache:
        """A zero-filled cache (zeros, not ``empty``: unwritten rows are never NaN garbage)."""
        for name, n in (("num_slots", num_slots), ("n_kv_heads", n_kv_heads), ("max_len", max_len),
                        ("head_dim", head_dim)):
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{name} must be a positive int, got {n!r}")
        shape = (num_slots, n_kv_heads, max_len, head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def num_slots(self) -> int:
        return self.k_cache.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.k_cache.shape[1]

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    @property
    def head_dim(self) -> int:
        return self.k_cache.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_cache.dtype

    @property
    def device(self) -> torch.device:
        return self.k_cache.device


def host_ints(name: str, values: IntsLike, length: int | None = None) -> list[int]:
    """Batch metadata (lengths, slots, offsets) as a list of Python ints, with a clear error if malformed."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1 or values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor, got {tuple(values.shape)} {values.dtype}")
        out = values.tolist()
    else:
        try:
            out = list(values)
        except TypeError as err:
            raise TypeError(f"{name} must be a sequence of ints or a 1-D integer tensor") from err
        if not all(type(v) is int for v in out):  # fast path above; numpy ints and the like below
            if any(isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__index__")
                   or isinstance(v, float) and not v.is_integer() for v in out):
                raise TypeError(f"{name} must hold integers, got {out!r}")
            out = [int(v) for v in out]
    if length is not None and len(out) != length:
        raise ValueError(f"{name} has {len(out)} entries, expected {length}")
    return out


def check_cu_seqlens(cu_seqlens: IntsLike, total_tokens: int) -> list[int]:
    """Validate packed-sequence offsets: starts at 0, never decreases, ends at ``total_tokens``."""
    cu = host_ints("cu_seqlens", cu_seqlens)
    if len(cu) < 1 or cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[:4]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must not decrease, got {cu}")
    if cu[-1] != total_tokens:
        raise ValueError(f"cu_seqlens ends at {cu[-1]} but there are {total_tokens} packed tokens")
    return cu


def check_slots(slots: IntsLike, batch: int, num_slots: int) -> list[int]:
    """Validate one cache slot per sequence."""
    out = host_ints("slots", slots, batch)
    bad = [s for s in out if not 0 <= s < num_slots]
    if bad:
        raise ValueError(f"slots {bad} are outside the cache's {num_slots} slots")
    return out


def write_kv(cache: KVCache, k_new: torch.Tensor, v_new: torch.Tensor, cu_seqlens: IntsLike,
             slots: IntsLike, start_pos: IntsLike) -> None:
    """Write the packed new keys and values of a batch into the cache, before attention reads them.

    ``k_new``, ``v_new``: ``[total_tokens, n_kv_heads, head_dim]``; sequence ``b``'s tokens are rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` and go to slot ``slots[b]`` at positions ``start_pos[b]``, ... .
    Each cache row is written by at most one token (two sequences may not write one slot's row).
    """
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        check_float_tensor(name, t)
        if t.dim() != 3 or tuple(t.shape[1:]) != (cache.n_kv_heads, cache.head_dim):
            raise ValueError(f"{name} must be [total_tokens, {cache.n_kv_heads}, {cache.head_dim}] "
                             f"(n_kv_heads, head_dim of the cache), got {tuple(t.shape)}")
        if t.dtype != cache.dtype:
            raise TypeError(f"{name} is {t.dtype} but the cache holds {cache.dtype}")
        if t.device != cache.device:
            raise ValueError(f"{name} is on {t.device} but the cache is on {cache.device}")
    if k_new.shape != v_new.shape:
        raise ValueError(f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must have one shape")
    cu = check_cu_seqlens(cu_seqlens, k_new.shape[0])
    batch = len(cu) - 1
    slot_list = check_slots(slots, batch, cache.num_slots)
    starts = host_ints("start_pos", start_pos, batch)
    counts = [cu[b + 1] - cu[b] for b in range(batch)]
    for b in range(batch):
        if starts[b] < 0 or starts[b] + counts[b] > cache.max_len:
            raise ValueError(f"sequence {b}: positions {starts[b]}..{starts[b] + counts[b] - 1} do not fit the "
                             f"cache's max_len {cache.max_len}")
    total = cu[-1]
    if total == 0:
        return
    seq = torch.repeat_interleave(torch.arange(batch), torch.tensor(counts))
    pos = torch.tensor(starts)[seq] + torch.arange(total) - torch.tensor(cu[:-1])[seq]
    slot = torch.tensor(slot_list)[seq]
    if torch.unique(slot * cache.max_len + pos).numel() != total:
        raise ValueError("two tokens of this batch would write the same cache row (same slot and position)")
    slot, pos = slot.to(cache.device, non_blocking=True), pos.to(cache.device, non_blocking=True)
    cache.k_cache[slot, :, pos] = k_new
    cache.v_cache[slot, :, pos] = v_new
