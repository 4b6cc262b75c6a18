"""A small decoder-only transformer written in plain PyTorch, for lab 07's batch-invariant mode.

Nothing here knows about detlib: ``nn.Linear``, ``nn.RMSNorm`` (``F.rms_norm``),
``F.scaled_dot_product_attention`` and ``F.silu``, the way a model from the wild is written.  Lab 07
runs it unchanged, first on PyTorch's kernels, then inside :func:`detlib.mode.invariant_mode`.

(The course model of labs 08 and 09, with a KV cache and a serving engine, is :mod:`detlib.model`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ToyConfig:
    """Sizes of the toy model; the defaults are small enough for Triton's interpreter on a laptop."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: two query heads share each key/value head
    mlp_hidden: int = 128
    max_seq_len: int = 64
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.dim % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"dim ({self.dim}) must be a multiple of n_heads ({self.n_heads}), "
                             f"and n_heads a multiple of n_kv_heads ({self.n_kv_heads})")


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads, through ``F.scaled_dot_product_attention``."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = cfg.n_heads, cfg.n_kv_heads
        self.head_dim = cfg.dim // cfg.n_heads
        self.q = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=True)
        self.k = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=True)
        self.v = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=True)
        self.o = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class ToyTransformer(nn.Module):
    """Token ids ``[batch, seq]`` to next-token logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: ToyConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or ToyConfig()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {tokens.shape[1]} tokens exceeds max_seq_len={self.cfg.max_seq_len}")
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def toy_transformer(cfg: ToyConfig | None = None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> ToyTransformer:
    """A toy model with weights drawn from ``seed`` (reproducible), in eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ToyTransformer(cfg)
        for name, p in model.named_parameters():  # RMSNorm weights start at 1: jitter them, so they matter
            if name.endswith("norm.weight"):
                nn.init.normal_(p, mean=1.0, std=0.1)
    return model.to(dtype=dtype, device=device).eval()


# ----------------------------------------------------------------------------------------------------
# a planted variance: the layer the audit exercise hunts for


class SplitKLinear(nn.Linear):
    """An ``nn.Linear`` that, like a tuned library, splits K in two when it has few rows to work on.

    With at most ``split_below`` rows (a small batch), ``x @ W.T`` is computed as two half-K products
    added together; with more rows, in one product.  Each product may be invariant, but their sum
    associates the K reduction differently, so a row's bits depend on the batch: the mode cannot
    repair an algorithm that is *chosen* by the shape.  Its ``repr`` is the one of ``nn.Linear``.
    """

    split_below: int = 32

    def _get_name(self) -> str:
        return "Linear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(x.shape[-1], 1)
        if rows > self.split_below:
            return F.linear(x, self.weight, self.bias)
        half = self.in_features // 2
        return F.linear(x[..., :half], self.weight[:, :half], self.bias) + F.linear(x[..., half:], self.weight[:, half:])


def linear_names(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` layers, in registration order."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def plant_split_k(model: nn.Module, name: str) -> nn.Module:
    """Replace the ``nn.Linear`` called ``name`` by a :class:`SplitKLinear` with the same weights (in place)."""
    if name not in linear_names(model):
        raise KeyError(f"{name!r} is not an nn.Linear of the model; linears: {', '.join(linear_names(model))}")
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    new = SplitKLinear(old.in_features, old.out_features, bias=old.bias is not None,
                       device=old.weight.device, dtype=old.weight.dtype)
    new.load_state_dict(old.state_dict())
    setattr(parent, child, new)
    return model
