"""Lab 04 (RMSNorm): the data-parallel kernel, the split-reduction kernel, the batch-invariant version.

Each check draws fresh random inputs (the seed is in the message), compares with a float64 reference
within a stated tolerance and, where the lesson is about bits, compares bits across batch sizes.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from detlib.backend import compute_dtype, device
from detlib.grade.harness import CheckFailed, call, expect_close, expect_tensor
from detlib.grade.spec import exercise
from detlib.numerics import bitwise_equal, diff_summary
from detlib.rmsnorm import rms_norm_float64

# |out - ref| <= ATOL + RTOL * |ref|: fp32 math, rounded to the compute dtype at the end
_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 2e-2)}
_RMS_REFS = ("detlib.rmsnorm.rms_norm_rows", "detlib.rmsnorm.rms_norm_split", "detlib.rmsnorm.library_rms_norm",
             "detlib.rmsnorm.invariant_rms_norm")


def _inputs(rows: int, hidden: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype()
    x = (torch.randn(rows, hidden, generator=gen) * 3).to(device(), dtype)
    w = (1 + 0.5 * torch.randn(hidden, generator=gen)).to(device(), dtype)
    return x, w


def _expect_rms_norm(out: object, x: torch.Tensor, w: torch.Tensor, eps: float, what: str) -> torch.Tensor:
    got = expect_tensor(out, shape=x.shape, dtype=x.dtype, device=x.device, what=what)
    rtol, atol = _TOL.get(x.dtype, (1e-2, 1e-2))
    expect_close(got, rms_norm_float64(x, w, eps), rtol=rtol, atol=atol, what=what,
                 hint="sum x*x in float32 over the whole row (mask the tail), mean = sum / hidden, "
                      "y = x * rsqrt(mean + eps) * w")
    return got


@exercise("04", "rms_norm_rows", points=2, replaces=_RMS_REFS, timeout_s=120,
          hint="one program per row: loop over the row in BLOCK-wide slices (mask cols < N), accumulate x*x, "
               "tl.sum once, then loop again to write x * rstd * w")
def check_rms_norm_rows(rms_norm_rows: Callable[..., torch.Tensor]) -> None:
    """``rms_norm_rows(x, weight, eps)``: correct for any hidden size, and batch-invariant by construction."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for rows, hidden, eps in [(1, 1, 1e-6), (3, 7, 1e-6), (5, 256, 1e-5), (4, 300, 1e-6), (2, 2500, 1e-6)]:
        x, w = _inputs(rows, hidden, gen)
        _expect_rms_norm(call(rms_norm_rows, x, w, eps), x, w, eps,
                         f"rms_norm_rows on x of shape {tuple(x.shape)}, eps={eps} (seed {seed})")
    x, w = _inputs(20, 300, gen)
    full = call(rms_norm_rows, x, w, 1e-6)
    for b in (1, 2, 7, 19):
        part = call(rms_norm_rows, x[:b], w, 1e-6)
        if not bitwise_equal(part, full[:b]):
            raise CheckFailed(f"rows 0..{b - 1} differ between a batch of {b} and a batch of 20 (seed {seed}): "
                              f"{diff_summary(part, full[:b])}",
                              "one program per row, and the row's reduction must not depend on the batch")


@exercise("04", "rms_norm_split", points=2, replaces=_RMS_REFS, timeout_s=120,
          hint="grid (rows, splits): kernel 1 writes each slice's sum of squares to part[row, s]; "
               "kernel 2 adds the row's partials, then normalises its slice")
def check_rms_norm_split(rms_norm_split: Callable[..., torch.Tensor]) -> None:
    """``rms_norm_split(x, weight, eps, splits)``: correct for every split count, even ones that do not divide."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for rows, hidden, splits in [(1, 64, 1), (2, 64, 4), (3, 300, 3), (2, 1000, 7), (1, 5, 8)]:
        x, w = _inputs(rows, hidden, gen)
        _expect_rms_norm(call(rms_norm_split, x, w, 1e-6, splits), x, w, 1e-6,
                         f"rms_norm_split on x of shape {tuple(x.shape)} with splits={splits} (seed {seed})")


@exercise("04", "invariant_rms_norm", points=3, replaces=(*_RMS_REFS, "detlib.rmsnorm.invariant_rms_norm_path"),
          timeout_s=180,
          hint="fix the order by the hidden size alone: chunks of a fixed length, one tl.sum per chunk, chunk sums "
               "added left to right, whether one program does a whole row or one program per chunk")
def check_invariant_rms_norm(invariant_rms_norm: Callable[..., torch.Tensor]) -> None:
    """``invariant_rms_norm(x, weight, eps)``: correct; each row's bits the same at every batch size and position."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for hidden in (300, 2500):
        x, w = _inputs(40, hidden, gen)
        full = _expect_rms_norm(call(invariant_rms_norm, x, w, 1e-6), x, w, 1e-6,
                                f"invariant_rms_norm on x of shape {tuple(x.shape)} (seed {seed})")
        for b in (1, 2, 3, 5, 8, 15, 16, 17, 33):
            part = call(invariant_rms_norm, x[:b], w, 1e-6)
            if not bitwise_equal(part, full[:b]):
                raise CheckFailed(
                    f"hidden={hidden}: rows 0..{b - 1} differ between a batch of {b} and a batch of 40 "
                    f"(seed {seed}): {diff_summary(part, full[:b])}",
                    "the reduction order may depend on the hidden size, never on the number of rows")
        moved = torch.cat([x[5:9], x[:5]])  # row 0 now at position 4 of a batch of 9
        if not bitwise_equal(call(invariant_rms_norm, moved, w, 1e-6)[4], full[0]):
            raise CheckFailed(f"hidden={hidden}: row 0 changed when moved to position 4 of a batch of 9 (seed {seed})")
