"""detlib.rowwise: softmax, log-softmax, mean and sum with one fixed reduction order per row."""

from __future__ import annotations

import pytest
import torch

import detlib
from detlib import rowwise as R

ROW_COUNTS = (1, 2, 3, 8, 33, 64)


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * 3).to(detlib.device())


@pytest.mark.parametrize("n", [1, 5, 300, 1024, 2500])
def test_row_ops_match_float64(n: int) -> None:
    x = _x(4, n, seed=n)
    xd = x.double()
    # fp32 accumulation of n terms of size ~3: error well under n * 2^-24 * sum|x|
    torch.testing.assert_close(R.row_sums(x).double(), xd.sum(-1), rtol=0, atol=n * 3 * 4 * 2**-23 + 1e-6)
    torch.testing.assert_close(R.row_means(x).double(), xd.mean(-1), rtol=0, atol=3 * 4 * 2**-23 + 1e-7)
    torch.testing.assert_close(R.row_softmax(x).double(), torch.softmax(xd, -1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(R.row_softmax(x, log=True).double(), torch.log_softmax(xd, -1), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("dim", [0, 1, -1, (0, 2), None])
def test_op_level_functions_take_torch_arguments(dim: int | tuple[int, ...] | None) -> None:
    x = _x(3, 5, 7)
    xd = x.double()
    for keepdim in (False, True):
        want = xd.mean() if dim is None else xd.mean(dim, keepdim=keepdim)
        if dim is None and keepdim:
            want = xd.mean((0, 1, 2), keepdim=True)
        got = R.invariant_mean(x, dim, keepdim)
        assert got.shape == want.shape and got.dtype == x.dtype
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
        got_sum = R.invariant_sum(x, dim, keepdim)
        assert got_sum.shape == want.shape
    if isinstance(dim, int):
        torch.testing.assert_close(R.invariant_softmax(x, dim).double(), torch.softmax(xd, dim), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(R.invariant_log_softmax(x, dim).double(), torch.log_softmax(xd, dim),
                                   rtol=1e-5, atol=2e-5)


def test_half_precision_in_fp32_out_dtype_kept() -> None:
    x = _x(6, 200).to(torch.bfloat16)
    y = R.invariant_softmax(x, -1)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), torch.softmax(x.double(), -1), rtol=2**-7, atol=1e-6)
    assert R.invariant_log_softmax(x, -1, dtype=torch.float32).dtype == torch.float32
    assert R.invariant_mean(x, -1).dtype == torch.bfloat16


def test_rows_are_bitwise_batch_invariant() -> None:
    x = _x(max(ROW_COUNTS), 1500, seed=1)  # two chunks of ROW_BLOCK per row
    fns = {
        "sum": R.row_sums,
        "mean": R.row_means,
        "softmax": R.row_softmax,
        "log_softmax": lambda t: R.row_softmax(t, log=True),
    }
    for name, fn in fns.items():
        alone = fn(x[:1])[0]
        for rows in ROW_COUNTS:
            batch = fn(x[:rows])
            assert detlib.bitwise_equal(batch[0], alone), f"{name}: row 0 differs with {rows} rows"
            last_alone = fn(x[rows - 1:rows])[0]
            assert detlib.bitwise_equal(batch[-1], last_alone), f"{name}: row {rows - 1} differs with {rows} rows"


def test_neutral_padding_keeps_the_bits() -> None:
    """A fixed chunk size makes trailing zeros (sum) and -inf (softmax) change nothing, as causal masking needs."""
    x = _x(3, 700, seed=2)
    zeros = torch.zeros(3, 1500, device=x.device)
    assert detlib.bitwise_equal(R.row_sums(torch.cat([x, zeros], 1)), R.row_sums(x))
    padded = torch.cat([x, torch.full((3, 1500), float("-inf"), device=x.device)], 1)
    assert detlib.bitwise_equal(R.row_softmax(padded)[:, :700], R.row_softmax(x))
    assert detlib.bitwise_equal(R.row_softmax(padded, log=True)[:, :700], R.row_softmax(x, log=True))


def test_strided_rows_give_the_same_bits() -> None:
    x = _x(20, 64)
    assert detlib.bitwise_equal(R.row_sums(x.t().contiguous().t()), R.row_sums(x))
    assert detlib.bitwise_equal(R.invariant_softmax(x.t(), 0).t(), R.invariant_softmax(x, 1))


def test_empty_and_scalar_inputs() -> None:
    assert R.row_sums(_x(0, 8)).shape == (0,)
    assert bool(torch.isnan(R.invariant_mean(_x(3, 0), -1)).all())
    assert detlib.bitwise_equal(R.invariant_sum(_x(3, 0), -1), torch.zeros(3, device=detlib.device()))
    s = torch.tensor(2.5, device=detlib.device())
    assert float(R.invariant_mean(s)) == 2.5 and float(R.invariant_softmax(s, 0)) == 1.0


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="dtype"):
        R.row_sums(torch.ones(2, 3, dtype=torch.int64, device=detlib.device()))
    with pytest.raises(ValueError, match="2-D"):
        R.row_sums(_x(5))
    with pytest.raises(IndexError, match="out of range"):
        R.invariant_mean(_x(2, 3), 2)
    with pytest.raises(ValueError, match="twice"):
        R.invariant_sum(_x(2, 3), (1, -1))
    with pytest.raises(TypeError, match="torch.Tensor"):
        R.invariant_softmax([1.0, 2.0], 0)  # type: ignore[arg-type]
