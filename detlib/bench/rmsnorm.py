"""Invariant RMSNorm on the device: correctness, bitwise checks over batch size, and speed vs torch.

``python -m detlib.bench rmsnorm`` checks, for bf16/fp16/fp32, that :func:`detlib.rmsnorm.invariant_rms_norm`
matches a float64 reference, that its two execution paths (one program per row, one per chunk) give
the same bits, and that rows do not change with the batch size; it shows how often the library-style
dispatch (:func:`detlib.rmsnorm.library_rms_norm`) changes a row, and times both against torch.
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path
from typing import Any

import torch

from detlib.backend import device, environment, is_interpreter
from detlib.bench.record import record
from detlib.bench.timing import graph_ms
from detlib.numerics import bitwise_equal
from detlib.rmsnorm import invariant_rms_norm, invariant_rms_norm_path, library_rms_norm, rms_norm_float64

DESCRIPTION = "invariant RMSNorm: float64 check, bitwise over batch size, library dispatch, speed vs torch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="write the results to data/gpu/rmsnorm.json")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")


TIMING = "kernel time: median over CUDA-graph replays rotating over input sets larger than the L2 cache"


def _checks(hidden: int, dtype: torch.dtype, batches: list[int]) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(max(batches), hidden, generator=gen).to(device(), dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device(), dtype)
    full = invariant_rms_norm(x, w)
    err = float((full.double() - rms_norm_float64(x, w)).abs().max())
    paths_equal = bitwise_equal(invariant_rms_norm_path(x[:7], w, 1e-6, "rows"),
                                invariant_rms_norm_path(x[:7], w, 1e-6, "chunks"))
    inv_fail = [b for b in batches if not bitwise_equal(invariant_rms_norm(x[:b], w), full[:b])]
    lib_full = library_rms_norm(x, w)
    lib_diff = [b for b in batches if not bitwise_equal(library_rms_norm(x[:b], w), lib_full[:b])]
    return {"hidden": hidden, "dtype": str(dtype), "max_abs_err": err, "paths_same_bits": paths_equal,
            "invariant_failed_batches": inv_fail, "library_differs_at": lib_diff, "batches": batches}


def main(args: argparse.Namespace) -> int:
    env = environment()
    gpu = not is_interpreter()
    dtypes = (torch.bfloat16, torch.float16, torch.float32) if gpu else (torch.float32,)
    hiddens = (512, 4096, 5000) if gpu else (300, 2500)
    batches = [1, 2, 3, 7, 16, 31, 64, 100, 131, 132, 133, 256, 1000, 2048] if gpu else [1, 2, 5, 15, 16, 17, 40]
    results: dict[str, Any] = {"checks": [_checks(h, d, batches) for h in hiddens for d in dtypes]}
    for r in results["checks"]:
        print(f"rmsnorm hidden={r['hidden']} {r['dtype']}: max|err| {r['max_abs_err']:.2e}, paths same bits "
              f"{r['paths_same_bits']}, invariant failures {r['invariant_failed_batches'] or 'none'}, "
              f"library differs from full batch at {r['library_differs_at']}", flush=True)
    if gpu:
        rows = []
        for hidden in (512, 4096):
            for batch in (1, 16, 128, 1024, 8192):
                n_sets = max(2, min(32, int(150e6 // (4 * batch * hidden))))
                sets = [(torch.randn(batch, hidden, device=device(), dtype=torch.bfloat16),
                         torch.randn(hidden, device=device(), dtype=torch.bfloat16)) for _ in range(n_sets)]
                ops = {
                    "torch": lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-6),
                    "library": library_rms_norm,
                    "invariant_rows": lambda x, w: invariant_rms_norm_path(x, w, 1e-6, "rows"),
                    "invariant_chunks": lambda x, w: invariant_rms_norm_path(x, w, 1e-6, "chunks"),
                    "invariant": invariant_rms_norm,
                }
                t = {name: graph_ms([functools.partial(op, x, w) for x, w in sets]) for name, op in ops.items()}
                rows.append({"hidden": hidden, "batch": batch, **{k + "_us": v * 1e3 for k, v in t.items()}})
                print(json.dumps(rows[-1]), flush=True)
        results["timing_bf16"] = rows
        results["timing"] = TIMING
    if args.out:
        args.out.write_text(json.dumps({"environment": env.as_dict(), "results": results}, indent=1) + "\n")
    if args.record:
        print(f"recorded {record('rmsnorm', results)}")
    return 0
