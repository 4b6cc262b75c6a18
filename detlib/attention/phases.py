"""Where do the phases disagree?  One sequence through full prefill, chunked prefill and decode.

:func:`phase_ulps` runs a sequence through one attention implementation three ways and returns, for
each phase, how many ulps every position's output is from the full prefill's (0 everywhere: the
phases agree bit for bit).  Two implementations: PyTorch SDPA (``"sdpa"``) and
:func:`detlib.attention.invariant_attention` (``"invariant"``).  :func:`plot_phase_ulps` draws them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

from detlib.attention.cache import KVCache, write_kv
from detlib.attention.invariant import invariant_attention
from detlib.numerics import ulp_distance

# attend(q_rows, start, end) -> output rows: queries at positions start..end-1 over keys 0..end-1
Attend = Callable[[int, int], torch.Tensor]


def _sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Attend:
    """SDPA over the keys so far; a chunk sees keys up to each query's own position (a boolean mask)."""
    def attend(start: int, end: int) -> torch.Tensor:
        qb, kb, vb = (t[None].transpose(1, 2) for t in (q[start:end], k[:end], v[:end]))  # [1, H, len, D]
        if start == 0:
            out = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True)
        elif end - start == 1:
            out = F.scaled_dot_product_attention(qb, kb, vb)
        else:
            mask = torch.arange(end, device=q.device)[None, :] <= torch.arange(start, end, device=q.device)[:, None]
            out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)
        return out[0].transpose(0, 1)
    return attend


def _invariant_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Attend:
    """The KV cache is written up to ``end`` first, then the chunk's queries attend over it."""
    cache = KVCache.allocate(1, k.shape[1], q.shape[0], q.shape[2], q.dtype, q.device)

    def attend(start: int, end: int) -> torch.Tensor:
        write_kv(cache, k[start:end], v[start:end], [0, end - start], [0], [start])
        return invariant_attention(q[start:end], cache, [0, end - start], [0], [end])
    return attend


def phase_ulps(impl: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: Sequence[int] = (16,),
               decode: bool = True) -> dict[str, torch.Tensor]:
    """Per-position max ulp distance to the full prefill, for each chunk size and for decode.

    ``q``: ``[len, heads, head_dim]``; ``k``, ``v``: ``[len, kv_heads, head_dim]`` (``"sdpa"`` needs
    ``kv_heads == heads``).  Returns ``{"chunk 16": tensor[len], ..., "decode": tensor[len]}``.
    """
    make = {"sdpa": _sdpa_attend, "invariant": _invariant_attend}[impl]
    n = q.shape[0]
    full = make(q, k, v)(0, n)
    out: dict[str, torch.Tensor] = {}
    for chunk in list(chunks) + ([1] if decode else []):
        attend = make(q, k, v)
        rows = torch.cat([attend(s, min(s + chunk, n)) for s in range(0, n, chunk)])
        out["decode" if chunk == 1 else f"chunk {chunk}"] = ulp_distance(rows, full).amax(dim=(1, 2))
    return out


def plot_phase_ulps(ulps: dict[str, torch.Tensor], ax: plt.Axes, title: str) -> None:
    """Max ulp to the full prefill at every position, one line per phase (0 = the same bits)."""
    for name, values in ulps.items():
        ax.plot(range(len(values)), values.numpy(), marker="o", ms=2, lw=1, label=f"{name}: {int((values > 0).sum())} "
                f"of {len(values)} positions differ")
    ax.set_yscale("symlog", linthresh=1)
    ax.set(title=title, xlabel="position in the sequence", ylabel="max ulp vs full prefill")
    ax.legend(fontsize=8)


def plot_ratios(rows: list[dict[str, object]], ax: plt.Axes, title: str) -> None:
    """Recorded speed ratios against SDPA's fastest backend (1 = as fast; above 1 = faster).

    Two bars a shape: device time (both replayed from a CUDA graph, as a server runs decode) and the
    plain Python call of each (where small decodes pay for the launch, not for the GPU).
    """
    x = np.arange(len(rows))
    labels = [f"{r['phase']}\nB{r['batch']} L{r['len']}\n{r['heads']}/{r['kv_heads']}" for r in rows]
    graph = [float(r.get("ratio_graph", np.nan)) for r in rows]  # type: ignore[arg-type]
    eager = [float(r["ratio_launch"]) for r in rows]  # type: ignore[arg-type]
    ax.bar(x - 0.2, graph, width=0.4, label="device time (CUDA graph)")
    ax.bar(x + 0.2, eager, width=0.4, label="Python call (launch included)", alpha=0.6)
    ax.axhline(0.8, color="k", ls="--", lw=1, label="target 0.8x")
    ax.set_xticks(x, labels, fontsize=6, rotation=90)
    ax.set(title=title, xlabel="shape (phase, batch B, length L, heads/KV heads)", ylabel="SDPA time / invariant time")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
