"""detlib.audit: per-layer comparison of one example's bits across batch sizes, rows and prefixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import detlib
from detlib.audit import Probe, audit
from detlib.toy_transformer import ToyConfig, linear_names, plant_split_k, toy_transformer

DEV = detlib.device()


class ByBatch(nn.Module):
    """Adds a rounding error that depends on the batch size: a stand-in for a shape-dispatched kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1e-3 * x.shape[0] if x.shape[0] > 2 else x


class Net(nn.Module):
    def __init__(self, variant: bool) -> None:
        super().__init__()
        self.first = nn.Softsign()  # elementwise: invariant (PyTorch's CPU nn.Linear is not, for 1 row vs 2)
        self.mid = ByBatch() if variant else nn.Identity()
        self.last = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.mid(self.first(x)))


def _example(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def test_audit_finds_where_variance_enters() -> None:
    torch.manual_seed(0)
    report = audit(Net(variant=True), _example(1, 8), batch_sizes=(1, 2, 3, 5), modes=("off",), progress=False)
    assert report.layers == ["first", "mid", "last", "(output)"]
    assert [p.label for p in report.probes][:3] == ["B=1 row 0", "B=2 row 0", "B=2 row 1"]
    firsts = report.first_differences("off")
    for probe, first in zip(report.probes, firsts):
        assert first == ("mid" if probe.batch_size > 2 else None), probe
    assert report.first_variant_layer("off") == "mid" and not report.invariant("off")
    assert report.differs("off")[report.layers.index("first")].sum() == 0
    text = report.table()
    assert "variance enters first at mid" in text


def test_invariant_model_reports_no_difference() -> None:
    torch.manual_seed(0)
    report = audit(nn.Sequential(nn.Tanh(), nn.ReLU()), _example(1, 3, 8), batch_sizes=(1, 4, 9),
                   modes=("off",), progress=False)
    assert report.invariant("off") and report.first_variant_layer("off") is None
    assert np.all(report.ulps["off"] == 0)


def test_prefix_probes_compare_positions_of_a_causal_model() -> None:
    class Causal(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cumsum(x, dim=1)

    class Leaky(nn.Module):  # sees the future: position 0 depends on the sequence length
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + x.shape[1]

    ex = _example(1, 6, 4)
    ok = audit(nn.Sequential(Causal()), ex, batch_sizes=(1,), prefixes=(1, 3, 6), modes=("off",), progress=False)
    assert ok.invariant("off") and [p.kind for p in ok.probes] == ["batch", "prefix", "prefix", "prefix"]
    bad = audit(nn.Sequential(Causal(), Leaky()), ex, batch_sizes=(1,), prefixes=(2, 6), modes=("off",),
                progress=False)
    assert bad.first_differences("off") == [None, "1", None]


def test_outputs_without_a_batch_dimension_are_not_compared() -> None:
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(4, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.table(torch.arange(4))

    report = audit(Bias(), _example(1, 4, 8), batch_sizes=(1, 2), modes=("off",), progress=False)
    assert np.isnan(report.ulps["off"][report.layers.index("table"), 1])
    assert report.invariant("off")


def test_plot_has_titles_and_labels() -> None:
    import matplotlib

    matplotlib.use("Agg")
    report = audit(Net(variant=True), _example(1, 8), batch_sizes=(1, 3), modes=("off",), progress=False)
    fig = report.plot()
    ax = fig.axes[0]
    assert ax.get_title() and ax.get_xlabel() and ax.get_ylabel() and fig._suptitle is not None


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="batch size 1"):
        audit(Net(False), _example(2, 8), progress=False)
    with pytest.raises(ValueError, match="mode"):
        audit(Net(False), _example(1, 8), modes=("sideways",), progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="prefix"):
        audit(Net(False), _example(1, 3, 8), prefixes=(4,), progress=False)
    assert Probe("prefix", length=3).label == "first 3"


def test_audit_under_the_mode_finds_a_planted_split_k_layer() -> None:
    cfg = ToyConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, max_seq_len=16)
    model = toy_transformer(cfg, device=DEV)
    name = linear_names(model)[2]
    plant_split_k(model, name)
    assert repr(model.get_submodule(name)).startswith("Linear(")
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(1)).to(DEV)
    report = audit(model, tokens, batch_sizes=(1, 9), modes=("on",), progress=False)
    assert report.first_variant_layer("on") == name
    upstream = report.layers.index(name)
    assert not report.differs("on")[:upstream].any()


def test_lab07_find_variant_layer_check_grades_full_or_zero() -> None:
    from detlib.grade import find, run_check

    ex = find("07.find_variant_layer")

    def first_in_order(model: nn.Module, tokens: torch.Tensor) -> str:
        report = audit(model, tokens, batch_sizes=(1, 16), modes=("on",), progress=False)
        return next(name for name in report.first_differences("on") if name is not None)

    assert run_check(ex, first_in_order).status == "passed"
    res = run_check(ex, lambda model, tokens: "lm_head")
    assert res.status == "failed" and res.points == 0
    forbidden = run_check(ex, lambda m, t: audit(m, t, batch_sizes=(1, 16), modes=("on",), progress=False)
                          .first_variant_layer("on"))
    assert forbidden.status == "forbidden call"
