"""``python -m detlib.bench sweep [--record]``: batch-invariance sweeps, reductions and the toy server.

On a GPU this measures what labs 02 and 03 show beside the learner's own numbers: every op of
:func:`detlib.sweep.standard_cases` at many batch sizes (bf16 and fp32), a size × position heatmap of
``x @ W.T``, prefill vs decode per SDPA backend, atomic vs fixed-tree sums over repeated runs, one
matmul repeated many times, and the toy server.  ``--record`` writes ``data/gpu/sweep.json``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from detlib.backend import compute_dtype, device, is_interpreter
from detlib.bench.record import record
from detlib.reduce import atomic_sum, count_distinct, distinct_results, sample_results, scheduling_order, tree_sum
from detlib.sweep import (
    Sweep,
    attention_case,
    default_batch_sizes,
    matmul_case,
    prefill_vs_decode,
    standard_cases,
    sweep,
)
from detlib.toy_server import ToyModel, ToyServer, output_histogram, rowwise_forward

DESCRIPTION = "batch-invariance sweeps, atomic vs tree sums, toy server (--record: data/gpu/sweep.json)"
NAME = "sweep"
SDPA_BACKENDS = (None, "flash", "efficient", "cudnn", "math")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="write data/gpu/sweep.json (GPU only)")
    parser.add_argument("--runs", type=int, default=50, help="runs of each reduction (default 50)")
    parser.add_argument("--trials", type=int, default=300, help="toy-server trials per setting (default 300)")


def _limit(case_name: str, gpu: bool) -> int:
    """The largest batch tried per op: memory-bound by attention, time-bound on the CPU."""
    if not gpu:
        return 48
    if case_name.startswith("attention prefill"):
        return 64
    if case_name.startswith("attention decode"):
        return 128
    return 1024


def run_sweeps(gpu: bool) -> list[Sweep]:
    """Every standard case at its batch sizes, rows first and last; bf16 and fp32 on a GPU."""
    dtypes = [compute_dtype(), torch.float32] if gpu else [torch.float32]
    out: list[Sweep] = []
    for dtype in dtypes:
        for case in standard_cases(dtype, small=not gpu):
            start = time.perf_counter()
            result = sweep(case, default_batch_sizes(_limit(case.name, gpu)), ("first", "last"))
            print(f"{result.summary()}  [{time.perf_counter() - start:.1f} s]", flush=True)
            out.append(result)
        if gpu:  # the decode sweep per SDPA backend: does the batch change decode?
            for backend in SDPA_BACKENDS[1:]:
                try:
                    r = sweep(attention_case(8, 1024, 128, decode=True, dtype=dtype, backend=backend),
                              default_batch_sizes(128), ("first", "last"))
                except (RuntimeError, NotImplementedError, ValueError) as err:  # a backend may not support this dtype
                    print(f"attention decode {dtype} ({backend}): not run: {str(err).splitlines()[0][:120]}")
                    continue
                print(r.summary(), flush=True)
                out.append(r)
    return out


def run_heatmap(gpu: bool) -> Sweep:
    """``x @ W.T`` at every position of every batch size up to 48 (32 on the CPU)."""
    k = 4096 if gpu else 512
    case = matmul_case(k, k, "x@W.T", dtype=compute_dtype())
    result = sweep(case, range(1, 49 if gpu else 33), "all")
    result.name += " (all positions)"
    print(result.summary(), flush=True)
    return result


def run_prefill_vs_decode(gpu: bool) -> list[Sweep]:
    """The last token's attention, prefill vs decode, over KV lengths, per SDPA backend on a GPU."""
    lengths = default_batch_sizes(4096 if gpu else 512)
    out: list[Sweep] = []
    for backend in SDPA_BACKENDS if gpu else (None,):
        try:
            r = prefill_vs_decode(8 if gpu else 4, lengths, 128 if gpu else 64, dtype=compute_dtype(), backend=backend)
        except (RuntimeError, NotImplementedError, ValueError) as err:
            print(f"prefill vs decode ({backend}): not run: {str(err).splitlines()[0][:120]}")
            continue
        print(r.summary(), flush=True)
        out.append(r)
    return out


def run_reductions(runs: int, gpu: bool) -> dict[str, Any]:
    """Atomic vs fixed-tree sums of one vector, ``runs`` times each, under the hardware's and a random order."""
    n, block = (1 << 22, 1024) if gpu else (32 * 256, 256)
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(device())
    res: dict[str, Any] = {"n": n, "block": block, "runs": runs, "exact": float(x.double().sum())}
    orders = ("hardware", "random") if gpu else ("random",)
    for order in orders:
        for name, fn in (("atomic", atomic_sum), ("tree", tree_sum)):
            sums = sample_results(lambda fn=fn, order=order: fn(x, block=block, order=order), runs)
            res[f"{name} {order}"] = {"distinct": count_distinct(sums), "sums": [float(s) for s in sums]}
            print(f"{name:>6} sum, {order} order: {count_distinct(sums)} distinct of {runs}", flush=True)
    return res


def run_run_to_run(gpu: bool) -> dict[str, Any]:
    """The same matmul many times: how many distinct results (one, unless something is really racy)."""
    size, runs = (2048, 1000) if gpu else (256, 200)
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=g).to(device(), compute_dtype()) for _ in range(2))
    distinct = distinct_results(lambda: a @ b, runs)
    print(f"{compute_dtype()} matmul {size}³, {runs} runs: {distinct} distinct", flush=True)
    return {"op": f"a @ b, {size}x{size}x{size}", "dtype": str(compute_dtype()), "runs": runs, "distinct": distinct}


def run_toy_server(trials: int) -> dict[str, Any]:
    """The toy server's fixed request: distinct outputs with batched ops vs row-by-row ops."""
    model = ToyModel.random(dtype=compute_dtype())
    request = torch.randn(model.dim, generator=torch.Generator().manual_seed(1)).to(device(), compute_dtype())
    res: dict[str, Any] = {"trials": trials, "dtype": str(compute_dtype())}
    for label, fwd in (("default", model.forward), ("row by row", lambda b: rowwise_forward(model, b))):
        server = ToyServer(fwd, model.dim, dtype=compute_dtype())
        hist = output_histogram(server.trials(request, trials))
        res[label] = hist
        res["max_batch"], res["mean_waiting"] = server.max_batch, server.mean_waiting
        print(f"toy server, {label}: {len(hist)} distinct outputs of {trials}", flush=True)
    return res


def main(args: argparse.Namespace) -> int:
    gpu = not is_interpreter()
    if args.record and not gpu:
        raise SystemExit("--record writes GPU results to data/gpu/: run it on a machine with a CUDA GPU")
    settings = {"allow_tf32": torch.backends.cuda.matmul.allow_tf32,
                "allow_bf16_reduced_precision_reduction":
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction}
    results: dict[str, Any] = {"settings": settings, "scheduling_order": scheduling_order()}
    results["reductions"] = run_reductions(args.runs, gpu)
    results["run_to_run"] = run_run_to_run(gpu)
    results["sweeps"] = [s.as_dict() for s in run_sweeps(gpu)]
    results["heatmap"] = run_heatmap(gpu).as_dict()
    results["prefill_vs_decode"] = [s.as_dict() for s in run_prefill_vs_decode(gpu)]
    results["toy_server"] = run_toy_server(args.trials)
    if args.record:
        print(f"recorded {record(NAME, results)}")
    return 0
