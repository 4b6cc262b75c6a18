"""Does PyTorch's attention agree with itself?  Prefill against decode, and decode against batch size.

:func:`phase_disagreement` runs ``torch.nn.functional.scaled_dot_product_attention`` on one random
sequence twice, as a causal prefill and as a single-token decode of its last position, on each SDPA
backend available here, and compares the last row's bits.  :func:`decode_batch_dependence` decodes
the same sequence amid 0, 1, 3, ... other sequences and counts the distinct results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from detlib.numerics import bitwise_equal, ulp_distance

BACKENDS: dict[str, SDPBackend | None] = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, *, is_causal: bool) -> torch.Tensor:
    """SDPA restricted to one backend (``"default"``: let PyTorch choose)."""
    chosen = BACKENDS[backend]
    if chosen is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    with sdpa_kernel(chosen):
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


@dataclass(frozen=True)
class PhaseResult:
    """Prefill's last row against a one-token decode of the same position, on one backend."""

    backend: str
    available: bool
    equal: bool | None = None
    n_different: int | None = None
    max_ulp: float | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def random_qkv(batch: int, heads: int, seq_len: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
               seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reproducible random ``q, k, v``: ``[batch, heads, seq_len, head_dim]``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return tuple(torch.randn(batch, heads, seq_len, head_dim, generator=gen).to(device, dtype) for _ in range(3))


def phase_disagreement(seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, device: torch.device | str,
                       backends: Sequence[str] = tuple(BACKENDS)) -> list[PhaseResult]:
    """For each backend: is the causal prefill's last row bitwise the single-token decode of that position?"""
    q, k, v = random_qkv(1, heads, seq_len, head_dim, dtype, device)
    results = []
    for name in backends:
        try:
            prefill = sdpa(q, k, v, name, is_causal=True)[:, :, -1]
            decode = sdpa(q[:, :, -1:], k, v, name, is_causal=False)[:, :, 0]
        except RuntimeError as err:  # backend not available for this device, dtype or shape
            results.append(PhaseResult(name, False, error=str(err).splitlines()[0][:160]))
            continue
        differ = int((ulp_distance(prefill, decode) > 0).sum())
        results.append(PhaseResult(name, True, bitwise_equal(prefill, decode), differ,
                                   float(ulp_distance(prefill, decode).max())))
    return results


def decode_batch_dependence(batch_sizes: Sequence[int], seq_len: int, heads: int, head_dim: int, dtype: torch.dtype,
                            device: torch.device | str, backend: str = "default") -> dict[str, object]:
    """Decode sequence 0 in batches of the given sizes (the others random); how many distinct outputs?

    Returns the batch sizes, for each the index of its distinct result (0 = same as the first), and
    the number of distinct results.
    """
    q, k, v = random_qkv(max(batch_sizes), heads, seq_len, head_dim, dtype, device, seed=1)
    outs: list[torch.Tensor] = []
    labels: list[int] = []
    for b in batch_sizes:
        out = sdpa(q[:b, :, -1:], k[:b], v[:b], backend, is_causal=False)[0, :, 0]
        match = next((i for i, o in enumerate(outs) if bitwise_equal(o, out)), None)
        if match is None:
            outs.append(out)
            match = len(outs) - 1
        labels.append(match)
    return {"backend": backend, "batch_sizes": list(batch_sizes), "result_id": labels, "distinct": len(outs)}
