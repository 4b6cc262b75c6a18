"""Triton building blocks shared by detlib's attention kernels.

``dot`` is the one place where the interpreter and the GPU part ways.  Under Triton's interpreter
``tl.dot`` is a numpy matmul, whose result for one row depends on where that row sits in the tile (the
BLAS micro-kernel blocks rows differently), so a query's attention would change with the tile it
landed in.  There ``dot`` is a broadcast multiply and a ``tl.sum`` over the shared axis instead: every
output element is summed in the same order whatever the other rows are.  On a GPU ``tl.dot`` runs on
the tensor cores (fp32 operands: full fp32 precision, not tf32).

``merge_weights`` is the log-sum-exp merge of two online-softmax states; the in-kernel merge of the
invariant prefill path and the separate merge kernel of its split-KV path both call it, so both do
exactly the same floating-point operations (the kernels are launched with ``enable_fp_fusion=False``,
so the compiler cannot contract them into FMAs differently in the two kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import triton
import triton.language as tl

from detlib.backend import is_interpreter

F = TypeVar("F", bound=Callable[..., object])


def device_function(fn: F) -> F:
    """``@triton.jit`` for a helper that kernels call; a plain function under the interpreter.

    The interpreter re-patches ``triton.language`` on every call of a jitted helper (about a
    millisecond each, thousands of calls per attention), while a plain function runs the same
    ``tl`` operations directly.  On a GPU the helper must be jitted to be inlined into kernels.
    """
    return fn if is_interpreter() else triton.jit(fn)  # type: ignore[return-value]


if is_interpreter():
    # ``tl.sum``/``tl.max``/``tl.min`` are jitted wrappers (a re-patch per call); the reductions under
    # them go straight to numpy

    def reduce_sum(x, axis):  # noqa: ANN001, ANN201
        """``tl.sum(x, axis)`` for float tensors."""
        return tl.reduce(x, axis, tl.standard._sum_combine)

    def reduce_max(x, axis):  # noqa: ANN001, ANN201
        """``tl.max(x, axis)``."""
        return tl.reduce(x, axis, tl.standard._elementwise_max)

    def reduce_min(x, axis):  # noqa: ANN001, ANN201
        """``tl.min(x, axis)``."""
        return tl.reduce(x, axis, tl.standard._elementwise_min)
else:
    reduce_sum, reduce_max, reduce_min = tl.sum, tl.max, tl.min


@device_function
def dot(a, b, FIXED_ORDER: tl.constexpr):
    """``a @ b`` with fp32 accumulation; ``FIXED_ORDER``: a row's sum order never depends on the tile."""
    if FIXED_ORDER:
        return reduce_sum(a[:, :, None].to(tl.float32) * b[None, :, :].to(tl.float32), 1)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, input_precision="ieee", out_dtype=tl.float32)
    else:
        return tl.dot(a, b, out_dtype=tl.float32)


@device_function
def dot_acc(a, b, acc, FIXED_ORDER: tl.constexpr):
    """``acc + a @ b``: on a GPU the matrix unit adds into ``acc`` itself (no second tile, one rounding less)."""
    if FIXED_ORDER:
        return acc + dot(a, b, FIXED_ORDER)
    elif a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@device_function
def merge_weights(m_a, m_b):
    """Merge two softmax states with running maxima ``m_a``, ``m_b`` (log2 domain).

    Returns ``(m, w_a, w_b)``: the new maximum and the factors that rescale each state's sum and
    accumulator to it.  A state that saw no key has maximum ``-inf`` and gets weight 0 (no NaN).
    """
    m = tl.maximum(m_a, m_b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m, tl.exp2(m_a - m_safe), tl.exp2(m_b - m_safe)
