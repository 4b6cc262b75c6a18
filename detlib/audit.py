"""An invariance audit of any ``nn.Module``: where, layer by layer, do a sequence's bits start to differ?

:func:`audit` runs a model on one example (batch size 1) and then on probes that should not change the
example's result:

* **batch probes**: the example placed at several rows of batches of other inputs (batch size ``B``,
  row ``p``);
* **prefix probes** (optional, for causal sequence models): the example cut to its first ``t``
  positions, to be compared with the first ``t`` positions of the full run (what a decode step or a
  chunked prefill computes).

Forward hooks on every submodule record each layer's output; the example's slice of it is compared bit
for bit with the reference run's.  It does this with the batch-invariant mode off (PyTorch's kernels)
and on (:func:`detlib.mode.invariant_mode`), and reports, per layer and probe, the largest distance in
ulps, and per probe the *first* layer (in execution order) whose output differs: where the variance
enters.  Later layers only inherit it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from detlib.grade.guard import reference
from detlib.mode import invariant_mode
from detlib.numerics import ulp_distance

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Mode = Literal["off", "on"]
Inputs = torch.Tensor | tuple[torch.Tensor, ...]
BatchMaker = Callable[[tuple[torch.Tensor, ...], int, torch.Generator], tuple[torch.Tensor, ...]]


@dataclass(frozen=True)
class Probe:
    """One way of running the example that must not change its bits."""

    kind: Literal["batch", "prefix"]
    batch_size: int = 1
    position: int = 0  # the example's row in the batch
    length: int = 0  # prefix probes: positions kept

    @property
    def label(self) -> str:
        return f"B={self.batch_size} row {self.position}" if self.kind == "batch" else f"first {self.length}"


@dataclass
class AuditReport:
    """Per layer and probe, the largest ulp distance from the reference run (0: bitwise equal)."""

    layers: list[str]  # execution order of the reference run; "(output)" is the model's output
    layer_types: list[str]
    probes: list[Probe]
    ulps: dict[str, np.ndarray] = field(default_factory=dict)  # mode -> [layers, probes]; nan: not comparable

    @property
    def modes(self) -> list[str]:
        return list(self.ulps)

    def differs(self, mode: Mode) -> np.ndarray:
        """Boolean [layers, probes]: the layer's output for the example is not bitwise the reference."""
        u = self.ulps[mode]
        return ~np.isnan(u) & (u != 0)

    def first_differences(self, mode: Mode) -> list[str | None]:
        """For each probe, the first layer (in execution order) whose bits differ, or None."""
        d = self.differs(mode)
        return [self.layers[int(np.argmax(d[:, j]))] if d[:, j].any() else None for j in range(len(self.probes))]

    def invariant(self, mode: Mode) -> bool:
        """True when no layer differs in any probe."""
        return not self.differs(mode).any()

    @reference
    def first_variant_layer(self, mode: Mode) -> str | None:
        """The layer where variance enters most often (ties: the earliest); None if everything is invariant."""
        firsts = [f for f in self.first_differences(mode) if f is not None]
        if not firsts:
            return None
        return max(dict.fromkeys(sorted(firsts, key=self.layers.index)), key=firsts.count)

    def table(self) -> str:
        """A text table: per layer and mode, probes whose bits differ, the largest ulp distance, and how
        often the layer is where the difference starts (``first``)."""
        width = max(len(n) for n in self.layers)
        twidth = max(len(t) for t in self.layer_types)
        head = f"{'layer':<{width}}  {'type':<{twidth}}"
        for mode in self.modes:
            head += f"  | mode {mode}: differ  max ulp  first"
        lines = [head, "-" * len(head)]
        firsts = {m: self.first_differences(m) for m in self.modes}  # type: ignore[arg-type]
        n = len(self.probes)
        for i, (name, kind) in enumerate(zip(self.layers, self.layer_types)):
            row = f"{name:<{width}}  {kind:<{twidth}}"
            for mode in self.modes:
                d = self.differs(mode)[i]  # type: ignore[arg-type]
                u = self.ulps[mode][i]
                worst = np.nanmax(u) if not np.isnan(u).all() else float("nan")
                worst_txt = "n/a" if math.isnan(worst) else ("inf" if math.isinf(worst) else f"{worst:.0f}")
                row += f"  | {'':>5}{int(d.sum()):>3}/{n:<3} {worst_txt:>8} {firsts[mode].count(name):>6}"
            lines.append(row)
        for mode in self.modes:
            where = self.first_variant_layer(mode)  # type: ignore[arg-type]
            lines.append(f"mode {mode}: " + ("bitwise invariant in every probe" if where is None
                                              else f"variance enters first at {where}"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def plot(self) -> Figure:
        """Heatmaps (one per mode) of log2(1 + max ulp distance), layers down, probes across; grey cells are
        outputs without a batch dimension to compare (e.g. position embeddings)."""
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(self.modes), figsize=(4 + 2.2 * len(self.modes) + 0.25 * len(self.probes),
                                                               1.5 + 0.28 * len(self.layers)),
                                 squeeze=False, sharey=True)
        top = max(1.0, max(float(np.nanmax(np.log2(1 + u))) if not np.isnan(u).all() else 0.0
                           for u in self.ulps.values()))
        cmap = plt.get_cmap("Reds").with_extremes(bad="lightgrey")  # grey: outputs without a batch dimension
        for ax, mode in zip(axes[0], self.modes):
            img = ax.imshow(np.ma.masked_invalid(np.log2(1 + self.ulps[mode])), aspect="auto", cmap=cmap,
                            vmin=0, vmax=top, interpolation="nearest")
            ax.set_title(f"batch-invariant mode {mode}")
            ax.set_xticks(range(len(self.probes)), [p.label for p in self.probes], rotation=60, ha="right",
                          fontsize=7)
            ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
            ax.set_xlabel("probe (batch size and row, or prefix length)")
        axes[0][0].set_ylabel("layer (execution order)")
        fig.colorbar(img, ax=axes[0].tolist(), label="log2(1 + max ulp distance)\n(palest = bitwise equal, grey = no batch dim)")
        fig.suptitle("Where the example's bits differ from its batch-of-1 run")
        return fig


# ----------------------------------------------------------------------------------------------------
# recording layer outputs


def _first_tensor(out: object) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for item in out:
            if isinstance(item, torch.Tensor):
                return item
    return None


@contextlib.contextmanager
def _recording(model: nn.Module, into: dict[str, list[torch.Tensor]], order: list[str]):  # type: ignore[no-untyped-def]
    """Record every submodule's output (per call) into ``into``; ``order`` gets the firing order."""

    def hook_for(name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: object, out: object) -> None:
            t = _first_tensor(out)
            if t is not None:
                into.setdefault(name, []).append(t.detach().clone())
                order.append(name)
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in model.named_modules() if name]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _run(model: nn.Module, inputs: tuple[torch.Tensor, ...], mode: Mode
         ) -> tuple[dict[str, list[torch.Tensor]], list[str]]:
    outputs: dict[str, list[torch.Tensor]] = {}
    order: list[str] = []
    ctx = invariant_mode() if mode == "on" else contextlib.nullcontext()
    with torch.no_grad(), ctx, _recording(model, outputs, order):
        out = _first_tensor(model(*inputs))
    if out is not None:
        outputs["(output)"] = [out.detach().clone()]
        order.append("(output)")
    return outputs, order


def _ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    if got.shape != want.shape or got.dtype != want.dtype:
        return float("inf")
    if not got.is_floating_point():
        return 0.0 if torch.equal(got.cpu(), want.cpu()) else float("inf")
    return float(ulp_distance(got, want).max()) if got.numel() else 0.0


def _batch_slice(out: torch.Tensor, ref: torch.Tensor, batch_size: int, row: int) -> torch.Tensor | None:
    """The example's part of a batched output: rows ``[B, ...]`` or flattened ``[B * n, ...]``."""
    if out.dim() == 0 or ref.dim() == 0 or out.shape[0] != batch_size * ref.shape[0] or out.shape[1:] != ref.shape[1:]:
        return None
    return out.reshape(batch_size, *ref.shape)[row]


def _prefix_slice(full: torch.Tensor, out: torch.Tensor, full_len: int, length: int, seq_dim: int
                  ) -> torch.Tensor | None:
    """The first ``length`` positions of a full-length output, along the dimension that holds positions."""
    if full.dim() != out.dim():
        return None
    candidates = [seq_dim] + [d for d in range(full.dim()) if d != seq_dim]
    for d in candidates:
        if d < full.dim() and full.shape[d] == full_len and out.shape[d] == length and all(
                full.shape[e] == out.shape[e] for e in range(full.dim()) if e != d):
            return full.narrow(d, 0, length)
    return None


def default_batch(example: tuple[torch.Tensor, ...], batch_size: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, ...]:
    """Fill a batch with other inputs like the example: integers drawn from the example's range, floats
    from a normal distribution with its mean and spread."""
    batch = []
    for x in example:
        shape = (batch_size, *x.shape[1:])
        if x.is_floating_point():
            std = float(x.float().std()) if x.numel() > 1 else 1.0
            filler = torch.randn(shape, generator=generator) * std + float(x.float().mean())
        else:
            lo, hi = int(x.min()), int(x.max())
            filler = torch.randint(lo, hi + 1, shape, generator=generator)
        batch.append(filler.to(dtype=x.dtype, device=x.device))
    return tuple(batch)


def _positions(batch_size: int) -> list[int]:
    return sorted({0, batch_size // 2, batch_size - 1})


def audit(
    model: nn.Module,
    example: Inputs,
    *,
    batch_sizes: Sequence[int] = (1, 2, 3, 4, 8),
    prefixes: Sequence[int] = (),
    seq_dim: int = 1,
    modes: Sequence[Mode] = ("off", "on"),
    make_batch: BatchMaker = default_batch,
    seed: int = 0,
    progress: bool = True,
) -> AuditReport:
    """Audit ``model`` for batch invariance on ``example`` (a tensor, or a tuple of the model's inputs,
    each with batch size 1).

    For each batch size ``B`` the example is put at rows ``0``, ``B // 2`` and ``B - 1`` of one batch
    (the other rows from ``make_batch``), and each row is a probe.  ``prefixes`` adds probes that keep
    only the first ``t`` positions (along ``seq_dim``) of the example.  Each mode in ``modes`` (``"off"``:
    PyTorch's kernels, ``"on"``: :func:`detlib.mode.invariant_mode`) is compared with its own
    batch-of-1 reference run.
    """
    inputs = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    if not inputs or any(not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] != 1 for x in inputs):
        raise ValueError("example must be a tensor (or tuple of tensors) with batch size 1 in dimension 0")
    if any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch sizes must be positive, got {list(batch_sizes)}")
    for m in modes:
        if m not in ("off", "on"):
            raise ValueError(f"mode {m!r}: expected 'off' or 'on'")
    full_len = inputs[0].shape[seq_dim] if prefixes else 0
    if any(not 1 <= t <= full_len for t in prefixes):
        raise ValueError(f"prefix lengths must be in 1..{full_len} (the example's length along dim {seq_dim})")

    probes = [Probe("batch", b, p) for b in batch_sizes for p in _positions(b)]
    probes += [Probe("prefix", length=t) for t in prefixes]
    runs = [("batch", b) for b in batch_sizes] + [("prefix", t) for t in prefixes]
    steps = [(mode, run) for mode in modes for run in runs]

    layers: list[str] = []
    types: list[str] = []
    ulps: dict[str, np.ndarray] = {}
    bar = _progress(len(steps) + len(modes), progress)
    for mode in modes:
        ref, order = _run(model, inputs, mode)
        bar.update(1)
        if not layers:
            layers = list(dict.fromkeys(order))
            kinds = dict(model.named_modules())
            types = [kinds[n]._get_name() if n in kinds else "output" for n in layers]
        table = np.full((len(layers), len(probes)), np.nan)
        for kind, value in runs:
            got = _probe_outputs(model, inputs, mode, kind, value, make_batch, seed, seq_dim)
            for j, probe in enumerate(probes):
                if probe.kind != kind or (probe.batch_size if kind == "batch" else probe.length) != value:
                    continue
                for i, name in enumerate(layers):
                    table[i, j] = _compare(ref.get(name, []), got.get(name, []), probe, full_len, seq_dim)
            bar.update(1)
        ulps[mode] = table
    bar.close()
    return AuditReport(layers, types, probes, ulps)


def _probe_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], mode: Mode, kind: str, value: int,
                   make_batch: BatchMaker, seed: int, seq_dim: int) -> dict[str, list[torch.Tensor]]:
    if kind == "prefix":
        full_len = inputs[0].shape[seq_dim]
        cut = tuple(x.narrow(seq_dim, 0, value) if x.dim() > seq_dim and x.shape[seq_dim] == full_len else x
                    for x in inputs)
        return _run(model, cut, mode)[0]
    generator = torch.Generator().manual_seed(seed * 1000 + value)
    batch = tuple(t.clone() for t in make_batch(inputs, value, generator))
    for x, b in zip(inputs, batch):
        if b.shape[0] != value or b.shape[1:] != x.shape[1:]:
            raise ValueError(f"make_batch returned shape {tuple(b.shape)}, expected {(value, *x.shape[1:])}")
        for p in _positions(value):
            b[p] = x[0]
    return _run(model, batch, mode)[0]


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor], probe: Probe, full_len: int, seq_dim: int) -> float:
    """Largest ulp distance over the layer's calls; nan when the outputs cannot be matched up."""
    if not ref or len(ref) != len(got):
        return float("nan")
    worst = 0.0
    for r, g in zip(ref, got):
        if probe.kind == "batch":
            part = _batch_slice(g, r, probe.batch_size, probe.position)
            if part is None:
                return float("nan")
            worst = max(worst, _ulps(part, r))
        else:
            part = _prefix_slice(r, g, full_len, probe.length, seq_dim)
            if part is None:
                return float("nan")
            worst = max(worst, _ulps(g, part))
    return worst


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="audit", leave=False)
