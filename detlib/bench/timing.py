"""Time a callable honestly on either backend: CUDA events on a GPU, a wall clock on the CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from detlib.backend import is_interpreter


def median_ms(fn: Callable[[], object], *, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median time of one call of ``fn`` in milliseconds (warm-up calls excluded)."""
    if not is_interpreter():
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times: list[float] = []
    deadline = time.perf_counter() + rep_ms / 1000
    while not times or (time.perf_counter() < deadline and len(times) < 1000):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sync() -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if torch.cuda.is_available() and not is_interpreter():
        torch.cuda.synchronize()


def graph_ms(fns: list[Callable[[], object]], *, replays: int = 10, min_calls: int = 16) -> float:
    """Median GPU time of one call, from CUDA-graph replays that run every callable of ``fns`` in turn.

    The graph removes the CPU's launch overhead (what a server running CUDA graphs pays), so the
    number is the kernels' own time.  Give ``fns`` the same operation over several input sets whose
    total size exceeds the L2 cache: each set is then read from device memory, not from the cache.
    """
    calls = list(fns) * max(1, -(-min_calls // len(fns)))
    for fn in fns:  # compile and warm up outside the capture
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / len(calls))
    return statistics.median(times)
