"""Sum reductions whose combining order is set by scheduling (atomics) or fixed by the code (a tree).

Lab 02 asks whether "the GPU is random".  The honest answer: a kernel is nondeterministic only when
its result depends on the order in which its programs (thread blocks) happen to run, and the classic
way to get that is ``tl.atomic_add`` of partial sums into one address.  A fixed reduction tree, where
every program writes its partial sum to its own slot and a later pass combines the slots in an order
the code fixes, gives the same bits whatever the schedule.

On a GPU the hardware decides when each program runs.  Triton's CPU interpreter runs the programs of
a grid one after another, in program-id order, so there the atomic kernel would always give the same
answer.  To show the effect on a CPU, every kernel here reads *which block to work on* from a
permutation of program ids (``order``): program ``i`` handles block ``order[i]``.  Under the
interpreter, a random permutation is exactly a random schedule, so ``order="random"`` is a faithful
*simulation* of GPU scheduling; on a GPU ``order="hardware"`` leaves the schedule to the hardware.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch

from detlib.backend import device as backend_device
from detlib.backend import is_interpreter
from detlib.grade.guard import reference

import triton  # noqa: E402  (after detlib.backend: it sets TRITON_INTERPRET first)
import triton.language as tl  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes

Order = Literal["hardware", "reversed", "random"]
_ORDERS = ("hardware", "reversed", "random")


def program_order(
    n_programs: int, order: Order | torch.Tensor = "hardware", *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The block each program works on, as an int32 tensor on detlib's device.

    ``"hardware"`` is the identity (program ``i`` takes block ``i``; when it runs is up to the
    hardware, or, under the interpreter, ``i``-th); ``"reversed"`` runs the blocks last to first under
    the interpreter; ``"random"`` is a fresh random permutation (from ``generator`` if given).  A tensor
    is checked to be a permutation of ``0..n_programs-1`` and used as is.
    """
    if n_programs < 1:
        raise ValueError(f"n_programs must be at least 1, got {n_programs}")
    dev = backend_device()
    if isinstance(order, torch.Tensor):
        perm = order.to(device=dev, dtype=torch.int32)
        expected = torch.arange(n_programs, device=dev, dtype=torch.int32)
        if perm.shape != (n_programs,) or not torch.equal(perm.sort().values, expected):
            raise ValueError(f"order must be a permutation of 0..{n_programs - 1}, got shape {tuple(order.shape)}")
        return perm.contiguous()
    if order == "hardware":
        return torch.arange(n_programs, device=dev, dtype=torch.int32)
    if order == "reversed":
        return torch.arange(n_programs - 1, -1, -1, device=dev, dtype=torch.int32)
    if order == "random":
        perm = torch.randperm(n_programs, generator=generator)
        return perm.to(device=dev, dtype=torch.int32)
    raise ValueError(f"order must be one of {', '.join(_ORDERS)} or a permutation tensor, got {order!r}")


def _check_input(x: torch.Tensor, block: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"these reductions sum float32 tensors, got {x.dtype} (atomics on bf16 are not portable)")
    if x.device.type != backend_device().type:
        raise ValueError(f"x is on {x.device}, but detlib's kernels run on {backend_device()} here")
    if x.numel() == 0:
        raise ValueError("cannot reduce an empty tensor")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous (call .contiguous() first)")
    return x.reshape(-1)


@triton.jit
def _atomic_sum_kernel(x_ptr, out_ptr, order_ptr, n, BLOCK: tl.constexpr):
    """Each program sums one block and adds it into ``out[0]`` atomically: the add order is the schedule."""
    block_id = tl.load(order_ptr + tl.program_id(0))
    offs = block_id * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(x, axis=0))


@triton.jit
def _block_sum_kernel(x_ptr, partial_ptr, order_ptr, n, BLOCK: tl.constexpr):
    """Each program sums one block and writes it to the block's own slot: no program sees another's work."""
    block_id = tl.load(order_ptr + tl.program_id(0))
    offs = block_id * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.store(partial_ptr + block_id, tl.sum(x, axis=0))


def atomic_sum(
    x: torch.Tensor,
    *,
    block: int = 1024,
    order: Order | torch.Tensor = "hardware",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sum a float32 tensor with one atomic add per block; a 0-d float32 tensor.

    The partial sums reach ``out`` in the order the programs run, so the rounding, and the bits of
    the result, depend on the schedule: on a GPU with ``order="hardware"``, or on the CPU with
    ``order="random"`` (the simulation described in the module docstring).
    """
    flat = _check_input(x, block)
    n_programs = triton.cdiv(flat.numel(), block)
    perm = program_order(n_programs, order, generator=generator)
    out = torch.zeros(1, device=flat.device, dtype=torch.float32)
    _atomic_sum_kernel[(n_programs,)](flat, out, perm, flat.numel(), BLOCK=block)
    return out[0]


@reference
def tree_sum(
    x: torch.Tensor,
    *,
    block: int = 1024,
    order: Order | torch.Tensor = "hardware",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sum a float32 tensor along a tree fixed by the code; a 0-d float32 tensor.

    Level by level, each program sums one block of the level's values into its own slot; the slots
    become the next level, until one value is left.  The order the programs run in (``order``, or the
    hardware) changes nothing: the same bits come out every time.  A permutation tensor orders the
    first level; the later, smaller levels then run in program-id order.
    """
    level = _check_input(x, block)
    level_order = order
    while True:
        n_programs = triton.cdiv(level.numel(), block)
        partials = torch.empty(n_programs, device=level.device, dtype=torch.float32)
        perm = program_order(n_programs, level_order, generator=generator)
        _block_sum_kernel[(n_programs,)](level, partials, perm, level.numel(), BLOCK=block)
        if n_programs == 1:
            return partials[0]
        level = partials
        if isinstance(level_order, torch.Tensor):
            level_order = "hardware"


def scheduling_order() -> Order:
    """The order that shows scheduling effects here: the hardware's on a GPU, a random one (simulated) on the CPU."""
    return "random" if is_interpreter() else "hardware"


def sample_results(fn: Callable[[], torch.Tensor], runs: int, *, desc: str | None = None) -> list[torch.Tensor]:
    """Call ``fn`` ``runs`` times and return what it gave (detached, on the CPU), with a progress bar if ``desc``."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if desc is not None:
        from tqdm.auto import trange

        steps = trange(runs, desc=desc, leave=False)
    else:
        steps = range(runs)
    return [fn().detach().cpu().clone() for _ in steps]


def _key(t: torch.Tensor) -> tuple[tuple[int, ...], str, bytes]:
    """What makes two results 'the same': shape, dtype and every bit."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected the function to return a torch.Tensor, got {type(t).__name__}")
    flat = t.detach().cpu().contiguous().reshape(-1)
    return tuple(t.shape), str(t.dtype), flat.view(torch.uint8).numpy().tobytes()


def count_distinct(results: list[torch.Tensor]) -> int:
    """How many different bit patterns (with shape and dtype) a list of results holds."""
    return len({_key(r) for r in results})


@reference
def distinct_results(fn: Callable[[], torch.Tensor], runs: int) -> int:
    """Run ``fn`` ``runs`` times and count the distinct results, bit for bit: 1 means run-to-run deterministic.

    Bits, not values: ``0.0`` and ``-0.0`` are two results, and a NaN that comes back every time is one.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    return len({_key(fn()) for _ in range(runs)})


def plot_sum_spread(samples: dict[str, list[torch.Tensor]], exact: float, *, ax: Axes | None = None) -> Axes:
    """Bars per method: how many runs gave each sum, placed by distance from the exact (float64) sum in float32 ulps."""
    import math
    from collections import Counter

    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5))
    ulp = 2.0 ** (math.floor(math.log2(abs(exact))) - 23) if exact != 0 else 2.0**-149  # float32 spacing there
    spread = [(float(r) - exact) / ulp for runs in samples.values() for r in runs]
    slot = max(1.0, (max(spread) - min(spread)) / 60)  # bars stay visible when the sums spread over many ulps
    width = 0.8 * slot / max(len(samples), 1)
    for i, (label, runs) in enumerate(samples.items()):
        counts = Counter(float(r) for r in runs)
        xs = [(value - exact) / ulp - 0.4 * slot + (i + 0.5) * width for value in counts]
        ax.bar(xs, list(counts.values()), width=width, label=f"{label}: {count_distinct(runs)} distinct of {len(runs)}")
    ax.set_title("One sum, computed again and again")
    ax.set_xlabel("result − exact float64 sum (float32 ulps of the sum)")
    ax.set_ylabel("runs")
    ax.legend()
    return ax
