"""Compare tensors the way this course needs: by their bits, not their values.

``torch.equal`` says ``0.0 == -0.0`` and ``nan != nan``; both answers are wrong for reproducibility,
where the question is "did the same bits come out?".  These helpers answer that question and, when
the answer is no, say by how much (in absolute terms and in units in the last place).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor, as integers of the same width (other dtypes are returned as is)."""
    t = t.detach()
    view = _INT_VIEW.get(t.dtype)
    return t.contiguous().view(view) if view is not None else t


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` and ``b`` have the same shape, dtype and bits (NaN payloads and -0.0 included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(_bits(a).cpu(), _bits(b).cpu())


def _ordered(t: torch.Tensor) -> torch.Tensor:
    """Map float bits to integers that are ordered like the floats, so that neighbours differ by 1."""
    bits = _bits(t).to(torch.int64)
    width = torch.finfo(t.dtype).bits
    sign = bits < 0
    magnitude = bits & ((1 << (width - 1)) - 1)
    return torch.where(sign, -magnitude, magnitude)


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance between ``a`` and ``b`` in units in the last place of their dtype.

    Returned as float64: 0 for equal values (+0.0 and -0.0 are 0 ulp apart), 1 for neighbouring floats,
    ``inf`` where exactly one side is NaN, and 0 where both are NaN.
    """
    if a.shape != b.shape:
        raise ValueError(f"ulp_distance needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or a.dtype not in _INT_VIEW:
        raise TypeError(f"ulp_distance needs two tensors of one float dtype, got {a.dtype} and {b.dtype}")
    a, b = a.detach().cpu(), b.detach().cpu()
    oa, ob = _ordered(a), _ordered(b)
    same_sign = (oa >= 0) == (ob >= 0)
    # Same sign: the int64 difference is exact. Opposite signs: add magnitudes in float64 (an int64 sum of two
    # float64 magnitudes could overflow; a distance that large needs no exactness).
    exact = (torch.where(same_sign, oa, 0) - torch.where(same_sign, ob, 0)).abs().to(torch.float64)
    across = oa.abs().to(torch.float64) + ob.abs().to(torch.float64)
    dist = torch.where(same_sign, exact, across)
    a_nan, b_nan = torch.isnan(a), torch.isnan(b)
    dist = torch.where(a_nan & b_nan, torch.zeros_like(dist), dist)
    return torch.where(a_nan ^ b_nan, torch.full_like(dist, float("inf")), dist)


@dataclass(frozen=True)
class DiffSummary:
    """How two tensors differ: printed by the labs and by the grader."""

    shape: tuple[int, ...]
    dtype: str
    n_elements: int
    n_different: int
    first_index: tuple[int, ...] | None
    first_values: tuple[float, float] | None
    max_abs: float
    max_ulp: float
    mismatch: str | None = None  # shape or dtype mismatch, when there is one

    @property
    def identical(self) -> bool:
        return self.mismatch is None and self.n_different == 0

    def __str__(self) -> str:
        if self.mismatch is not None:
            return self.mismatch
        if self.n_different == 0:
            return f"bitwise identical ({self.n_elements} elements, {self.dtype})"
        a, b = self.first_values or (float("nan"), float("nan"))
        return (
            f"{self.n_different} of {self.n_elements} elements differ; first at {self.first_index}: "
            f"{a!r} vs {b!r}; max |diff| {self.max_abs:.3g}, max {self.max_ulp:.0f} ulp"
        )


def diff_summary(a: torch.Tensor, b: torch.Tensor) -> DiffSummary:
    """Summarise the bitwise differences between ``a`` and ``b`` (same shape and dtype expected)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        what = "shape" if a.shape != b.shape else "dtype"
        text = f"{what} mismatch: {tuple(a.shape)} {a.dtype} vs {tuple(b.shape)} {b.dtype}"
        return DiffSummary(tuple(a.shape), str(a.dtype), a.numel(), a.numel(), None, None,
                           float("inf"), float("inf"), mismatch=text)
    a, b = a.detach().cpu(), b.detach().cpu()
    differs = _bits(a) != _bits(b)
    n_diff = int(differs.sum())
    if n_diff == 0:
        return DiffSummary(tuple(a.shape), str(a.dtype), a.numel(), 0, None, None, 0.0, 0.0)
    first = tuple(int(i) for i in differs.nonzero()[0])
    abs_diff = (a.double() - b.double()).abs()[differs]
    finite = torch.isfinite(abs_diff)
    max_abs = float(abs_diff[finite].max()) if bool(finite.all()) else float("inf")
    max_ulp = float(ulp_distance(a, b)[differs].max()) if a.dtype in _INT_VIEW else float("nan")
    return DiffSummary(tuple(a.shape), str(a.dtype), a.numel(), n_diff, first,
                       (float(a[first]), float(b[first])), max_abs, max_ulp)


# bitwise_equal is the reference of lab 00's first exercise, so the grader can forbid calling it. The
# decorator is applied here, at the end, because detlib.grade imports this module: the grader's own
# helpers keep the plain function, learners' code gets the guarded one through detlib and detlib.numerics.
from detlib.grade.guard import reference  # noqa: E402

bitwise_equal = reference(bitwise_equal)
