"""Lab 08 (the deterministic model run): the scheduler's batch-forming step, counting distinct results,
and finding the near-tie behind a divergence."""

from __future__ import annotations

import random

import torch

from detlib import engine, experiment
from detlib.engine import Completion, Request, SeqView
from detlib.grade.harness import CheckFailed, call, expect_equal
from detlib.grade.spec import exercise

_form_batch = engine.form_batch.__wrapped__
_distinct_counts = experiment.distinct_counts.__wrapped__
_near_tie = experiment.near_tie.__wrapped__


def _scenario(rng: random.Random) -> tuple[list[SeqView], list[SeqView], int, int, int]:
    running = []
    for i in range(rng.randint(0, 6)):
        n_prompt = rng.randint(1, 60)
        n_cached = rng.choice([n_prompt, n_prompt + rng.randint(0, 9), rng.randint(0, n_prompt)])
        running.append(SeqView(i, n_prompt, n_cached, max(n_cached + 1, n_prompt)))
    waiting = [SeqView(100 + i, (n := rng.randint(1, 60)), 0, n) for i in range(rng.randint(0, 6))]
    return running, waiting, rng.randint(0, 4), rng.randint(1, 80), rng.randint(1, 32)


@exercise("08", "form_batch", points=3, replaces=("detlib.engine.form_batch",), timeout_s=60,
          hint="decodes first (1 token each), then running prefills (a chunk each), then admit waiting ones "
               "while a slot and budget are left")
def check_form_batch(form_batch) -> None:
    rng = random.Random()
    fixed = [
        ([SeqView(1, 10, 10, 12), SeqView(2, 40, 16, 40)], [SeqView(3, 30, 0, 30)], 1, 40, 16),
        ([], [SeqView(5, 8, 0, 8), SeqView(6, 9, 0, 9)], 2, 100, 4),
        ([SeqView(1, 5, 5, 6)], [SeqView(2, 50, 0, 50)], 0, 10, 16),
        ([SeqView(1, 5, 5, 6), SeqView(2, 5, 5, 9)], [], 3, 1, 8),
    ]
    for case in fixed + [_scenario(rng) for _ in range(300)]:
        running, waiting, slots, budget, chunk = case
        got = call(form_batch, running, waiting, slots, budget, chunk)
        want = _form_batch(running, waiting, slots, budget, chunk)
        if not isinstance(got, list) or [tuple(x) for x in got] != want:
            raise CheckFailed(
                f"with running={[(s.id, s.n_prompt, s.n_cached) for s in running]} (id, prompt, cached), "
                f"waiting={[(s.id, s.n_prompt) for s in waiting]}, free_slots={slots}, token_budget={budget}, "
                f"max_chunk={chunk}: got {got!r}, expected {want!r}")


def _completion(tokens: list[int], logprobs: list[float]) -> Completion:
    c = Completion(Request(0, (1,), max(1, len(tokens))))
    c.tokens, c.logprobs = list(tokens), list(logprobs)
    return c


@exercise("08", "distinct_counts", points=2, replaces=("detlib.experiment.distinct_counts",), timeout_s=60,
          hint="compare the log-prob traces as float32 bits (e.g. bytes of a float32 tensor), not as values")
def check_distinct_counts(distinct_counts) -> None:
    base = [-0.5, -1.25, -0.125]
    one_ulp = float(torch.nextafter(torch.tensor(-1.25), torch.tensor(0.0)))
    cases = [
        [_completion([1, 2, 3], base)] * 4,
        [_completion([1, 2, 3], base), _completion([1, 2, 3], [base[0], one_ulp, base[2]])],
        [_completion([1, 2, 3], base), _completion([1, 2, 4], base), _completion([1, 2, 3], base)],
        [_completion([1], [0.0]), _completion([1], [-0.0])],
        [_completion([5, 6], [-1.0, -2.0]), _completion([5], [-1.0])],
    ]
    for completions in cases:
        got = call(distinct_counts, completions)
        want = _distinct_counts(completions)
        expect_equal(tuple(got) if isinstance(got, (tuple, list)) else got, want,
                     what=f"distinct_counts of {[(c.tokens, c.logprobs) for c in completions]}")


@exercise("08", "near_tie", points=2, replaces=("detlib.experiment.near_tie",), timeout_s=60,
          hint="torch.topk(logits, 2) gives the two largest values and their indices")
def check_near_tie(near_tie) -> None:
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    for n in (2, 7, 4096):
        logits = torch.randn(n, generator=gen) * 3
        got = call(near_tie, logits)
        want = _near_tie(logits)
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            raise CheckFailed(f"near_tie should return (top1, top2, gap), got {got!r}")
        if (int(got[0]), int(got[1])) != want[:2] or abs(float(got[2]) - want[2]) > 1e-6 * max(1.0, abs(want[2])):
            raise CheckFailed(f"near_tie of a row of {n} logits: got {tuple(got)!r}, expected {want!r}")
