"""Matrix multiplication in Triton: the tiled kernel, Split-K, a library's shape dispatch, and the
batch-invariant matmul.

Lab 05 walks through these in order:

* :func:`tiled_matmul` is the Triton-tutorial kernel: each program owns a ``BLOCK_M x BLOCK_N`` tile of
  the output and walks K in steps of ``BLOCK_K``.
* :func:`splitk_matmul` cuts K into ``split_k`` slices computed by different programs and adds the
  partial tiles afterwards (in a fixed order, so it is deterministic, but the *association* of the sum
  depends on ``split_k``).
* :func:`library_matmul` picks tiles and ``split_k`` from the shape, as cuBLAS's heuristics do: a small
  M gives few output tiles, so K is split to fill the GPU.  That is the step that breaks batch
  invariance: the same row gets a different reduction order at a different batch size.
* :func:`invariant_matmul` and :func:`invariant_linear` keep one K order for every output element
  whatever M is: no split-K, one ``BLOCK_K`` (:data:`INVARIANT_BLOCK_K`), K walked from 0 upwards, one
  instruction shape.  Tile sizes in M and N, warps, pipeline stages and the grid may change with M
  (:func:`invariant_config`), because they only change *which* outputs a program computes.

Under Triton's interpreter ``tl.dot`` is numpy's matmul, which calls a BLAS whose per-row result is not
promised to be independent of the row's place in the tile or of the tile's shape (a one-row product
takes a different code path than a 64-row one).  The invariant kernel therefore replaces ``tl.dot``
there by an elementwise product and a sum over K (``EXACT_DOT``), whose order per element is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

import torch
import triton
import triton.language as tl

from detlib._inputs import check_float_tensor, check_same_dtype, kernel_operand
from detlib.backend import is_interpreter
from detlib.grade import reference

# ----------------------------------------------------------------------------------------------------
# input checks


def _check_matmul_inputs(a: torch.Tensor, b: torch.Tensor, a_name: str = "a", b_name: str = "b") -> None:
    check_float_tensor(a_name, a)
    check_float_tensor(b_name, b)
    check_same_dtype(**{a_name: a, b_name: b})
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{a_name} and {b_name} must be 2-D, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValueError(
            f"inner dimensions differ: {a_name} is {tuple(a.shape)} and {b_name} is {tuple(b.shape)} "
            f"({a_name}.shape[1] must equal {b_name}.shape[0])"
        )


def _readable(t: torch.Tensor) -> torch.Tensor:
    """The operand as a kernel reads it: one of its two strides must be 1 (row- or column-major)."""
    t = kernel_operand(t)
    if t.stride(1) != 1 and t.stride(0) != 1:
        t = t.contiguous()
    return t


def _empty_result(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """The result when there is nothing to compute (M, N or K is 0), else None."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return torch.empty((M, N), dtype=a.dtype, device=a.device)
    if K == 0:
        return torch.zeros((M, N), dtype=a.dtype, device=a.device)
    return None


# ----------------------------------------------------------------------------------------------------
# 1. the tiled matmul (Triton tutorial shape)


@triton.jit
def _tiled_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program computes one BLOCK_M x BLOCK_N output tile, walking K in BLOCK_K steps."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@reference
def tiled_matmul(
    a: torch.Tensor, b: torch.Tensor, *, block_m: int = 32, block_n: int = 32, block_k: int = 32
) -> torch.Tensor:
    """``a @ b`` with the tiled kernel: fp32 accumulation, the result in the inputs' dtype."""
    _check_matmul_inputs(a, b)
    if (out := _empty_result(a, b)) is not None:
        return out
    ka, kb = _readable(a), _readable(b)
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=ka.dtype, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _tiled_matmul_kernel[grid](ka, kb, c, M, N, K, ka.stride(0), ka.stride(1), kb.stride(0), kb.stride(1),
                               c.stride(0), c.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c.to(a.dtype)


# ----------------------------------------------------------------------------------------------------
# 2. Split-K


@triton.jit
def _splitk_partial_kernel(
    a_ptr, b_ptr, part_ptr, M, N, K, K_PER_SPLIT,
    stride_am, stride_ak, stride_bk, stride_bn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (m, n, s) computes the tile's partial product over K slice s; fp32 partials go to part[s]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = s * K_PER_SPLIT
    k_end = tl.minimum(k_begin + K_PER_SPLIT, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (k[None, :] < k_end), other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(k[:, None] < k_end) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc)
    out = part_ptr + s * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _splitk_sum_kernel(part_ptr, c_ptr, MN, SPLIT_K, BLOCK: tl.constexpr):
    """c = part[0] + part[1] + ... + part[S-1], added in this order (deterministic, no atomics)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT_K):
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    tl.store(c_ptr + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@reference
def splitk_matmul(
    a: torch.Tensor, b: torch.Tensor, split_k: int, *, block_m: int = 32, block_n: int = 32, block_k: int = 32
) -> torch.Tensor:
    """``a @ b`` with K cut into ``split_k`` slices (each a multiple of ``block_k``) summed afterwards.

    Every slice keeps fp32; the slices are added in slice order.  The result is deterministic for a
    given ``split_k`` but changes with it: ``(k0..k_{K/2}) + (k_{K/2}..K)`` is another association of
    the same sum than one pass from 0 to K.
    """
    _check_matmul_inputs(a, b)
    if not isinstance(split_k, int) or split_k < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    if (out := _empty_result(a, b)) is not None:
        return out
    ka, kb = _readable(a), _readable(b)
    M, K = a.shape
    N = b.shape[1]
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), block_k) * block_k
    split_k = triton.cdiv(K, k_per_split)  # no empty slices
    part = torch.empty((split_k, M, N), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), split_k)
    _splitk_partial_kernel[grid](ka, kb, part, M, N, K, k_per_split, ka.stride(0), ka.stride(1),
                                 kb.stride(0), kb.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    c = torch.empty((M, N), dtype=ka.dtype, device=a.device)
    block = 1024
    _splitk_sum_kernel[(triton.cdiv(M * N, block),)](part, c, M * N, split_k, BLOCK=block)
    return c.to(a.dtype)


# ----------------------------------------------------------------------------------------------------
# 3. a library's shape dispatch


@dataclass(frozen=True)
class LibraryConfig:
    """What a library's heuristic picks for one shape: the tile and how many K slices."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int


@functools.cache
def default_num_sms() -> int:
    """Programs that run at once: the GPU's SM count, or a small pretend GPU of 16 under the interpreter."""
    if is_interpreter():
        return 16
    return torch.cuda.get_device_properties(0).multi_processor_count


def choose_config(M: int, N: int, K: int, num_sms: int) -> LibraryConfig:
    """A cuBLAS-like heuristic: big tiles for big problems, smaller tiles and Split-K when few tiles exist.

    It is a fine choice for speed: a small batch (M) gives few output tiles, so the GPU's
    ``num_sms`` processors would sit idle unless K is split between them.  It is fatal for batch
    invariance: the reduction order of every output element now depends on M.
    """
    block_m = 64 if M >= 64 else 32
    block_n = 64 if N >= 64 * num_sms // 4 else 32
    block_k = 32 if K < 256 else 64
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    k_blocks = triton.cdiv(K, block_k)
    split_k = 1
    if tiles < num_sms:
        split_k = max(1, min(num_sms // tiles, k_blocks // 2, 16))
    return LibraryConfig(block_m, block_n, block_k, split_k)


def library_matmul(a: torch.Tensor, b: torch.Tensor, *, num_sms: int | None = None) -> torch.Tensor:
    """``a @ b`` the way a library does it: the tile and ``split_k`` come from the shape (:func:`choose_config`)."""
    _check_matmul_inputs(a, b)
    M, K = a.shape
    cfg = choose_config(M, b.shape[1], K, default_num_sms() if num_sms is None else num_sms)
    return splitk_matmul(a, b, cfg.split_k, block_m=cfg.block_m, block_n=cfg.block_n, block_k=cfg.block_k)


# ----------------------------------------------------------------------------------------------------
# the interpreter's trap


@contextlib.contextmanager
def edge_row_blas() -> Iterator[None]:
    """Within the block, numpy's matmul rounds odd rows of a 2-D float32 product differently from even
    rows (they are computed in float64 and rounded once), as a BLAS whose micro-kernel treats edge rows
    on another path would.  Under the interpreter ``tl.dot`` is numpy's matmul, so this shows which
    kernels rely on the BLAS for their batch invariance (lab 05 and the tests use it)."""
    real = np.matmul

    def edge_row_matmul(a, b, *args, **kwargs):
        out = real(a, b, *args, **kwargs)
        if out.ndim == 2 and out.dtype == np.float32:
            out[1::2] = real(np.asarray(a)[1::2].astype(np.float64), np.asarray(b).astype(np.float64))
        return out

    np.matmul = edge_row_matmul
    try:
        yield
    finally:
        np.matmul = real


# ----------------------------------------------------------------------------------------------------
# 4. the batch-invariant matmul

INVARIANT_BLOCK_K = 64
"""The one K blocking of every invariant configuration: K is reduced 64 at a time, from 0 upwards."""


@dataclass(frozen=True)
class InvariantConfig:
    """How the invariant kernel covers the output; none of these fields changes the K order.

    ``kernel`` is ``"pointer"`` (masked loads, any shape and strides) or ``"tma"`` (Hopper's tensor
    memory accelerator, GPU only, needs 16-byte aligned rows); ``persistent`` launches one program per
    SM that loops over tiles.
    """

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 3
    group_m: int = 8
    kernel: str = "pointer"
    persistent: bool = False

    def validate(self) -> None:
        """Reject configurations that would change the instruction (and with it the order) on a GPU."""
        if self.kernel not in ("pointer", "tma"):
            raise ValueError(f"kernel must be 'pointer' or 'tma', got {self.kernel!r}")
        if self.kernel == "tma" and is_interpreter():
            raise ValueError("the 'tma' kernel needs a GPU")
        if not is_interpreter() and (self.block_m < 64 or self.num_warps % 4):
            raise ValueError(
                "on a GPU every invariant config must use BLOCK_M >= 64 and a multiple of 4 warps, so that "
                f"Triton emits the same warpgroup MMA (wgmma) instruction for every M; got {self}"
            )
        for v in (self.block_m, self.block_n):
            if v < 16 or v & (v - 1):
                raise ValueError(f"block sizes must be powers of two >= 16, got {self}")

    def fitted(self, element_size: int) -> InvariantConfig:
        """This config with as many pipeline stages as fit in shared memory for this element size
        (fp32 tiles are twice as large as bf16 ones).  Stages change only how far loads run ahead."""
        per_stage = (self.block_m + self.block_n) * INVARIANT_BLOCK_K * element_size
        stages = max(1, min(self.num_stages, SHARED_MEMORY_BUDGET // per_stage))
        return self if stages == self.num_stages else dataclasses.replace(self, num_stages=stages)


SHARED_MEMORY_BUDGET = 200 * 1024
"""Bytes of shared memory the pipeline stages may use (an H100 block may have 227 KiB; the epilogue needs some)."""

# Under the interpreter: few, wide programs (the interpreter pays per program and per op).
_CPU_CONFIG = InvariantConfig(block_m=16, block_n=512, num_warps=4, num_stages=1)


_BY_SIZE = (  # from the most efficient tile to the one that gives the most programs (H100 sweep, data/gpu)
    InvariantConfig(128, 256, num_warps=8, num_stages=3, kernel="tma", persistent=True),
    InvariantConfig(128, 128, num_warps=4, num_stages=5, kernel="tma", persistent=True),
    InvariantConfig(64, 128, num_warps=4, num_stages=6, kernel="tma"),
    InvariantConfig(64, 64, num_warps=4, num_stages=8, kernel="tma"),
)
_DECODE = InvariantConfig(64, 32, num_warps=4, num_stages=8, kernel="pointer")
"""Few rows: 64-row tiles (the smallest wgmma M), 32 columns per program, a deep pipeline, so that the
weights stream through every SM at once.  Plain loads beat TMA here (measured on the H100)."""


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gpu_config(M: int, N: int, num_sms: int) -> InvariantConfig:
    """The GPU's rule: decode (M <= 64) streams the weights with :data:`_DECODE`; otherwise the largest
    tile of :data:`_BY_SIZE` that still gives most SMs (70%) a program; :data:`_DECODE` if none does."""
    if M <= 64:
        return _DECODE
    for cfg in _BY_SIZE:
        if _cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n) >= 0.7 * num_sms:
            return cfg
    return _DECODE


def invariant_config(M: int, N: int, K: int) -> InvariantConfig:  # noqa: ARG001 (K never changes the tiles)
    """The tile configuration for one shape on this backend.

    It may depend on M (that is the point: small batches want small tiles and more programs), because
    every configuration shares :data:`INVARIANT_BLOCK_K`, the ascending K loop and the wgmma
    instruction; the GPU benchmark checks that every configuration gives the same bits.
    """
    if is_interpreter():
        return _CPU_CONFIG
    return gpu_config(M, N, default_num_sms())


@triton.jit
def _grouped_tile(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear tile id to (pid_m, pid_n), GROUP_M rows of tiles at a time, so B tiles stay in L2."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % num_pid_in_group) % group_size_m
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS: tl.constexpr):
    """Epilogue: add the bias in fp32 once the whole K sum is done, round to the output dtype, store."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _invariant_matmul_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, EXACT_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS, PERSISTENT: tl.constexpr,
):
    """Batch-invariant C = A @ B (+ bias): every output element is reduced over K in BLOCK_K steps from 0
    up, the same way whatever M and the tile sizes are.  EXACT_DOT (interpreter) sums elementwise
    products instead of calling numpy's matmul, whose rounding may depend on the tile's shape."""
    start = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    step = NUM_PROGRAMS if PERSISTENT else num_tiles
    for tile_id in range(start, num_tiles, step):
        pid_m, pid_n = _grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                        mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
            b = tl.load(b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=(k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
            if EXACT_DOT:
                acc += tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
            else:
                acc = tl.dot(a, b, acc)
        _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


@triton.jit
def _invariant_matmul_tma_kernel(
    a_desc, b_desc, c_ptr, bias_ptr, M, N, K, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, B_IS_NK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_PROGRAMS, PERSISTENT: tl.constexpr,
):
    """The same K order as :func:`_invariant_matmul_kernel`, with tiles fetched by TMA (GPU only).

    B_IS_NK: B is given as an [N, K] row-major matrix (a weight W in ``x @ W.T``), read as [BLOCK_N,
    BLOCK_K] tiles and transposed for the MMA; otherwise B is [K, N].  TMA fills out-of-range elements
    with zeros, so partial tiles need no masks.
    """
    start = tl.program_id(0)
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    step = NUM_PROGRAMS if PERSISTENT else num_tiles
    for tile_id in range(start, num_tiles, step):
        pid_m, pid_n = _grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = a_desc.load([pid_m * BLOCK_M, k0])
            if B_IS_NK:
                b = tl.trans(b_desc.load([pid_n * BLOCK_N, k0]))
            else:
                b = b_desc.load([k0, pid_n * BLOCK_N])
            acc = tl.dot(a, b, acc)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        _store_tile(c_ptr, bias_ptr, acc, offs_m, offs_n, M, N, stride_cm, stride_cn, HAS_BIAS)


def _tma_ready(t: torch.Tensor) -> bool:
    """TMA needs a row-major matrix with 16-byte aligned base and row stride."""
    return t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


def _launch_tma(a, b, bias, c, cfg: InvariantConfig, num_programs: int) -> bool:
    """Launch the TMA kernel if the operands allow it; False if they do not (the caller falls back)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    b_is_nk = b.stride(0) == 1 and b.stride(1) != 1  # b is W.T for a row-major W
    w = b.t() if b_is_nk else b
    if not (_tma_ready(a) and _tma_ready(w)):
        return False
    M, K = a.shape
    N = b.shape[1]
    a_desc = TensorDescriptor.from_tensor(a, [cfg.block_m, INVARIANT_BLOCK_K])
    b_block = [cfg.block_n, INVARIANT_BLOCK_K] if b_is_nk else [INVARIANT_BLOCK_K, cfg.block_n]
    b_desc = TensorDescriptor.from_tensor(w, b_block)
    _invariant_matmul_tma_kernel[(num_programs,)](
        a_desc, b_desc, c, c if bias is None else bias, M, N, K, c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, B_IS_NK=b_is_nk, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=INVARIANT_BLOCK_K, GROUP_M=cfg.group_m, NUM_PROGRAMS=num_programs, PERSISTENT=cfg.persistent,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return True


@reference
def invariant_mm_with_config(
    a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None, cfg: InvariantConfig
) -> torch.Tensor:
    """``a @ b (+ bias)`` with an explicit configuration: the benchmark and the tests use it to show that
    every configuration gives the same bits.  Inputs are checked by the public entry points."""
    cfg.validate()
    if (out := _empty_result(a, b)) is not None:
        return out + bias if bias is not None and a.shape[1] == 0 else out
    ka, kb = _readable(a), _readable(b)
    cfg = cfg.fitted(ka.element_size())
    kbias = None if bias is None else kernel_operand(bias).contiguous()
    M, K = a.shape
    N = b.shape[1]
    c = torch.empty((M, N), dtype=ka.dtype, device=a.device)
    tiles = _cdiv(M, cfg.block_m) * _cdiv(N, cfg.block_n)
    num_programs = min(tiles, default_num_sms()) if cfg.persistent else tiles
    if cfg.kernel == "tma" and _launch_tma(ka, kb, kbias, c, cfg, num_programs):
        return c.to(a.dtype)
    _invariant_matmul_kernel[(num_programs,)](
        ka, kb, c, c if kbias is None else kbias, M, N, K,
        ka.stride(0), ka.stride(1), kb.stride(0), kb.stride(1), c.stride(0), c.stride(1),
        HAS_BIAS=kbias is not None, EXACT_DOT=is_interpreter(), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=INVARIANT_BLOCK_K, GROUP_M=cfg.group_m, NUM_PROGRAMS=num_programs, PERSISTENT=cfg.persistent,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return c.to(a.dtype)


@reference
def invariant_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batch-invariant ``a @ b`` for ``a: [M, K]``, ``b: [K, N]`` (any M >= 0, any K and N).

    Row i of the result has the same bits whatever M is and wherever the row sits in ``a``.
    fp32 accumulation; the result has the inputs' dtype.
    """
    _check_matmul_inputs(a, b)
    return invariant_mm_with_config(a, b, None, invariant_config(a.shape[0], b.shape[1], a.shape[1]))


@reference
def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batch-invariant ``x @ weight.T + bias`` for ``x: [..., K]``, ``weight: [N, K]``, ``bias: [N]``.

    The layout of ``torch.nn.functional.linear``; the bias is added in fp32 after the whole K sum.
    """
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if x.dim() < 1 or weight.dim() != 2:
        raise ValueError(f"x must be [..., K] and weight [N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"x's last dimension ({x.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]}); "
            f"weight is [out_features, in_features] = {tuple(weight.shape)}"
        )
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        check_float_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        tensors["bias"] = bias
    check_same_dtype(**tensors)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    out = invariant_mm_with_config(
        x2, weight.t(), bias, invariant_config(x2.shape[0], weight.shape[0], weight.shape[1]))
    return out.reshape(*lead, weight.shape[0])
