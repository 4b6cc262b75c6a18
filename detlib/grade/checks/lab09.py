"""Lab 09 (true on-policy RL): the trainer's recompute of the sampler's log-probs, the sampler/trainer KL
estimate, and the importance ratios."""

from __future__ import annotations

import random

import torch

from detlib import rl
from detlib.backend import device
from detlib.grade.harness import CheckFailed, call, expect_close, expect_tensor
from detlib.grade.spec import exercise
from detlib.kernels import use_kernels
from detlib.numerics import bitwise_equal, diff_summary

_trainer_logprobs = rl.trainer_logprobs.__wrapped__
_kl_estimate = rl.kl_estimate.__wrapped__
_importance_ratios = rl.importance_ratios.__wrapped__


def _as_list(got, n: int, what: str) -> list[torch.Tensor]:
    if not isinstance(got, (list, tuple)) or len(got) != n:
        raise CheckFailed(f"{what} should be a list of {n} tensors (one per sequence), got "
                          f"{type(got).__name__}{f' of length {len(got)}' if isinstance(got, (list, tuple)) else ''}")
    return list(got)


@exercise("09", "trainer_logprobs", points=3, replaces=("detlib.rl.trainer_logprobs",), timeout_s=180,
          hint="one model.forward_dense over the right-padded [batch, seq] ids; the log-prob of completion token t "
               "is kernels.log_softmax(logits[b, len(prompt) - 1 + t])[token]")
def check_trainer_logprobs(trainer_logprobs) -> None:
    seed = random.randrange(1000)
    model = rl.tiny_policy(seed).to(device())  # fp32 everywhere (the tolerance below is fp32's), on detlib's device
    task = rl.tiny_task(seed)
    prompts = [(5,), (1, 2, 3, 4), (9, 10)]  # different lengths: the batch needs padding
    cfg = rl.SamplerConfig(group_size=1, new_tokens=4, traffic=1, arrival_window=3)

    # 1. default kernels: the values (which position, which token), within fp32 rounding of the reference
    rollouts = rl.sample_rollouts(model, prompts, cfg, "default", traffic_pool=task.traffic_pool, seed=seed)
    ps, cs = [r.prompt for r in rollouts], [r.tokens for r in rollouts]
    with torch.no_grad():
        want = _trainer_logprobs(model, ps, cs)
        got = _as_list(call(trainer_logprobs, model, ps, cs), len(ps), "trainer_logprobs(model, prompts, completions)")
    for b, (g, w) in enumerate(zip(got, want)):
        expect_tensor(g, shape=w.shape, dtype=torch.float32, what=f"the log-probs of sequence {b}")
        expect_close(g.detach().cpu(), w, rtol=1e-5, atol=1e-5,
                     what=f"the log-probs of sequence {b} (prompt {list(ps[b])}, completion {cs[b]})",
                     hint="the logits at position i predict token i + 1: completion token t (at position "
                          "len(prompt) + t) is scored by the logits at position len(prompt) - 1 + t")

    # 2. invariant kernels: bit for bit the log-probs the engine recorded while sampling amid traffic
    rollouts = rl.sample_rollouts(model, prompts, cfg, "invariant", traffic_pool=task.traffic_pool, seed=seed)
    ps, cs = [r.prompt for r in rollouts], [r.tokens for r in rollouts]
    with use_kernels("invariant"), torch.no_grad():
        got = _as_list(call(trainer_logprobs, model, ps, cs), len(ps), "trainer_logprobs under invariant kernels")
    for b, (g, r) in enumerate(zip(got, rollouts)):
        expect_tensor(g, shape=r.sampler_logprobs.shape, dtype=torch.float32, what=f"the log-probs of sequence {b}")
        if not bitwise_equal(g.detach().cpu(), r.sampler_logprobs):
            raise CheckFailed(
                f"under invariant kernels, sequence {b}'s trainer log-probs are not bitwise the sampler's: "
                f"{diff_summary(g.detach().cpu(), r.sampler_logprobs)}",
                "use the kernels the engine uses: model.forward_dense and detlib.kernels.log_softmax (not "
                "torch.log_softmax), and no dtype round trips on the way")


@exercise("09", "kl_estimate", points=2, replaces=("detlib.rl.kl_estimate",), timeout_s=60,
          hint="log_r = trainer - sampler in float64; return float(((exp(log_r) - 1) - log_r).mean())")
def check_kl_estimate(kl_estimate) -> None:
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    sampler = -torch.rand(500, generator=gen) * 6
    got = call(kl_estimate, sampler, sampler.clone())
    if not isinstance(got, (float, torch.Tensor)) or float(got) != 0.0:
        raise CheckFailed(f"equal log-probs must give a KL of exactly 0.0, got {got!r}",
                          "(r - 1) - log r is exactly 0 when r == 1: compute it from the difference of the log-probs")
    for scale in (1e-7, 1e-3, 0.5):
        trainer = sampler + torch.randn(500, generator=gen) * scale
        got = call(kl_estimate, sampler, trainer)
        if isinstance(got, torch.Tensor) and got.numel() != 1:
            raise CheckFailed(f"kl_estimate should return one number (a mean over tokens), got shape "
                              f"{tuple(got.shape)}")
        want = _kl_estimate(sampler, trainer)
        expect_close(torch.tensor(float(got), dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                     rtol=1e-3, atol=0.0, what=f"the KL estimate for log-prob differences of about {scale:g}",
                     hint="for tiny differences (r - 1) - log r cancels catastrophically in float32: compute in "
                          "float64, with torch.expm1 if you like")
        if float(got) < 0:
            raise CheckFailed(f"the KL estimate must never be negative, got {float(got)!r} (differences ~{scale:g})")


@exercise("09", "importance_ratios", points=2, replaces=("detlib.rl.importance_ratios",), timeout_s=60,
          hint="torch.exp(trainer - sampler) in float32, then .clamp(max=cap) when cap is given")
def check_importance_ratios(importance_ratios) -> None:
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    sampler = -torch.rand(400, generator=gen) * 6
    trainer = sampler + torch.randn(400, generator=gen) * 0.3
    trainer[::3] = sampler[::3]  # a third of the tokens agree exactly
    for cap in (None, 1.5):
        got = call(importance_ratios, sampler, trainer, cap)
        expect_tensor(got, shape=sampler.shape, dtype=torch.float32, what=f"the ratios (cap={cap})")
        got = got.detach().cpu()
        if not bool((got[::3] == 1.0).all()):
            bad = int((got[::3] != 1.0).nonzero()[0]) * 3
            raise CheckFailed(f"token {bad} has equal sampler and trainer log-probs but ratio {float(got[bad])!r}, "
                              "not exactly 1.0", "exp(trainer - sampler) is exactly exp(0) = 1.0 for equal log-probs")
        expect_close(got, _importance_ratios(sampler.double(), trainer.double(), cap), rtol=1e-6, atol=0.0,
                     what=f"the ratios p_trainer / p_sampler (cap={cap})")
