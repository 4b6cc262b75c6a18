"""Tests of detlib.rmsnorm: float64 agreement, bitwise batch invariance of the invariant version, the
split variant's dependence on the batch, and bad input."""

from __future__ import annotations

import pytest
import torch

import detlib
from detlib import rmsnorm as rn
from detlib.numerics import bitwise_equal, diff_summary

DEV = detlib.device()
DTYPE = detlib.compute_dtype()
# |out - ref| <= ATOL + RTOL |ref|, fp32 math; bf16 outputs round to 8 bits
RTOL, ATOL = (1e-5, 1e-5) if DTYPE == torch.float32 else (1e-2, 1e-2)
HIDDENS = [1, 7, 300, 1024, 2500]  # one element, tiny, masked tail, one full chunk, several chunks


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(DEV, DTYPE)


def assert_close_to_float64(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> None:
    ref = rn.rms_norm_float64(x, w, eps)
    assert out.shape == x.shape and out.dtype == x.dtype
    err = (out.double().cpu() - ref.cpu()).abs()
    assert bool((err <= ATOL + RTOL * ref.abs().cpu()).all()), f"max error {float(err.max()):.3g}"


@pytest.mark.parametrize("hidden", HIDDENS)
def test_every_variant_matches_float64(hidden: int) -> None:
    x, w = randn(6, hidden, seed=hidden), randn(hidden, seed=hidden + 1)
    assert_close_to_float64(rn.rms_norm_rows(x, w), x, w)
    assert_close_to_float64(rn.rms_norm_split(x, w, splits=3), x, w)
    assert_close_to_float64(rn.library_rms_norm(x, w), x, w)
    assert_close_to_float64(rn.invariant_rms_norm(x, w), x, w)
    assert_close_to_float64(rn.invariant_rms_norm(x, w, 1e-2), x, w, 1e-2)


def test_leading_dimensions_are_rows() -> None:
    x, w = randn(2, 3, 50, seed=1), randn(50, seed=2)
    out = rn.invariant_rms_norm(x, w)
    assert_close_to_float64(out, x, w)
    assert bitwise_equal(out.reshape(6, 50), rn.invariant_rms_norm(x.reshape(6, 50), w))


@pytest.mark.parametrize("hidden", [300, 2500])
def test_invariant_rows_do_not_depend_on_batch_size_or_position(hidden: int) -> None:
    x, w = randn(40, hidden, seed=3), randn(hidden, seed=4)
    full = rn.invariant_rms_norm(x, w)  # 40 rows: one program per row on the CPU's pretend 16 "SMs"
    for b in (1, 2, 3, 5, 15, 16, 17, 33):  # below 16 rows: one program per chunk
        got = rn.invariant_rms_norm(x[:b], w)
        assert bitwise_equal(got, full[:b]), f"batch {b}: {diff_summary(got, full[:b])}"
    moved = torch.cat([x[10:13], x[:1]])
    assert bitwise_equal(rn.invariant_rms_norm(moved, w)[3], full[0])


@pytest.mark.parametrize("hidden", [1, 1024, 2500])
def test_both_invariant_paths_give_the_same_bits(hidden: int) -> None:
    x, w = randn(5, hidden, seed=5), randn(hidden, seed=6)
    rows = rn.invariant_rms_norm_path(x, w, 1e-6, "rows")
    chunks = rn.invariant_rms_norm_path(x, w, 1e-6, "chunks")
    assert bitwise_equal(rows, chunks), diff_summary(rows, chunks)


def test_split_count_changes_bits_and_library_dispatch_follows_batch_size() -> None:
    x, w = randn(64, 3000, seed=7), randn(3000, seed=8)  # not a power of two: numpy's pairwise blocks differ
    one, many = rn.rms_norm_split(x, w, splits=1), rn.rms_norm_split(x, w, splits=7)
    assert not bitwise_equal(one, many), "7 slices should round some row differently from 1"
    assert rn.choose_splits(1, 3000, 16) > 1 and rn.choose_splits(16, 3000, 16) == 1
    lib_full = rn.library_rms_norm(x, w, num_sms=16)
    assert not all(bitwise_equal(rn.library_rms_norm(x[:b], w, num_sms=16), lib_full[:b]) for b in (1, 2, 4, 8, 12, 15))


def test_bf16_and_fp16_inputs_keep_their_dtype() -> None:
    x, w = randn(4, 100, seed=9), randn(100, seed=10)
    for dtype in (torch.bfloat16, torch.float16):
        out = rn.invariant_rms_norm(x.to(dtype), w.to(dtype))
        assert out.dtype == dtype
        ref = rn.rms_norm_float64(x.to(dtype), w.to(dtype))
        assert float((out.double().cpu() - ref.cpu()).abs().max()) < 5e-2
    mixed = rn.invariant_rms_norm(x.to(torch.bfloat16), w.float())  # fp32 weight with bf16 activations
    assert mixed.dtype == torch.bfloat16


def test_empty_and_strided_inputs() -> None:
    w = randn(16, seed=11)
    assert rn.invariant_rms_norm(torch.empty(0, 16, device=DEV, dtype=DTYPE), w).shape == (0, 16)
    x = randn(8, 32, seed=12)[:, ::2]  # a non-contiguous view: copied before the kernel
    assert_close_to_float64(rn.invariant_rms_norm(x, w), x, w)
    assert_close_to_float64(rn.invariant_rms_norm(x.t().contiguous().t(), w), x, w)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: rn.invariant_rms_norm(randn(3, 8), randn(7)), ValueError, "weight must have shape"),
        (lambda: rn.invariant_rms_norm(randn(3, 8).double(), randn(8).double()), TypeError, "dtype"),
        (lambda: rn.invariant_rms_norm(randn(3, 8).to(torch.int32), randn(8)), TypeError, "dtype"),
        (lambda: rn.invariant_rms_norm([1.0, 2.0], randn(2)), TypeError, "torch.Tensor"),
        (lambda: rn.invariant_rms_norm(randn(3, 8), randn(8), -1.0), ValueError, "eps"),
        (lambda: rn.invariant_rms_norm(torch.tensor(1.0, device=DEV), randn(1)), ValueError, "at least one"),
        (lambda: rn.rms_norm_split(randn(3, 8), randn(8), splits=0), ValueError, "splits"),
        (lambda: rn.invariant_rms_norm(torch.ones(2, 4, device="meta"), torch.ones(4, device="meta")), ValueError,
         "detlib's kernels run on"),
    ],
)
def test_bad_input_fails_clearly(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_lab04_checks_pass_good_code_and_fail_wrong_code() -> None:
    from detlib.grade import find, run_check

    rows = rn.rms_norm_rows.__wrapped__  # the unguarded references stand in for a learner's code
    assert run_check(find("04.rms_norm_rows"), rows).status == "passed"
    assert run_check(find("04.rms_norm_split"), lambda x, w, eps, s: rn.rms_norm_split.__wrapped__(x, w, eps, splits=s)
                     ).status == "passed"
    assert run_check(find("04.invariant_rms_norm"), rows).status == "passed"
    assert run_check(find("04.rms_norm_rows"), lambda x, w, eps: x * torch.rsqrt((x * x).mean(-1, keepdim=True))
                     ).status == "failed"  # forgets weight and eps

    def batch_dependent(x, w, eps):  # float64 math for small batches, the float32 kernel for large ones
        return rn.rms_norm_float64(x, w, eps).to(x.dtype) if x.shape[0] < 8 else rows(x, w, eps)

    verdict = run_check(find("04.invariant_rms_norm"), batch_dependent)
    assert verdict.status == "failed" and "differ" in verdict.reason
    assert run_check(find("04.invariant_rms_norm"), rn.invariant_rms_norm).status == "forbidden call"
