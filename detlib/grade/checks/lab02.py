"""Lab 02 (the concurrency myth): a fixed-tree reduction kernel and a run-to-run determinism checker."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import torch

from detlib.backend import device, is_interpreter
from detlib.grade.harness import CheckFailed, call, expect_tensor
from detlib.grade.spec import exercise
from detlib.numerics import diff_summary
from detlib.reduce import tree_sum as _tree_sum_ref

_reference_tree = _tree_sum_ref.__wrapped__  # type: ignore[attr-defined]  # unguarded: the check's own tree
_TREE_BLOCKS = tuple(2**k for k in range(4, 14))

_ORDERS = ("hardware", "reversed", "random", "random", "random", "random")


def _vector(n: int, gen: torch.Generator) -> torch.Tensor:
    """Normal numbers times magnitudes over two decades: rounding matters, nothing overflows."""
    return (torch.randn(n, generator=gen) * 10.0 ** (2 * torch.rand(n, generator=gen))).to(device())


def _sequence(values: list[torch.Tensor]) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """A function returning the given tensors in turn (cycling), and a list that counts its calls."""
    calls: list[int] = []

    def fn() -> torch.Tensor:
        calls.append(1)
        return values[(len(calls) - 1) % len(values)].clone()

    return fn, calls


@exercise(
    "02",
    "distinct_results",
    points=2,
    replaces=("detlib.reduce.distinct_results", "detlib.reduce.count_distinct"),
    timeout_s=60,
    hint="call fn() runs times; keep one key per result made of its shape and its bytes "
    "(t.cpu().contiguous().view(torch.uint8) or .numpy().tobytes()), and count the distinct keys",
)
def check_distinct_results(distinct_results: Callable[[Callable[[], torch.Tensor], int], int]) -> None:
    """``distinct_results(fn, runs)``: how many different bit patterns ``runs`` calls of ``fn`` returned."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(1000, generator=gen)
    up = torch.nextafter(base, torch.full_like(base, math.inf))
    k = 2 + secrets.randbelow(5)
    variants = [base.clone() for _ in range(k)]
    for i, v in enumerate(variants):
        v[i] = up[i]  # k results, each one ulp away from the others in one element
    cases = [
        ("a function that always returns the same tensor", [base], 40, 1, None),
        (f"a function cycling through {k} tensors that differ by one ulp", variants, 10 * k, k,
         "compare bits, not rounded or printed values"),
        (f"the same, called only {k - 1} times", variants, k - 1, k - 1, "count only the results you saw"),
        ("a function returning 0.0 and -0.0 in turn", [torch.tensor(0.0), torch.tensor(-0.0)], 10, 2,
         "0.0 == -0.0, yet their bits differ: compare bits (as in lab 00)"),
        ("a function that always returns NaN", [torch.tensor([math.nan, 1.0])], 10, 1,
         "NaN != NaN, yet the same bits come back every time: compare bits (as in lab 00)"),
        ("a function returning zeros of shape (2,) and of shape (1, 2) in turn",
         [torch.zeros(2), torch.zeros(1, 2)], 6, 2, "two results of different shapes are different results"),
        ("a bfloat16 result that never changes", [base.to(torch.bfloat16)], 20, 1, None),
    ]
    for what, values, runs, want, hint in cases:
        fn, calls = _sequence([v.to(device()) for v in values])
        got = call(distinct_results, fn, runs)
        if isinstance(got, bool) or not isinstance(got, int):
            raise CheckFailed(f"for {what}: returned {type(got).__name__} {got!r}, expected the Python int {want}",
                              "return a Python int")
        if len(calls) != runs:
            raise CheckFailed(f"for {what}: distinct_results(fn, {runs}) called fn {len(calls)} times, "
                              f"expected {runs}", "call fn exactly runs times")
        if got != want:
            raise CheckFailed(f"for {what} (seed {seed}): returned {got}, expected {want} distinct results", hint)


@exercise(
    "02",
    "tree_sum",
    points=3,
    replaces=("detlib.reduce.tree_sum",),
    timeout_s=120,
    hint="each program reads its block id from the order, sums its block with tl.sum and stores it in "
    "partials[block_id] (no atomic_add); relaunch on the partials until one value is left",
)
def check_tree_sum(tree_sum: Callable[..., torch.Tensor]) -> None:
    """``tree_sum(x, order)``: close to the exact sum, and the same bits whatever order the programs run in."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    sizes = (1, 100, 256, 257, 5000) + ((20000,) if is_interpreter() else (1 << 20, 3_000_001))
    for n in sizes:
        x = _vector(n, gen)
        got = expect_tensor(call(tree_sum, x, "random"), shape=(), dtype=torch.float32,
                            what=f"tree_sum(x, 'random') for n = {n}")
        exact = float(x.double().sum())
        # a float32 tree over n values: each level rounds once, so a few ulps of sum|x| per level
        bound = 4 * (math.ceil(math.log2(n)) + 2) * 2.0**-24 * float(x.double().abs().sum())
        if not abs(float(got) - exact) <= bound:
            raise CheckFailed(f"tree_sum for n = {n} (seed {seed}) gave {float(got):.9g}, the exact sum is "
                              f"{exact:.9g} (allowed error {bound:.3g})",
                              "mask the last block's tail with other=0.0, and make sure every block is summed once")
    n = 64 * 256 + 17
    x = _vector(n, gen)
    results = [call(tree_sum, x, order) for order in _ORDERS]
    first = results[0]
    for order, r in zip(_ORDERS, results, strict=True):
        if not isinstance(r, torch.Tensor) or diff_summary(r, first).n_different:
            raise CheckFailed(f"tree_sum(x, {order!r}) for n = {n} (seed {seed}) is not bitwise equal to "
                              f"tree_sum(x, 'hardware'): the sum depends on the order the programs run in",
                              "no program may add into another's result: store each block's sum in its own slot")
    # the tree itself: blocks of one power-of-two size summed with tl.sum, level after level (torch's own
    # sum is order-independent too, but it is not this tree).  Values over six decades make the block size
    # show in the bits; one block size must explain every vector.  Only under the interpreter: there tl.sum
    # of a block has one order; on a GPU it follows the kernel's warps, which a correct answer may choose.
    if is_interpreter():
        sizes_left = set(_TREE_BLOCKS)
        for _ in range(6):
            x = (torch.randn(n, generator=gen) * 10.0 ** (6 * torch.rand(n, generator=gen))).to(device())
            got = expect_tensor(call(tree_sum, x, "hardware"), shape=(), dtype=torch.float32,
                                what=f"tree_sum(x, 'hardware') for n = {n}")
            sizes_left = {b for b in sizes_left if diff_summary(got, _reference_tree(x, block=b)).n_different == 0}
            if not sizes_left:
                raise CheckFailed(f"tree_sum for n = {n} (seed {seed}) is not the fixed tree of the exercise: no "
                                  f"block size from {min(_TREE_BLOCKS)} to {max(_TREE_BLOCKS)}, summed with tl.sum "
                                  "level after level, gives its bits on every test vector",
                                  "sum each BLOCK-element block with tl.sum in tree_sum_kernel, then the partials "
                                  "the same way; torch's x.sum() is not the exercise")
