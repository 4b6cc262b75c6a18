"""Invariant attention on the device: correctness, bitwise phase agreement, SDPA's disagreement, speed.

``python -m detlib.bench attention`` runs, in one go:

1. a float64 check of :func:`detlib.attention.invariant_attention` (relative error, bf16 on a GPU);
2. the bitwise phase check: 64 ragged sequences, every position's output from one full prefill,
   from chunked prefills (several chunk sizes) and from token-by-token decode, plus decode/chunk calls
   amid 1..64 sequences, all compared bit for bit;
3. PyTorch SDPA against itself: prefill's last row vs single-token decode per backend, and decode of
   one sequence amid different numbers of others; and the teaching split-KV decode whose number of
   splits follows the batch;
4. speed against ``scaled_dot_product_attention`` (every backend available, the fastest counts), prefill
   (one sequence, 32 heads x 128, 1k..8k tokens) and batched decode (batch 1..64, cache 1k..8k).

``--record`` writes everything to ``data/gpu/attention.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from detlib.attention import KVCache, reference_attention, write_kv
from detlib.attention import invariant as inv
from detlib.attention import sdpa, teaching
from detlib.backend import compute_dtype, device, environment, is_interpreter
from detlib.bench.record import record
from detlib.bench.timing import median_ms
from detlib.numerics import bitwise_equal

DESCRIPTION = ("invariant attention: float64 check, bitwise prefill/chunked/decode agreement (batch 1..64), "
               "SDPA's own disagreement, prefill and decode speed vs SDPA (--record: data/gpu/attention.json)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="write the results to data/gpu/attention.json")
    parser.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    parser.add_argument("--explore", action="store_true",
                        help="also check (MHA and GQA, 16 sequences) and time other kernel configurations "
                             "side by side (reported, never chosen: only the default is checked in full)")


def _cumsum0(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def phase_check(n_heads: int, n_kv_heads: int, head_dim: int, lengths: list[int], chunks: tuple[int, ...],
                cfg: inv.KernelConfig, seed: int = 0) -> dict[str, Any]:
    """Full prefill vs chunked prefill vs decode vs mixed batches of 1..len(lengths), bit for bit."""
    dev, dtype = device(), compute_dtype()
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    n = len(lengths)
    total, cu = sum(lengths), _cumsum0(lengths)
    k, v = (torch.randn(total, n_kv_heads, head_dim, generator=gen).to(dev, dtype) for _ in range(2))
    q = torch.randn(total, n_heads, head_dim, generator=gen).to(dev, dtype)
    slots = rng.sample(range(n + 3), n)

    def attend(q_rows: torch.Tensor, cache: KVCache, cu_: list[int], slots_: list[int], kv: list[int]) -> torch.Tensor:
        return inv.attention_with_config(q_rows, cache, cu_, slots_, kv, scale=None, config=cfg)

    def new_cache() -> KVCache:
        return KVCache.allocate(n + 3, n_kv_heads, max(lengths) + 5, head_dim, dtype, dev)

    cache = new_cache()
    write_kv(cache, k, v, cu, slots, [0] * n)
    full = attend(q, cache, cu, slots, lengths)
    few = min(n, 3)
    ref = reference_attention(q[:cu[few]], cache, cu[:few + 1], slots[:few], lengths[:few])
    got = full[:cu[few]].double().cpu()
    rel_err = float((got - ref).norm() / ref.norm())

    def stepped(chunk: int) -> int:
        """Advance all sequences ``chunk`` tokens per call; count rows that differ from the full prefill."""
        c, out = new_cache(), torch.full_like(q, float("nan"))
        for start in range(0, max(lengths), chunk):
            seqs = [b for b in range(n) if start < lengths[b]]
            ends = [min(start + chunk, lengths[b]) for b in seqs]
            rows = [r for b, e in zip(seqs, ends) for r in range(cu[b] + start, cu[b] + e)]
            cu_ = _cumsum0([e - start for e in ends])
            write_kv(c, k[rows], v[rows], cu_, [slots[b] for b in seqs], [start] * len(seqs))
            out[rows] = attend(q[rows], c, cu_, [slots[b] for b in seqs], ends)
        return int((out.view(torch.int16 if out.element_size() == 2 else torch.int32)
                    != full.view(torch.int16 if full.element_size() == 2 else torch.int32)).any(-1).any(-1).sum())

    chunk_rows = {str(c): stepped(c) for c in chunks}
    decode_rows = stepped(1)
    sweep_fail = []
    for size in range(1, n + 1):
        seqs = rng.sample(range(n), size)
        pos = [rng.randrange(lengths[b]) for b in seqs]
        q_lens = [1 if i % 2 == 0 else rng.randint(1, p + 1) for i, p in enumerate(pos)]
        rows = [r for b, p, m in zip(seqs, pos, q_lens) for r in range(cu[b] + p + 1 - m, cu[b] + p + 1)]
        out = attend(q[rows], cache, _cumsum0(q_lens), [slots[b] for b in seqs], [p + 1 for p in pos])
        if not bitwise_equal(out, full[rows]):
            sweep_fail.append(size)
    return {"n_heads": n_heads, "n_kv_heads": n_kv_heads, "head_dim": head_dim, "dtype": str(dtype),
            "sequences": n, "max_len": max(lengths), "tokens": total, "rel_err_vs_float64": rel_err,
            "chunked_rows_differing": chunk_rows, "decode_rows_differing": decode_rows,
            "batch_sizes_checked": n, "batch_sizes_differing": sweep_fail,
            "bitwise_ok": decode_rows == 0 and not any(chunk_rows.values()) and not sweep_fail}


def sdpa_report(gpu: bool) -> dict[str, Any]:
    """SDPA's prefill-vs-decode agreement per backend, and its decode's dependence on batch size."""
    dev, dtype = device(), compute_dtype()
    seq_len, heads, dim = (1000, 32, 128) if gpu else (200, 4, 32)
    sizes = list(range(1, 65)) if gpu else [1, 2, 4, 8]
    phase = [r.as_dict() for r in sdpa.phase_disagreement(seq_len, heads, dim, dtype, dev)]
    batch = []
    for r in phase:
        if r["available"]:
            batch.append(sdpa.decode_batch_dependence(sizes, seq_len, heads, dim, dtype, dev, r["backend"]))
    return {"seq_len": seq_len, "heads": heads, "head_dim": dim, "dtype": str(dtype), "prefill_vs_decode": phase,
            "decode_vs_batch_size": batch}


def teaching_report(gpu: bool) -> dict[str, Any]:
    """The teaching split-KV decode: how many distinct results for one token as the batch grows."""
    dev, dtype = device(), compute_dtype()
    heads, seq_len, dim = (32, 2048, 128) if gpu else (2, 64, 16)
    sizes = [1, 2, 4, 8, 16, 32, 64] if gpu else [1, 2, 4]
    sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else teaching.H100_SMS
    q, k, v = sdpa.random_qkv(max(sizes), heads, seq_len, dim, dtype, dev, seed=3)
    prefill_last = teaching.flash_prefill(q[:1], k[:1], v[:1], block_m=64 if gpu else 16,
                                          block_n=64 if gpu else 16)[0, :, -1]
    rows = []
    for b in sizes:
        splits = teaching.choose_num_splits(b, heads, seq_len, num_sms=sms)
        out = teaching.split_kv_decode(q[:b, :, -1].contiguous(), k[:b], v[:b], num_splits=splits)[0]
        rows.append({"batch": b, "num_splits": splits, "equals_prefill_last_row": bitwise_equal(out, prefill_last)})
    return {"heads": heads, "seq_len": seq_len, "head_dim": dim, "num_sms": sms, "rows": rows}


def _sdpa_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str, *, causal: bool, gqa: bool
             ) -> Callable[[], torch.Tensor]:
    from torch.nn.attention import sdpa_kernel

    backend = sdpa.BACKENDS[name]

    def run() -> torch.Tensor:
        if backend is None:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def _graph_ms(fn: Callable[[], object]) -> float | None:
    """Median time of ``fn`` replayed from a CUDA graph: the device's time, without Python's launch cost."""
    if is_interpreter():
        return None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return median_ms(graph.replay)
    except Exception as err:  # noqa: BLE001 - a backend that cannot be captured is reported, not fatal
        print(f"  (no CUDA graph: {type(err).__name__}: {str(err)[:80]})")
        return None


def _measure(shape: dict[str, Any], q_sdpa: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
             q: torch.Tensor, cache: KVCache, cu: list[int], slots: list[int], kv: list[int],
             configs: dict[str, inv.KernelConfig], work: dict[str, float]) -> dict[str, Any]:
    """SDPA on every fused backend, then each configuration of ours, on the same inputs."""
    gqa = shape["heads"] != shape["kv_heads"]
    sdpa_ms: dict[str, float] = {}
    for name in sdpa.BACKENDS:
        if name == "math":
            continue  # the unfused reference: never the fastest, and the full score matrix would not fit at 8k
        try:
            fn = _sdpa_fn(q_sdpa, k, v, name, causal=causal, gqa=gqa)
            fn()
            sdpa_ms[name] = median_ms(fn)
        except RuntimeError:
            continue
    best = min(sdpa_ms, key=sdpa_ms.get)
    row: dict[str, Any] = {**shape, "sdpa_ms": sdpa_ms, "sdpa_best": best,
                           "sdpa_best_graph_ms": _graph_ms(_sdpa_fn(q_sdpa, k, v, best, causal=causal, gqa=gqa)),
                           "ours": {}}
    for name, cfg in configs.items():
        try:
            prepared = inv.prepare_batch(cache, q.shape[0], q.shape[1], cu, slots, kv, cfg)
            launch = median_ms(lambda: inv.run_prepared(q, cache, prepared))  # noqa: B023
        except Exception as err:  # noqa: BLE001 - reported with the row, the other configurations go on
            row["ours"][name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            continue
        graph = _graph_ms(lambda: inv.run_prepared(q, cache, prepared))  # noqa: B023
        row["ours"][name] = {"launch_ms": launch, "graph_ms": graph,
                             **{k_: round(amount / (graph or launch) / 1e9, 1) for k_, amount in work.items()}}
    # the whole call (checks and metadata on the host included) is the same for every configuration
    first = next(iter(configs.values()))
    row["ours_call_ms"] = median_ms(
        lambda: inv.attention_with_config(q, cache, cu, slots, kv, scale=None, config=first))
    print(json.dumps(row), flush=True)
    return row


PREFILL_SHAPES = [(1024, 32, 32), (2048, 32, 32), (4096, 32, 32), (8192, 32, 32), (4096, 32, 8)]  # len, heads, kv
DECODE_SHAPES = [(b, n, 32, 32) for n in (1024, 4096, 8192) for b in (1, 8, 32, 64)] + \
    [(b, 4096, 32, 8) for b in (1, 16, 64)]  # batch, cache length, heads, kv heads


def timing(configs: dict[str, inv.KernelConfig], prefill: list[tuple[int, int, int]],
           decode: list[tuple[int, int, int, int]], dim: int = 128) -> list[dict[str, Any]]:
    """Prefill (one sequence, causal) and batched decode, SDPA and each configuration side by side."""
    dev, dtype = device(), compute_dtype()
    rows = []
    for seq_len, heads, kv_heads in prefill:
        q, k, v = sdpa.random_qkv(1, heads, seq_len, dim, dtype, dev, seed=seq_len)
        k, v = k[:, :kv_heads].contiguous(), v[:, :kv_heads].contiguous()
        qp = q[0].transpose(0, 1).contiguous()  # packed [tokens, heads, dim]
        shape = {"phase": "prefill", "batch": 1, "len": seq_len, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}
        flops = 4 * seq_len * seq_len * dim * heads / 2
        rows.append(_measure(shape, q, k, v, True, qp, KVCache(k, v), [0, seq_len], [0], [seq_len], configs,
                             {"tflops": flops}))
        if heads == kv_heads:  # the same online softmax without any invariance: what invariance costs
            rows[-1]["teaching_flash_prefill_ms"] = median_ms(
                lambda: teaching.flash_prefill(q, k, v, block_m=64, block_n=64))  # noqa: B023
        del q, k, v, qp
    for b, seq_len, heads, kv_heads in decode:
        gen = torch.Generator().manual_seed(b * seq_len)
        k, v = (torch.randn(b, kv_heads, seq_len, dim, generator=gen).to(dev, dtype) if dev.type == "cpu" else
                torch.randn(b, kv_heads, seq_len, dim, device=dev, dtype=dtype) for _ in range(2))
        q = torch.randn(b, heads, dim, generator=gen).to(dev, dtype)
        shape = {"phase": "decode", "batch": b, "len": seq_len, "heads": heads, "kv_heads": kv_heads, "head_dim": dim}
        rows.append(_measure(shape, q[:, :, None], k, v, False, q, KVCache(k, v), list(range(b + 1)), list(range(b)),
                             [seq_len] * b, configs, {"gbps": 2 * b * kv_heads * seq_len * dim * 2 * 1e3}))
        del k, v, q
    return rows


def flatten(rows: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The rows of one configuration, with its ratios to SDPA's fastest backend (above 1: ours is faster)."""
    out = []
    for r in rows:
        ours, best = r["ours"].get(name, {"error": "not run"}), r["sdpa_ms"][r["sdpa_best"]]
        if "error" in ours:
            continue
        flat = {k: r[k] for k in ("phase", "batch", "len", "heads", "kv_heads", "head_dim", "sdpa_best")}
        flat.update({f"sdpa_{k}_ms": round(v, 5) for k, v in r["sdpa_ms"].items()})
        flat.update({"ours_launch_ms": round(ours["launch_ms"], 5), "ours_call_ms": round(r["ours_call_ms"], 5),
                     "ratio_launch": round(best / ours["launch_ms"], 3),
                     "ratio_call": round(best / r["ours_call_ms"], 3)})
        if "teaching_flash_prefill_ms" in r:
            flat["teaching_flash_prefill_ms"] = round(r["teaching_flash_prefill_ms"], 5)
        if ours["graph_ms"] and r["sdpa_best_graph_ms"]:
            flat.update({"ours_graph_ms": round(ours["graph_ms"], 5),
                         "sdpa_best_graph_ms": round(r["sdpa_best_graph_ms"], 5),
                         "ratio_graph": round(r["sdpa_best_graph_ms"] / ours["graph_ms"], 3)})
        flat.update({k: v for k, v in ours.items() if k in ("tflops", "gbps")})
        out.append(flat)
    return out


def _score(rows: list[dict[str, Any]]) -> float:
    """Geometric mean of the device-time ratios (graph where available): how a configuration ranks."""
    ratios = [r.get("ratio_graph", r["ratio_launch"]) for r in rows]
    return math.exp(sum(math.log(max(x, 1e-6)) for x in ratios) / len(ratios)) if ratios else 0.0


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| phase | batch | len | heads/kv | ours ms (launch / call / graph) | SDPA best ms (backend; graph) | "
             "ratio launch / call / graph |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        best = r["sdpa_best"]
        lines.append(f"| {r['phase']} | {r['batch']} | {r['len']} | {r['heads']}/{r['kv_heads']} | "
                     f"{r['ours_launch_ms']:.4f} / {r['ours_call_ms']:.4f} / {r.get('ours_graph_ms', '-')} | "
                     f"{r[f'sdpa_{best}_ms']:.4f} ({best}; {r.get('sdpa_best_graph_ms', '-')}) | "
                     f"{r['ratio_launch']} / {r['ratio_call']} / {r.get('ratio_graph', '-')} |")
    return "\n".join(lines)


def candidates(base: inv.KernelConfig) -> tuple[dict[str, inv.KernelConfig], dict[str, inv.KernelConfig]]:
    """The configuration checked in full (the default) and the ones only explored.

    The explored ones each change one thing that decided speed on the H100: the pipeline depth, TMA
    loads, and where ``p @ v`` accumulates (docs/perf/attention.md has the wider search).
    """
    full = {"default": base}
    variants = {"stages2": {"num_stages": 2}, "stages4": {"num_stages": 4}, "tma": {"tma": True},
                "separate_pv": {"acc_in_dot": False}}
    explore = {}
    for name, change in variants.items():
        cfg = dataclasses.replace(base, **change)
        if cfg != base:
            explore[name] = cfg
    return full, explore


def _save(args: argparse.Namespace, env: Any, results: dict[str, Any]) -> None:
    if args.out:
        args.out.write_text(json.dumps({"environment": env.as_dict(), "results": results}, indent=1) + "\n")


def main(args: argparse.Namespace) -> int:
    env = environment()
    gpu = not is_interpreter()
    started = time.perf_counter()
    rng = random.Random(0)
    if gpu:
        lengths = [rng.randint(1, 700) for _ in range(64)]
        lengths[:3] = [700, 513, 257]
        shapes, chunks = [(32, 8, 128), (32, 32, 128), (16, 2, 64)], (37, 128, 300)
    else:
        lengths = [rng.randint(1, 40) for _ in range(8)]
        shapes, chunks = [(4, 2, 16)], (7, 16)
    full, explore = candidates(inv.default_config())
    if not (gpu and args.explore):
        full, explore = {"default": full["default"]}, {}
    checks: dict[str, list[dict[str, Any]]] = {}
    for name, cfg in {**full, **explore}.items():
        try:
            if name in full:
                checks[name] = [phase_check(h, kvh, d, lengths, chunks, cfg) for h, kvh, d in shapes]
            else:  # explored only: MHA and GQA, 16 sequences
                checks[name] = [phase_check(h, kvh, 128, lengths[:16], (37, 300), cfg, seed=1)
                                for h, kvh in ((32, 8), (32, 32))]
        except Exception as err:  # noqa: BLE001 - a configuration that fails to compile or run is reported
            checks[name] = [{"error": f"{type(err).__name__}: {err}"[:400], "bitwise_ok": False}]
        for r in checks[name]:
            print(f"[{name}] " + (r["error"] if "error" in r else
                  f"phase agreement {r['n_heads']}/{r['n_kv_heads']}x{r['head_dim']}: bitwise_ok={r['bitwise_ok']} "
                  f"rel_err={r['rel_err_vs_float64']:.2e} chunked={r['chunked_rows_differing']} "
                  f"decode={r['decode_rows_differing']} batch sizes differing={r['batch_sizes_differing']}"),
                  flush=True)
    results: dict[str, Any] = {"phase_agreement_all_configs": checks}
    _save(args, env, results)  # what is known so far, in case a later step runs out of time
    results["sdpa_self_agreement"] = sdpa_report(gpu)
    for r in results["sdpa_self_agreement"]["prefill_vs_decode"]:
        print(f"SDPA {r['backend']}: available={r['available']} prefill==decode {r['equal']} "
              f"(max {r['max_ulp']} ulp)", flush=True)
    for r in results["sdpa_self_agreement"]["decode_vs_batch_size"]:
        print(f"SDPA {r['backend']} decode over batch sizes: {r['distinct']} distinct results", flush=True)
    results["teaching_split_kv"] = teaching_report(gpu)
    print("teaching split-KV decode:", results["teaching_split_kv"]["rows"], flush=True)
    ok = [n for n in full if all(c["bitwise_ok"] for c in checks[n])]  # explored ones are reported, not chosen
    chosen = "default"
    if gpu:
        runnable = {n: c for n, c in {**full, **explore}.items() if "error" not in checks[n][0]}
        rows = timing(runnable, PREFILL_SHAPES, DECODE_SHAPES)
        per_config = {name: flatten(rows, name) for name in runnable}
        ranked = [n for n in ok if n in per_config]
        chosen = max(ranked, key=lambda n: _score(per_config[n])) if ranked else chosen
        results["candidates"] = {
            n: {"config": dataclasses.asdict(c), "fully_checked": n in full,
                "bitwise_ok": all(x["bitwise_ok"] for x in checks[n]),
                "score_geomean_ratio": round(_score(per_config[n]), 3) if n in per_config else None}
            for n, c in {**full, **explore}.items()}
        results["timing_bf16"] = per_config.get(chosen, [])
        results["timing_all_configs"] = per_config
        for n, c in results["candidates"].items():
            print(f"candidate {n}: {c}", flush=True)
        print(f"chosen: {chosen}\n" + _table(results["timing_bf16"]))
    results["chosen"] = chosen
    results["config"] = dataclasses.asdict({**full, **explore}[chosen])
    results["phase_agreement"] = checks[chosen]
    results["seconds"] = round(time.perf_counter() - started, 1)
    _save(args, env, results)
    if args.record:
        print(f"recorded {record('attention', results)}")
    return 0
