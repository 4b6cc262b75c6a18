"""A Qwen3-style decoder in one file: the model that labs 08 and 09 serve and sample.

Architecture (as Qwen3): token embedding; ``n_layers`` blocks of pre-norm attention and MLP with
residual connections; final RMSNorm; LM head (tied to the embedding or not). Attention is grouped-query
(``n_kv_heads`` key/value heads shared by ``n_heads`` query heads), with Qwen3's RMSNorm on each head's
queries and keys before the rotary position embedding. The MLP is SwiGLU: ``down(silu(gate(x)) * up(x))``.

Every matmul, norm and attention goes through :mod:`detlib.kernels`, so ``with use_kernels("invariant")``
turns the whole model batch-invariant.

Two forwards share the blocks:

* :meth:`Qwen3Model.forward` (serving): packed tokens of many sequences at once, ragged: each sequence
  brings ``q_len`` new tokens (a whole prompt, a prefill chunk, or one decode token) that attend to its
  KV cache. Described by a :class:`Batch`. This is the layout a continuous-batching engine runs.
* :meth:`Qwen3Model.forward_dense` (training): a ``[batch, seq]`` block of tokens, causal, no cache.

:func:`generate` runs one prompt (prefill, optionally in chunks, then decode). :func:`load_model`
loads the course model from ``data/model``; :mod:`detlib.checkpoint` loads Hugging Face Qwen3 checkpoints.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from detlib import kernels

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ModelError(ValueError):
    """A model file, config or input that cannot be used (missing, corrupt, mismatched, too long)."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Qwen3-style model; ``config.json`` of ``data/model`` holds exactly these fields."""

    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_seq_len: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    attention_bias: bool = False
    dropout: float = 0.0  # training only (residual dropout); inference ignores it

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "intermediate_size", "max_seq_len"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ModelError(f"config.{f} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ModelError(f"config.n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ModelError(f"config.head_dim ({self.head_dim}) must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> ModelConfig:
        """Build from a dict; unknown or missing fields are an error (a typo must not pass silently)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = sorted(required - set(d))
        if missing:
            raise ModelError(f"{where}: missing field(s) {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self) -> int:
        """Number of parameters (the tied LM head counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.n_heads + 2 * self.n_kv_heads) + 2 * d
        if self.attention_bias:
            attn += d * (self.n_heads + 2 * self.n_kv_heads) + h
        block = attn + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.n_layers * block + h + head


@dataclass(frozen=True)
class Batch:
    """Where the packed tokens of one forward come from.

    ``cu_seqlens[b]:cu_seqlens[b+1]`` are the new tokens of sequence ``b``, which lives in KV-cache slot
    ``slots[b]`` and holds ``kv_lens[b]`` tokens once they are written (so its new tokens sit at
    positions ``kv_lens[b] - q_len .. kv_lens[b] - 1``). ``positions`` is that per token.
    """

    cu_seqlens: torch.Tensor  # [B+1] int32
    slots: torch.Tensor  # [B] int32
    kv_lens: torch.Tensor  # [B] int32
    start_pos: torch.Tensor  # [B] int32: kv_lens - q_lens
    positions: torch.Tensor  # [total_tokens] int64

    @classmethod
    def build(cls, q_lens: Sequence[int], start_pos: Sequence[int], slots: Sequence[int],
              device: torch.device | str = "cpu") -> Batch:
        """Metadata for sequences that each add ``q_lens[b]`` tokens after ``start_pos[b]`` cached ones."""
        if not (len(q_lens) == len(start_pos) == len(slots)) or not q_lens:
            raise ModelError(f"q_lens, start_pos, slots must be non-empty and of one length, got "
                             f"{len(q_lens)}, {len(start_pos)}, {len(slots)}")
        if min(q_lens) < 1 or min(start_pos) < 0:
            raise ModelError(f"each sequence needs q_len >= 1 and start_pos >= 0, got {list(q_lens)}, {list(start_pos)}")
        if len(set(slots)) != len(slots):
            raise ModelError(f"a slot may appear once per batch, got {list(slots)}")
        cu = [0]
        for n in q_lens:
            cu.append(cu[-1] + n)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(start_pos, q_lens)])
        i32 = dict(dtype=torch.int32, device=device)
        return cls(cu_seqlens=torch.tensor(cu, **i32), slots=torch.tensor(list(slots), **i32),
                   kv_lens=torch.tensor([s + n for s, n in zip(start_pos, q_lens)], **i32),
                   start_pos=torch.tensor(list(start_pos), **i32), positions=positions.to(device))

    @property
    def last_token_index(self) -> torch.Tensor:
        """Index, in the packed tokens, of each sequence's last new token (whose logits predict the next)."""
        return (self.cu_seqlens[1:] - 1).long()


class Linear(nn.Module):
    """A weight ``[out, in]`` (and optional bias) applied through :func:`detlib.kernels.linear`."""

    def __init__(self, n_in: int, n_out: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_out, n_in))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension through :func:`detlib.kernels.rms_norm`."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(x, self.weight, self.eps)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables ``[len(positions), head_dim]`` in the "rotate half" layout (as Qwen3/Llama).

    Computed in float32 per position (an elementwise product, no reduction), so a token's table does
    not depend on which other tokens share the batch.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float()
                                / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [..., tokens, heads, head_dim]`` by the tables ``[..., tokens, head_dim]``."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


# attend(q, k, v) -> out, all [..., tokens, heads, head_dim]: stores k/v in the cache, or attends densely
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Attention(nn.Module):
    """Grouped-query attention with per-head q/k RMSNorm and rotary embeddings (Qwen3)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.n_heads * d, cfg.attention_bias)
        self.k_proj = Linear(h, cfg.n_kv_heads * d, cfg.attention_bias)
        self.v_proj = Linear(h, cfg.n_kv_heads * d, cfg.attention_bias)
        self.o_proj = Linear(cfg.n_heads * d, h, cfg.attention_bias)  # Qwen3 biases o_proj too
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        lead, d = x.shape[:-1], self.cfg.head_dim
        q = self.q_norm(self.q_proj(x).view(*lead, self.cfg.n_heads, d))
        k = self.k_norm(self.k_proj(x).view(*lead, self.cfg.n_kv_heads, d))
        v = self.v_proj(x).view(*lead, self.cfg.n_kv_heads, d)
        out = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
        return self.o_proj(out.reshape(*lead, self.cfg.n_heads * d))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend) -> torch.Tensor:
        drop = self.dropout if self.training else 0.0
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin, attend), drop, self.training)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), drop, self.training)


class Qwen3Model(nn.Module):
    """The decoder. Parameter names follow Hugging Face's Qwen3 (without its ``model.`` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_embeddings else Linear(cfg.hidden_size, cfg.vocab_size)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def init_weights(self, seed: int) -> None:
        """Random initialisation for training: normal(0, 0.02), output projections scaled by depth."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return kernels.linear(x, weight)

    def forward(self, input_ids: torch.Tensor, batch: Batch, cache: Sequence, *, last_only: bool = False
                ) -> torch.Tensor:
        """Logits of packed tokens ``input_ids [total_tokens]`` (``[B, vocab]`` of each sequence's last token
        when ``last_only``). Writes the tokens' keys and values into ``cache`` (one KVCache per layer)."""
        if input_ids.dim() != 1 or input_ids.dtype not in (torch.int32, torch.int64):
            raise ModelError(f"input_ids must be a 1-D integer tensor of packed tokens, got {tuple(input_ids.shape)} "
                             f"{input_ids.dtype}")
        if input_ids.numel() != batch.positions.numel():
            raise ModelError(f"{input_ids.numel()} tokens but the batch describes {batch.positions.numel()}")
        if len(cache) != self.cfg.n_layers:
            raise ModelError(f"cache has {len(cache)} layers, the model {self.cfg.n_layers}")
        max_len = cache[0].max_len
        if int(batch.kv_lens.max()) > max_len:
            raise ModelError(f"a sequence would hold {int(batch.kv_lens.max())} tokens; the cache holds {max_len}")
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(batch.positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer, kv in zip(self.layers, cache):
            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv=kv) -> torch.Tensor:
                kernels.write_kv(kv, k, v, batch.cu_seqlens, batch.slots, batch.start_pos)
                return kernels.attention(q, kv, batch.cu_seqlens, batch.slots, batch.kv_lens, self.scale)

            x = layer(x, cos, sin, attend)
        if last_only:
            x = x[batch.last_token_index]
        return self._logits(x)

    def forward_dense(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, seq, vocab]`` of whole sequences ``input_ids [batch, seq]`` (causal, no cache)."""
        if input_ids.dim() != 2:
            raise ModelError(f"forward_dense expects [batch, seq] token ids, got shape {tuple(input_ids.shape)}")
        seq = input_ids.shape[1]
        if seq > self.cfg.max_seq_len:
            raise ModelError(f"sequence of {seq} tokens is longer than the context ({self.cfg.max_seq_len})")
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(torch.arange(seq, device=x.device), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = kernels.causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale)
            return out.transpose(1, 2)

        for layer in self.layers:
            x = layer(x, cos, sin, attend)
        return self._logits(x)

    def allocate_cache(self, num_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                       device: torch.device | str | None = None) -> list:
        """One :class:`detlib.attention.KVCache` per layer, ``num_slots`` sequences of ``max_len`` tokens each."""
        from detlib.attention import KVCache

        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if max_len > self.cfg.max_seq_len:
            raise ModelError(f"cache length {max_len} exceeds the model's context ({self.cfg.max_seq_len})")
        p = self.embed_tokens.weight
        return [KVCache.allocate(num_slots, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, dtype or p.dtype,
                                 device or p.device) for _ in range(self.cfg.n_layers)]


@torch.no_grad()
def generate(model: Qwen3Model, prompt: Sequence[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0, prefill_chunk: int | None = None,
             stop_token: int | None = None) -> list[int]:
    """Continue one prompt: prefill (whole, or in chunks of ``prefill_chunk`` tokens), then decode one token
    at a time with the KV cache. Greedy when ``temperature == 0``, else sampled (top-k optional) with a
    generator seeded by ``seed``. Returns the new tokens (stops early after ``stop_token``)."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ModelError("prompt is empty: give at least one token")
    if max_new_tokens < 0:
        raise ModelError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if min(prompt) < 0 or max(prompt) >= model.cfg.vocab_size:
        raise ModelError(f"prompt has token ids outside 0..{model.cfg.vocab_size - 1}: is the tokenizer the model's?")
    total = len(prompt) + max_new_tokens
    if total > model.cfg.max_seq_len:
        raise ModelError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens = {total} exceeds the "
                         f"model's context of {model.cfg.max_seq_len} tokens")
    device = model.embed_tokens.weight.device
    cache = model.allocate_cache(1, total)
    gen = torch.Generator(device=device).manual_seed(seed)
    chunk = prefill_chunk or len(prompt)
    if chunk < 1:
        raise ModelError(f"prefill_chunk must be positive, got {prefill_chunk}")
    for start in range(0, len(prompt), chunk):
        piece = prompt[start:start + chunk]
        batch = Batch.build([len(piece)], [start], [0], device)
        logits = model(torch.tensor(piece, device=device), batch, cache, last_only=True)
    out: list[int] = []
    while len(out) < max_new_tokens:
        token = sample(logits[0], temperature, top_k, gen)
        out.append(token)
        if token == stop_token or len(out) == max_new_tokens:
            break
        batch = Batch.build([1], [len(prompt) + len(out) - 1], [0], device)
        logits = model(torch.tensor([token], device=device), batch, cache, last_only=True)
    return out


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen: torch.Generator) -> int:
    """One token from a row of logits: argmax at temperature 0, else a draw from softmax(logits / T)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = kernels.softmax(logits)
    return int(torch.multinomial(probs, 1, generator=gen))


# ---- files ---------------------------------------------------------------------------------------------
def default_model_dir() -> Path:
    """``data/model`` of the repository: the course's trained model."""
    return Path(__file__).resolve().parent.parent / "data" / "model"


def save_model(model: Qwen3Model, directory: str | Path, dtype: torch.dtype = torch.bfloat16,
               metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (weights in ``dtype``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(model.cfg.to_dict(), indent=2) + "\n")
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(directory / MODEL_FILE), metadata=metadata or {})
    return directory / MODEL_FILE


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one safetensors file, with a clear error if it is missing or corrupt."""
    from safetensors import safe_open

    if not path.is_file():
        raise ModelError(f"weights file not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for truncated/garbled files
        raise ModelError(f"weights file {path} is corrupt or not safetensors: {err}") from err


def load_state(model: Qwen3Model, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``tensors`` into ``model``: every parameter must be present with its shape, nothing extra."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ModelError(f"{where}: weights do not match the config: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise ModelError(f"{where}: {name} has shape {tuple(t.shape)}, the config needs {tuple(expected[name].shape)}")
    with torch.no_grad():
        for name, p in expected.items():
            p.copy_(tensors[name].to(p.dtype))


def read_config(path: Path) -> dict:
    """The JSON object at ``path``, with clear errors for a missing or malformed file."""
    if not path.is_file():
        raise ModelError(f"config file not found: {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelError(f"config file {path} is not valid JSON: {err}") from err
    if not isinstance(d, dict):
        raise ModelError(f"config file {path} must hold a JSON object")
    return d


def load_model(directory: str | Path | None = None, *, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu", tokenizer=None) -> Qwen3Model:
    """Load a model saved by :func:`save_model` (default: the course model in ``data/model``).

    With ``tokenizer``, also check that it is the one the model was trained with (the weights file
    records its fingerprint): a model fed another tokenizer's ids produces fluent-looking garbage.
    """
    directory = default_model_dir() if directory is None else Path(directory)
    cfg = ModelConfig.from_dict(read_config(directory / CONFIG_FILE), str(directory / CONFIG_FILE))
    tensors, meta = read_safetensors(directory / MODEL_FILE)
    model = Qwen3Model(cfg)
    load_state(model, tensors, str(directory / MODEL_FILE))
    if tokenizer is not None:
        check_tokenizer(cfg, tokenizer, meta.get("tokenizer_fingerprint"))
    return model.to(device=device, dtype=dtype).eval()


def check_tokenizer(cfg: ModelConfig, tokenizer, fingerprint: str | None) -> None:
    """Raise if ``tokenizer`` cannot be this model's: ids beyond the embedding, or another fingerprint."""
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ModelError(f"tokenizer mismatch: the tokenizer has {tokenizer.vocab_size} tokens, the model embeds "
                         f"{cfg.vocab_size}")
    if fingerprint is not None and fingerprint != tokenizer.fingerprint():
        raise ModelError(f"tokenizer mismatch: the model was trained with tokenizer {fingerprint}, this one is "
                         f"{tokenizer.fingerprint()}")
