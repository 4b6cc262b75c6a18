"""Batch-invariance sweeps: does one row's result change with the batch it is computed in?

A server batches your request with whatever else is waiting.  An op is *batch invariant* when the
row that belongs to you comes out with the same bits whatever the batch size and wherever your row
sits in the batch.  :func:`sweep` answers that for any op: it runs the op on batches of many sizes
(the row of interest at chosen positions, random traffic around it), compares the row bitwise with
the batch-of-1 result, and returns a :class:`Sweep` (a table, a plot, JSON for ``data/``).

The op is any callable, so detlib's own kernels of later labs can be swept like torch's.  The
:class:`Case` factories below build the ops lab 03 sweeps: matmul in both layouts, RMSNorm,
softmax / log_softmax and attention (a batch of sequences, a batch of decode steps).
:func:`prefill_vs_decode` sweeps the KV length instead of the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Union

import torch
import torch.nn.functional as F

from detlib.backend import device as backend_device
from detlib.grade.guard import reference
from detlib.numerics import diff_summary

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Row = Union[torch.Tensor, tuple[torch.Tensor, ...]]
"""One request's input: a tensor, or a tuple of tensors (attention's q, k, v) without the batch dim."""
Op = Callable[..., torch.Tensor]
"""An op over a batch: called with one tensor per part of a row, each with a leading batch dim."""
Position = Union[int, Literal["first", "middle", "last"]]
Layout = Literal["a@b", "x@W.T"]
LAYOUTS: tuple[Layout, ...] = ("a@b", "x@W.T")


@dataclass(frozen=True)
class Case:
    """An op to sweep, the row of interest, and a source of other rows (random traffic).

    ``others(n)`` returns ``n`` other rows, stacked like a batch (a tensor, or a tuple of tensors);
    ``info`` says what the case is (shapes, dtype, device) and travels with the recorded results.
    """

    name: str
    op: Op
    row: Row
    others: Callable[[int], Row]
    info: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepPoint:
    """One comparison: the row at ``position`` of a batch of ``size`` against the batch-of-1 result."""

    size: int
    position: int
    equal: bool
    n_different: int
    n_elements: int
    max_abs: float
    max_ulp: float


_COLUMNS = ("size", "position", "equal", "n_different", "n_elements", "max_abs", "max_ulp")


@dataclass
class Sweep:
    """The result of a sweep: one :class:`SweepPoint` per (size, position)."""

    name: str
    points: list[SweepPoint]
    axis: str = "batch size"
    info: dict[str, str] = field(default_factory=dict)

    def sizes(self) -> list[int]:
        """The sizes swept, in increasing order."""
        return sorted({p.size for p in self.points})

    def positions(self) -> list[int]:
        """The positions of the row that were tried, in increasing order."""
        return sorted({p.position for p in self.points})

    def differing_sizes(self) -> list[int]:
        """The sizes at which the row came out different at some position."""
        return sorted({p.size for p in self.points if not p.equal})

    @property
    def invariant(self) -> bool:
        """True when the row had the same bits everywhere the sweep looked."""
        return all(p.equal for p in self.points)

    def summary(self) -> str:
        """One line: where the row changed."""
        diff = self.differing_sizes()
        n = len(self.sizes())
        if not diff:
            return f"{self.name}: invariant at all {n} {self.axis}s tried ({self.sizes()[0]}–{self.sizes()[-1]})"
        return f"{self.name}: differs at {len(diff)} of {n} {self.axis}s: {_ranges(diff)}"

    def table(self, *, only_different: bool = False, max_rows: int | None = None) -> str:
        """A text table: size, position, equal?, elements differing, max |diff|, max ulp (``max_rows`` rows at most)."""
        head = f"{self.axis:>10}  {'position':>8}  {'equal':>5}  {'differ':>14}  {'max abs':>9}  {'max ulp':>8}"
        lines = [self.name, head]
        rows = [p for p in sorted(self.points, key=lambda q: (q.size, q.position)) if not (only_different and p.equal)]
        for p in rows[:max_rows]:
            lines.append(f"{p.size:>10}  {p.position:>8}  {'yes' if p.equal else 'NO':>5}  "
                         f"{f'{p.n_different}/{p.n_elements}':>14}  {p.max_abs:>9.2g}  {p.max_ulp:>8.0f}")
        if max_rows is not None and len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def as_dict(self) -> dict[str, Any]:
        """Column-wise, compact JSON-ready form (see :meth:`from_dict`)."""
        return {"name": self.name, "axis": self.axis, "info": dict(self.info),
                "points": {c: [getattr(p, c) for p in self.points] for c in _COLUMNS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sweep:
        """The inverse of :meth:`as_dict` (how recorded sweeps are read back from ``data/``)."""
        cols = d["points"]
        pts = [SweepPoint(*(cols[c][i] for c in _COLUMNS)) for i in range(len(cols["size"]))]
        return cls(d["name"], pts, d.get("axis", "batch size"), dict(d.get("info", {})))


def _ranges(values: Sequence[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` → ``"1–3, 7, 9–10"``: how the labs print lists of sizes."""
    out: list[str] = []
    start = prev = values[0]
    for v in list(values[1:]) + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(str(start) if start == prev else f"{start}–{prev}")
        if v is not None:
            start = prev = v
    return ", ".join(out)


# ----------------------------------------------------------------------------------------------- the sweep


def _parts(row: Row) -> tuple[torch.Tensor, ...]:
    return row if isinstance(row, tuple) else (row,)


def _resolve(position: Position, size: int) -> int | None:
    if position == "first":
        return 0
    if position == "last":
        return size - 1
    if position == "middle":
        return size // 2
    if isinstance(position, int) and not isinstance(position, bool):
        return position if 0 <= position < size else None
    raise ValueError(f"a position is an int or 'first', 'middle', 'last'; got {position!r}")


def _batch(row: tuple[torch.Tensor, ...], traffic: tuple[torch.Tensor, ...], size: int, pos: int) -> list[torch.Tensor]:
    """A batch of ``size``: ``size - 1`` rows of traffic with the row of interest inserted at ``pos``."""
    return [torch.cat([t[:pos], r[None], t[pos:size - 1]]) for r, t in zip(row, traffic, strict=True)]


def _validate(case: Case, traffic: tuple[torch.Tensor, ...], need: int) -> tuple[torch.Tensor, ...]:
    row = _parts(case.row)
    if len(row) != len(traffic):
        raise ValueError(f"{case.name}: the row has {len(row)} part(s) but others() returned {len(traffic)}")
    for i, (r, t) in enumerate(zip(row, traffic, strict=True)):
        if t.shape[1:] != r.shape or t.shape[0] < need:
            raise ValueError(f"{case.name}: part {i} of others({need}) has shape {tuple(t.shape)}, expected "
                             f"({need}, {', '.join(map(str, r.shape))})")
        if t.dtype != r.dtype or t.device != r.device:
            raise ValueError(f"{case.name}: part {i} of the traffic is {t.dtype} on {t.device}, "
                             f"the row is {r.dtype} on {r.device}")
    return row


def sweep(
    case: Case,
    batch_sizes: Sequence[int],
    positions: Sequence[Position] | Literal["all"] = ("first",),
    *,
    progress: bool = False,
) -> Sweep:
    """Run ``case.op`` at every batch size (row of interest at every position) and compare with batch of 1.

    ``positions="all"`` tries every position of every batch (what the heatmap shows).  The traffic is
    drawn once, so batch ``B`` holds the first ``B - 1`` other rows: only the batch size and the
    position change from one point to the next.
    """
    sizes = sorted(set(int(b) for b in batch_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    traffic = _parts(case.others(max(sizes[-1] - 1, 1)))
    row = _validate(case, traffic, max(sizes[-1] - 1, 1))
    alone = case.op(*_batch(row, traffic, 1, 0))[0]
    points: list[SweepPoint] = []
    steps: Any = sizes
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(sizes, desc=case.name, leave=False)
    for size in steps:
        wanted = range(size) if positions == "all" else positions
        for pos in sorted({p for p in (_resolve(q, size) for q in wanted) if p is not None}):
            out = case.op(*_batch(row, traffic, size, pos))
            if out.shape[0] != size:
                raise ValueError(f"{case.name}: the op returned {out.shape[0]} rows for a batch of {size}")
            d = diff_summary(out[pos], alone)
            points.append(SweepPoint(size, pos, d.identical, d.n_different, d.n_elements, d.max_abs, d.max_ulp))
    return Sweep(case.name, points, "batch size", dict(case.info))


@reference
def batch_invariance_failures(
    op: Callable[[torch.Tensor], torch.Tensor], row: torch.Tensor, others: torch.Tensor, batch_sizes: Sequence[int]
) -> list[int]:
    """The batch sizes at which ``op(batch)[0]`` is not bitwise ``op(row[None])[0]``, in increasing order.

    The batch of size ``B`` is ``row`` followed by the first ``B - 1`` rows of ``others``.
    """
    case = Case("op", op, row, lambda n: others)
    return sweep(case, batch_sizes, ("first",)).differing_sizes()


def default_batch_sizes(limit: int) -> list[int]:
    """Every size up to 32, then a denser-than-powers-of-two ladder up to ``limit``."""
    sizes = set(range(1, min(limit, 32) + 1))
    b = 32
    while b <= limit:
        sizes.update({b, min(b + b // 2, limit)})
        b *= 2
    sizes.add(limit)
    return sorted(s for s in sizes if s <= limit)


# ----------------------------------------------------------------------------------------------- cases


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape: Sequence[int], gen: torch.Generator, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Random normal values drawn on the CPU (the same on every machine), then cast and moved."""
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def _info(dtype: torch.dtype, device: torch.device, **shape: object) -> dict[str, str]:
    return {"dtype": str(dtype).replace("torch.", ""), "device": str(device), **{k: str(v) for k, v in shape.items()}}


def matmul_case(
    k: int, n: int, layout: Layout = "a@b", *, dtype: torch.dtype = torch.float32,
    device: torch.device | None = None, seed: int = 0,
) -> Case:
    """Row ``x`` (k,) times a fixed weight: ``a @ b`` with ``b`` (k, n), or ``x @ W.T`` (``F.linear``) with ``W`` (n, k)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    dev = device or backend_device()
    g = _gen(seed)
    x = _randn((k,), g, dtype, dev)
    if layout == "a@b":
        b = _randn((k, n), g, dtype, dev)

        def op(a: torch.Tensor) -> torch.Tensor:
            return a @ b
    else:
        w = _randn((n, k), g, dtype, dev)

        def op(a: torch.Tensor) -> torch.Tensor:
            return F.linear(a, w)

    return Case(f"matmul {layout} {_info(dtype, dev)['dtype']}", op, x,
                lambda m: _randn((m, k), _gen(seed + 1), dtype, dev), _info(dtype, dev, k=k, n=n, layout=layout))


def rms_norm_case(
    hidden: int, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None, seed: int = 0,
    eps: float = 1e-6,
) -> Case:
    """Row ``x`` (hidden,) through ``F.rms_norm`` with a fixed weight."""
    dev = device or backend_device()
    g = _gen(seed)
    x, w = _randn((hidden,), g, dtype, dev), _randn((hidden,), g, dtype, dev)

    def op(a: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(a, (hidden,), w, eps)

    return Case(f"rms_norm {_info(dtype, dev)['dtype']}", op, x,
                lambda m: _randn((m, hidden), _gen(seed + 1), dtype, dev), _info(dtype, dev, hidden=hidden))


def softmax_case(
    width: int, *, log: bool = False, dtype: torch.dtype = torch.float32, device: torch.device | None = None,
    seed: int = 0,
) -> Case:
    """Row ``x`` (width,) of logits through ``softmax`` or ``log_softmax`` over its last dim."""
    dev = device or backend_device()
    fn = torch.log_softmax if log else torch.softmax
    name = "log_softmax" if log else "softmax"

    def op(a: torch.Tensor) -> torch.Tensor:
        return fn(a, dim=-1)

    scale = 4.0  # logits of a realistic spread
    return Case(f"{name} {_info(dtype, dev)['dtype']}", op, _randn((width,), _gen(seed), dtype, dev) * scale,
                lambda m: _randn((m, width), _gen(seed + 1), dtype, dev) * scale, _info(dtype, dev, width=width))


def _sdpa_context(backend: str | None) -> Any:
    """``torch.nn.attention.sdpa_kernel`` for a named backend ("flash", "efficient", "cudnn", "math"), or none."""
    if backend is None:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if backend not in names:
        raise ValueError(f"SDPA backend must be one of {', '.join(names)} or None, got {backend!r}")
    return sdpa_kernel(names[backend])


def attention_case(
    heads: int, seq_len: int, head_dim: int, *, decode: bool = False, dtype: torch.dtype = torch.float32,
    device: torch.device | None = None, seed: int = 0, backend: str | None = None,
) -> Case:
    """A batch of sequences through ``F.scaled_dot_product_attention``.

    Prefill (default): each row is a whole sequence ``(q, k, v)``, each (heads, seq_len, head_dim),
    causal.  ``decode=True``: each row is one decode step, a query (heads, 1, head_dim) against its
    own KV cache of ``seq_len`` positions.  ``backend`` picks an SDPA backend (None: torch's choice).
    """
    dev = device or backend_device()
    q_len = 1 if decode else seq_len

    def parts(gen: torch.Generator, lead: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return (_randn((*lead, heads, q_len, head_dim), gen, dtype, dev),
                _randn((*lead, heads, seq_len, head_dim), gen, dtype, dev),
                _randn((*lead, heads, seq_len, head_dim), gen, dtype, dev))

    def op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        with _sdpa_context(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=not decode)

    kind = "decode" if decode else "prefill"
    return Case(f"attention {kind} {_info(dtype, dev)['dtype']}" + (f" ({backend})" if backend else ""), op,
                parts(_gen(seed), ()), lambda m: parts(_gen(seed + 1), (m,)),
                _info(dtype, dev, heads=heads, seq_len=seq_len, head_dim=head_dim, kind=kind,
                      backend=backend or "default"))


def prefill_vs_decode(
    heads: int, kv_lengths: Sequence[int], head_dim: int, *, dtype: torch.dtype = torch.float32,
    device: torch.device | None = None, seed: int = 0, backend: str | None = None, progress: bool = False,
) -> Sweep:
    """Attention output of the last token: causal prefill of ``L`` tokens vs one decode step over a KV cache of ``L``.

    Both compute the same math (the last query attends to all ``L`` keys); a server computes it one
    way when the prompt arrives and the other way when it generates.  The sweep's axis is the KV length.
    """
    lengths = sorted(set(int(n) for n in kv_lengths))
    if not lengths or lengths[0] < 1:
        raise ValueError(f"KV lengths must be positive integers, got {list(kv_lengths)}")
    dev = device or backend_device()
    g = _gen(seed)
    q, k, v = (_randn((1, heads, lengths[-1], head_dim), g, dtype, dev) for _ in range(3))
    points: list[SweepPoint] = []
    steps: Any = lengths
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(lengths, desc="prefill vs decode", leave=False)
    with _sdpa_context(backend):
        for n in steps:
            prefill = F.scaled_dot_product_attention(q[:, :, :n], k[:, :, :n], v[:, :, :n], is_causal=True)[:, :, -1]
            decode = F.scaled_dot_product_attention(q[:, :, n - 1:n], k[:, :, :n], v[:, :, :n])[:, :, 0]
            d = diff_summary(decode, prefill)
            points.append(SweepPoint(n, n - 1, d.identical, d.n_different, d.n_elements, d.max_abs, d.max_ulp))
    name = f"prefill vs decode {_info(dtype, dev)['dtype']}" + (f" ({backend})" if backend else "")
    return Sweep(name, points, "KV length",
                 _info(dtype, dev, heads=heads, head_dim=head_dim, backend=backend or "default"))


def standard_cases(dtype: torch.dtype, *, small: bool, device: torch.device | None = None) -> list[Case]:
    """The ops lab 03 sweeps, at CPU-friendly sizes (``small``) or at model-like sizes (a GPU)."""
    if small:
        k = n = 512
        hidden, width, heads, seq, head_dim = 1024, 1024, 4, 32, 64
    else:  # model-like widths; 8 (KV) heads keep batches of long sequences within memory
        k = n = 4096
        hidden, width, heads, seq, head_dim = 4096, 32768, 8, 256, 128
    kw: dict[str, Any] = {"dtype": dtype, "device": device}
    return [
        matmul_case(k, n, "a@b", **kw),
        matmul_case(k, n, "x@W.T", **kw),
        rms_norm_case(hidden, **kw),
        softmax_case(width, **kw),
        softmax_case(width, log=True, **kw),
        attention_case(heads, seq, head_dim, **kw),
        attention_case(heads, seq * 4, head_dim, decode=True, **kw),
    ]


# ----------------------------------------------------------------------------------------------- plots


def plot_sweep(result: Sweep, *, ax: Axes | None = None) -> Axes:
    """A line plot of max ulp against size (red where the row changed), or a heatmap over size × position."""
    import matplotlib.pyplot as plt
    import numpy as np

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    per_size: dict[int, int] = {}
    for p in result.points:
        per_size[p.size] = per_size.get(p.size, 0) + 1
    if max(per_size.values()) > 2:  # many positions per size: a heatmap over size × position
        sizes, positions = result.sizes(), result.positions()
        grid = np.full((len(positions), len(sizes)), np.nan)
        col, row_of = {s: i for i, s in enumerate(sizes)}, {p: i for i, p in enumerate(positions)}
        for p in result.points:
            grid[row_of[p.position], col[p.size]] = math.log10(1 + p.max_ulp)
        img = ax.imshow(grid, origin="lower", aspect="auto", cmap="magma_r", interpolation="nearest",
                        extent=(sizes[0] - 0.5, sizes[-1] + 0.5, positions[0] - 0.5, positions[-1] + 0.5))
        ax.figure.colorbar(img, ax=ax, label="log10(1 + max ulp)")
        ax.set_ylabel("position of the row in the batch")
    else:
        batched = result.axis == "batch size"
        groups: dict[str, list[SweepPoint]] = {}
        for p in result.points:
            where = "first" if p.position == 0 else "last" if p.position == p.size - 1 else "middle"
            groups.setdefault(f"row {where} in the batch" if batched else result.name, []).append(p)
        for label, pts in groups.items():
            pts.sort(key=lambda q: q.size)
            ax.plot([p.size for p in pts], [p.max_ulp for p in pts], marker="o", ms=3, lw=1, label=label)
        bad = [p for p in result.points if not p.equal]
        ax.scatter([p.size for p in bad], [p.max_ulp for p in bad], color="red", s=18, zorder=3,
                   label="bits differ from batch of 1" if batched else "bits differ")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("max ulp vs batch of 1" if result.axis == "batch size" else "max ulp")
        ax.legend(fontsize=8)
    if len(result.sizes()) > 1 and result.sizes()[-1] / result.sizes()[0] > 64:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(result.axis)
    ax.set_title(f"{result.name} ({result.info.get('device', '?')})")
    return ax


def plot_overview(results: Sequence[Sweep], *, title: str, ax: Axes | None = None) -> Axes:
    """A heatmap of many sweeps: one row per op, one column per size; dark where the row's bits changed."""
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = sorted({s for r in results for s in r.sizes()})
    if ax is None:
        _, ax = plt.subplots(figsize=(min(14, 3 + 0.18 * len(sizes)), 0.9 + 0.38 * len(results)))
    col = {s: i for i, s in enumerate(sizes)}
    grid = np.full((len(results), len(sizes)), np.nan)
    for i, r in enumerate(results):
        for p in r.points:
            here = math.log10(1 + p.max_ulp)
            j = col[p.size]
            grid[i, j] = here if np.isnan(grid[i, j]) else max(grid[i, j], here)
    img = ax.imshow(grid, aspect="auto", cmap="magma_r", interpolation="nearest", vmin=0)
    ax.figure.colorbar(img, ax=ax, label="log10(1 + max ulp)")
    ax.set_yticks(range(len(results)), [r.name for r in results], fontsize=8)
    step = max(1, len(sizes) // 24)
    ax.set_xticks(range(0, len(sizes), step), [str(s) for s in sizes[::step]], fontsize=7, rotation=90)
    ax.set_xlabel("batch size (blank: not tried)")
    ax.set_ylabel("operation")
    ax.set_title(title)
    return ax
