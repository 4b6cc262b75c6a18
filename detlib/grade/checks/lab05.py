"""Lab 05 (matmul and Split-K): the tiled kernel, Split-K, the batch-invariant matmul.

Each check draws fresh random inputs (the seed is in the message), compares with a float64 reference
by ``||out - ref|| / ||ref||`` and, for the invariant kernel, compares bits across batch sizes and
row positions.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from detlib.backend import compute_dtype, device
from detlib.grade.harness import CheckFailed, call, expect_tensor
from detlib.grade.spec import exercise
from detlib.numerics import bitwise_equal, diff_summary

_MM_REFS = ("detlib.matmul.tiled_matmul", "detlib.matmul.splitk_matmul", "detlib.matmul.invariant_matmul",
            "detlib.matmul.invariant_linear", "detlib.matmul.invariant_mm_with_config")
# ||out - ref|| / ||ref||: fp32 accumulation lands far under 1e-5; bf16 outputs near 4e-3
_REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
_SHAPES = [(1, 1, 1), (5, 70, 33), (37, 100, 40), (64, 64, 64), (65, 9, 130)]


def _operands(M: int, K: int, N: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype()
    return (torch.randn(M, K, generator=gen).to(device(), dtype), torch.randn(K, N, generator=gen).to(device(), dtype))


def _expect_product(out: object, a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    got = expect_tensor(out, shape=(a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device, what=what)
    ref = a.double().cpu() @ b.double().cpu()
    err = float((got.double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30))
    tol = _REL_TOL.get(a.dtype, 1e-2)
    if not err <= tol:
        raise CheckFailed(f"{what}: ||out - a@b|| / ||a@b|| = {err:.2e}, above {tol:g}",
                          "mask both loads (rows/cols out of range and k >= K read as 0) and accumulate in float32")
    return got


@exercise("05", "tiled_matmul", points=2, replaces=_MM_REFS, timeout_s=120,
          hint="grid (cdiv(M, BM), cdiv(N, BN)); each program: acc = zeros((BM, BN), fp32); for k0 in range(0, K, BK): "
               "load masked tiles of a and b, acc = tl.dot(a_tile, b_tile, acc); store the masked tile")
def check_tiled_matmul(tiled_matmul: Callable[..., torch.Tensor]) -> None:
    """``tiled_matmul(a, b)``: a @ b for any M, K, N (masked edges)."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for M, K, N in _SHAPES:
        a, b = _operands(M, K, N, gen)
        _expect_product(call(tiled_matmul, a, b), a, b, f"tiled_matmul for M={M}, K={K}, N={N} (seed {seed})")


@exercise("05", "splitk_matmul", points=2, replaces=_MM_REFS, timeout_s=120,
          hint="grid (tiles_m, tiles_n, S): program s reduces K slice s into an fp32 partial tile part[s]; "
               "then add part[0] + part[1] + ... in order and cast")
def check_splitk_matmul(splitk_matmul: Callable[..., torch.Tensor]) -> None:
    """``splitk_matmul(a, b, split_k)``: a @ b for every split count, including more splits than K blocks."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for (M, K, N), split_k in [((5, 70, 33), 1), ((5, 70, 33), 2), ((8, 512, 40), 4), ((3, 100, 17), 3),
                               ((2, 40, 8), 16)]:
        a, b = _operands(M, K, N, gen)
        _expect_product(call(splitk_matmul, a, b, split_k), a, b,
                        f"splitk_matmul for M={M}, K={K}, N={N}, split_k={split_k} (seed {seed})")


@exercise("05", "invariant_matmul", points=3, replaces=_MM_REFS, timeout_s=180,
          hint="no split-K and one fixed BLOCK_K; walk K from 0 upwards for every output tile, whatever M is")
def check_invariant_matmul(invariant_matmul: Callable[..., torch.Tensor]) -> None:
    """``invariant_matmul(a, b)``: correct, and row i's bits the same at every M and every row position."""
    seed = secrets.randbelow(2**31)
    gen = torch.Generator().manual_seed(seed)
    for M, K, N in _SHAPES[1:]:
        a, b = _operands(M, K, N, gen)
        _expect_product(call(invariant_matmul, a, b), a, b, f"invariant_matmul for M={M}, K={K}, N={N} (seed {seed})")
    a, b = _operands(100, 200, 48, gen)
    full = call(invariant_matmul, a, b)
    for M in (1, 2, 3, 16, 31, 32, 33, 64, 65):
        part = call(invariant_matmul, a[:M], b)
        if not bitwise_equal(part, full[:M]):
            raise CheckFailed(f"rows 0..{M - 1} differ between M={M} and M=100 (seed {seed}): "
                              f"{diff_summary(part, full[:M])}",
                              "the K reduction of each output element must not depend on M: no split-K chosen "
                              "from the shape, one BLOCK_K")
    moved = torch.cat([a[50:57], a[:1]])  # row 0 at position 7 of a batch of 8
    if not bitwise_equal(call(invariant_matmul, moved, b)[7], full[0]):
        raise CheckFailed(f"row 0 changed when moved to position 7 of a batch of 8 (seed {seed})")
