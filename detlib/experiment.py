"""The essay's experiment on the course model: one prompt, N times, amid random traffic.

The fixed prompt is submitted ``n_fixed`` times at random moments while other requests (random prompts,
lengths and arrival times) keep the batch size and the cache lengths changing. With default kernels the
fixed prompt's log-probabilities, and sometimes its tokens, depend on what it was batched with; with
batch-invariant kernels every copy is bitwise the same.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from detlib.engine import Completion, Engine, EngineStats, KernelMode, Request
from detlib.grade import reference
from detlib.model import Qwen3Model


#: The fixed prompt of the course's experiment (lab 08 and the recorded GPU run), in the corpus's play format.
DEFAULT_PROMPT = "Romeo.\nTell me, good friar, what news of Juliet?\n"


@dataclass(frozen=True)
class Traffic:
    """How the experiment's requests arrive.

    ``n_fixed`` copies of the fixed prompt and ``n_other`` random requests arrive at random steps in
    ``[0, arrival_window)``; other requests have prompts of ``other_prompt_len`` tokens (inclusive range)
    and generate ``other_new_tokens`` tokens. Everything random comes from ``seed``.

    The fixed prompt is decoded greedily when ``temperature == 0``; otherwise every copy samples at that
    temperature (nucleus ``top_p``) with one and the same seed, as a server does when a client pins its seed:
    the copies then differ only where the batch moved a probability across the seeded draw.
    """

    n_fixed: int = 16
    n_other: int = 32
    max_new_tokens: int = 32
    arrival_window: int = 64
    other_prompt_len: tuple[int, int] = (4, 48)
    other_new_tokens: tuple[int, int] = (4, 48)
    seed: int = 0
    temperature: float = 0.0
    top_p: float = 1.0


def corpus_token_pool(tokenizer, n_chars: int = 20_000, path: str | Path | None = None) -> list[int]:
    """Token ids of the start of the course corpus, where random traffic prompts are cut from."""
    path = Path(path) if path else Path(__file__).resolve().parents[1] / "data" / "corpus" / "shakespeare_plays.txt"
    with open(path, encoding="utf-8") as f:
        text = f.read(n_chars)
    return tokenizer.encode(text)


def make_requests(fixed_prompt: Sequence[int], pool: Sequence[int], traffic: Traffic) -> list[Request]:
    """The fixed prompt ``traffic.n_fixed`` times (ids ``0..n_fixed-1``) plus random greedy traffic."""
    rng = random.Random(traffic.seed)
    if len(pool) <= traffic.other_prompt_len[1]:
        raise ValueError(f"token pool of {len(pool)} tokens is too short for prompts of up to "
                         f"{traffic.other_prompt_len[1]} tokens")
    requests = [Request(i, tuple(fixed_prompt), traffic.max_new_tokens, rng.randrange(traffic.arrival_window),
                        temperature=traffic.temperature, top_p=traffic.top_p, seed=traffic.seed)
                for i in range(traffic.n_fixed)]
    for j in range(traffic.n_other):
        n = rng.randint(*traffic.other_prompt_len)
        start = rng.randrange(len(pool) - n)
        requests.append(Request(traffic.n_fixed + j, tuple(pool[start:start + n]), rng.randint(*traffic.other_new_tokens),
                                rng.randrange(traffic.arrival_window)))
    return requests


@reference
def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first token where two completions differ (``None`` if one is a prefix of the other)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@reference
def distinct_counts(completions: Sequence[Completion]) -> tuple[int, int]:
    """``(distinct token sequences, distinct log-prob traces)``: traces compared bitwise, as float32 bytes."""
    return len({tuple(c.tokens) for c in completions}), len({c.logprob_bits() for c in completions})


@reference
def near_tie(logits: torch.Tensor) -> tuple[int, int, float]:
    """The two most likely tokens of one row of logits and the gap between their logits (``top1 - top2``).

    A divergence between two completions happens where this gap is about as small as the rounding noise
    that the batch changes: a few ulps of the logits.
    """
    if logits.dim() != 1 or logits.numel() < 2:
        raise ValueError(f"near_tie needs one row of at least 2 logits, got shape {tuple(logits.shape)}")
    top = torch.topk(logits.float(), 2)
    return int(top.indices[0]), int(top.indices[1]), float(top.values[0] - top.values[1])


@dataclass
class ExperimentResult:
    """The fixed prompt's completions from one run, with the run's counters."""

    kernels_mode: KernelMode
    completions: list[Completion]  # the fixed prompt's, in finishing order
    stats: EngineStats
    batch_sizes_seen: list[int] = field(default_factory=list)  # sequences in the step of each fixed request's first token

    @property
    def token_counts(self) -> Counter[tuple[int, ...]]:
        return Counter(tuple(c.tokens) for c in self.completions)

    @property
    def n_distinct_completions(self) -> int:
        return distinct_counts(self.completions)[0]

    @property
    def n_distinct_traces(self) -> int:
        """Distinct log-prob traces, compared bitwise."""
        return distinct_counts(self.completions)[1]

    def divergence_positions(self) -> list[int]:
        """For each completion unlike the most common one, the token index where it first differs."""
        common = self.token_counts.most_common(1)[0][0]
        return [d for c in self.completions if (d := first_divergence(common, c.tokens)) is not None]

    def distinct_vs_n(self) -> list[int]:
        """Distinct completions among the first k finished copies, for k = 1..N (the curve of the lab's plot)."""
        seen: set[tuple[int, ...]] = set()
        curve = []
        for c in self.completions:
            seen.add(tuple(c.tokens))
            curve.append(len(seen))
        return curve

    def summary(self) -> dict[str, object]:
        div = self.divergence_positions()
        return {
            "kernels": self.kernels_mode,
            "n": len(self.completions),
            "distinct_completions": self.n_distinct_completions,
            "distinct_logprob_traces": self.n_distinct_traces,
            "first_divergence_min": min(div) if div else None,
            "wall_s": round(self.stats.wall_s, 3),
            "steps": self.stats.steps,
            "tokens_per_s": round(self.stats.tokens_per_s, 1),
            "batch_size_max": max(self.stats.batch_sizes or [0]),
        }


def run_experiment(model: Qwen3Model, requests: Sequence[Request], kernels_mode: KernelMode, *, n_fixed: int,
                   num_slots: int = 32, token_budget: int = 256, max_chunk: int = 64,
                   progress: bool = True) -> ExperimentResult:
    """Serve ``requests`` with one engine and collect the completions of ids ``0..n_fixed-1``."""
    engine = Engine(model, num_slots=num_slots, token_budget=token_budget, max_chunk=max_chunk,
                    max_len=max(len(r.prompt) + r.max_new_tokens for r in requests), kernels_mode=kernels_mode)
    for r in requests:
        engine.submit(r)
    finished = engine.run(progress=f"{kernels_mode} kernels" if progress else False)
    fixed = [c for c in finished if c.request.id < n_fixed]
    sizes = [engine.stats.batch_sizes[c.first_token_step - 1] for c in fixed if c.first_token_step]
    return ExperimentResult(kernels_mode, fixed, engine.stats, sizes)


def variants_table(result: ExperimentResult, decode, k: int = 3) -> list[tuple[int, str]]:
    """The ``k`` most common completions as ``(count, text)``, for showing divergent variants side by side."""
    return [(n, decode(list(tokens))) for tokens, n in result.token_counts.most_common(k)]


def plot_results(results: Sequence[ExperimentResult], title: str = "One prompt amid traffic"):
    """Three panels: distinct completions vs N, divergence positions, and wall time per kernel mode."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for res in results:
        curve = res.distinct_vs_n()
        axes[0].plot(range(1, len(curve) + 1), curve, marker=".", label=f"{res.kernels_mode} kernels")
        axes[1].hist(res.divergence_positions(), bins=20, alpha=0.6, label=f"{res.kernels_mode} kernels")
    axes[0].set(title="Distinct completions vs N", xlabel="completions finished (N)", ylabel="distinct completions")
    axes[1].set(title="Where completions first diverge", xlabel="token index of first divergence",
                ylabel="completions")
    modes = [r.kernels_mode for r in results]
    axes[2].bar(modes, [r.stats.wall_s for r in results], color=["tab:blue", "tab:orange"][:len(results)])
    axes[2].set(title="Wall time per kernel mode", xlabel="kernels", ylabel="seconds")
    for ax in axes[:2]:
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def logit_gaps(model: Qwen3Model, prompt: Sequence[int], completion: Sequence[int]) -> torch.Tensor:
    """For each generated position, the gap between the two largest logits (teacher-forced, one forward).

    Small gaps are where a few ulps of batch-dependent rounding can flip a greedy choice.
    """
    ids = torch.tensor([list(prompt) + list(completion)], device=model.embed_tokens.weight.device)
    logits = model.forward_dense(ids)[0, len(prompt) - 1:len(prompt) - 1 + len(completion)].float()
    top = torch.topk(logits, 2, dim=-1).values
    return (top[:, 0] - top[:, 1]).cpu()
