"""True on-policy RL (lab 09): the sampler and the trainer must compute the same log-probabilities.

In RL for language models two programs look at the same policy:

* the **sampler**, an inference engine (:class:`detlib.engine.Engine`: continuous batching, a KV cache,
  decode steps mixed with other requests' prefills), draws completions and records each token's
  log-probability ``log p_sampler(token)``;
* the **trainer** recomputes the same log-probabilities with one forward pass over prompt + completion
  (teacher forcing, a ``[batch, seq]`` block: the training batch shape), ``log p_trainer(token)``, and
  takes a policy-gradient step.

Mathematically the two are one policy, so the samples are *on-policy*. Numerically they agree only if
every kernel gives a token the same bits in a decode step amid traffic and in a dense forward: with
default kernels they differ by rounding, the importance ratio ``p_trainer / p_sampler`` drifts from 1 and
the sampler/trainer KL is not zero, so "on-policy" RL is silently off-policy; with batch-invariant kernels
(``use_kernels("invariant")``) the log-probs agree bit for bit, every ratio is exactly 1.0 and the KL is
exactly 0 (He et al., *Defeating Nondeterminism in LLM Inference*, 2025).

This module has the pieces lab 09 uses: :func:`sample_rollouts` (the sampler, with traffic),
:func:`trainer_logprobs` (the recompute), :func:`importance_ratios`, :func:`kl_estimate`,
:func:`compare_logprobs` (the per-token report), and :func:`run_rl`, a GRPO-style loop with a verifiable
reward (the fraction of completion tokens in a target set).

What is bitwise and what is not: the sampler's and the trainer's log-probs, the importance ratios and
the KL are computed with the chosen kernels, and under invariant kernels they are exactly equal, 1.0
and 0. The *gradient* comes from PyTorch autograd on a default-kernel forward of an fp32 master copy of
the weights (detlib's Triton kernels have no backward); it is deterministic run to run on the CPU, but
its bits are not batch-invariant, and on a GPU PyTorch's backward may use atomics. The update weights
that gradient by 1 (``correction="none"``) or by the truncated importance ratios (``"tis"``), which under
invariant kernels are exactly 1.0 as well, so both corrections give bitwise the same loss.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from detlib import kernels
from detlib.engine import Engine, KernelMode, Request
from detlib.grade import reference
from detlib.model import ModelConfig, Qwen3Model

Reward = Callable[[Sequence[int]], float]
Correction = Literal["none", "tis"]

TINY_CONFIG = ModelConfig(vocab_size=32, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                          intermediate_size=64, max_seq_len=32)
"""The CPU policy of lab 09 and its tests: small enough for Triton's interpreter to run invariant
kernels through dozens of engine steps in seconds."""


def tiny_policy(seed: int = 0, weight_scale: float = 8.0) -> Qwen3Model:
    """A random :data:`TINY_CONFIG` model (fp32, eval mode) whose next-token distributions are far from
    uniform (matrices scaled by ``weight_scale``, as a trained model's are), so sampling has something
    to learn and rounding differences show in the log-probs."""
    model = Qwen3Model(TINY_CONFIG)
    model.init_weights(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(weight_scale)
            else:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def target_fraction_reward(targets: Iterable[int]) -> Reward:
    """The verifiable reward of the lab: the fraction of a completion's tokens that are in ``targets``."""
    target_set = frozenset(int(t) for t in targets)
    if not target_set:
        raise ValueError("target_fraction_reward needs at least one target token")

    def reward(tokens: Sequence[int]) -> float:
        return sum(t in target_set for t in tokens) / len(tokens) if tokens else 0.0

    return reward


@dataclass(frozen=True)
class Task:
    """What the policy is trained on: fixed prompts, the target tokens the reward counts, and the token
    pool the sampler's random traffic is cut from."""

    prompts: tuple[tuple[int, ...], ...]
    targets: frozenset[int]
    traffic_pool: tuple[int, ...]
    description: str

    @property
    def reward(self) -> Reward:
        return target_fraction_reward(self.targets)


def tiny_task(seed: int = 0) -> Task:
    """The CPU task for :func:`tiny_policy`: two 3-token prompts; reward = fraction of tokens in {0, 1, 2, 3}
    (about 1/8 of a random policy's tokens); traffic prompts are random tokens."""
    rng = random.Random(seed)
    pool = tuple(rng.randrange(TINY_CONFIG.vocab_size) for _ in range(256))
    return Task(((1, 2, 3), (7, 8, 9)), frozenset({0, 1, 2, 3}), pool,
                "tiny random policy (vocab 32): reward = fraction of completion tokens in {0, 1, 2, 3}")


SHIPPED_PROMPTS = ("HELENA.\n", "PAROLLES.\n", "ROMEO.\n", "JULIET.\n")


def shipped_task(tokenizer, target: str = "!") -> Task:
    """The GPU task for the course model: four speaker cues of the corpus as prompts; reward = fraction of
    completion tokens whose text contains ``target`` (``"!"``: about 0.5% of the corpus's tokens, so the
    model must learn to exclaim); traffic prompts are cut from the corpus."""
    from detlib.experiment import corpus_token_pool

    targets = frozenset(i for i in range(tokenizer.vocab_size) if target in tokenizer.decode([i]))
    if not targets:
        raise ValueError(f"no token of the tokenizer contains {target!r}")
    return Task(tuple(tuple(tokenizer.encode(p)) for p in SHIPPED_PROMPTS), targets,
                tuple(corpus_token_pool(tokenizer)),
                f"course model: reward = fraction of completion tokens containing {target!r} ({len(targets)} tokens)")


# ---- the sampler ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplerConfig:
    """How one round of sampling runs: ``group_size`` completions of ``new_tokens`` tokens per prompt at
    temperature ``temperature``, served by one engine together with ``traffic`` other requests (random
    prompts of ``traffic_prompt_len`` tokens from ``traffic_pool``, greedy, ``traffic_new_tokens`` new
    tokens), all arriving at random steps in ``[0, arrival_window)``, so the batches a completion is
    decoded in change from round to round."""

    group_size: int = 4
    new_tokens: int = 6
    temperature: float = 1.0
    traffic: int = 3
    traffic_prompt_len: tuple[int, int] = (2, 8)
    traffic_new_tokens: tuple[int, int] = (2, 6)
    arrival_window: int = 6
    num_slots: int = 16
    token_budget: int = 16
    max_chunk: int = 4

    def __post_init__(self) -> None:
        if self.group_size < 1 or self.new_tokens < 1 or self.traffic < 0 or self.arrival_window < 1:
            raise ValueError(f"need group_size, new_tokens, arrival_window >= 1 and traffic >= 0, got {self}")
        if self.temperature <= 0:
            raise ValueError(f"RL samples at a positive temperature, got {self.temperature}")


@dataclass
class Rollout:
    """One sampled completion: its prompt (index into the round's prompts), tokens and the sampler's
    float32 log-probability of each token (at temperature 1, as the engine records them)."""

    prompt_index: int
    prompt: tuple[int, ...]
    tokens: list[int]
    sampler_logprobs: torch.Tensor  # float32 [len(tokens)]


def _check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    if not prompts:
        raise ValueError("no prompts: give at least one")
    for p in prompts:
        if not p:
            raise ValueError("a prompt is empty: give at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {list(p)[:8]}... has token ids outside 0..{vocab_size - 1}")


def sample_rollouts(model: Qwen3Model, prompts: Sequence[Sequence[int]], cfg: SamplerConfig,
                    kernels_mode: KernelMode, *, traffic_pool: Sequence[int], seed: int) -> list[Rollout]:
    """The sampler: serve ``cfg.group_size`` sampled completions of every prompt amid random traffic with
    one :class:`~detlib.engine.Engine` in ``kernels_mode``; return them in (prompt, sample) order.

    Everything random (arrival steps, traffic, each request's sampling seed) comes from ``seed``.
    """
    _check_prompts(prompts, model.cfg.vocab_size)
    if len(traffic_pool) <= cfg.traffic_prompt_len[1]:
        raise ValueError(f"traffic_pool of {len(traffic_pool)} tokens is too short for prompts of up to "
                         f"{cfg.traffic_prompt_len[1]} tokens")
    rng = random.Random(seed)
    requests = [Request(i * cfg.group_size + g, tuple(int(t) for t in p), cfg.new_tokens,
                        rng.randrange(cfg.arrival_window), cfg.temperature, 1.0, rng.randrange(2**31))
                for i, p in enumerate(prompts) for g in range(cfg.group_size)]
    n_rl = len(requests)
    for j in range(cfg.traffic):
        n = rng.randint(*cfg.traffic_prompt_len)
        start = rng.randrange(len(traffic_pool) - n)
        requests.append(Request(n_rl + j, tuple(traffic_pool[start:start + n]), rng.randint(*cfg.traffic_new_tokens),
                                rng.randrange(cfg.arrival_window)))
    engine = Engine(model, num_slots=cfg.num_slots, token_budget=cfg.token_budget, max_chunk=cfg.max_chunk,
                    max_len=max(len(r.prompt) + r.max_new_tokens for r in requests), kernels_mode=kernels_mode)
    for r in requests:
        engine.submit(r)
    by_id = {c.request.id: c for c in engine.run()}
    return [Rollout(i // cfg.group_size, by_id[i].request.prompt, list(by_id[i].tokens),
                    torch.tensor(by_id[i].logprobs, dtype=torch.float32)) for i in range(n_rl)]


# ---- the trainer's recompute and the comparison --------------------------------------------------------
@reference
def trainer_logprobs(model: Qwen3Model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                     ) -> list[torch.Tensor]:
    """The trainer's log-probabilities of each completion token, by teacher forcing: one
    :meth:`~detlib.model.Qwen3Model.forward_dense` over the ``[batch, seq]`` block of prompt + completion
    (right-padded), then :func:`detlib.kernels.log_softmax` of the logits at the position *before* each
    completion token. Returns one float32 tensor ``[len(completion)]`` per sequence.

    Runs with the kernels in force (wrap it in ``use_kernels(...)``); differentiable under default
    kernels when gradients are enabled (the RL loop's gradient uses that).
    """
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"need one completion per prompt, got {len(prompts)} prompts and "
                         f"{len(completions)} completions")
    _check_prompts(prompts, model.cfg.vocab_size)
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(len(s) for s in seqs)
    device = model.embed_tokens.weight.device
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)  # causal: padding is unseen
    logits = model.forward_dense(ids)
    rows = [(b, len(p) - 1 + t) for b, (p, c) in enumerate(zip(prompts, completions)) for t in range(len(c))]
    if not rows:
        return [torch.zeros(0) for _ in seqs]
    b_idx = torch.tensor([b for b, _ in rows], device=device)
    pos = torch.tensor([s for _, s in rows], device=device)
    tok = torch.tensor([t for c in completions for t in c], device=device)
    logprobs = kernels.log_softmax(logits[b_idx, pos]).gather(-1, tok[:, None])[:, 0]
    return list(logprobs.cpu().split([len(c) for c in completions]))


@reference
def importance_ratios(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor,
                      cap: float | None = None) -> torch.Tensor:
    """Per-token importance ratios ``p_trainer / p_sampler = exp(log p_trainer - log p_sampler)`` (float32),
    truncated at ``cap`` when given (truncated importance sampling: the off-policy correction that keeps
    a rare huge ratio from blowing up the update). Exactly 1.0 where the two log-probs are equal."""
    if sampler_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(f"log-prob tensors differ in shape: {tuple(sampler_logprobs.shape)} vs "
                         f"{tuple(trainer_logprobs.shape)}")
    ratios = torch.exp(trainer_logprobs.float() - sampler_logprobs.float())
    return ratios if cap is None else ratios.clamp(max=cap)


@reference
def kl_estimate(sampler_logprobs: torch.Tensor, trainer_logprobs: torch.Tensor) -> float:
    """KL(sampler || trainer) estimated from the sampled tokens, the mean over tokens of
    ``(r - 1) - log r`` with ``r = p_trainer / p_sampler`` (Schulman's "k3": unbiased, never negative,
    exactly 0 when the log-probs are equal). Computed in float64 so tiny mismatches are not lost."""
    if sampler_logprobs.shape != trainer_logprobs.shape:
        raise ValueError(f"log-prob tensors differ in shape: {tuple(sampler_logprobs.shape)} vs "
                         f"{tuple(trainer_logprobs.shape)}")
    if sampler_logprobs.numel() == 0:
        raise ValueError("no tokens: the KL of an empty sample is undefined")
    log_r = trainer_logprobs.double() - sampler_logprobs.double()
    return float((torch.expm1(log_r) - log_r).mean())


@dataclass(frozen=True)
class Mismatch:
    """How the sampler's and the trainer's log-probs of the same tokens compare."""

    n_tokens: int
    n_different: int  # tokens whose two log-probs differ in bits
    max_abs_diff: float  # largest |log p_trainer - log p_sampler|
    kl: float  # kl_estimate
    ratio_min: float
    ratio_max: float

    @property
    def bitwise_equal(self) -> bool:
        return self.n_different == 0

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.n_different}/{self.n_tokens} tokens differ, max |diff| {self.max_abs_diff:.3g}, "
                f"KL {self.kl:.3g}, ratios in [{self.ratio_min!r}, {self.ratio_max!r}]")


def compare_logprobs(sampler: Sequence[torch.Tensor], trainer: Sequence[torch.Tensor]) -> Mismatch:
    """Per-token comparison of the sampler's and the trainer's log-probs (lists of per-sequence tensors)."""
    if len(sampler) != len(trainer):
        raise ValueError(f"{len(sampler)} sampler sequences but {len(trainer)} trainer sequences")
    s, t = torch.cat([x.float() for x in sampler]), torch.cat([x.float() for x in trainer])
    ratios = importance_ratios(s, t)
    different = s.view(torch.int32) != t.view(torch.int32)
    return Mismatch(int(s.numel()), int(different.sum()), float((t - s).abs().max()), kl_estimate(s, t),
                    float(ratios.min()), float(ratios.max()))


def measure_mismatch(model: Qwen3Model, task: Task, cfg: SamplerConfig, kernels_mode: KernelMode, *,
                     seed: int = 0) -> tuple[list[Rollout], list[torch.Tensor], Mismatch]:
    """Sample ``task``'s prompts with the engine and recompute with the trainer, both in ``kernels_mode``;
    return the rollouts, the trainer's log-probs and the per-token comparison."""
    rollouts = sample_rollouts(model, task.prompts, cfg, kernels_mode, traffic_pool=task.traffic_pool, seed=seed)
    with kernels.use_kernels(kernels_mode), torch.no_grad():
        trainer = trainer_logprobs(model, [r.prompt for r in rollouts], [r.tokens for r in rollouts])
    return rollouts, trainer, compare_logprobs([r.sampler_logprobs for r in rollouts], trainer)


# ---- the RL loop ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RLConfig:
    """One GRPO-style run: ``steps`` rounds of sampling ``sampler.group_size`` completions per prompt,
    group-relative advantages (reward minus the group's mean), and one Adam step on
    ``-mean_tokens(advantage * weight * log p)``, where the weight is 1 (``correction="none"``: the samples
    are assumed on-policy) or the importance ratio truncated at ``tis_cap`` (``"tis"``)."""

    steps: int = 8
    lr: float = 3e-2
    correction: Correction = "none"
    tis_cap: float = 2.0
    seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.lr <= 0 or self.tis_cap <= 0:
            raise ValueError(f"need steps >= 1, lr > 0 and tis_cap > 0, got {self}")
        if self.correction not in ("none", "tis"):
            raise ValueError(f"correction must be 'none' or 'tis', got {self.correction!r}")


@dataclass(frozen=True)
class StepRecord:
    """What one RL step measured (before its update)."""

    step: int
    reward: float  # mean reward of the step's samples
    kl: float  # sampler/trainer KL estimate
    ratio_min: float
    ratio_max: float
    n_tokens: int
    n_different: int  # tokens whose sampler and trainer log-probs differ in bits
    max_abs_diff: float
    loss: float
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class Policy:
    """The weights the sampler and the trainer share, and the optimizer that moves them.

    ``model`` (in the compute dtype: bf16 on a GPU) is what the engine samples from and what the trainer
    recomputes log-probs with. The optimizer updates an fp32 ``master`` copy (the same object when
    ``model`` is fp32) and copies it back into ``model`` after each step, as mixed-precision training does.
    """

    def __init__(self, model: Qwen3Model, lr: float) -> None:
        self.model = model.eval()
        fp32 = model.embed_tokens.weight.dtype == torch.float32
        self.master = model if fp32 else copy.deepcopy(model).float()
        self.optimizer = torch.optim.Adam(self.master.parameters(), lr=lr)

    def update(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss`` (built from ``master``), then ``model`` gets the new weights."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.master is not self.model:
            with torch.no_grad():
                for p, q in zip(self.model.parameters(), self.master.parameters()):
                    p.copy_(q)


def group_advantages(rewards: Sequence[float], prompt_index: Sequence[int]) -> list[float]:
    """Each reward minus the mean reward of the samples of the same prompt (GRPO's baseline, without
    dividing by the standard deviation)."""
    groups: dict[int, list[float]] = {}
    for r, i in zip(rewards, prompt_index):
        groups.setdefault(i, []).append(r)
    means = {i: sum(v) / len(v) for i, v in groups.items()}
    return [r - means[i] for r, i in zip(rewards, prompt_index)]


def rl_step(policy: Policy, task: Task, cfg: RLConfig, kernels_mode: KernelMode, step: int) -> StepRecord:
    """Sample (engine, ``kernels_mode``), recompute (trainer, ``kernels_mode``), compare, update."""
    start = time.perf_counter()
    rollouts = sample_rollouts(policy.model, task.prompts, cfg.sampler, kernels_mode,
                               traffic_pool=task.traffic_pool, seed=cfg.seed * 1_000_003 + step)
    ps, cs = [r.prompt for r in rollouts], [r.tokens for r in rollouts]
    with kernels.use_kernels(kernels_mode), torch.no_grad():
        trainer = trainer_logprobs(policy.model, ps, cs)
    sampler = [r.sampler_logprobs for r in rollouts]
    mismatch = compare_logprobs(sampler, trainer)
    rewards = [task.reward(c) for c in cs]
    advantages = group_advantages(rewards, [r.prompt_index for r in rollouts])

    with kernels.use_kernels("default"):  # the gradient: autograd through PyTorch's kernels, fp32 master
        logp = torch.cat(trainer_logprobs(policy.master, ps, cs))
    s, t = torch.cat(sampler), torch.cat(trainer)
    weights = torch.ones_like(s) if cfg.correction == "none" else importance_ratios(s, t, cap=cfg.tis_cap)
    adv = torch.tensor([a for a, c in zip(advantages, cs) for _ in c], dtype=torch.float32)
    loss = -(adv * weights * logp).mean()
    policy.update(loss)
    return StepRecord(step, sum(rewards) / len(rewards), mismatch.kl, mismatch.ratio_min, mismatch.ratio_max,
                      mismatch.n_tokens, mismatch.n_different, mismatch.max_abs_diff, float(loss.detach()),
                      time.perf_counter() - start)


def run_rl(models: dict[KernelMode, Qwen3Model], task: Task, cfg: RLConfig, *, progress: bool = True,
           time_budget_s: float | None = None) -> dict[KernelMode, list[StepRecord]]:
    """Train one copy of the policy per kernel mode (``models[mode]``, each updated in place), step by step
    side by side with the same prompts, seeds and traffic; return each mode's step records.

    With ``time_budget_s``, no new step starts once the next one would likely end past the budget (both
    modes always have the same number of steps).
    """
    if not models or any(m not in kernels.MODES for m in models):
        raise ValueError(f"models must map kernel modes {kernels.MODES} to models, got {list(models)}")
    policies = {mode: Policy(m, cfg.lr) for mode, m in models.items()}
    history: dict[KernelMode, list[StepRecord]] = {mode: [] for mode in models}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="RL steps", leave=False)
    start = time.perf_counter()
    try:
        for step in range(cfg.steps):
            elapsed = time.perf_counter() - start
            if time_budget_s is not None and step and elapsed + elapsed / step > time_budget_s:
                break
            for mode, policy in policies.items():
                history[mode].append(rl_step(policy, task, cfg, mode, step))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return history


def summary_table(history: dict[KernelMode, list[StepRecord]]) -> str:
    """A short text table of each mode's run: steps, reward first → last, KL and ratios over all steps."""
    lines = [f"{'kernels':>9} {'steps':>5} {'reward first→last':>18} {'max KL':>10} {'ratio min':>12} "
             f"{'ratio max':>12} {'tokens differ':>14} {'s/step':>7}"]
    for mode, recs in history.items():
        if not recs:
            continue
        n_tok, n_diff = sum(r.n_tokens for r in recs), sum(r.n_different for r in recs)
        lines.append(f"{mode:>9} {len(recs):5d} {recs[0].reward:8.3f} → {recs[-1].reward:6.3f} "
                     f"{max(r.kl for r in recs):10.3g} {min(r.ratio_min for r in recs):12.9f} "
                     f"{max(r.ratio_max for r in recs):12.9f} {n_diff:>7d}/{n_tok:<6d} "
                     f"{sum(r.seconds for r in recs) / len(recs):7.2f}")
    return "\n".join(lines)


def plot_curves(history: dict[str, Sequence[dict[str, float]] | Sequence[StepRecord]], title: str):
    """Three panels over RL steps, one line per kernel mode: mean reward, sampler/trainer KL (symlog, so
    an exact 0 shows), and the spread of the importance ratios (max |ratio - 1|, symlog)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for mode, recs in history.items():
        rows = [r.as_dict() if isinstance(r, StepRecord) else r for r in recs]
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["reward"] for r in rows], marker=".", label=f"{mode} kernels")
        axes[1].plot(steps, [r["kl"] for r in rows], marker=".", label=f"{mode} kernels")
        spread = [max(abs(r["ratio_max"] - 1), abs(1 - r["ratio_min"])) for r in rows]
        axes[2].plot(steps, spread, marker=".", label=f"{mode} kernels")
    axes[0].set(title="Mean reward", xlabel="RL step", ylabel="reward (fraction of target tokens)")
    axes[1].set(title="Sampler/trainer KL", xlabel="RL step", ylabel="KL estimate (symlog)")
    axes[2].set(title="Importance ratios", xlabel="RL step", ylabel="max |p_trainer/p_sampler − 1| (symlog)")
    axes[1].set_yscale("symlog", linthresh=1e-16)  # linear below 1e-16: an exact 0 sits on the axis
    axes[2].set_yscale("symlog", linthresh=1e-9)
    for ax in axes:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig

