"""Tests of detlib.matmul: correctness against float64, bitwise batch invariance, bad input.

Runs on the backend detlib picked (the Triton interpreter on a CPU, the kernels on a GPU); sizes are
small so that the interpreter stays fast.  M values are sampled around tile boundaries (the CPU tile
is 32 rows; the GPU's are 64 and 128) rather than exhaustively.
"""

from __future__ import annotations

import pytest
import torch

import detlib
from detlib import matmul as mm
from detlib.numerics import bitwise_equal, diff_summary

DEV = detlib.device()
DTYPE = detlib.compute_dtype()
# ||out - ref|| / ||ref|| bounds: fp32 accumulation of fp32 products; bf16 outputs round to 8 bits
REL_TOL = 1e-6 if DTYPE == torch.float32 else 8e-3
M_SAMPLE = [1, 2, 3, 5, 16, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 2048]


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEV, DTYPE)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double().cpu() - ref.cpu()).norm() / ref.norm().clamp_min(1e-30))


SHAPES = [(1, 70, 33), (37, 100, 40), (65, 9, 17), (64, 128, 64)]


@pytest.mark.parametrize("M,K,N", SHAPES)
def test_every_kernel_matches_float64(M: int, K: int, N: int) -> None:
    a, b = randn(M, K, seed=1), randn(K, N, seed=2)
    ref = a.double() @ b.double()
    outs = {
        "tiled": mm.tiled_matmul(a, b),
        "splitk3": mm.splitk_matmul(a, b, 3),
        "library": mm.library_matmul(a, b),
        "invariant": mm.invariant_matmul(a, b),
    }
    for name, out in outs.items():
        assert out.shape == (M, N) and out.dtype == DTYPE, name
        assert rel_err(out, ref) < REL_TOL, f"{name}: {rel_err(out, ref):.2e}"


def test_linear_matches_float64_with_bias_and_leading_dims() -> None:
    x, w, bias = randn(3, 7, 50, seed=3), randn(20, 50, seed=4), randn(20, seed=5)
    out = mm.invariant_linear(x, w, bias)
    ref = x.double() @ w.double().T + bias.double()
    assert out.shape == (3, 7, 20) and out.dtype == DTYPE
    assert rel_err(out, ref) < REL_TOL
    assert rel_err(mm.invariant_linear(x, w), x.double() @ w.double().T) < REL_TOL


@pytest.mark.parametrize("layout", ["ab", "xwt"])
def test_invariant_rows_do_not_depend_on_batch_size(layout: str) -> None:
    K, N = 80, 40  # K: one full 64-block and a masked one; N: two column tiles, the second masked
    x = randn(max(M_SAMPLE), K, seed=6)
    w, bias = randn(N, K, seed=7), randn(N, seed=8)
    run = (lambda xs: mm.invariant_matmul(xs, w.t().contiguous())) if layout == "ab" else \
          (lambda xs: mm.invariant_linear(xs, w, bias))
    full = run(x)
    for M in M_SAMPLE:
        got = run(x[:M])
        assert bitwise_equal(got, full[:M]), f"M={M}: {diff_summary(got, full[:M])}"


def test_invariant_row_does_not_depend_on_its_position() -> None:
    K, N = 70, 33
    row, others, b = randn(1, K, seed=9), randn(64, K, seed=10), randn(K, N, seed=11)
    alone = mm.invariant_matmul(row, b)[0]
    for pos in [*range(0, 40), 63]:
        batch = others.clone()
        batch[pos] = row[0]
        assert bitwise_equal(mm.invariant_matmul(batch, b)[pos], alone), f"position {pos}"


def test_every_config_gives_the_same_bits() -> None:
    """Tiles in M and N, warps and stages only decide which outputs a program computes."""
    a, b = randn(100, 90, seed=12), randn(90, 70, seed=13)
    block = 64 if not detlib.is_interpreter() else 16
    configs = [mm.InvariantConfig(block, block), mm.InvariantConfig(2 * block, block, num_warps=8),
               mm.InvariantConfig(block, 2 * block, num_stages=2), mm.InvariantConfig(block, block, persistent=True)]
    outs = [mm.invariant_mm_with_config(a, b, None, cfg) for cfg in configs]
    for cfg, out in zip(configs[1:], outs[1:], strict=True):
        assert bitwise_equal(out, outs[0]), f"{cfg}: {diff_summary(out, outs[0])}"


@pytest.mark.skipif(not detlib.is_interpreter(), reason="the trap is numpy's matmul inside Triton's interpreter")
def test_invariance_does_not_rely_on_numpy_matmul() -> None:
    """Under the interpreter tl.dot is np.matmul, and a BLAS may round a row differently by its place in
    the tile.  With such a BLAS (simulated) the plain tl.dot kernel changes a row with its position, and
    the invariant kernel must not."""
    K, N = 96, 32
    row, others, b = randn(1, K, seed=14), randn(32, K, seed=15), randn(K, N, seed=16)
    at0, at1 = others.clone(), others.clone()
    at0[0], at1[1] = row[0], row[0]
    with mm.edge_row_blas():
        tiled = mm.tiled_matmul(at0, b)[0], mm.tiled_matmul(at1, b)[1]
        inv = mm.invariant_matmul(at0, b)[0], mm.invariant_matmul(at1, b)[1]
    assert not bitwise_equal(*tiled), "the simulated BLAS should make the plain tl.dot kernel position-dependent"
    assert bitwise_equal(*inv), diff_summary(*inv)


def test_split_k_changes_the_bits_and_the_library_dispatch_follows_m() -> None:
    a, b = randn(8, 512, seed=17).float(), randn(512, 64, seed=18).float()  # fp32 out: bf16 would round it away
    outs = [mm.splitk_matmul(a, b, s) for s in (1, 2, 4)]
    assert not bitwise_equal(outs[0], outs[1]) and not bitwise_equal(outs[1], outs[2])
    splits = {mm.choose_config(M, 64, 512, num_sms=16).split_k for M in (1, 8, 64, 512)}
    assert len(splits) > 1 and 1 in splits


def test_empty_and_degenerate_shapes() -> None:
    w, bias = randn(5, 7, seed=19), randn(5, seed=20)
    assert mm.invariant_matmul(randn(0, 7), w.t()).shape == (0, 5)
    assert mm.invariant_linear(randn(0, 7), w, bias).shape == (0, 5)
    assert mm.invariant_linear(randn(2, 0, 7), w).shape == (2, 0, 5)
    zero_k = mm.invariant_linear(torch.zeros(3, 0, device=DEV, dtype=DTYPE), torch.zeros(5, 0, device=DEV, dtype=DTYPE),
                                 bias)
    assert bitwise_equal(zero_k, bias.expand(3, 5).contiguous())
    assert mm.invariant_matmul(randn(4, 3), torch.zeros(3, 0, device=DEV, dtype=DTYPE)).shape == (4, 0)


def test_transposed_and_strided_inputs_are_read_correctly() -> None:
    a, b = randn(40, 30, seed=21), randn(30, 25, seed=22)
    ref = a.double() @ b.double()
    column_major_a = a.t().contiguous().t()
    column_major_b = b.t().contiguous().t()
    assert rel_err(mm.invariant_matmul(column_major_a, b), ref) < REL_TOL
    assert rel_err(mm.invariant_matmul(a, column_major_b), ref) < REL_TOL
    assert rel_err(mm.invariant_matmul(column_major_a, column_major_b), ref) < REL_TOL
    every_other = randn(40, 60, seed=23)[:, ::2]  # neither stride is 1: copied before the kernel
    assert rel_err(mm.invariant_matmul(every_other, b), every_other.double() @ b.double()) < REL_TOL
    assert bitwise_equal(mm.invariant_matmul(column_major_a, b), mm.invariant_matmul(a, b))


def test_bf16_and_fp16_inputs_give_their_dtype() -> None:
    a, b = randn(9, 20, seed=26), randn(20, 11, seed=27)
    for dtype in (torch.bfloat16, torch.float16):
        out = mm.invariant_matmul(a.to(dtype), b.to(dtype))
        assert out.dtype == dtype
        assert rel_err(out, a.to(dtype).double() @ b.to(dtype).double()) < 1e-2


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: mm.invariant_matmul(randn(3, 4), randn(5, 6)), ValueError, "inner dimensions"),
        (lambda: mm.invariant_matmul(randn(3, 4)[0], randn(4, 6)), ValueError, "2-D"),
        (lambda: mm.invariant_matmul(randn(3, 4), randn(4, 6).double()), TypeError, "dtype"),
        (lambda: mm.invariant_matmul(randn(3, 4).to(torch.int32), randn(4, 6).to(torch.int32)), TypeError, "dtype"),
        (lambda: mm.invariant_matmul(randn(3, 4), randn(4, 6).to(torch.float16)), TypeError, "dtypes differ"),
        (lambda: mm.invariant_matmul([[1.0]], randn(1, 1)), TypeError, "torch.Tensor"),
        (lambda: mm.invariant_linear(randn(3, 4), randn(6, 5)), ValueError, "last dimension"),
        (lambda: mm.invariant_linear(randn(3, 4), randn(6, 4), randn(5)), ValueError, "bias"),
        (lambda: mm.splitk_matmul(randn(3, 4), randn(4, 6), 0), ValueError, "split_k"),
    ],
)
def test_bad_input_fails_clearly(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_wrong_device_fails_clearly() -> None:
    other = "meta"
    with pytest.raises(ValueError, match="detlib's kernels run on"):
        mm.invariant_matmul(torch.empty(3, 4, device=other), torch.empty(4, 5, device=other))


def test_lab05_checks_pass_good_code_and_fail_wrong_code() -> None:
    from detlib.grade import find, run_check

    tiled = mm.tiled_matmul.__wrapped__  # the unguarded references stand in for a learner's code
    splitk = mm.splitk_matmul.__wrapped__
    assert run_check(find("05.tiled_matmul"), tiled).status == "passed"
    assert run_check(find("05.splitk_matmul"), splitk).status == "passed"
    assert run_check(find("05.invariant_matmul"), tiled).status == "passed"
    assert run_check(find("05.tiled_matmul"), lambda a, b: (a @ b) * 1.001).status == "failed"
    dispatching = run_check(find("05.invariant_matmul"), lambda a, b: splitk(a, b, 2 if a.shape[0] <= 32 else 1))
    assert dispatching.status == "failed" and "differ" in dispatching.reason
    assert run_check(find("05.invariant_matmul"), mm.invariant_matmul).status == "forbidden call"
