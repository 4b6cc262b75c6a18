"""Lab 01 (float order): sums in a given order, checked bit for bit against detlib.summation.

The checks are registered in the order the lab presents the exercises.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator

import torch

from detlib import summation
from detlib.grade.harness import CheckFailed, call, expect_bits
from detlib.grade.spec import exercise
from detlib.numerics import bitwise_equal

# The plain functions behind the guarded references: the checks compute expected answers with them.
_sequential = summation.sequential_sum.__wrapped__
_pairwise = summation.pairwise_sum.__wrapped__
_blocked = summation.blocked_sum.__wrapped__
_count_distinct_sums = summation.count_distinct_sums.__wrapped__

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _lists(sizes: tuple[int, ...], seed: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Fresh float32 lists of the given sizes: normal numbers times magnitudes over two decades.

    Two decades make rounding matter while keeping every partial sum of 1000 of them inside float16's range.
    """
    gen = torch.Generator().manual_seed(seed)
    for n in sizes:
        scale = 10.0 ** (2 * torch.rand(n, generator=gen))
        yield n, torch.randn(n, generator=gen) * scale


_MISTAKES: dict[str, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    "what torch.sum gives (its own tree, not this one)": lambda x, dtype: x.to(dtype).sum(),
    "a float64 sum rounded once at the end": lambda x, dtype: x.to(torch.float64).sum().to(dtype),
    "the sequential (left-to-right) sum": _sequential,
    "the pairwise sum": _pairwise,
}


def _same(got: object, want: torch.Tensor) -> bool:
    return (isinstance(got, torch.Tensor) and got.dtype == want.dtype and got.numel() == want.numel()
            and bitwise_equal(got.reshape(want.shape), want))


def _diagnose(learner: Callable[[torch.Tensor], object], reference: Callable[[torch.Tensor], torch.Tensor],
              dtype: torch.dtype, seed: int) -> str | None:
    """Name the usual mistake the learner's function makes: it must match it on four fresh lists of 1000,
    at least two of which tell the mistake and the right answer apart."""
    lists = [x for _, x in _lists((1000,) * 4, seed + 1)]
    try:
        gots = [learner(x) for x in lists]
    except Exception:  # the learner's code failing here says nothing about which mistake it is
        return None
    for label, mistake in _MISTAKES.items():
        wrong = [mistake(x, dtype) for x in lists]
        telling = sum(not _same(w, reference(x)) for w, x in zip(wrong, lists, strict=True))
        if telling >= 2 and all(_same(g, w) for g, w in zip(gots, wrong, strict=True)):
            return label
    return None


def _compare(got: object, want: torch.Tensor, what: str, hint: str, *, learner: Callable[[torch.Tensor], object],
             reference: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype, seed: int) -> None:
    """``expect_bits``, plus, on failure, which usual mistake the learner's function seems to make."""
    try:
        expect_bits(got, want, what=what)  # type: ignore[arg-type]
    except CheckFailed as err:
        mistake = _diagnose(learner, reference, dtype, seed)
        note = f"; on other lists your function gives {mistake}" if mistake else ""
        raise CheckFailed(err.reason + note, err.hint or hint) from None


@exercise(
    "01",
    "sequential_sum",
    points=2,
    replaces=("detlib.summation.sequential_sum",),
    timeout_s=60,
    hint="cast x to dtype, start from x[0] and add one element at a time, keeping the running total a "
    "tensor of that dtype (not torch.sum, torch.cumsum, Python floats or Python's sum())",
)
def check_sequential_sum(sequential_sum: Callable[..., torch.Tensor]) -> None:
    """``sequential_sum(x, dtype)`` must add ``x`` left to right in ``dtype`` and return a 0-dim tensor."""
    seed = secrets.randbelow(2**31)
    for dtype in _DTYPES:
        for n, x in _lists((1, 2, 3, 7, 64, 1000), seed):
            for given in (x, x.to(dtype)):
                want = _sequential(given, dtype)
                got = call(sequential_sum, given, dtype)
                what = f"sequential_sum(x, {_name(dtype)}) for a {_name(given.dtype)} list of {n} (seed {seed})"
                _compare(got, want, what, "every addition must round to dtype, in list order",
                         learner=lambda v, dt=dtype: sequential_sum(v, dt),
                         reference=lambda v, dt=dtype: _sequential(v, dt), dtype=dtype, seed=seed)


@exercise(
    "01",
    "count_distinct_sums",
    points=2,
    replaces=(
        "detlib.summation.count_distinct_sums",
        "detlib.summation.count_distinct",
        "detlib.summation.sequential_sum",
    ),
    timeout_s=60,
    hint="x[orders] is an (n_orders, n) tensor: add its columns one by one in dtype to get every order's "
    "sum at once, then count distinct bit patterns (view as an integer dtype, then torch.unique)",
)
def check_count_distinct_sums(count_distinct_sums: Callable[..., int]) -> None:
    """``count_distinct_sums(x, orders, dtype)``: distinct bit patterns among the orders' sequential sums."""
    seed = secrets.randbelow(2**31)
    cases: list[tuple[str, torch.Tensor, torch.Tensor, torch.dtype]] = []
    for dtype in _DTYPES[:3]:
        for n, decades in ((8, 0), (50, 2), (200, 3)):
            x = summation.swallowing_list(n, decades, seed=seed)
            orders = summation.random_orders(n, 300, seed=seed + n)
            cases.append((f"a list of {n} over {decades} decades, 300 orders, {_name(dtype)} (seed {seed})",
                          x, orders, dtype))
    x = summation.swallowing_list(30, 2, seed=seed)
    cases.append(("300 copies of one order", x, torch.arange(30).expand(300, 30).clone(), torch.float32))
    special = torch.tensor([1.0, float("inf"), 2.0, float("-inf"), 3.0])
    cases.append(("a list holding inf and -inf (every order gives NaN)", special,
                  summation.random_orders(5, 50, seed=seed), torch.float32))
    for what, x, orders, dtype in cases:
        want = _count_distinct_sums(x, orders, dtype)
        got = call(count_distinct_sums, x, orders, dtype)
        if isinstance(got, bool) or not isinstance(got, int):
            raise CheckFailed(f"for {what}: returned {type(got).__name__} {got!r}, expected the Python int {want}",
                              "return a Python int: int(...) around a tensor count")
        if got != want:
            hint = None
            if "NaN" in what:
                hint = "NaNs with the same bits are one result: count bit patterns (as in lab 00), not values"
            raise CheckFailed(f"for {what}: returned {got}, expected {want} distinct sums", hint)


@exercise(
    "01",
    "pairwise_sum",
    points=2,
    replaces=("detlib.summation.pairwise_sum",),
    timeout_s=60,
    hint="one level: y = [x0+x1, x2+x3, ...] in dtype, with an odd last element copied up unchanged; "
    "repeat until one element is left",
)
def check_pairwise_sum(pairwise_sum: Callable[..., torch.Tensor]) -> None:
    """``pairwise_sum(x, dtype)`` must follow Higham's pairwise tree, level by level, in ``dtype``."""
    seed = secrets.randbelow(2**31)
    for dtype in _DTYPES:
        for n, x in _lists((1, 2, 3, 5, 6, 8, 13, 100, 1000, 1023), seed):
            want = _pairwise(x, dtype)
            got = call(pairwise_sum, x, dtype)
            hint = (f"for n = {n} the tree is {summation.tree_expression('pairwise', n)}" if n <= 8 else
                    "an odd last element is carried up a level unchanged (not split into halves n//2 and n - n//2)")
            _compare(got, want, f"pairwise_sum(x, {_name(dtype)}) for a list of {n} (seed {seed})", hint,
                     learner=lambda v, dt=dtype: pairwise_sum(v, dt), reference=lambda v, dt=dtype: _pairwise(v, dt),
                     dtype=dtype, seed=seed)


@exercise(
    "01",
    "blocked_sum",
    points=2,
    replaces=("detlib.summation.blocked_sum",),
    timeout_s=60,
    hint="sum x[0:block], x[block:2*block], ... each left to right in dtype (the last block may be shorter), "
    "then add the block sums left to right",
)
def check_blocked_sum(blocked_sum: Callable[..., torch.Tensor]) -> None:
    """``blocked_sum(x, block, dtype)``: blocks summed left to right, then the block sums left to right."""
    seed = secrets.randbelow(2**31)
    shapes = ((1, 1), (10, 1), (10, 3), (10, 10), (10, 32), (100, 7), (999, 100), (1000, 32), (1000, 128))
    for dtype in _DTYPES[:3]:
        for (n, x), (_, block) in zip(_lists(tuple(n for n, _ in shapes), seed), shapes, strict=True):
            want = _blocked(x, block, dtype)
            got = call(blocked_sum, x, block, dtype)
            what = f"blocked_sum(x, block={block}, {_name(dtype)}) for a list of {n} (seed {seed})"
            hint = (f"for n = {n}, block = {block} the tree is {summation.tree_expression('blocked', n, block)}"
                    if n <= 10 else "the last block is shorter when block does not divide n")
            _compare(got, want, what, hint, learner=lambda v, b=block, dt=dtype: blocked_sum(v, b, dt),
                     reference=lambda v, b=block, dt=dtype: _blocked(v, b, dt), dtype=dtype, seed=seed)
