"""detlib.toy_server: batched ops give one request several answers; row-by-row ops give one."""

from __future__ import annotations

import matplotlib
import pytest
import torch

import detlib
from detlib.toy_server import ToyModel, ToyServer, output_histogram, plot_histograms, rowwise_forward

matplotlib.use("Agg")
DTYPE = detlib.compute_dtype()
TRIALS = 150


@pytest.fixture(scope="module")
def model() -> ToyModel:
    """Toy widths on the CPU; on a GPU the width of the recorded sweep (bf16 ``x @ W.T`` at K = N = 4096 changed
    with the batch on the H100, while toy widths were invariant up to batches of 32)."""
    if detlib.is_interpreter():
        return ToyModel.random(64, 256, 128, dtype=DTYPE)
    return ToyModel.random(4096, 4096, 512, dtype=DTYPE)


@pytest.fixture(scope="module")
def request_vector(model: ToyModel) -> torch.Tensor:
    return torch.randn(model.dim, generator=torch.Generator().manual_seed(7)).to(detlib.device(), DTYPE)


def test_default_ops_give_several_answers(model: ToyModel, request_vector: torch.Tensor) -> None:
    """The lab's claim: with torch's batched kernels the fixed request gets more than one distinct output."""
    served = ToyServer(model.forward, model.dim, dtype=DTYPE).trials(request_vector, TRIALS)
    hist = output_histogram(served)
    assert sum(hist) == TRIALS and len(hist) > 1


def test_row_by_row_gives_one_answer(model: ToyModel, request_vector: torch.Tensor) -> None:
    server = ToyServer(lambda b: rowwise_forward(model, b), model.dim, dtype=DTYPE)
    served = server.trials(request_vector, TRIALS)
    assert output_histogram(served) == [TRIALS]
    assert len({s.batch_size for s in served}) > 3  # the batches really did vary
    alone = model.forward(request_vector[None])[0].cpu()
    assert detlib.bitwise_equal(served[0].output, alone)


def test_rowwise_forward_matches_the_batched_one(model: ToyModel) -> None:
    batch = torch.randn(9, model.dim).to(detlib.device(), DTYPE)
    slow, fast = rowwise_forward(model, batch), model.forward(batch)
    assert slow.shape == fast.shape == (9, model.w_out.shape[0])
    tol = 1e-4 if DTYPE == torch.float32 else 5e-2
    assert torch.allclose(slow.float(), fast.float(), atol=tol, rtol=tol)
    assert torch.allclose(slow.exp().sum(-1).float(), torch.ones(9, device=slow.device), atol=tol * 10)


def test_serving_is_reproducible_and_within_limits(model: ToyModel, request_vector: torch.Tensor) -> None:
    server = ToyServer(model.forward, model.dim, max_batch=5, mean_waiting=8.0, dtype=DTYPE)
    a, b = server.trials(request_vector, 40, seed=3), server.trials(request_vector, 40, seed=3)
    assert [(s.batch_size, s.position) for s in a] == [(s.batch_size, s.position) for s in b]
    assert all(detlib.bitwise_equal(x.output, y.output) for x, y in zip(a, b))
    assert all(1 <= s.batch_size <= 5 and 0 <= s.position < s.batch_size for s in a)
    assert max(s.batch_size for s in a) == 5


def test_bad_input_is_a_clear_error(model: ToyModel) -> None:
    with pytest.raises(ValueError, match="shape"):
        ToyServer(model.forward, model.dim).serve(torch.zeros(3), torch.Generator())
    with pytest.raises(ValueError, match=rf"\(B, {model.dim}\)"):
        model.forward(torch.zeros(2, 3, dtype=DTYPE, device=detlib.device()))
    with pytest.raises(ValueError, match="expected"):
        model.forward(torch.zeros(2, model.dim, dtype=torch.float64, device=detlib.device()))
    with pytest.raises(ValueError, match="max_batch"):
        ToyServer(model.forward, model.dim, max_batch=0)


def test_plot(model: ToyModel) -> None:
    ax = plot_histograms({"default": [5, 3, 1], "row by row": [9]})
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel()
