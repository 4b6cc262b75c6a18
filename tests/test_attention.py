"""Tests of detlib.attention: the KV cache, invariant attention in every phase, the teaching kernels.

The central property is checked bitwise: every position's output is the same from a full prefill, a
chunked prefill (several chunk sizes) and token-by-token decode, for ragged batches of 1 to 64
sequences.  Values are checked against a float64 reference with a stated tolerance.  Sizes are small
(the interpreter runs every program in Python) but long enough to cross several splits and blocks.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

import detlib
from detlib.attention import KVCache, invariant_attention, reference_attention, write_kv
from detlib.attention import invariant as inv
from detlib.attention import lab, sdpa, teaching

DEV = detlib.device()
DTYPE = detlib.compute_dtype()
CFG = inv.default_config()
TOL = 2e-5 if DTYPE == torch.float32 else 2e-2  # fp32 on the CPU; bf16 inputs on a GPU


def cumsum0(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


class Batch:
    """Random keys, values and queries of a ragged batch, prefilled into its own cache."""

    def __init__(self, lengths: list[int], n_heads: int, n_kv_heads: int, head_dim: int, seed: int = 0,
                 extra_slots: int = 2) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lengths = lengths
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.max_len = max(lengths + [1]) + 3
        self.slots = random.Random(seed).sample(range(len(lengths) + extra_slots), len(lengths))
        self.num_slots = len(lengths) + extra_slots
        total = sum(lengths)
        self.k = torch.randn(total, n_kv_heads, head_dim, generator=gen).to(DEV, DTYPE)
        self.v = torch.randn(total, n_kv_heads, head_dim, generator=gen).to(DEV, DTYPE)
        self.q = torch.randn(total, n_heads, head_dim, generator=gen).to(DEV, DTYPE)
        self.cu = cumsum0(lengths)

    def new_cache(self) -> KVCache:
        return KVCache.allocate(self.num_slots, self.n_kv_heads, self.max_len, self.head_dim, DTYPE, DEV)

    def prefill(self) -> tuple[torch.Tensor, KVCache]:
        cache = self.new_cache()
        write_kv(cache, self.k, self.v, self.cu, self.slots, [0] * len(self.lengths))
        return invariant_attention(self.q, cache, self.cu, self.slots, self.lengths), cache

    def rows(self, b: int, lo: int, hi: int) -> list[int]:
        return list(range(self.cu[b] + lo, self.cu[b] + hi))

    def chunked(self, chunk: int) -> torch.Tensor:
        """Every sequence advanced ``chunk`` tokens per call, all sequences in each call."""
        cache, out = self.new_cache(), torch.full_like(self.q, float("nan"))
        for start in range(0, max(self.lengths), chunk):
            seqs = [b for b, n in enumerate(self.lengths) if start < n]
            ends = [min(start + chunk, self.lengths[b]) for b in seqs]
            rows = [r for b, e in zip(seqs, ends) for r in self.rows(b, start, e)]
            cu = cumsum0([e - start for e in ends])
            slots = [self.slots[b] for b in seqs]
            write_kv(cache, self.k[rows], self.v[rows], cu, slots, [start] * len(seqs))
            out[rows] = invariant_attention(self.q[rows], cache, cu, slots, ends)
        return out

    def decoded(self) -> torch.Tensor:
        return self.chunked(1)


def expect_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert detlib.bitwise_equal(got, want), f"{what}: {detlib.diff_summary(got, want)}"


def test_prefill_matches_float64_reference() -> None:
    batch = Batch([37, 5, 0, 70, 1], n_heads=4, n_kv_heads=2, head_dim=32)
    out, cache = batch.prefill()
    assert out.shape == batch.q.shape and out.dtype == batch.q.dtype
    ref = reference_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths)
    err = (out.double().cpu() - ref).abs().max().item()
    assert err < TOL, f"max |error| {err:.3g} over tolerance {TOL}"


def test_full_chunked_and_decode_agree_bitwise() -> None:
    """The heart of the lab: one token, one result, in every phase (several splits crossed)."""
    lengths = [2 * CFG.split + 9, CFG.split + 1, 5, 1, CFG.split]
    batch = Batch(lengths, n_heads=4, n_kv_heads=2, head_dim=16, seed=1)
    full, _ = batch.prefill()
    for chunk in (7, CFG.block_m, CFG.split + 3):
        expect_bits(batch.chunked(chunk), full, f"chunked prefill (chunk {chunk}) vs full prefill")
    expect_bits(batch.decoded(), full, "token-by-token decode vs full prefill")


def test_batch_sizes_1_to_64_ragged() -> None:
    """A token decoded or chunk-prefilled amid 0..63 other sequences gives its full-prefill bits."""
    rng = random.Random(2)
    lengths = [rng.randint(1, 2 * CFG.block_m) for _ in range(64)]
    lengths[5] = CFG.split + 5  # one long sequence crosses a split boundary
    batch = Batch(lengths, n_heads=2, n_kv_heads=1, head_dim=16, seed=2)
    full, cache = batch.prefill()
    for size in (1, 2, 3, 5, 8, 13, 21, 34, 64):
        seqs = rng.sample(range(64), size)
        positions = [rng.randrange(lengths[b]) for b in seqs]
        q_lens = [rng.randint(1, p + 1) if i % 2 else 1 for i, p in enumerate(positions)]  # decode and chunks
        rows = [r for b, p, n in zip(seqs, positions, q_lens) for r in batch.rows(b, p + 1 - n, p + 1)]
        out = invariant_attention(batch.q[rows], cache, cumsum0(q_lens), [batch.slots[b] for b in seqs],
                                  [p + 1 for p in positions])
        expect_bits(out, full[rows], f"batch of {size} sequences vs full prefill")


@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim"), [(2, 2, 32), (6, 2, 16), (2 * CFG.block_m, 1, 16)])
def test_gqa_groups_and_head_dims(n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    """MHA, a group of 3 (not a power of two) and a group larger than a tile all agree with themselves."""
    batch = Batch([CFG.split + 3, 9], n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, seed=3)
    full, cache = batch.prefill()
    ref = reference_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths)
    assert (full.double().cpu() - ref).abs().max().item() < TOL
    expect_bits(batch.chunked(CFG.split // 2 + 1), full, "chunked vs full")


def test_both_launch_plans_give_the_same_bits() -> None:
    """Splits merged in registers (many tiles, one loop or one per split) or by the merge kernel: the same bits."""
    batch = Batch([2 * CFG.split + 3, 40], n_heads=4, n_kv_heads=2, head_dim=16, seed=4)
    _, cache = batch.prefill()
    args = (batch.q, cache, batch.cu, batch.slots, batch.lengths)
    in_registers = dataclasses.replace(CFG, min_programs=0)
    by_kernel = dataclasses.replace(CFG, min_programs=10**9)
    plan_a, _, _ = inv._plan(batch.lengths, batch.lengths, 2, 2, in_registers)
    plan_b, _, _ = inv._plan(batch.lengths, batch.lengths, 2, 2, by_kernel)
    assert not plan_a.split_per_program and plan_b.split_per_program
    a = inv.attention_with_config(*args, scale=None, config=in_registers)
    b = inv.attention_with_config(*args, scale=None, config=by_kernel)
    expect_bits(a, b, "in-register merge vs merge kernel")
    per_split = dataclasses.replace(in_registers, flat=not CFG.flat)
    expect_bits(inv.attention_with_config(*args, scale=None, config=per_split), a, "flat loop vs a loop per split")


def test_scale_and_low_precision_inputs() -> None:
    batch = Batch([23, 4], n_heads=2, n_kv_heads=1, head_dim=16, seed=5)
    _, cache = batch.prefill()
    out = invariant_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths, scale=0.3)
    ref = reference_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths, scale=0.3)
    assert (out.double().cpu() - ref).abs().max().item() < TOL
    half = KVCache(cache.k_cache.bfloat16(), cache.v_cache.bfloat16())
    out16 = invariant_attention(batch.q.bfloat16(), half, batch.cu, batch.slots, batch.lengths)
    assert out16.dtype == torch.bfloat16
    ref16 = reference_attention(batch.q.bfloat16(), half, batch.cu, batch.slots, batch.lengths)
    assert (out16.double().cpu() - ref16).abs().max().item() < 2e-2


def test_empty_sequences_and_empty_batch() -> None:
    batch = Batch([0, 6, 0], n_heads=2, n_kv_heads=1, head_dim=16, seed=6)
    out, cache = batch.prefill()
    ref = reference_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths)
    assert (out.double().cpu() - ref).abs().max().item() < TOL
    none = invariant_attention(batch.q[:0], cache, [0, 0], [1], [4])
    assert none.shape == (0, 2, 16)


def test_write_kv_places_rows_and_rejects_bad_input() -> None:
    cache = KVCache.allocate(3, 2, 8, 16, DTYPE, DEV)
    k = torch.randn(5, 2, 16).to(DEV, DTYPE)
    write_kv(cache, k, -k, torch.tensor([0, 2, 5]), torch.tensor([2, 0]), torch.tensor([3, 0]))
    expect_bits(cache.k_cache[2, :, 3:5], k[0:2].transpose(0, 1), "slot 2 rows 3..4")
    expect_bits(cache.v_cache[0, :, 0:3], -k[2:5].transpose(0, 1), "slot 0 rows 0..2")
    assert not bool(cache.k_cache[1].any()), "slot 1 must stay untouched"
    with pytest.raises(ValueError, match="max_len"):
        write_kv(cache, k, k, [0, 2, 5], [2, 0], [7, 0])
    with pytest.raises(ValueError, match="same cache row"):
        write_kv(cache, k, k, [0, 2, 5], [1, 1], [0, 1])
    with pytest.raises(ValueError, match="n_kv_heads"):
        write_kv(cache, k[:, :1], k[:, :1], [0, 5], [0], [0])
    with pytest.raises(ValueError, match="slots"):
        write_kv(cache, k, k, [0, 5], [3], [0])


def _bad_calls() -> list[tuple[str, dict[str, object], str]]:
    return [
        ("q not 3-D", {"q": torch.randn(4, 32)}, "total_tokens, n_heads, head_dim"),
        ("heads not a multiple", {"q": torch.randn(4, 3, 16)}, "not a multiple"),
        ("head_dim mismatch", {"q": torch.randn(4, 2, 32)}, "head_dim"),
        ("kv_len over the cache", {"kv_lens": [9]}, "max_len"),
        ("q_len over kv_len", {"kv_lens": [3]}, "q_len <= kv_len"),
        ("cu_seqlens ends wrong", {"cu_seqlens": [0, 3]}, "packed tokens"),
        ("cu_seqlens decreasing", {"cu_seqlens": [0, 5, 4], "slots": [0, 1], "kv_lens": [5, 5]}, "decrease"),
        ("slot outside", {"slots": [7]}, "outside"),
        ("float lengths", {"kv_lens": torch.tensor([4.0])}, "integer"),
        ("kv_lens count", {"kv_lens": [4, 4]}, "entries"),
        ("dtype mismatch", {"q": torch.randn(4, 2, 16, dtype=torch.float64)}, "dtype"),
        ("negative scale", {"scale": -0.5}, "positive"),
    ]


@pytest.mark.parametrize(("what", "change", "message"), _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_is_a_clear_error(what: str, change: dict[str, object], message: str) -> None:
    cache = KVCache.allocate(2, 2, 8, 16, DTYPE, DEV)
    args: dict[str, object] = {"q": torch.randn(4, 2, 16), "cu_seqlens": [0, 4], "slots": [0], "kv_lens": [4]}
    args.update(change)
    if isinstance(args["q"], torch.Tensor) and args["q"].dtype == torch.float32:
        args["q"] = args["q"].to(DEV, DTYPE)
    with pytest.raises((ValueError, TypeError), match=message):
        invariant_attention(args["q"], cache, args["cu_seqlens"], args["slots"], args["kv_lens"],
                            scale=args.get("scale"))


def test_bad_cache_shapes() -> None:
    with pytest.raises(ValueError, match="must match"):
        KVCache(torch.zeros(1, 1, 4, 16, device=DEV), torch.zeros(1, 1, 5, 16, device=DEV))
    with pytest.raises(ValueError, match="positive"):
        KVCache.allocate(0, 1, 4, 16, torch.float32, "cpu")
    cache = KVCache.allocate(1, 1, 8, 24, DTYPE, DEV)
    with pytest.raises(ValueError, match="power of two"):
        invariant_attention(torch.randn(2, 1, 24).to(DEV, DTYPE), cache, [0, 2], [0], [2])


def test_teaching_prefill_and_split_kv_decode() -> None:
    """Flash prefill is right; split-KV decode is right too, but its bits depend on the number of splits."""
    q, k, v = sdpa.random_qkv(2, 2, 50, 16, DTYPE, DEV, seed=7)
    out = teaching.flash_prefill(q, k, v)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert (out.double() - ref).abs().max().item() < TOL
    last = q[:, :, -1].contiguous()
    results = {n: teaching.split_kv_decode(last, k, v, num_splits=n) for n in (1, 2, 3, 4)}
    for n, r in results.items():
        assert (r.double() - ref[:, :, -1]).abs().max().item() < TOL, f"num_splits={n}"
    expect_bits(results[1], out[:, :, -1], "one split is the prefill's own order")
    assert not all(detlib.bitwise_equal(results[1], r) for r in results.values()), "splits should change bits"
    assert teaching.choose_num_splits(1, 8, 4096) > teaching.choose_num_splits(64, 8, 4096) >= 1


def test_lab_references() -> None:
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(n, 8, generator=gen, dtype=torch.float64) for n in (5, 37, 37))
    want = torch.softmax(q @ k.T / math.sqrt(8), -1) @ v
    for block in (1, 8, 64):
        assert torch.allclose(lab.online_softmax_attention(q, k, v, block), want, atol=1e-12)
    bounds = lab.fixed_size_splits(37, 16)
    assert bounds == [(0, 16), (16, 32), (32, 37)]
    assert lab.even_splits(37, 3) == [(0, 13), (13, 26), (26, 37)]
    assert torch.allclose(lab.split_attention(q, k, v, bounds, 4), want, atol=1e-12)
    empty = (torch.tensor([[float("-inf")]]), torch.zeros(1, 1), torch.zeros(1, 1, 8, dtype=torch.float64))
    m, l, acc = lab.split_state(q[:1], k, v, 8)
    merged = lab.merge_splits(torch.cat([m[None], empty[0]]), torch.cat([l[None], empty[1]]),
                              torch.cat([acc[None], empty[2]]))
    assert torch.equal(merged, acc / l[:, None]), "an empty split must weigh nothing"


def test_sdpa_phase_report_runs() -> None:
    results = sdpa.phase_disagreement(40, 2, 16, torch.float32, "cpu", backends=("math", "cudnn"))
    math_result = results[0]
    assert math_result.available and math_result.equal is not None
    assert not results[1].available or DEV.type == "cuda"
    dep = sdpa.decode_batch_dependence([1, 2, 4], 40, 2, 16, torch.float32, "cpu")
    assert dep["result_id"][0] == 0 and 1 <= dep["distinct"] <= 3


def test_prepared_batch_is_reused_and_checked() -> None:
    """Host work once per step, launches per layer: same bits as the one-call form; a mismatch is an error."""
    batch = Batch([21, 4], n_heads=2, n_kv_heads=1, head_dim=16, seed=9)
    full, cache = batch.prefill()
    prepared = inv.prepare_batch(cache, batch.q.shape[0], 2, batch.cu, batch.slots, batch.lengths)
    expect_bits(inv.run_prepared(batch.q, cache, prepared), full, "run_prepared vs invariant_attention")
    with pytest.raises(ValueError, match="prepared batch"):
        inv.run_prepared(batch.q[:-1], cache, prepared)


@pytest.mark.parametrize("change", [{"tma": True}, {"acc_in_dot": True, "tma": True, "num_stages": 3}],
                         ids=["tma", "tma_accumulate_in_dot"])
def test_gpu_kernel_options_keep_phases_in_agreement(change: dict[str, object]) -> None:
    """The GPU's options (TMA loads, p @ v added inside the matrix unit) run here too and agree in every phase."""
    cfg = dataclasses.replace(CFG, **change)
    batch = Batch([2 * cfg.split + 9, cfg.split + 1, 5], n_heads=6, n_kv_heads=2, head_dim=16, seed=6)
    cache = batch.new_cache()
    write_kv(cache, batch.k, batch.v, batch.cu, batch.slots, [0] * 3)
    full = inv.attention_with_config(batch.q, cache, batch.cu, batch.slots, batch.lengths, scale=None, config=cfg)
    ref = reference_attention(batch.q, cache, batch.cu, batch.slots, batch.lengths)
    assert (full.double().cpu() - ref).abs().max().item() < TOL
    decoded = torch.full_like(batch.q, float("nan"))
    step_cache = batch.new_cache()
    for pos in range(max(batch.lengths)):
        seqs = [b for b, n in enumerate(batch.lengths) if pos < n]
        rows = [batch.cu[b] + pos for b in seqs]
        slots = [batch.slots[b] for b in seqs]
        cu = list(range(len(seqs) + 1))
        write_kv(step_cache, batch.k[rows], batch.v[rows], cu, slots, [pos] * len(seqs))
        decoded[rows] = inv.attention_with_config(batch.q[rows], step_cache, cu, slots, [pos + 1] * len(seqs),
                                                  scale=None, config=cfg)
    expect_bits(decoded, full, f"decode vs full prefill with {change}")
