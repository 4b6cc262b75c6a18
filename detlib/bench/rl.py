"""Sampler vs trainer in a small RL run, default vs invariant kernels (lab 09).

``python -m detlib.bench rl`` trains two copies of the course model (``data/model``, bf16 on a GPU), one
with default and one with invariant kernels, side by side on the same prompts, seeds and traffic, and
records per step the mean reward, the sampler/trainer KL, the importance-ratio range and how many tokens
had different log-probs in the sampler and the trainer. ``--tiny`` runs the CPU setup of the lab instead
(a tiny random policy), for a quick check of the command anywhere.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict

import torch

import detlib
from detlib import kernels, rl
from detlib.bench.record import record
from detlib.model import Qwen3Model

DESCRIPTION = "sampler vs trainer log-probs and a small RL run, default vs invariant kernels (lab 09)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tiny", action="store_true", help="the lab's tiny CPU policy and task instead of data/model")
    p.add_argument("--steps", type=int, default=None, help="RL steps per mode (default: 30, tiny: 3)")
    p.add_argument("--group-size", type=int, default=None, help="completions per prompt (default: 8, tiny: 4)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default: 32, tiny: 6)")
    p.add_argument("--traffic", type=int, default=None, help="other requests per sampling round (default: 16, tiny: 3)")
    p.add_argument("--lr", type=float, default=None, help="Adam learning rate (default: 3e-4, tiny: 3e-2)")
    p.add_argument("--target", default="!", help="the reward counts completion tokens containing this text")
    p.add_argument("--correction", choices=("none", "tis"), default="none",
                   help="importance weights of the update: none (assume on-policy) or truncated ratios")
    p.add_argument("--time-budget", type=float, default=120.0,
                   help="seconds for the whole run (load, compile, measure, train): no RL step starts that "
                        "would likely end past it; both modes keep equal steps")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="policy dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--modes", default="default,invariant",
                   help="comma-separated kernel modes to run (default alone: a quick CPU look at the course model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="write data/gpu/rl.json")


def _setup(args: argparse.Namespace, dtype: torch.dtype) -> tuple[rl.Task, dict[str, Qwen3Model], rl.RLConfig]:
    """The task, one fresh policy per kernel mode, and the run's configuration (course model or tiny)."""
    tiny = args.tiny
    pick = lambda value, big, small: value if value is not None else (small if tiny else big)  # noqa: E731
    sampler = rl.SamplerConfig(
        group_size=pick(args.group_size, 8, 4), new_tokens=pick(args.new_tokens, 32, 6),
        traffic=pick(args.traffic, 16, 3),
        traffic_prompt_len=(2, 8) if tiny else (8, 64), traffic_new_tokens=(2, 6) if tiny else (8, 48),
        arrival_window=6 if tiny else 16, num_slots=16 if tiny else 64, token_budget=16 if tiny else 512,
        max_chunk=4 if tiny else 64)
    cfg = rl.RLConfig(steps=pick(args.steps, 30, 3), lr=pick(args.lr, 3e-4, 3e-2), correction=args.correction,
                      seed=args.seed, sampler=sampler)
    modes = [m.strip() for m in args.modes.split(",")]
    if not modes or any(m not in kernels.MODES for m in modes) or len(set(modes)) != len(modes):
        raise SystemExit(f"--modes {args.modes!r}: expected distinct modes among {', '.join(kernels.MODES)}")
    if tiny:
        task = rl.tiny_task(args.seed)
        models = {mode: rl.tiny_policy(args.seed).to(detlib.device(), dtype) for mode in modes}
    else:
        from detlib.model import load_model
        from detlib.tokenizer import load_tokenizer

        tok = load_tokenizer()
        task = rl.shipped_task(tok, args.target)
        models = {mode: load_model(dtype=dtype, device=detlib.device(), tokenizer=tok) for mode in modes}
    return task, models, cfg


def main(args: argparse.Namespace) -> int:
    if args.record and (args.tiny or detlib.is_interpreter()):
        raise SystemExit("--record writes the course model's run on a GPU (data/gpu/rl.json): drop --tiny and "
                         "run it where a GPU is")
    start = time.perf_counter()
    dtype = getattr(torch, args.dtype) if args.dtype else detlib.compute_dtype()
    task, models, cfg = _setup(args, dtype)
    print(f"{task.description}; {len(task.prompts)} prompts x {cfg.sampler.group_size} completions of "
          f"{cfg.sampler.new_tokens} tokens amid {cfg.sampler.traffic} other requests; {dtype}, "
          f"{detlib.environment().device_name}")
    snapshot = {}
    for mode, model in models.items():  # the per-token picture before training (the lab's first plot)
        rollouts, trainer, mismatch = rl.measure_mismatch(model, task, cfg.sampler, mode, seed=cfg.seed + 999)
        diffs = torch.cat(trainer) - torch.cat([r.sampler_logprobs for r in rollouts])
        snapshot[mode] = {**mismatch.as_dict(), "logprob_diffs": [float(d) for d in diffs]}
        print(f"{mode:>9} before training: {mismatch}")
    history = rl.run_rl(models, task, cfg, progress=True,
                        time_budget_s=max(1.0, args.time_budget - (time.perf_counter() - start)))
    print(rl.summary_table(history))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.record:
        payload = {
            "task": task.description,
            "model": "tiny random policy" if args.tiny else "data/model",
            "dtype": str(dtype),
            "config": {k: v for k, v in vars(args).items() if k not in ("record", "_module")},
            "rl": asdict(cfg),
            "before_training": snapshot,
            "history": {mode: [r.as_dict() for r in recs] for mode, recs in history.items()},
        }
        print("recorded", record("rl", payload))
    return 0
