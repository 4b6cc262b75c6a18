"""Lab 00 (setup): the first exercise, telling whether two tensors hold the same bits."""

from __future__ import annotations

import torch

from detlib import numerics
from detlib.grade.harness import CheckFailed, call
from detlib.grade.spec import exercise

_reference = numerics.bitwise_equal.__wrapped__  # the plain function: the check itself may call it


def _next_bits(t: torch.Tensor, index: int = 0) -> torch.Tensor:
    """A contiguous copy of ``t`` whose element ``index`` (flat) has the next bit pattern up."""
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
    out = t.contiguous().clone()
    out.view(ints).view(-1)[index] += 1
    return out


def _cases() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pairs of tensors a learner's ``bits_equal`` must judge, each with a description."""
    x = torch.randn(6, 5)
    nan = torch.tensor([1.0, float("nan"), 3.0])
    cases = [
        ("a float32 tensor and its clone", x, x.clone()),
        ("0.0 and -0.0 (equal values, different sign bit)", torch.tensor([0.0, 1.0]), torch.tensor([-0.0, 1.0])),
        ("a tensor holding NaN and its clone (same NaN bits)", nan, nan.clone()),
        ("two NaNs with different payloads", nan, _next_bits(nan, index=1)),
        ("1.0 and the next float32 above it (one ulp apart)", torch.tensor([1.0]), torch.tensor([1.0 + 2.0**-23])),
        ("float16 values one ulp apart", x.half(), _next_bits(x.half())),
        ("bfloat16 values one ulp apart", x.bfloat16(), _next_bits(x.bfloat16())),
        ("a bfloat16 tensor and its clone", x.bfloat16(), x.bfloat16().clone()),
        ("float16 and bfloat16 tensors (different dtypes) with the same 16-bit patterns",
         x.half(), x.half().view(torch.bfloat16)),
        ("float32 and float64 ones (same values, different dtypes)", torch.ones(3), torch.ones(3, dtype=torch.float64)),
        ("shapes (4,) and (2, 2) with the same values", torch.arange(4.0), torch.arange(4.0).reshape(2, 2)),
        ("shapes (3,) and (4,)", torch.zeros(3), torch.zeros(4)),
        ("a transposed (non-contiguous) view and a contiguous copy of it", x.t(), x.t().contiguous()),
        ("a strided view x[:, ::2] and a copy of it", x[:, ::2], x[:, ::2].clone()),
        ("a strided view whose bits differ from the copy's", x[:, ::2], _next_bits(x[:, ::2], index=7)),
        ("two 0-dim float64 tensors holding 0.1", torch.tensor(0.1, dtype=torch.float64),
         torch.tensor(0.1, dtype=torch.float64)),
        ("float64 0.0 and -0.0", torch.tensor(0.0, dtype=torch.float64), torch.tensor(-0.0, dtype=torch.float64)),
        ("two empty float32 tensors", torch.empty(0), torch.empty(0)),
    ]
    return cases


@exercise(
    "00",
    "bits_equal",
    points=1,
    replaces=("detlib.numerics.bitwise_equal",),
    timeout_s=30,
    hint="check shape and dtype first; then compare the bit patterns: a.view(torch.int32) for float32, "
    "torch.int16 for float16/bfloat16, torch.int64 for float64",
)
def check_bits_equal(bits_equal: object) -> None:
    """``bits_equal(a, b)`` must return the Python bool "same shape, same dtype, same bits"."""
    if not callable(bits_equal):
        raise CheckFailed(f"bits_equal should be a function, got {type(bits_equal).__name__}")
    for what, a, b in _cases():
        want = _reference(a, b)
        got = call(bits_equal, a, b)
        if not isinstance(got, bool):
            raise CheckFailed(f"for {what}: returned {type(got).__name__} {got!r}, expected the Python bool {want}",
                              "return a Python bool: wrap a tensor answer in bool(...)")
        if got != want:
            hint = None
            if "NaN" in what or "0.0" in what:
                hint = "== and torch.equal compare values: 0.0 == -0.0 and NaN != NaN; compare bit patterns"
            elif "dtype" in what or "shape" in what:
                hint = "tensors of different shapes or dtypes are never bitwise equal, even with equal values"
            raise CheckFailed(f"for {what}: returned {got}, expected {want}", hint)
