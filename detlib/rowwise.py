"""Batch-invariant row-wise reductions: softmax, log-softmax, mean and sum, one row per Triton program.

A row-wise op is batch-invariant when the order in which one row's elements are combined depends on
nothing but that row.  The kernels here fix that order once and for all:

* every program owns one row, whatever the number of rows (no split of a row across programs, which is
  what a library does to keep a GPU busy when there are few rows);
* the row is read in chunks of :data:`ROW_BLOCK` elements (a constant, never chosen from the shape);
  element ``j`` is always added into lane ``j % ROW_BLOCK`` of an fp32 accumulator, lane by lane in
  ascending chunk order, and the lanes are combined by one fixed tree (``tl.sum``) at the end.

So a row's bits depend on its values alone: not on the batch, not on the row's place in it.  A bonus of
the fixed chunk size: padding a row with neutral elements (zeros for a sum, ``-inf`` for a softmax)
does not change its bits either, because ``x + 0 == x`` exactly.  Causal attention relies on this: a
query's row of scores is the same whether the sequence has been extended or not.

The op-level functions (:func:`invariant_softmax`, :func:`invariant_log_softmax`, :func:`invariant_mean`,
:func:`invariant_sum`) take PyTorch's arguments (any shape, any ``dim``) and are what
:mod:`detlib.mode` routes ``aten::_softmax``, ``aten::_log_softmax`` and ``aten::mean.dim`` to.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from detlib._inputs import check_float_tensor, kernel_operand
from detlib.backend import is_interpreter
from detlib.grade import reference

import triton  # noqa: E402  (after detlib: it sets TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402

ROW_BLOCK = 1024
"""Elements a program reads per step; fixed, so the reduction order is the same for every shape."""
ROW_WARPS = 4
"""Warps per program; fixed too, since on a GPU ``tl.sum``'s tree follows the thread layout."""

# ----------------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _softmax_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, LOG: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id`` of softmax (or log-softmax): a max pass, a sum-of-exp pass, a write pass."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    out_row = out_ptr + row * stride_out
    offs = tl.arange(0, BLOCK)
    lane_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < n_cols, other=float("-inf")).to(tl.float32)
        lane_max = tl.maximum(lane_max, x)
    row_max = tl.max(lane_max, axis=0)  # a max is exact: its order does not matter
    lane_sum = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(x_row + start + offs, mask=start + offs < n_cols, other=float("-inf")).to(tl.float32)
        lane_sum += tl.exp(x - row_max)  # masked lanes add exp(-inf) == 0 exactly
    total = tl.sum(lane_sum, axis=0)
    for start in range(0, n_cols, BLOCK):
        mask = start + offs < n_cols
        x = tl.load(x_row + start + offs, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            y = (x - row_max) - tl.log(total)
        else:
            y = tl.exp(x - row_max) / total
        tl.store(out_row + start + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _row_sum_kernel(x_ptr, out_ptr, n_cols, stride_x, MEAN: tl.constexpr, BLOCK: tl.constexpr):
    """``out[row] = sum(x[row, :])`` (divided by ``n_cols`` if ``MEAN``), accumulated in fp32."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n_cols, BLOCK):
        acc += tl.load(x_row + start + offs, mask=start + offs < n_cols, other=0.0).to(tl.float32)
    total = tl.sum(acc, axis=0)
    if MEAN:
        total = total / n_cols
    tl.store(out_ptr + row, total)


# ----------------------------------------------------------------------------------------------------
# 2-D building blocks: rows of a matrix


def _check_rows(name: str, x: torch.Tensor) -> torch.Tensor:
    check_float_tensor(name, x)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, n], got shape {tuple(x.shape)}")
    return x


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """The matrix as the kernels read it: fp32 under the interpreter, unit stride along a row."""
    x = kernel_operand(x)
    return x if x.stride(1) == 1 or x.shape[1] <= 1 else x.contiguous()


def _row_reduce(x: torch.Tensor, mean: bool) -> torch.Tensor:
    rows, n = x.shape
    if n == 0:
        return torch.full((rows,), float("nan") if mean else 0.0, dtype=torch.float32, device=x.device)
    out = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows:
        kx = _row_major(x)
        _row_sum_kernel[(rows,)](kx, out, n, kx.stride(0), MEAN=mean, BLOCK=ROW_BLOCK, num_warps=ROW_WARPS)
    return out


def row_sums(x: torch.Tensor) -> torch.Tensor:
    """fp32 sum of each row of ``x: [rows, n]``: the same bits for a row whatever ``rows`` is."""
    return _row_reduce(_check_rows("x", x), mean=False)


def row_means(x: torch.Tensor) -> torch.Tensor:
    """fp32 mean of each row of ``x: [rows, n]``, batch-invariant like :func:`row_sums`."""
    return _row_reduce(_check_rows("x", x), mean=True)


def row_softmax(x: torch.Tensor, *, log: bool = False, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Softmax (or log-softmax if ``log``) of each row of ``x: [rows, n]``, computed in fp32.

    The result has ``out_dtype`` (default: ``x``'s dtype).
    """
    _check_rows("x", x)
    rows, n = x.shape
    out = torch.empty((rows, n), dtype=out_dtype or x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    kx = _row_major(x)
    # the interpreter cannot round to bf16/fp16 faithfully: write fp32 there and let torch round
    kout = torch.empty_like(out, dtype=torch.float32) if is_interpreter() and out.dtype != torch.float32 else out
    _softmax_kernel[(rows,)](kx, kout, n, kx.stride(0), kout.stride(0), LOG=log, BLOCK=ROW_BLOCK, num_warps=ROW_WARPS)
    return kout if kout is out else out.copy_(kout)


# ----------------------------------------------------------------------------------------------------
# op level: PyTorch's arguments


def _normalize_dims(x: torch.Tensor, dim: int | Sequence[int] | None) -> list[int]:
    """The reduced dimensions as sorted non-negative ints; ``None`` or ``[]`` means all of them."""
    if dim is None:
        return list(range(x.dim()))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return list(range(x.dim()))
    rank = max(x.dim(), 1)
    out = []
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(f"dim {d} is out of range for a tensor of {x.dim()} dimension(s)")
        out.append(d % rank)
    if len(set(out)) != len(out):
        raise ValueError(f"dim {dims} names a dimension twice")
    return sorted(out) if x.dim() else []


def _as_rows(x: torch.Tensor, dims: list[int]) -> tuple[torch.Tensor, list[int]]:
    """``x`` with the reduced ``dims`` moved last and flattened: ``[rows, n]``, and the kept sizes."""
    kept = [d for d in range(x.dim()) if d not in dims]
    perm = x.permute([*kept, *dims])
    sizes = [x.shape[d] for d in kept]
    return perm.reshape(math.prod(sizes), math.prod(x.shape[d] for d in dims)), sizes


def _reduced(x: torch.Tensor, dim: int | Sequence[int] | None, keepdim: bool, dtype: torch.dtype | None,
             mean: bool) -> torch.Tensor:
    check_float_tensor("input", x)
    dims = _normalize_dims(x, dim)
    rows, kept = _as_rows(x, dims)
    values = _row_reduce(rows, mean=mean).reshape(kept)
    if keepdim:
        for d in dims:
            values = values.unsqueeze(d)
    return values.to(dtype or x.dtype)


@reference
def invariant_mean(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.mean(x, dim, keepdim, dtype=dtype)``, batch-invariant: fp32 accumulation in a fixed order."""
    return _reduced(x, dim, keepdim, dtype, mean=True)


@reference
def invariant_sum(
    x: torch.Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``torch.sum(x, dim, keepdim, dtype=dtype)`` for float tensors, batch-invariant like :func:`invariant_mean`."""
    return _reduced(x, dim, keepdim, dtype, mean=False)


def _softmax_along(x: torch.Tensor, dim: int, log: bool, out_dtype: torch.dtype | None) -> torch.Tensor:
    check_float_tensor("input", x)
    out_dtype = out_dtype or x.dtype
    if x.dim() == 0:
        return row_softmax(x.reshape(1, 1), log=log, out_dtype=out_dtype).reshape(())
    d = _normalize_dims(x, dim)[0]
    moved = x.movedim(d, -1)
    out = row_softmax(moved.reshape(-1, moved.shape[-1]), log=log, out_dtype=out_dtype)
    return out.reshape(moved.shape).movedim(-1, d).contiguous()


@reference
def invariant_softmax(x: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.softmax(x, dim)``, batch-invariant; computed in fp32, returned in ``dtype`` (default ``x.dtype``)."""
    return _softmax_along(x, dim, log=False, out_dtype=dtype)


@reference
def invariant_log_softmax(x: torch.Tensor, dim: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.log_softmax(x, dim)``, batch-invariant; computed in fp32, returned in ``dtype``."""
    return _softmax_along(x, dim, log=True, out_dtype=dtype)
