"""The batch-invariant mode on an unmodified PyTorch transformer: bitwise invariance, where variance
enters without it, what runs outside it, and its cost.

``python -m detlib.bench mode`` runs, on :mod:`detlib.toy_transformer` (plain ``nn.Linear``,
``F.rms_norm``, SDPA) in the backend's dtype:

1. invariance: one sequence placed at rows 0, B//2 and B-1 of batches of every size 1..64, and every
   prefix of it, compared bit for bit with its batch-of-1 run, mode off and mode on;
2. the audit (:func:`detlib.audit.audit`) with the mode off and on: the first variant layer per probe;
3. the trace (:func:`detlib.mode.trace_outside`): aten ops that reduced outside the mode;
4. cost: a forward at batch 1, 8 and 64 with PyTorch's kernels vs inside the mode.

``--record`` writes everything to ``data/gpu/mode.json`` (``--out`` also to another file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from detlib.audit import audit
from detlib.backend import compute_dtype, device, is_interpreter
from detlib.bench.record import record
from detlib.bench.timing import median_ms
from detlib.mode import invariant_mode, trace_outside
from detlib.numerics import bitwise_equal
from detlib.toy_transformer import ToyConfig, toy_transformer

DESCRIPTION = ("batch-invariant mode on a plain PyTorch transformer: bitwise invariance over batch 1..64 and "
               "prefixes, audit, trace, cost vs PyTorch (--record: data/gpu/mode.json)")

GPU_CONFIG = ToyConfig(vocab_size=4096, dim=1024, n_layers=4, n_heads=16, n_kv_heads=4, mlp_hidden=2816,
                       max_seq_len=256)
CPU_CONFIG = ToyConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, max_seq_len=16)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="write the results to data/gpu/mode.json")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: 64 GPU, 3 CPU)")
    parser.add_argument("--max-batch", type=int, default=None, help="largest batch (default: 64 GPU, 4 CPU)")


def invariance(model: torch.nn.Module, seq: torch.Tensor, batch_sizes: list[int], mode: str) -> dict[str, Any]:
    """Rows 0, B//2, B-1 of each batch and every prefix, bit for bit against the batch-of-1 run."""
    gen = torch.Generator().manual_seed(1)
    vocab = model.cfg.vocab_size  # type: ignore[union-attr]
    ctx = invariant_mode() if mode == "on" else contextlib.nullcontext()
    batch_failures: list[list[int]] = []
    distinct: dict[bytes, int] = {}
    with torch.no_grad(), ctx:
        ref = model(seq)
        for b in batch_sizes:
            tokens = torch.randint(0, vocab, (b, seq.shape[1]), generator=gen).to(seq.device)
            rows = sorted({0, b // 2, b - 1})
            tokens[rows] = seq[0]
            out = model(tokens)
            for r in rows:
                distinct.setdefault(out[r].float().cpu().numpy().tobytes(), b)
                if not bitwise_equal(out[r:r + 1], ref):
                    batch_failures.append([b, r])
        prefix_failures = [t for t in range(1, seq.shape[1] + 1)
                           if not bitwise_equal(model(seq[:, :t]), ref[:, :t])]
    return {
        "batch_sizes": [batch_sizes[0], batch_sizes[-1]],
        "probes": sum(len({0, b // 2, b - 1}) for b in batch_sizes),
        "batch_failures": batch_failures,
        "distinct_outputs_over_batches": len(distinct),
        "prefix_lengths": [1, seq.shape[1]],
        "prefix_failures": prefix_failures,
        "bitwise_invariant": not batch_failures and not prefix_failures,
    }


def cost(model: torch.nn.Module, seq_len: int, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Median forward time with PyTorch's kernels and inside the mode, side by side."""
    rows = []
    vocab = model.cfg.vocab_size  # type: ignore[union-attr]
    for b in batch_sizes:
        tokens = torch.randint(0, vocab, (b, seq_len), generator=torch.Generator().manual_seed(b)).to(device())
        with torch.no_grad():
            plain = median_ms(lambda: model(tokens))
            with invariant_mode():
                model(tokens)  # compile outside the timing
                inv = median_ms(lambda: model(tokens))
        rows.append({"batch": b, "tokens": b * seq_len, "torch_ms": plain, "mode_ms": inv, "slowdown": inv / plain})
    return rows


def row_ops() -> dict[str, Any]:
    """detlib.rowwise and the mode's softmax, mean and masked SDPA on this device: error against float64,
    and bitwise agreement of row 0 over 1..64 rows."""
    from detlib import rowwise

    gen = torch.Generator().manual_seed(2)
    out: dict[str, Any] = {}
    for dtype in (torch.float32, compute_dtype()):
        x = (torch.randn(64, 5000, generator=gen) * 3).to(device(), dtype)
        xd = x.double()
        refs = {"softmax": torch.softmax(xd, -1), "log_softmax": torch.log_softmax(xd, -1), "mean": xd.mean(-1)}
        fns = {"softmax": lambda t: rowwise.invariant_softmax(t, -1),
               "log_softmax": lambda t: rowwise.invariant_log_softmax(t, -1),
               "mean": lambda t: rowwise.invariant_mean(t, -1)}
        for name, fn in fns.items():
            got = fn(x)
            err = float(((got.double() - refs[name]).norm() / refs[name].norm()))
            alone = fn(x[:1])
            invariant = all(bitwise_equal(fn(x[:n])[:1], alone) for n in range(1, 65))
            out[f"{name}/{str(dtype).removeprefix('torch.')}"] = {"rel_error_vs_float64": err, "row0_invariant": invariant}
    q = torch.randn(16, 8, 48, 64, generator=gen).to(device(), compute_dtype())
    kv = torch.randn(16, 2, 48, 64, generator=gen).to(device(), compute_dtype())
    mask = torch.rand(48, 48, generator=gen).to(device()) > 0.2
    mask[:, 0] = True
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with invariant_mode(strict=True):
        full = sdpa(q, kv, kv, attn_mask=mask, enable_gqa=True)
        alone = [sdpa(q[i:i + 1], kv[i:i + 1], kv[i:i + 1], attn_mask=mask, enable_gqa=True) for i in (0, 15)]
        logits = torch.randn(64, 4096, generator=gen).to(device(), compute_dtype())
        lsm = torch.log_softmax(logits, -1)
        lsm_alone = torch.log_softmax(logits[5:6], -1)
    want = sdpa(q.double(), kv.double(), kv.double(), attn_mask=mask, enable_gqa=True)
    out["sdpa_masked"] = {"rel_error_vs_float64": float((full.double() - want).norm() / want.norm()),
                          "batch_invariant": bitwise_equal(full[:1], alone[0]) and bitwise_equal(full[15:], alone[1])}
    out["mode_log_softmax"] = {"batch_invariant": bitwise_equal(lsm[5:6], lsm_alone)}
    return out


def _section(results: dict[str, Any], name: str, fn: Callable[[], Any], save: Callable[[], None]) -> None:
    """Run one part; an error is recorded, not raised, and the results so far are saved after each part
    (one GPU call has to bring back everything it managed to measure)."""
    start = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:
        results[name] = {"error": traceback.format_exc(limit=8)}
    print(f"[mode] {name}: {time.perf_counter() - start:.1f} s", flush=True)
    save()


def main(args: argparse.Namespace) -> int:
    cfg = CPU_CONFIG if is_interpreter() else GPU_CONFIG
    seq_len = args.seq_len or (3 if is_interpreter() else 64)
    max_batch = args.max_batch or (4 if is_interpreter() else 64)
    dtype = compute_dtype()
    model = toy_transformer(cfg, dtype=dtype, device=device())
    seq = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0)).to(device())
    batch_sizes = list(range(1, max_batch + 1))
    results: dict[str, Any] = {"config": asdict(cfg), "dtype": str(dtype), "seq_len": seq_len}

    def save() -> None:
        if args.record:
            recorded = record("mode", results)
            if args.out:  # the recorded file (with the environment) next to --out, to fetch from a GPU machine
                args.out.with_name(args.out.stem + "_record.json").write_text(recorded.read_text())
        if args.out:
            args.out.write_text(json.dumps(results, indent=1) + "\n")

    def trace_section() -> dict[str, Any]:
        with torch.no_grad():
            report = trace_outside(model, seq)
        return {"table": str(report), "outside": [u.op for u in report.outside],
                "invariant_ops": sorted(u.op for u in report.ops.values() if u.status == "invariant")}

    def audit_section() -> dict[str, Any]:
        probes = sorted({1, 2, 4, 8, 16, 32, max_batch} & set(batch_sizes))
        report = audit(model, seq, batch_sizes=probes, prefixes=sorted({1, 2, seq_len // 2, seq_len}),
                       progress=False)
        modes = ("off", "on")
        return {"table": report.table(), "probes": [p.label for p in report.probes],
                "first_differences": {m: report.first_differences(m) for m in modes},
                "first_variant_layer": {m: report.first_variant_layer(m) for m in modes}}

    # most important first: a run cut short by its time limit keeps what it measured
    _section(results, "invariance_mode_on", lambda: invariance(model, seq, batch_sizes, "on"), save)
    _section(results, "trace", trace_section, save)
    _section(results, "cost", lambda: cost(model, seq_len, sorted({1, 8, max_batch})), save)
    _section(results, "invariance_mode_off", lambda: invariance(model, seq, batch_sizes, "off"), save)
    _section(results, "row_ops", row_ops, save)
    _section(results, "audit", audit_section, save)
    for name in ("invariance_mode_on", "invariance_mode_off"):
        r = results[name]
        if "error" not in r:
            print(f"{name}: bitwise invariant={r['bitwise_invariant']}, batch failures {len(r['batch_failures'])}"
                  f"/{r['probes']}, distinct outputs {r['distinct_outputs_over_batches']}, "
                  f"prefix failures {r['prefix_failures'][:8]}")
    if "error" not in results["cost"]:
        for row in results["cost"]:
            print(f"batch {row['batch']:>3}: torch {row['torch_ms']:.3f} ms, mode {row['mode_ms']:.3f} ms, "
                  f"x{row['slowdown']:.2f}")
    return 0
