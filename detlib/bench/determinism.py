"""The essay's experiment on the course model: one prompt N times amid traffic, default vs invariant kernels."""

from __future__ import annotations

import argparse
import time

import torch

import detlib
from detlib.bench.record import record
from detlib.experiment import DEFAULT_PROMPT as PROMPT
from detlib.experiment import Traffic, corpus_token_pool, make_requests, run_experiment, variants_table
from detlib.model import load_model
from detlib.tokenizer import load_tokenizer

DESCRIPTION = "N completions of one prompt amid random traffic, default vs invariant kernels (lab 08)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n", type=int, default=1000, help="copies of the fixed prompt")
    p.add_argument("--other", type=int, default=None, help="random traffic requests (default: N)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per fixed request")
    p.add_argument("--slots", type=int, default=64, help="sequences the KV cache holds at once")
    p.add_argument("--token-budget", type=int, default=512, help="tokens per forward")
    p.add_argument("--max-chunk", type=int, default=128, help="largest prefill chunk")
    p.add_argument("--window", type=int, default=None, help="arrival window in steps (default: N // 4)")
    p.add_argument("--seed", type=int, default=0, help="traffic seed, and the one sampling seed of every copy")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0: greedy (the essay's setting); > 0: every copy samples with the same seed")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="model dtype (default: bf16 on a GPU, fp32 on the CPU)")
    p.add_argument("--record", action="store_true", help="write data/gpu/determinism.json")


def main(args: argparse.Namespace) -> int:
    dtype = getattr(torch, args.dtype) if args.dtype else detlib.compute_dtype()
    tok = load_tokenizer()
    model = load_model(dtype=dtype, device=detlib.device(), tokenizer=tok)
    traffic = Traffic(n_fixed=args.n, n_other=args.n if args.other is None else args.other,
                      max_new_tokens=args.new_tokens, arrival_window=args.window or max(8, args.n // 4),
                      other_prompt_len=(4, 96), other_new_tokens=(4, 96), seed=args.seed,
                      temperature=args.temperature, top_p=args.top_p)
    requests = make_requests(tok.encode(PROMPT), corpus_token_pool(tok), traffic)
    engine_args = dict(n_fixed=args.n, num_slots=args.slots, token_budget=args.token_budget,
                       max_chunk=args.max_chunk)
    warm = make_requests(tok.encode(PROMPT), corpus_token_pool(tok),
                         Traffic(n_fixed=4, n_other=12, max_new_tokens=8, arrival_window=8, seed=1))
    results = {}
    for mode in ("default", "invariant"):
        run_experiment(model, warm, mode, **{**engine_args, "n_fixed": 4}, progress=False)  # compile kernels first
        start = time.perf_counter()
        res = run_experiment(model, requests, mode, **engine_args, progress=True)
        print(f"{mode:>9}: {res.summary()}  ({time.perf_counter() - start:.1f} s)")
        results[mode] = res
    ratio = results["invariant"].stats.wall_s / results["default"].stats.wall_s
    print(f"overhead of invariant over default kernels: {ratio:.3f}x")
    for mode, res in results.items():
        print(f"most common {mode} completions:")
        for n, text in variants_table(res, tok.decode):
            print(f"  {n:5d}x {text!r}")
    if args.record:
        name = "determinism" if args.temperature == 0 else "determinism_sampled"
        payload = {
            "prompt": PROMPT,
            "dtype": str(dtype),
            "traffic": vars(traffic),
            "engine": {k: v for k, v in engine_args.items() if k != "n_fixed"},
            "overhead_ratio": round(ratio, 4),
            "modes": {
                mode: {
                    **res.summary(),
                    "distinct_vs_n": res.distinct_vs_n(),
                    "divergence_positions": res.divergence_positions(),
                    "variants": variants_table(res, tok.decode, k=5),
                    "batch_sizes_seen": res.batch_sizes_seen,
                }
                for mode, res in results.items()
            },
        }
        print("recorded", record(name, payload))
    return 0
