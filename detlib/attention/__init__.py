"""Attention for the course: one KV-cache layout, and an attention that agrees with itself in every phase.

* :class:`KVCache`, :func:`write_kv`: the cache prefill, chunked prefill and decode all read
  (``[num_slots, n_kv_heads, max_len, head_dim]``, written before attention runs);
* :func:`invariant_attention`: causal attention of a ragged batch over the cache, bitwise the same for
  a token whether it comes in a full prefill, a chunk, or a decode step, whatever else is batched;
  :func:`prepare_batch` / :func:`run_prepared` split it into the host work (checks, tile layout, one
  copy to the device), done once per step, and the launches, done per layer;
* :mod:`detlib.attention.teaching`: the readable kernels lab 06 builds up from (FlashAttention-style
  prefill, split-KV decode whose result depends on its number of splits);
* :mod:`detlib.attention.lab`: online softmax, split merge and fixed-size splits in plain torch (the
  references of lab 06's exercises); :mod:`detlib.attention.sdpa` and :mod:`detlib.attention.phases`:
  PyTorch SDPA's own disagreements and the per-position phase comparison the lab plots.
"""

from detlib.attention.cache import KVCache, write_kv
from detlib.attention.invariant import invariant_attention, prepare_batch, run_prepared
from detlib.attention.reference import reference_attention

__all__ = ["KVCache", "invariant_attention", "prepare_batch", "reference_attention", "run_prepared", "write_kv"]
