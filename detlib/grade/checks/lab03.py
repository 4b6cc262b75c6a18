"""Lab 03 (batch invariance): a batch-invariance checker, and the toy server's model made invariant row by row."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch
import torch.nn.functional as F

from detlib.backend import compute_dtype, device
from detlib.grade.harness import CheckFailed, call, expect_bits, expect_tensor
from detlib.grade.spec import exercise
from detlib.sweep import batch_invariance_failures as _failures_ref
from detlib.toy_server import ToyModel, ToyServer, output_histogram
from detlib.toy_server import rowwise_forward as _rowwise_ref

_failures = _failures_ref.__wrapped__  # type: ignore[attr-defined]
_rowwise = _rowwise_ref.__wrapped__  # type: ignore[attr-defined]


def _bump_at(sizes: set[int], *, rows: str = "all") -> Callable[[torch.Tensor], torch.Tensor]:
    """An op that is ``3 * a`` except at the given batch sizes, where it moves results one ulp up."""

    def op(a: torch.Tensor) -> torch.Tensor:
        out = a * 3
        if a.shape[0] in sizes:
            up = torch.nextafter(out, torch.full_like(out, float("inf")))
            if rows == "all":
                out = up
            else:  # every row but the first: the row of interest must come first in the batch
                out = torch.cat([out[:1], up[1:]])
        return out

    return op


def _signed_zero_at(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def op(a: torch.Tensor) -> torch.Tensor:
        out = a * 0.0  # +0.0 for positive inputs
        return -out if a.shape[0] == size else out  # -0.0 == 0.0 by value, not by bits

    return op


@exercise(
    "03",
    "batch_invariance_failures",
    points=2,
    replaces=("detlib.sweep.batch_invariance_failures", "detlib.sweep.sweep"),
    timeout_s=60,
    hint="alone = op(row[None])[0]; for each B: batch = torch.cat([row[None], others[:B-1]]), and compare "
    "op(batch)[0] with alone bit for bit (detlib.bitwise_equal); return the sorted list of B that differ",
)
def check_batch_invariance_failures(fn: Callable[..., list[int]]) -> None:
    """``batch_invariance_failures(op, row, others, batch_sizes)``: the sorted sizes where row 0 changes."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    row = torch.rand(32, generator=gen).to(device()) + 0.5
    others = torch.randn(40, 32, generator=gen).to(device())
    chosen = {int(b) for b in torch.randperm(39, generator=gen)[:5] + 2}
    nan_row = row.clone()
    nan_row[3] = float("nan")
    w = torch.randn(24, 32, generator=gen).to(device())
    cases = [
        ("an elementwise op (tanh)", torch.tanh, row, list(range(1, 41)), []),
        (f"an op that changes results by one ulp at batch sizes {sorted(chosen)}", _bump_at(chosen), row,
         list(range(1, 41)), sorted(chosen)),
        ("the same op, batch sizes given in decreasing order", _bump_at(chosen), row, list(range(40, 0, -1)),
         sorted(chosen)),
        ("an op that changes every row but the first at all sizes", _bump_at(set(range(2, 41)), rows="others"),
         row, list(range(1, 41)), []),
        ("an op returning -0.0 instead of 0.0 at batch size 7", _signed_zero_at(7), row, list(range(1, 12)), [7]),
        ("elementwise 3 * x of a row holding a NaN", _bump_at(set()), nan_row, list(range(1, 12)), []),
        ("F.linear with a fixed weight", lambda a: F.linear(a, w), row, [1, 2, 3, 4, 5, 8, 13, 32],
         _failures(lambda a: F.linear(a, w), row, others, [1, 2, 3, 4, 5, 8, 13, 32])),
    ]
    hints = {
        "decreasing": "return the sizes sorted in increasing order",
        "first": "put the row of interest first in the batch: torch.cat([row[None], others[:B - 1]])",
        "-0.0": "compare bits, not values: -0.0 == 0.0 is True",
        "NaN": "compare bits, not values: the same NaN comes back, yet NaN != NaN",
    }
    for what, op, r, sizes, want in cases:
        got = call(fn, op, r, others, sizes)
        if not isinstance(got, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in got):
            raise CheckFailed(f"for {what}: returned {got!r}, expected a list of Python ints", "return a list")
        if got != want:
            hint = next((h for key, h in hints.items() if key in what), None)
            raise CheckFailed(f"for {what} (seed {seed}): returned {got}, expected {want}", hint)


@exercise(
    "03",
    "rowwise_forward",
    points=2,
    replaces=("detlib.toy_server.rowwise_forward",),
    timeout_s=90,
    hint="run model.forward on batch[i:i+1] for each i (a batch of one row each) and torch.cat the results",
)
def check_rowwise_forward(rowwise_forward: Callable[[ToyModel, torch.Tensor], torch.Tensor]) -> None:
    """``rowwise_forward(model, batch)``: each row exactly as if it had been sent alone."""
    seed = secrets.randbelow(2**31)
    dtype = compute_dtype()
    model = ToyModel.random(64, 128, 96, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    for b in (1, 2, 5, 17):
        batch = torch.randn(b, 64, generator=gen).to(device(), dtype)
        got = expect_tensor(call(rowwise_forward, model, batch), shape=(b, 96), dtype=dtype,
                            what=f"rowwise_forward for a batch of {b}")
        expect_bits(got, _rowwise(model, batch), what=f"rowwise_forward for a batch of {b} (seed {seed})",
                    hint="each row must be computed as a batch of one: model.forward(batch[i:i+1])")
    request = torch.randn(64, generator=gen).to(device(), dtype)
    served = ToyServer(lambda bt: rowwise_forward(model, bt), 64, dtype=dtype).trials(request, 25, seed=seed)
    hist = output_histogram(served)
    if len(hist) != 1:
        raise CheckFailed(f"the toy server with your rowwise_forward gave the same request {len(hist)} "
                          f"different outputs over 25 trials (seed {seed}), expected 1")
