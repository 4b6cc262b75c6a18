"""The one place where the model's arithmetic is chosen: default PyTorch kernels or detlib's invariant ones.

Every matmul, norm, softmax and attention of :mod:`detlib.model` calls a function of this module, and
each function looks at the current mode:

* ``"default"``: plain PyTorch (``F.linear``, ``F.rms_norm``, ``F.scaled_dot_product_attention``), i.e. what
  a server gets out of the box. Fast, but a row's result may depend on how many rows share the call
  (cuBLAS picks a different kernel for M=1 than for M=256; SDPA splits decode differently from prefill).
* ``"invariant"``: detlib's batch-invariant kernels (:func:`detlib.matmul.invariant_linear`,
  :func:`detlib.rmsnorm.invariant_rms_norm`, :func:`detlib.attention.invariant_attention`,
  :func:`detlib.rowwise.invariant_softmax`), which reduce
  every row in the same order whatever the batch, so a token's logits are bitwise the same in a prefill,
  a chunked prefill or a decode step, alone or amid other requests.

Switch with ``with use_kernels("invariant"): ...`` (lab 07 builds the same idea over torch ops).
The invariant modules are imported on first use, so the default path works without them.

Elementwise work (SiLU, the rotary rotation, residual adds) and the embedding lookup need no switch:
they touch each element once, so no batch size can change their order of operations.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F

Mode = Literal["default", "invariant"]
MODES: tuple[Mode, ...] = ("default", "invariant")

_state = threading.local()


def current_mode() -> Mode:
    """The kernels in force in this thread: ``"default"`` unless inside :func:`use_kernels`."""
    return getattr(_state, "mode", "default")


@contextlib.contextmanager
def use_kernels(mode: Mode) -> Iterator[None]:
    """Run the enclosed model code with ``"default"`` (PyTorch) or ``"invariant"`` (detlib) kernels."""
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r}: expected one of {', '.join(MODES)}")
    previous = current_mode()
    _state.mode = mode
    try:
        yield
    finally:
        _state.mode = previous


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` over the last dimension of ``x`` (any leading shape)."""
    if current_mode() == "default":
        return F.linear(x, weight, bias)
    from detlib.matmul import invariant_linear

    return invariant_linear(x, weight, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x**2) + eps) * weight`` over the last dimension (any leading shape)."""
    if current_mode() == "default":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    from detlib.rmsnorm import invariant_rms_norm

    return invariant_rms_norm(x, weight, eps)


def log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the last dimension, in float32 (log-probs of sampler vs trainer, lab 09)."""
    if current_mode() == "default":
        return torch.log_softmax(logits.float(), dim=-1)
    from detlib.rowwise import invariant_log_softmax

    return invariant_log_softmax(logits, -1, dtype=torch.float32)


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """Probabilities over the last dimension, in float32 (sampling)."""
    if current_mode() == "default":
        return torch.softmax(logits.float(), dim=-1)
    from detlib.rowwise import invariant_softmax

    return invariant_softmax(logits, -1, dtype=torch.float32)


def write_kv(cache, k_new: torch.Tensor, v_new: torch.Tensor, cu_seqlens: torch.Tensor, slots: torch.Tensor,
             start_pos: torch.Tensor) -> None:
    """Store packed new keys/values ``[total_tokens, n_kv_heads, head_dim]`` in a
    :class:`detlib.attention.KVCache` (a copy: both modes share it)."""
    from detlib.attention import write_kv as _write_kv

    _write_kv(cache, k_new, v_new, cu_seqlens, slots, start_pos)


def attention(q: torch.Tensor, cache, cu_seqlens: torch.Tensor, slots: torch.Tensor, kv_lens: torch.Tensor,
              scale: float) -> torch.Tensor:
    """Causal attention of packed queries ``[total_tokens, n_heads, head_dim]`` over the KV cache.

    Sequence ``b`` owns queries ``cu_seqlens[b]:cu_seqlens[b+1]``; they are the last ``q_len`` positions of
    its ``kv_lens[b]`` cached tokens in cache slot ``slots[b]``; query ``i`` sees keys up to its own position.
    The cache may hold fewer KV heads than there are query heads (grouped-query attention).
    """
    if current_mode() == "invariant":
        from detlib.attention import invariant_attention

        return invariant_attention(q, cache, cu_seqlens, slots, kv_lens, scale=scale)
    return _padded_sdpa(q, cache, cu_seqlens, slots, kv_lens, scale)


def _padded_sdpa(q: torch.Tensor, cache, cu_seqlens: torch.Tensor, slots: torch.Tensor, kv_lens: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """The default path: one SDPA call for the whole batch, padded to its longest query chunk and KV length.

    This is how a plain PyTorch server batches ragged sequences. The padding (and so SDPA's blocking) depends
    on the other sequences in the batch, and so may a token's bits.
    """
    dev = q.device
    batch, group = slots.numel(), q.shape[1] // cache.k_cache.shape[1]
    cu, kv = cu_seqlens.to(dev).long(), kv_lens.to(dev).long()
    q_lens = cu[1:] - cu[:-1]
    max_q, max_kv = int(q_lens.max()), int(kv.max())
    seq_of_token = torch.repeat_interleave(torch.arange(batch, device=dev), q_lens)
    row_of_token = torch.arange(q.shape[0], device=dev) - cu[seq_of_token]
    q_pad = q.new_zeros(batch, max_q, q.shape[1], q.shape[2])
    q_pad[seq_of_token, row_of_token] = q
    index = slots.to(cache.k_cache.device).long()
    k = cache.k_cache[index, :, :max_kv].to(q.dtype)
    v = cache.v_cache[index, :, :max_kv].to(q.dtype)
    if not q.is_cuda:  # each KV head serves n_heads / n_kv_heads query heads; SDPA's enable_gqa is slower on CPUs
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    # query row i of sequence b sits at position kv_len - q_len + i and sees keys 0 .. that position;
    # padding rows see key 0 only (their output is dropped, but must not be NaN)
    rows = torch.arange(max_q, device=dev)[None, :]
    q_pos = torch.where(rows < q_lens[:, None], (kv - q_lens)[:, None] + rows, 0)
    mask = torch.arange(max_kv, device=dev)[None, None, :] <= q_pos[:, :, None]
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k, v, attn_mask=mask[:, None], scale=scale,
                                         enable_gqa=q.is_cuda)
    return out.transpose(1, 2)[seq_of_token, row_of_token]


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal self-attention of dense batches ``[batch, heads, seq, head_dim]`` (training, scoring).

    ``k``/``v`` may have fewer heads than ``q`` (grouped-query attention). In invariant mode the batch
    goes through the same KV-cache kernel as serving, so a full-sequence forward gives bitwise the
    logits that prefill and decode give.
    """
    if current_mode() == "default":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    from detlib.attention import KVCache

    batch, n_heads, seq, dim = q.shape
    cache = KVCache.allocate(batch, k.shape[1], seq, dim, k.dtype, k.device)
    cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=q.device)
    slots = torch.arange(batch, dtype=torch.int32, device=q.device)
    lens = torch.full((batch,), seq, dtype=torch.int32, device=q.device)

    def packed(t: torch.Tensor) -> torch.Tensor:  # [batch, heads, seq, dim] -> [batch * seq, heads, dim]
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)

    write_kv(cache, packed(k), packed(v), cu, slots, torch.zeros_like(lens))
    out = attention(packed(q), cache, cu, slots, lens, scale)
    return out.reshape(batch, seq, n_heads, dim).transpose(1, 2)
