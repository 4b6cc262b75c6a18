"""detlib.sweep: the sweep finds batch dependence where the labs claim it, and none where there can be none."""

from __future__ import annotations

import json

import matplotlib
import pytest
import torch

import detlib
from detlib.sweep import (
    Case,
    Sweep,
    _ranges,
    attention_case,
    batch_invariance_failures,
    default_batch_sizes,
    matmul_case,
    plot_overview,
    plot_sweep,
    prefill_vs_decode,
    rms_norm_case,
    softmax_case,
    standard_cases,
    sweep,
)

matplotlib.use("Agg")
DEV = detlib.device()
SIZES = default_batch_sizes(48)


def _rowwise(op):
    """Any op made invariant the slow way: one row at a time."""
    return lambda *parts: torch.cat([op(*(p[i:i + 1] for p in parts)) for i in range(parts[0].shape[0])])


@pytest.mark.parametrize("layout", ["a@b", "x@W.T"])
def test_fp32_matmul_depends_on_the_batch(layout: str) -> None:
    """Lab 03's claim for fp32 matmul (CPU and GPU): the row changes at some batch size."""
    result = sweep(matmul_case(256, 256, layout, dtype=torch.float32), SIZES, ("first", "last"))
    assert not result.invariant
    assert all(p.max_ulp < 1e4 for p in result.points)  # a rounding difference, not a bug


@pytest.mark.skipif(not detlib.is_interpreter(), reason="claim measured for the CPU")
@pytest.mark.parametrize("make", [lambda: rms_norm_case(1024), lambda: softmax_case(1024),
                                  lambda: softmax_case(1024, log=True), lambda: attention_case(2, 16, 32)],
                         ids=["rms_norm", "softmax", "log_softmax", "attention_prefill"])
def test_rowwise_reductions_are_invariant_on_cpu(make) -> None:
    assert sweep(make(), SIZES, ("first", "last")).invariant


@pytest.mark.parametrize("case", standard_cases(torch.float32, small=True), ids=lambda c: c.name)
def test_row_by_row_is_invariant_everywhere(case: Case) -> None:
    """The trivially invariant rewrite: no batch size or position can change a row computed alone."""
    slow = Case(case.name + " row by row", _rowwise(case.op), case.row, case.others)
    assert sweep(slow, [1, 2, 3, 5, 8], ("first", "middle", "last")).invariant


def test_decode_depends_on_the_batch_and_on_the_path() -> None:
    """SDPA's default decode differs with the batch of sequences and from prefill, yet stays close to it.

    Claimed in lab 03 for fp32 on the CPU and for bf16 at model-like shapes on the GPU.
    """
    dtype = detlib.compute_dtype()
    heads, kv, dim = (2, 64, 32) if detlib.is_interpreter() else (8, 1024, 128)
    assert not sweep(attention_case(heads, kv, dim, decode=True, dtype=dtype), SIZES).invariant
    lengths = [1, 2, 3, 8, 17, 64, 100, 256, 1024]
    pvd = prefill_vs_decode(heads, lengths, dim, dtype=dtype)
    assert pvd.axis == "KV length" and pvd.sizes() == lengths
    assert not pvd.invariant
    assert max(p.max_abs for p in pvd.points) < (1e-4 if dtype == torch.float32 else 2e-2)


def test_positions_are_resolved_per_batch_size() -> None:
    case = softmax_case(64)
    result = sweep(case, [1, 2, 5], "all")
    assert sorted((p.size, p.position) for p in result.points) == [(1, 0), (2, 0), (2, 1)] + [(5, i) for i in range(5)]
    result = sweep(case, [1, 4], ("first", "middle", "last", 3, 7))
    assert sorted((p.size, p.position) for p in result.points) == [(1, 0), (4, 0), (4, 2), (4, 3)]
    with pytest.raises(ValueError, match="position"):
        sweep(case, [2], ("top",))  # type: ignore[arg-type]


def test_sweep_detects_exactly_the_sizes_that_differ() -> None:
    """A synthetic op that changes the last bit only for batches of 3 and 7, at a -0.0 and a NaN too."""

    def op(a: torch.Tensor) -> torch.Tensor:
        out = a * 1.0
        if a.shape[0] in (3, 7):
            out = torch.nextafter(out, torch.full_like(out, float("inf")))
        if a.shape[0] == 9:
            out[:, 0] = -0.0  # equal to 0.0 by ==, not by bits
        return out

    row = torch.zeros(4)
    row[1] = float("nan")  # NaN every time: the same bits, so not a difference
    result = sweep(Case("synthetic", op, row, lambda n: torch.randn(n, 4)), range(1, 12))
    assert result.differing_sizes() == [3, 7, 9]
    at9 = next(p for p in result.points if p.size == 9)
    assert at9.n_different == 1 and at9.max_abs == 0.0
    at3 = next(p for p in result.points if p.size == 3)
    assert at3.max_ulp == 1 and at3.n_different == 3  # nextafter(nan) stays nan: 3 of 4 change


def test_batch_invariance_failures_reference() -> None:
    others = torch.randn(20, 64).to(DEV)
    row = torch.randn(64).to(DEV)
    assert batch_invariance_failures(lambda a: torch.tanh(a) * 2, row, others, range(1, 21)) == []

    def even_batches_round_up(a: torch.Tensor) -> torch.Tensor:
        out = a * 3
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if a.shape[0] % 2 == 0 else out

    assert batch_invariance_failures(even_batches_round_up, row, others, range(1, 21)) == list(range(2, 21, 2))
    assert batch_invariance_failures(even_batches_round_up, row, others, [5, 1, 4]) == [4]


def test_bad_cases_are_clear_errors() -> None:
    case = softmax_case(8)
    with pytest.raises(ValueError, match="positive"):
        sweep(case, [0, 1])
    with pytest.raises(ValueError, match="shape"):
        sweep(Case("bad", case.op, case.row, lambda n: torch.randn(n, 9).to(DEV)), [1, 2])
    with pytest.raises(ValueError, match="rows for a batch"):
        sweep(Case("bad", lambda a: a[:1], case.row, case.others), [1, 2])
    with pytest.raises(ValueError, match="part"):
        sweep(Case("bad", case.op, (case.row, case.row), case.others), [1, 2])
    with pytest.raises(ValueError, match="layout"):
        matmul_case(8, 8, "a@b.T")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        sweep(attention_case(1, 4, 8, backend="fast"), [1])


def test_round_trip_table_and_plots() -> None:
    result = sweep(matmul_case(64, 64, "x@W.T"), [1, 2, 3, 4], ("first", "last"))
    again = Sweep.from_dict(json.loads(json.dumps(result.as_dict())))
    assert again == result
    assert "batch size" in result.table() and result.summary().startswith("matmul x@W.T float32")
    assert _ranges([1, 2, 3, 7, 9, 10]) == "1–3, 7, 9–10"
    heat = sweep(softmax_case(16), range(1, 6), "all")
    for ax in (plot_sweep(result), plot_sweep(heat), plot_overview([result, heat], title="overview")):
        assert ax.get_title() and ax.get_xlabel()
    assert default_batch_sizes(100) == list(range(1, 33)) + [48, 64, 96, 100]
