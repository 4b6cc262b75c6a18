"""A toy inference server: one fixed request, random traffic around it, batched together.

The point of lab 03 in one experiment.  A user sends the same prompt-like input again and again; each
time a random number of other requests are waiting, the server batches whatever is waiting (up to
``max_batch``) and runs a small stack of ops (:class:`ToyModel`: norm, MLP, norm, output head,
log-softmax).  Nothing here is random *inside* a run, yet the fixed request gets several different
answers, because the batch it lands in changes the kernels' reduction order.  Running the ops row by
row (:func:`rowwise_forward`) makes them trivially batch invariant, and the count drops to one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from detlib.backend import device as backend_device
from detlib.grade.guard import reference

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ToyModel:
    """A small stack of the ops an LLM layer is made of, applied to one vector per request.

    ``forward(x)`` maps a batch ``(B, dim)`` to log-probabilities ``(B, vocab)``: RMSNorm → up
    projection → GELU → down projection (+ residual) → RMSNorm → output head → log_softmax.
    """

    norm1: torch.Tensor
    w_up: torch.Tensor
    w_down: torch.Tensor
    norm2: torch.Tensor
    w_out: torch.Tensor

    @classmethod
    def random(
        cls, dim: int = 256, hidden: int = 1024, vocab: int = 1024, *, dtype: torch.dtype = torch.float32,
        device: torch.device | None = None, seed: int = 0,
    ) -> ToyModel:
        """A model with random weights (scaled like a trained one's, so activations stay O(1))."""
        g = torch.Generator().manual_seed(seed)
        dev = device or backend_device()

        def w(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=g) * scale).to(device=dev, dtype=dtype)

        return cls(1 + 0.1 * w(dim), w(hidden, dim, scale=dim**-0.5), w(dim, hidden, scale=hidden**-0.5),
                   1 + 0.1 * w(dim), w(vocab, dim, scale=dim**-0.5))

    @property
    def dim(self) -> int:
        return self.w_up.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.w_up.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Log-probabilities ``(B, vocab)`` for a batch ``(B, dim)``, with torch's default (batched) kernels."""
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected a batch of shape (B, {self.dim}), got {tuple(x.shape)}")
        if x.dtype != self.dtype or x.device != self.w_up.device:
            raise ValueError(f"expected {self.dtype} on {self.w_up.device}, got {x.dtype} on {x.device}")
        h = F.rms_norm(x, (self.dim,), self.norm1, 1e-6)
        h = x + F.linear(F.gelu(F.linear(h, self.w_up)), self.w_down)
        h = F.rms_norm(h, (self.dim,), self.norm2, 1e-6)
        return torch.log_softmax(F.linear(h, self.w_out), dim=-1)

    __call__ = forward


@reference
def rowwise_forward(model: ToyModel, batch: torch.Tensor) -> torch.Tensor:
    """``model`` on each row alone (a batch of 1), results stacked: batch invariant by construction, and slow."""
    return torch.cat([model.forward(batch[i:i + 1]) for i in range(batch.shape[0])])


@dataclass(frozen=True)
class Served:
    """What happened to the fixed request in one trial."""

    output: torch.Tensor
    batch_size: int
    position: int


@dataclass
class ToyServer:
    """Batches whatever is waiting, up to ``max_batch`` requests, and runs ``forward`` on the batch.

    In each trial the number of other requests in the queue is geometric with mean ``mean_waiting``
    (the queue length of an M/M/1 queue: often a few, sometimes many), the fixed request takes a
    random place among them, and the server cuts the queue into batches of ``max_batch`` in arrival
    order; the fixed request's batch is run and its row returned.
    """

    forward: Forward
    dim: int
    max_batch: int = 32
    mean_waiting: float = 16.0
    dtype: torch.dtype = torch.float32
    device: torch.device | None = None

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.mean_waiting < 0:
            raise ValueError(f"mean_waiting must be >= 0, got {self.mean_waiting}")

    def serve(self, request: torch.Tensor, generator: torch.Generator) -> Served:
        """Serve ``request`` (dim,) once, amid random traffic drawn from ``generator``."""
        if request.shape != (self.dim,):
            raise ValueError(f"a request is a vector of shape ({self.dim},), got {tuple(request.shape)}")
        keep_going = self.mean_waiting / (1 + self.mean_waiting)  # P(one more waiting) of a geometric law
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        waiting = int(math.log1p(-u) / math.log(keep_going)) if keep_going > 0 else 0
        ahead = int(torch.randint(0, waiting + 1, (1,), generator=generator))  # requests queued before ours
        position = ahead % self.max_batch
        size = min(self.max_batch, waiting + 1 - (ahead - position))  # ours sits in the batch that starts there
        dev = self.device or request.device
        others = torch.randn(size - 1, self.dim, generator=generator).to(device=dev, dtype=self.dtype)
        batch = torch.cat([others[:position], request[None].to(dev, self.dtype), others[position:]])
        return Served(self.forward(batch)[position].detach().cpu(), size, position)

    def trials(self, request: torch.Tensor, n: int, *, seed: int = 0, desc: str | None = None) -> list[Served]:
        """Serve the same request ``n`` times (traffic from ``seed``), with a progress bar if ``desc``."""
        g = torch.Generator().manual_seed(seed)
        steps = range(n)
        if desc is not None:
            from tqdm.auto import trange

            steps = trange(n, desc=desc, leave=False)
        return [self.serve(request, g) for _ in steps]


def output_histogram(served: list[Served]) -> list[int]:
    """How many trials gave each distinct output (bit for bit), most frequent first."""
    counts = Counter(s.output.contiguous().view(torch.uint8).numpy().tobytes() for s in served)
    return sorted(counts.values(), reverse=True)


def plot_histograms(histograms: dict[str, list[int]], *, ax: Axes | None = None) -> Axes:
    """Bars per setting: trials per distinct output of the fixed request, most frequent first."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.2))
    n_settings = max(len(histograms), 1)
    width = 0.8 / n_settings
    n_bars = max([len(c) for c in histograms.values()] + [3])
    for i, (label, counts) in enumerate(histograms.items()):
        xs = [j - 0.4 + (i + 0.5) * width for j in range(len(counts))]
        ax.bar(xs, counts, width=width, label=f"{label}: {len(counts)} distinct of {sum(counts)}")
    ax.set_xticks(range(n_bars), [f"#{j + 1}" for j in range(n_bars)])
    ax.set_xlim(-0.5, n_bars - 0.5)
    ax.set_title("One request served again and again amid random traffic")
    ax.set_xlabel("distinct output (most frequent first)")
    ax.set_ylabel("trials")
    ax.legend(fontsize=8)
    return ax
