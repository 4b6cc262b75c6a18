"""Sums of one list of floats in many orders: the arithmetic behind every reduction kernel.

Floating-point addition rounds after every step, so it is not associative: ``(a + b) + c`` and
``a + (b + c)`` can differ in the last bits.  A sum of ``n`` numbers is therefore not one number but
one number *per reduction tree*: the left-to-right order of a loop, the pairwise tree of a tree
reduction, the blocks of a kernel that splits its input among programs.  Lab 01 counts how many
different results one list can have, and shows the two cures: fix the tree (reproducible for free) or
sum exactly (order-independent, at a cost).

Everything here is plain torch, one correctly rounded addition at a time, in the dtype asked for:
no ``torch.sum`` (its tree is an implementation detail), no ``torch.cumsum`` (it accumulates in
float64 on the CPU) and no Python ``sum()`` (compensated since Python 3.12).  Each function takes one
list (a 1-D tensor) or many lists at once (the last dimension is the list), and walks the lists'
columns together, so the sums of thousands of orders of one list cost about as much as one sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from detlib.grade.guard import reference

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Method = Literal["sequential", "pairwise", "blocked", "kahan", "neumaier", "exact"]
METHODS: tuple[Method, ...] = ("sequential", "pairwise", "blocked", "kahan", "neumaier", "exact")
FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_INT_OF_WIDTH = {8: torch.int64, 4: torch.int32, 2: torch.int16}


# ----------------------------------------------------------------------------------------------- input
def _rows(x: torch.Tensor, dtype: torch.dtype | None, who: str) -> tuple[torch.Tensor, torch.Size, torch.dtype]:
    """Validate ``x`` and return it as a 2-D ``(lists, n)`` tensor in ``dtype``, with the batch shape."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{who} needs a torch.Tensor, got {type(x).__name__}")
    dtype = x.dtype if dtype is None else dtype
    if x.dtype not in FLOAT_DTYPES or dtype not in FLOAT_DTYPES:
        raise TypeError(f"{who} sums float64, float32, float16 or bfloat16 values; got {x.dtype} to sum in {dtype}")
    if x.dim() == 0:
        raise ValueError(f"{who} needs a list: a tensor with at least one dimension, got a 0-dim tensor")
    if x.shape[-1] == 0:
        raise ValueError(f"{who} needs at least one element per list, got shape {tuple(x.shape)}")
    batch = x.shape[:-1]
    return x.detach().to(dtype).reshape(-1, x.shape[-1]), batch, dtype


def _sequential(rows: torch.Tensor) -> torch.Tensor:
    """Left to right, ``((x0 + x1) + x2) + ...``, every row at once: one rounded addition per column."""
    cols = rows.t().contiguous()
    acc = cols[0].clone()
    for col in cols[1:]:
        acc.add_(col)
    return acc


def _pairwise(rows: torch.Tensor) -> torch.Tensor:
    """Higham's pairwise sum: add neighbours ``x0+x1, x2+x3, ...``, carry an odd last element, repeat."""
    while rows.shape[1] > 1:
        n = rows.shape[1]
        pairs = rows[:, 0 : n - 1 : 2] + rows[:, 1:n:2]
        rows = torch.cat([pairs, rows[:, n - 1 :]], dim=1) if n % 2 else pairs
    return rows[:, 0]


def _blocked(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Sum each block of ``block`` consecutive elements left to right, then the block sums left to right."""
    lists, n = rows.shape
    full = n // block
    partials = []
    if full:
        partials.append(_sequential(rows[:, : full * block].reshape(lists * full, block)).reshape(lists, full))
    if full * block < n:
        partials.append(_sequential(rows[:, full * block :]).unsqueeze(1))
    return _sequential(torch.cat(partials, dim=1))


def _kahan(rows: torch.Tensor) -> torch.Tensor:
    """Kahan's compensated sum: carry the rounding error of each addition into the next one."""
    total = torch.zeros_like(rows[:, 0])
    carry = torch.zeros_like(total)
    for col in rows.t():
        y = col - carry
        t = total + y
        carry = (t - total) - y
        total = t
    return total


def _neumaier(rows: torch.Tensor) -> torch.Tensor:
    """Neumaier's variant of Kahan's sum: also right when an element is larger than the running total."""
    cols = rows.t()
    total = cols[0].clone()
    carry = torch.zeros_like(total)
    for col in cols[1:]:
        t = total + col
        lost = torch.where(total.abs() >= col.abs(), (total - t) + col, (col - t) + total)
        carry = carry + lost
        total = t
    return total + carry


def _neighbour(value: torch.Tensor, step: int) -> torch.Tensor:
    """The float ``step`` units in the last place away from ``value`` (non-negative finite values only)."""
    ints = _INT_OF_WIDTH[value.element_size()]
    return (value.view(ints) + step).view(value.dtype)


def _round_exact(values: list[float], dtype: torch.dtype) -> float:
    """The exact sum of ``values`` correctly rounded (to nearest, ties to even) to ``dtype``, as a Python float.

    ``math.fsum`` rounds the exact sum to float64.  Rounding that again to a narrower dtype can go wrong
    (double rounding), and so can torch's own float64 -> float16/bfloat16 cast, which goes through float32.
    So the two floats of ``dtype`` around the sum are found, and the sum is compared with their midpoint;
    when the float64 sum *is* the midpoint, the sign of the exact remainder decides.
    """
    total = math.fsum(values)
    if dtype == torch.float64 or not math.isfinite(total) or total == 0.0:
        return total
    info, size = torch.finfo(dtype), abs(total)
    if size >= info.max:  # between the largest float and infinity
        low = torch.tensor(info.max, dtype=dtype)
        high = torch.tensor(float("inf"), dtype=dtype)
    else:
        near = torch.tensor(size, dtype=torch.float64).to(dtype)  # one of the two floats around the sum
        if float(near) == size:
            return total
        low, high = (_neighbour(near, -1), near) if float(near) > size else (near, _neighbour(near, 1))
    # past the largest float, the next "float" is the power of two above it (their midpoint: where rounding overflows)
    high_value = math.ldexp(1.0, math.frexp(info.max)[1]) if math.isinf(float(high)) else float(high)
    midpoint = (float(low) + high_value) / 2  # exact in float64
    if size == midpoint:
        remainder = math.fsum([*values, -total]) * math.copysign(1.0, total)  # exact size - midpoint, signed
        if remainder == 0.0:  # a true tie: to the float with an even last bit
            low_is_even = int(low.view(_INT_OF_WIDTH[low.element_size()])) % 2 == 0
            pick = low if low_is_even else high
        else:
            pick = high if remainder > 0 else low
    else:
        pick = high if size > midpoint else low
    return math.copysign(float(pick), total)


def _exact(rows: torch.Tensor) -> torch.Tensor:
    """The exact sum of each row, correctly rounded once into the rows' dtype."""
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("exact_sum needs finite values (inf and NaN have no exact sum to round)")
    out = [_round_exact(row, rows.dtype) for row in rows.double().cpu().tolist()]
    return torch.tensor(out, dtype=torch.float64).to(device=rows.device, dtype=rows.dtype)


def _by_method(rows: torch.Tensor, method: Method, block: int | None) -> torch.Tensor:
    if method == "sequential":
        return _sequential(rows)
    if method == "pairwise":
        return _pairwise(rows)
    if method == "blocked":
        return _blocked(rows, _check_block(block))
    if method == "kahan":
        return _kahan(rows)
    if method == "neumaier":
        return _neumaier(rows)
    if method == "exact":
        return _exact(rows)
    raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def _check_block(block: int | None) -> int:
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    return block


# ------------------------------------------------------------------------------------------ the sums
@reference
def sequential_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``((x0 + x1) + x2) + ...`` in ``dtype`` (default ``x.dtype``), as a loop over the list would add.

    ``x`` is cast to ``dtype`` first (the list *is* in that dtype); every addition rounds to ``dtype``.
    Sums over the last dimension: a 1-D ``x`` gives a 0-dim tensor, ``(m, n)`` gives ``m`` sums.
    """
    rows, batch, _ = _rows(x, dtype, "sequential_sum")
    return _sequential(rows).reshape(batch)


@reference
def pairwise_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pairwise (tree) sum in ``dtype``: ``x0+x1, x2+x3, ...``, an odd last element carried up; repeat.

    This is the pairwise summation of Higham, *Accuracy and Stability of Numerical Algorithms* (2nd ed.,
    section 4.1): a balanced tree of depth ``ceil(log2 n)``, whose error grows like ``log n`` instead of
    ``n``.  Sums over the last dimension.
    """
    rows, batch, _ = _rows(x, dtype, "pairwise_sum")
    return _pairwise(rows).reshape(batch)


@reference
def blocked_sum(x: torch.Tensor, block: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Sum blocks of ``block`` consecutive elements left to right, then the block sums left to right.

    The last block may be shorter.  This is the shape of a kernel that gives each program (thread block)
    one block of the input and combines the partial sums afterwards: the block size, or the number of
    splits, chooses the tree and so the bits.  ``block=1`` and ``block >= n`` are the sequential sum.
    """
    rows, batch, _ = _rows(x, dtype, "blocked_sum")
    return _blocked(rows, _check_block(block)).reshape(batch)


def kahan_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Kahan's compensated sum in ``dtype``: nearly as accurate as summing in twice the precision.

    It keeps the rounding error of each addition and subtracts it from the next element.  It fails
    when an element dwarfs the running total (``0.1 + 1e20 - 1e20`` gives 0): see :func:`neumaier_sum`.
    """
    rows, batch, _ = _rows(x, dtype, "kahan_sum")
    return _kahan(rows).reshape(batch)


def neumaier_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Neumaier's improved Kahan sum in ``dtype``: the compensation also catches a huge element."""
    rows, batch, _ = _rows(x, dtype, "neumaier_sum")
    return _neumaier(rows).reshape(batch)


def exact_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The exact sum of the list (in ``dtype``), rounded once to ``dtype``: the same for every order.

    Uses ``math.fsum`` (Shewchuk's exact partials, correctly rounded to float64), then rounds into
    ``dtype`` without double-rounding error.  Needs finite values.  Slow: one Python loop per list.
    """
    rows, batch, _ = _rows(x, dtype, "exact_sum")
    return _exact(rows).reshape(batch)


def tree_expression(method: Literal["sequential", "pairwise", "blocked"], n: int, block: int | None = None) -> str:
    """The order of additions ``method`` performs on ``n`` elements, written out: ``((x0 + x1) + x2)``.

    The lab prints these to show that each method is one particular parenthesisation of the same sum.
    """
    if n < 1:
        raise ValueError(f"tree_expression needs n >= 1, got {n}")
    terms = [f"x{i}" for i in range(n)]

    def bare(expr: str) -> str:  # drop parentheses around the whole expression
        depth = 0
        for i, ch in enumerate(expr):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return expr[1:-1] if i == len(expr) - 1 and expr.startswith("(") else expr
        return expr

    def left_to_right(items: list[str]) -> str:
        out = items[0]
        for item in items[1:]:
            out = f"({out} + {item})"
        return out

    if method == "sequential":
        return bare(left_to_right(terms))
    if method == "pairwise":
        while len(terms) > 1:
            pairs = [f"({a} + {b})" for a, b in zip(terms[0::2], terms[1::2])]
            terms = pairs + terms[-1:] if len(terms) % 2 else pairs
        return bare(terms[0])
    if method == "blocked":
        size = _check_block(block)
        parts = [left_to_right(terms[i : i + size]) for i in range(0, n, size)]
        return bare(left_to_right(parts))
    raise ValueError(f"tree_expression knows sequential, pairwise and blocked, not {method!r}")


# --------------------------------------------------------------------------------- many orders of one list
def random_orders(n: int, n_orders: int, *, seed: int = 0) -> torch.Tensor:
    """``n_orders`` random permutations of ``0..n-1``, as an int64 tensor ``(n_orders, n)``, from ``seed``."""
    if n < 1 or n_orders < 1:
        raise ValueError(f"random_orders needs n >= 1 and n_orders >= 1, got n={n}, n_orders={n_orders}")
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(n, generator=gen) for _ in range(n_orders)])


def _check_orders(x: torch.Tensor, orders: torch.Tensor, who: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        raise ValueError(f"{who} needs one list: a 1-D tensor x, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(orders, torch.Tensor) or orders.dim() != 2 or orders.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who} needs orders as a 2-D integer tensor (n_orders, n), got "
                         f"{getattr(orders, 'shape', type(orders).__name__)} {getattr(orders, 'dtype', '')}")
    expected = torch.arange(x.shape[0], device=orders.device).expand(orders.shape[0], -1)
    if orders.shape[1] != x.shape[0] or not torch.equal(orders.sort(dim=1).values.long(), expected):
        raise ValueError(f"{who}: every row of orders must be a permutation of 0..{x.shape[0] - 1} "
                         f"(orders has shape {tuple(orders.shape)})")


def sums_over_orders(
    x: torch.Tensor,
    orders: torch.Tensor,
    method: Method = "sequential",
    *,
    dtype: torch.dtype | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """The sum of ``x`` taken in each order (row) of ``orders``, with ``method``, in ``dtype``.

    ``orders`` is ``(n_orders, n)``, each row a permutation (see :func:`random_orders`); the result has
    ``n_orders`` entries.  ``block`` is needed by ``method="blocked"`` only.
    """
    _check_orders(x, orders, "sums_over_orders")
    rows, _, _ = _rows(x[orders.to(x.device).long()], dtype, "sums_over_orders")
    return _by_method(rows, method, block)


def _distinct(values: torch.Tensor) -> int:
    """The number of different bit patterns among ``values``."""
    bits = values.detach().reshape(-1).contiguous().view(_INT_OF_WIDTH[values.element_size()])
    return int(torch.unique(bits).numel())


@reference
def count_distinct(values: torch.Tensor) -> int:
    """How many different bit patterns ``values`` holds (``0.0`` and ``-0.0`` differ; equal NaNs count once)."""
    if not isinstance(values, torch.Tensor) or values.dtype not in FLOAT_DTYPES:
        raise TypeError(f"count_distinct needs a float tensor, got {getattr(values, 'dtype', type(values).__name__)}")
    return _distinct(values)


@reference
def count_distinct_sums(x: torch.Tensor, orders: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    """How many different results the left-to-right sum of ``x`` gives over the orders in ``orders``."""
    _check_orders(x, orders, "count_distinct_sums")
    rows, _, _ = _rows(x[orders.to(x.device).long()], dtype, "count_distinct_sums")
    return _distinct(_sequential(rows))


# ------------------------------------------------------------------------------------------- experiments
def swallowing_list(n: int, log10_range: float, *, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """A shuffled list of ``n`` numbers whose sum depends on the order more, the larger ``log10_range`` is.

    Half the list is pairs ``+b, -b`` of large numbers, ``b`` of magnitude ``10**log10_range`` (times a
    random factor in [1, 2)), that cancel exactly; the other half is small numbers of magnitude [1, 2)
    and random sign.  The exact sum is the sum of the small half, but an order that adds a small number
    to a large partial sum rounds it away (``0.1 + 1e20 - 1e20``): the wider the range, the more is lost.
    ``log10_range=0`` is an ordinary list of numbers of similar size.
    """
    if n < 1:
        raise ValueError(f"swallowing_list needs n >= 1, got {n}")
    if not 0 <= log10_range <= 300:
        raise ValueError(f"log10_range must be between 0 and 300 decades, got {log10_range}")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"swallowing_list makes float64, float32, float16 or bfloat16 lists, got {dtype}")
    if 2 * 10.0**log10_range > torch.finfo(dtype).max:
        raise ValueError(f"log10_range={log10_range} overflows {dtype} (largest {torch.finfo(dtype).max:.3g})")
    gen = torch.Generator().manual_seed(seed)
    pairs = n // 4
    big = (10.0**log10_range * (1 + torch.rand(pairs, generator=gen, dtype=torch.float64))).to(dtype)
    n_small = n - 2 * pairs
    small = 1 + torch.rand(n_small, generator=gen, dtype=torch.float64)
    small = torch.where(torch.rand(n_small, generator=gen) < 0.5, -small, small).to(dtype)
    values = torch.cat([big, -big, small])
    return values[torch.randperm(n, generator=gen)]


def ulp_of(value: float, dtype: torch.dtype) -> float:
    """The spacing of ``dtype``'s floats at ``value``: one unit in the last place."""
    info = torch.finfo(dtype)
    if value == 0.0 or not math.isfinite(value):
        return info.smallest_normal * info.eps
    exponent = max(math.frexp(value)[1] - 1, int(math.log2(info.smallest_normal)))
    return math.ldexp(info.eps, exponent)


@dataclass(frozen=True)
class OrderStudy:
    """The sums of one list over many orders, and how far each lands from the exact (rounded) sum."""

    method: str
    dtype: torch.dtype
    n: int
    sums: torch.Tensor  # one sum per order, in dtype
    exact: float  # the exact sum, correctly rounded to dtype
    distinct: int  # distinct bit patterns among sums
    ulp_errors: torch.Tensor  # (sum - exact) in ulps of dtype at the exact sum, float64

    def __str__(self) -> str:
        spread = float(self.ulp_errors.max() - self.ulp_errors.min())
        return (f"{self.method} sums of {self.n} {str(self.dtype).removeprefix('torch.')} numbers over "
                f"{self.sums.numel()} orders: {self.distinct} distinct results, spread {spread:.0f} ulp")


def study_orders(
    x: torch.Tensor,
    n_orders: int,
    method: Method = "sequential",
    *,
    dtype: torch.dtype | None = None,
    block: int | None = None,
    seed: int = 0,
) -> OrderStudy:
    """Sum the 1-D list ``x`` in ``n_orders`` random orders with ``method`` and summarise the results."""
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        raise ValueError(f"study_orders needs one list: a 1-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    dtype = x.dtype if dtype is None else dtype
    sums = sums_over_orders(x, random_orders(x.shape[0], n_orders, seed=seed), method, dtype=dtype, block=block)
    rows, _, _ = _rows(x, dtype, "study_orders")
    exact = float(_exact(rows)[0])
    errors = (sums.double().cpu() - exact) / ulp_of(exact, dtype)
    return OrderStudy(method, dtype, int(x.shape[0]), sums, exact, _distinct(sums), errors)


def plot_study(study: OrderStudy, ax: Axes | None = None) -> Axes:
    """Histogram of a study's results, in ulps from the exact sum (the dashed line)."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    errors = study.ulp_errors.numpy()
    lo, hi = math.floor(errors.min()), math.ceil(errors.max())
    if hi - lo <= 80:  # results are whole ulps apart: one bar per possible result
        bins = [b - 0.5 for b in range(lo, hi + 2)]
    else:
        bins = 60
    ax.hist(errors, bins=bins, color="tab:blue")
    ax.axvline(0.0, color="black", linestyle="--", linewidth=1, label="exact sum, rounded once")
    ax.set_xlabel(f"result − exact sum (ulps of {str(study.dtype).removeprefix('torch.')})")
    ax.set_ylabel("number of orders")
    ax.set_title(f"{study.method} sum of {study.n} numbers in {study.sums.numel()} orders: "
                 f"{study.distinct} distinct results")
    ax.legend(loc="upper right")
    return ax
