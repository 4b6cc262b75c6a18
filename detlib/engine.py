"""A small continuous-batching inference engine, shaped like the servers the essay talks about.

Requests arrive over time. At every step a scheduler (:func:`form_batch`) builds one batch out of the
running sequences' decode tokens and chunks of waiting prompts, under a token budget; the model runs that
ragged batch in one forward over a KV cache that holds every running sequence (one slot each); each
sequence whose input is consumed gets its next token (greedy, or sampled with its own seed); finished
sequences leave and free their slot.

So the batch a request is computed in depends on everything else that is in flight — which is exactly
what makes default kernels give different bits for the same prompt, and what batch-invariant kernels
(``kernels="invariant"``) make irrelevant.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from detlib import kernels
from detlib.grade import reference
from detlib.model import Batch, Qwen3Model

KernelMode = Literal["default", "invariant"]


@dataclass(frozen=True)
class Request:
    """One completion request: ``prompt`` token ids, how many new tokens, and how to pick them.

    ``temperature == 0`` is greedy decoding; otherwise tokens are drawn from the top-``top_p`` nucleus of
    ``softmax(logits / temperature)`` with a generator seeded by ``seed``, one draw per token, so a
    request's randomness never depends on the other requests in its batch.
    """

    id: int
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_step: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_token: int | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError(f"request {self.id}: empty prompt")
        if self.max_new_tokens < 1:
            raise ValueError(f"request {self.id}: max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"request {self.id}: need temperature >= 0 and 0 < top_p <= 1, "
                             f"got {self.temperature}, {self.top_p}")


@dataclass(frozen=True)
class SeqView:
    """What the scheduler sees of a sequence: its prompt length and how many tokens are already cached."""

    id: int
    n_prompt: int
    n_cached: int  # tokens whose keys/values are in the KV cache
    n_tokens: int  # prompt + generated so far

    @property
    def in_prefill(self) -> bool:
        return self.n_cached < self.n_prompt


@reference
def form_batch(running: Sequence[SeqView], waiting: Sequence[SeqView], free_slots: int, token_budget: int,
               max_chunk: int) -> list[tuple[int, int]]:
    """The scheduler: which sequences run this step, with how many new tokens each.

    Rules, in this order (the policy of chunked-prefill servers such as vLLM's):

    1. every running sequence that is decoding (prompt fully cached) gets 1 token, in ``running`` order,
       while the budget lasts;
    2. every running sequence still in prefill gets a chunk of ``min(prompt left, max_chunk, budget left)``
       tokens, in ``running`` order;
    3. waiting sequences are admitted in arrival (list) order while a slot is free and budget is left,
       each with a chunk of ``min(prompt, max_chunk, budget left)`` tokens.

    Returns ``[(sequence id, number of new tokens), ...]`` in that order.
    """
    batch: list[tuple[int, int]] = []
    budget = token_budget
    for seq in running:
        if not seq.in_prefill and budget > 0:
            batch.append((seq.id, 1))
            budget -= 1
    for seq in running:
        if seq.in_prefill and budget > 0:
            n = min(seq.n_prompt - seq.n_cached, max_chunk, budget)
            batch.append((seq.id, n))
            budget -= n
    for seq in waiting:
        if free_slots <= 0 or budget <= 0:
            break
        n = min(seq.n_prompt, max_chunk, budget)
        batch.append((seq.id, n))
        budget -= n
        free_slots -= 1
    return batch


@dataclass
class Completion:
    """A finished request: its tokens, each token's log-probability, and when things happened."""

    request: Request
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)  # float32 log p(token) under the model (temperature 1)
    first_token_step: int | None = None
    finish_step: int | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    arrival_time: float | None = None

    def logprob_bits(self) -> bytes:
        """The log-prob trace as raw float32 bytes: equal bytes = bitwise equal trace."""
        return torch.tensor(self.logprobs, dtype=torch.float32).numpy().tobytes()


@dataclass
class _Running:
    completion: Completion
    slot: int
    n_cached: int = 0
    generator: torch.Generator | None = None

    @property
    def all_tokens(self) -> list[int]:
        return list(self.completion.request.prompt) + self.completion.tokens

    def view(self) -> SeqView:
        req = self.completion.request
        return SeqView(req.id, len(req.prompt), self.n_cached, len(req.prompt) + len(self.completion.tokens))


@dataclass
class EngineStats:
    """Throughput and latency counters of one engine run."""

    steps: int = 0
    forward_tokens: int = 0
    generated_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # sequences per step
    step_tokens: list[int] = field(default_factory=list)  # tokens per step
    wall_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> str:
        sizes = self.batch_sizes or [0]
        return (f"{self.steps} steps, {self.generated_tokens} tokens generated in {self.wall_s:.2f} s "
                f"({self.tokens_per_s:.1f} tok/s); sequences per step: min {min(sizes)}, "
                f"mean {sum(sizes) / len(sizes):.1f}, max {max(sizes)}")


class Engine:
    """Continuous batching over one model and one KV cache (``num_slots`` sequences of ``max_len`` tokens).

    ``token_budget`` caps the tokens of one forward (decode tokens plus prefill chunks); ``max_chunk``
    caps one prompt's chunk. ``kernels`` picks default (PyTorch) or invariant (detlib) arithmetic for the
    whole forward, sampling included.
    """

    def __init__(self, model: Qwen3Model, *, num_slots: int = 32, max_len: int | None = None,
                 token_budget: int = 256, max_chunk: int = 64, kernels_mode: KernelMode = "default") -> None:
        if kernels_mode not in kernels.MODES:
            raise ValueError(f"kernels_mode {kernels_mode!r}: expected one of {kernels.MODES}")
        if num_slots < 1 or token_budget < 1 or max_chunk < 1:
            raise ValueError("num_slots, token_budget and max_chunk must be >= 1")
        self.model = model
        self.max_len = max_len or model.cfg.max_seq_len
        self.cache = model.allocate_cache(num_slots, self.max_len)
        self.device = model.embed_tokens.weight.device
        self.token_budget, self.max_chunk, self.kernels_mode = token_budget, max_chunk, kernels_mode
        self.free_slots = list(range(num_slots))
        self.pending: list[Request] = []  # submitted, not yet arrived
        self.waiting: list[Completion] = []  # arrived, no slot yet
        self.running: list[_Running] = []
        self.finished: list[Completion] = []
        self.step_count = 0
        self.stats = EngineStats()

    def submit(self, request: Request) -> None:
        """Queue ``request``; it becomes eligible at its ``arrival_step``."""
        total = len(request.prompt) + request.max_new_tokens
        if total > self.max_len:
            raise ValueError(f"request {request.id}: prompt + max_new_tokens = {total} exceeds the cache "
                             f"length {self.max_len}")
        self.pending.append(request)

    @property
    def idle(self) -> bool:
        return not (self.pending or self.waiting or self.running)

    def _arrivals(self) -> None:
        now = time.perf_counter()
        arrived = [r for r in self.pending if r.arrival_step <= self.step_count]
        self.pending = [r for r in self.pending if r.arrival_step > self.step_count]
        for r in sorted(arrived, key=lambda r: (r.arrival_step, r.id)):
            self.waiting.append(Completion(r, arrival_time=now))

    @torch.no_grad()
    def step(self) -> None:
        """Form one batch, run one forward, pick the next token of every sequence that is ready."""
        self._arrivals()
        waiting_views = [SeqView(c.request.id, len(c.request.prompt), 0, len(c.request.prompt)) for c in self.waiting]
        plan = form_batch([r.view() for r in self.running], waiting_views, len(self.free_slots),
                          self.token_budget, self.max_chunk)
        self.step_count += 1
        if not plan:
            return
        by_id = {r.completion.request.id: r for r in self.running}
        for seq_id, _ in plan:  # admit the waiting sequences the scheduler picked
            if seq_id not in by_id:
                comp = next(c for c in self.waiting if c.request.id == seq_id)
                self.waiting.remove(comp)
                req = comp.request
                gen = torch.Generator().manual_seed(req.seed) if req.temperature > 0 else None
                run = _Running(comp, self.free_slots.pop(0), generator=gen)
                self.running.append(run)
                by_id[seq_id] = run
        seqs = [by_id[i] for i, _ in plan]
        ids: list[int] = []
        for run, (_, n) in zip(seqs, plan):
            ids.extend(run.all_tokens[run.n_cached:run.n_cached + n])
        batch = Batch.build([n for _, n in plan], [r.n_cached for r in seqs], [r.slot for r in seqs], self.device)
        with kernels.use_kernels(self.kernels_mode):
            logits = self.model(torch.tensor(ids, device=self.device), batch, self.cache, last_only=True)
            logprobs = kernels.log_softmax(logits)
            ready = [i for i, (run, (_, n)) in enumerate(zip(seqs, plan)) if run.n_cached + n == len(run.all_tokens)]
            choices = {i: self._choose(seqs[i], logits[i]) for i in ready}
        now = time.perf_counter()
        self.stats.steps += 1
        self.stats.forward_tokens += len(ids)
        self.stats.batch_sizes.append(len(plan))
        self.stats.step_tokens.append(len(ids))
        for i, (run, (_, n)) in enumerate(zip(seqs, plan)):
            run.n_cached += n
            if i not in choices:
                continue
            comp, token = run.completion, choices[i]
            comp.tokens.append(token)
            comp.logprobs.append(float(logprobs[i, token]))
            self.stats.generated_tokens += 1
            if comp.first_token_step is None:
                comp.first_token_step, comp.first_token_time = self.step_count, now
            if len(comp.tokens) == comp.request.max_new_tokens or token == comp.request.stop_token:
                comp.finish_step, comp.finish_time = self.step_count, now
                self.finished.append(comp)
                self.running.remove(run)
                self.free_slots.append(run.slot)
                self.free_slots.sort()

    def _choose(self, run: _Running, logits: torch.Tensor) -> int:
        req = run.completion.request
        if req.temperature == 0:
            return int(torch.argmax(logits))
        return sample_top_p(logits, req.temperature, req.top_p, run.generator)

    def run(self, *, max_steps: int = 1_000_000, progress: bool | str = False) -> list[Completion]:
        """Step until every submitted request has finished; return the completions in finishing order."""
        total = len(self.pending) + len(self.waiting) + len(self.running)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, desc=progress if isinstance(progress, str) else "requests", leave=False)
        start = time.perf_counter()
        try:
            while not self.idle:
                if self.stats.steps >= max_steps:
                    raise RuntimeError(f"engine did not finish within {max_steps} steps")
                done_before = len(self.finished)
                self.step()
                if bar is not None:
                    bar.update(len(self.finished) - done_before)
        finally:
            self.stats.wall_s += time.perf_counter() - start
            if bar is not None:
                bar.close()
        return self.finished


def sample_top_p(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    """Draw a token from the smallest set of most likely tokens whose probability reaches ``top_p``.

    The probabilities come from :func:`detlib.kernels.softmax` (invariant in invariant mode); the draw uses
    only the request's own generator, so the same logits and seed always give the same token.
    """
    probs = kernels.softmax(logits.float() / temperature)
    sorted_probs, order = torch.sort(probs, descending=True, stable=True)
    if top_p < 1.0:
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = int(torch.searchsorted(cumulative, torch.tensor([top_p], device=cumulative.device))) + 1
        sorted_probs = sorted_probs[:keep]
    choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator)
    return int(order[int(choice)])
