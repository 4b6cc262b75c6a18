"""One attention for every phase: prefill, any chunk of a chunked prefill, and decode agree bit for bit.

A query at position ``p`` always attends to keys ``0..p`` cut the same way, whatever phase it is in and
whatever else is in the batch:

* keys are cut into splits of a fixed SIZE (``SPLIT`` keys, never a number of splits chosen from the
  batch), each split into blocks of ``BLOCK_N`` keys, at the same absolute positions in every phase;
* within a split, an online softmax walks the blocks in order; a block a row cannot see (all its keys
  after the row's position) leaves that row's state untouched, bit for bit;
* the splits' states are merged in order, from the first, with one log-sum-exp formula
  (:func:`detlib.attention._tl.merge_weights`);
* a query's row in the tile is fixed by its position (tiles are aligned to absolute positions), so
  even the matrix unit sees it in the same row.

Two launch plans compute exactly this and differ only in where the work runs: when there are enough
query tiles to fill the device, one program walks all splits of its tile and merges them in registers;
when there are few (decode), one program per (tile, split) writes the split's state and a merge kernel
combines them.  Which plan runs is chosen from the batch, but it cannot change a bit of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from detlib._inputs import check_float_tensor, kernel_operand
from detlib.attention._tl import device_function, dot, dot_acc, merge_weights, reduce_max, reduce_min, reduce_sum
from detlib.attention.cache import IntsLike, KVCache, check_cu_seqlens, check_slots, host_ints
from detlib.backend import is_interpreter

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the invariant kernel.  Fixed per backend: changing them changes the bits."""

    block_m: int  # rows (query token x query head of one KV head) of a tile
    block_n: int  # keys per block: the unit of the online softmax
    split: int  # keys per split: the unit of the split-KV merge (a multiple of block_n)
    num_warps: int = 4
    num_stages: int = 2
    # split per program when fewer (tile, head) programs than this would run
    min_programs: int = 4
    # one program walks its splits in one loop over blocks (True) or one short loop per split (False)
    flat: bool = True
    # p @ v added into the accumulator by the matrix unit (True) or computed apart and added (False)
    acc_in_dot: bool = False
    # unmasked key blocks read by the tensor-memory accelerator (TMA descriptors, Hopper and later)
    tma: bool = False


GPU_CONFIG = KernelConfig(block_m=64, block_n=64, split=256, num_warps=4, num_stages=3, min_programs=264,
                          acc_in_dot=True)
INTERPRETER_CONFIG = KernelConfig(block_m=16, block_n=16, split=32, min_programs=4)


def default_config() -> KernelConfig:
    """The configuration of this backend (small tiles in the interpreter, so CPU tests cross splits)."""
    return INTERPRETER_CONFIG if is_interpreter() else GPU_CONFIG


@device_function
def _block_step(q, m, l, acc, kv, start, pos, pos_hi, qk_scale,
                MASKED: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FIXED_ORDER: tl.constexpr,
                ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr, SPANS: tl.constexpr):
    """One block of keys ``start..start+BLOCK_N`` folded into each row's online-softmax state.

    Unmasked when every row of the tile sees every key of the block; masked otherwise, where a row's
    keys after its position score ``-inf`` and a row that sees none of the block keeps its state.
    Only a tile whose positions ``SPANS`` several blocks has such rows; otherwise every real row of a
    masked block sees at least its first key and the selects are left out (they cost registers).
    ``kv``: ``(k_base, v_base, stride_kn, k_desc, v_desc, row0)``, the sequence's keys and values as
    pointers and (``TMA``) as descriptor rows ``row0 + position``; the loads return the same values.
    """
    k_base, v_base, stride_kn, k_desc, v_desc, row0 = kv
    keys = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    if TMA:  # rows past the context may be another sequence's or garbage: their scores and values are cut
        kt = k_desc.load([row0 + start, 0]).T
        v = v_desc.load([row0 + start, 0])
        if MASKED:
            v = tl.where((keys <= pos_hi)[:, None], v, 0.0)
    elif MASKED:
        in_ctx = keys <= pos_hi
        kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None], mask=in_ctx[None, :], other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_kn + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
    else:
        kt = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None])
        v = tl.load(v_base + keys[:, None] * stride_kn + offs_d[None, :])
    s = dot(q, kt, FIXED_ORDER)  # unscaled: the scale goes into the max (exact, it is positive) and an fma
    if MASKED:
        s = tl.where(keys[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m, reduce_max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(tl.fma(s, qk_scale, -m_safe[:, None]))
    l_new = l * alpha + reduce_sum(p, 1)
    if ACC_IN_DOT:
        acc_new = dot_acc(p.to(v.dtype), v, acc * alpha[:, None], FIXED_ORDER)
    else:
        acc_new = acc * alpha[:, None] + dot(p.to(v.dtype), v, FIXED_ORDER)
    if MASKED and SPANS:
        sees = start <= pos
        m_new = tl.where(sees, m_new, m)
        l_new = tl.where(sees, l_new, l)
        acc_new = tl.where(sees[:, None], acc_new, acc)
    return m_new, l_new, acc_new


@device_function
def _split_state(q, kv, lo, hi, pos, pos_lo, pos_hi, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, FIXED_ORDER: tl.constexpr,
                 ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr, SPANS: tl.constexpr):
    """Online softmax of every row over keys ``lo..hi`` (one split), from an empty state."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    # blocks that every row sees in full need no mask; the same arithmetic either way
    full_hi = tl.maximum(tl.minimum(hi, ((pos_lo + 1) // BLOCK_N) * BLOCK_N), lo)
    for start in range(lo, full_hi, BLOCK_N):
        m, l, acc = _block_step(q, m, l, acc, kv, start, pos, pos_hi, qk_scale,
                                False, BLOCK_N, HEAD_DIM, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
    for start in range(full_hi, hi, BLOCK_N):
        m, l, acc = _block_step(q, m, l, acc, kv, start, pos, pos_hi, qk_scale,
                                True, BLOCK_N, HEAD_DIM, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
    return m, l, acc


@device_function
def _fold(m_run, l_run, acc_run, m, l, acc, take, SELECT: tl.constexpr):
    """Merge a split's state into the running one, in the rows where ``take``: the one merge formula.

    Without ``SELECT`` every row takes the merge (the caller knows that every real row saw the split).
    """
    m_new, w_run, w_split = merge_weights(m_run, m)
    l_new = l_run * w_run + l * w_split
    acc_new = acc_run * w_run[:, None] + acc * w_split[:, None]
    if SELECT:
        return tl.where(take, m_new, m_run), tl.where(take, l_new, l_run), tl.where(take[:, None], acc_new, acc_run)
    return m_new, l_new, acc_new


@device_function
def _walk_blocks(q, kv, m_run, l_run, acc_run, m, l, acc, lo, stop, hi, pos, pos_hi, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                 FIXED_ORDER: tl.constexpr, ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr, SPANS: tl.constexpr,
                 MASKED: tl.constexpr, SELECT: tl.constexpr):
    """Blocks ``lo..stop`` of keys ``0..hi`` (all masked or none), each split folded in as it ends.

    ``SELECT``: some rows may have seen nothing of a split (masked blocks of tiles that span blocks).
    """
    for start in range(lo, stop, BLOCK_N):
        m, l, acc = _block_step(q, m, l, acc, kv, start, pos, pos_hi, qk_scale,
                                MASKED, BLOCK_N, HEAD_DIM, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
        if ((start + BLOCK_N) % SPLIT == 0) | (start + BLOCK_N >= hi):
            m_run, l_run, acc_run = _fold(m_run, l_run, acc_run, m, l, acc, pos >= start // SPLIT * SPLIT, SELECT)
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l = tl.full([BLOCK_M], 0.0, tl.float32)
            acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    return m_run, l_run, acc_run, m, l, acc


@device_function
def _attend_flat(q, kv, pos, pos_lo, pos_hi, qk_scale,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                 FIXED_ORDER: tl.constexpr, ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr, SPANS: tl.constexpr):
    """Every split of keys ``0..pos_hi``, in two long loops over blocks (unmasked, then masked).

    The state restarts at each split boundary and is folded into the running one as the split ends:
    exactly the arithmetic of :func:`_split_state` split by split, with loops long enough to pipeline.
    """
    m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_run = tl.full([BLOCK_M], 0.0, tl.float32)
    acc_run = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
    hi = pos_hi + 1
    full_hi = tl.minimum(hi, ((pos_lo + 1) // BLOCK_N) * BLOCK_N)
    m_run, l_run, acc_run, m, l, acc = _walk_blocks(
        q, kv, m_run, l_run, acc_run, m, l, acc, 0, full_hi, hi, pos, pos_hi, qk_scale,
        BLOCK_M, BLOCK_N, HEAD_DIM, SPLIT, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS, False, False)
    m_run, l_run, acc_run, m, l, acc = _walk_blocks(
        q, kv, m_run, l_run, acc_run, m, l, acc, full_hi, hi, hi, pos, pos_hi, qk_scale,
        BLOCK_M, BLOCK_N, HEAD_DIM, SPLIT, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS, True, SPANS)
    return m_run, l_run, acc_run


@triton.jit
def _attn_kernel(q_ptr, k_ptr, v_ptr, k_desc, v_desc, o_ptr, ws_acc_ptr, ws_ml_ptr, meta_ptr,
                 n_tiles, batch, qk_scale,
                 stride_qt, stride_qh, stride_ks, stride_kh, stride_kn, stride_ot, stride_oh,
                 stride_wt, stride_wh, stride_ws,
                 G: tl.constexpr, GT: tl.constexpr, TM: tl.constexpr, N_HEAD_TILES: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr,
                 SPLIT_PER_PROGRAM: tl.constexpr, FLAT: tl.constexpr, FIXED_ORDER: tl.constexpr,
                 ACC_IN_DOT: tl.constexpr, TMA: tl.constexpr, SPANS: tl.constexpr):
    """Attention of one tile of query rows over one KV head (all splits, or split ``program_id(2)``).

    Rows are (query token, query head of the KV head's group) pairs; the tile covers positions
    ``tile * TM .. tile * TM + TM - 1`` of its sequence, so a token's row depends on its position only.
    ``meta`` holds, as int32: tile_seq[n_tiles], tile_idx[n_tiles], cu_seqlens[batch+1], slots[batch],
    kv_lens[batch].  ``k_desc``/``v_desc`` (``TMA`` only): the caches as ``[rows, HEAD_DIM]`` descriptors.
    """
    tile = tl.program_id(0)
    kvh = tl.program_id(1) // N_HEAD_TILES
    head_tile = tl.program_id(1) % N_HEAD_TILES
    b = tl.load(meta_ptr + tile)
    tile_k = tl.load(meta_ptr + n_tiles + tile)
    tok0 = tl.load(meta_ptr + 2 * n_tiles + b)
    q_len = tl.load(meta_ptr + 2 * n_tiles + b + 1) - tok0
    slot = tl.load(meta_ptr + 2 * n_tiles + batch + 1 + b)
    kv_len = tl.load(meta_ptr + 2 * n_tiles + 2 * batch + 1 + b)
    q_first = kv_len - q_len  # position of the sequence's first query

    rows = tl.arange(0, BLOCK_M)
    tok_local = rows // GT
    head_in_group = head_tile * GT + rows % GT
    pos = tile_k * TM + tok_local
    valid = (tok_local < TM) & (head_in_group < G) & (pos >= q_first) & (pos < kv_len)
    q_row = tok0 + pos - q_first
    head = kvh * G + head_in_group
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + q_row[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    pos_lo = reduce_min(tl.where(valid, pos, 2147483647), 0)
    pos_hi = reduce_max(tl.where(valid, pos, -1), 0)
    k_base = k_ptr + slot.to(tl.int64) * stride_ks + kvh * stride_kh
    v_base = v_ptr + slot.to(tl.int64) * stride_ks + kvh * stride_kh
    row0 = ((slot.to(tl.int64) * stride_ks + kvh * stride_kh) // stride_kn).to(tl.int32)  # descriptor row of key 0
    kv = (k_base, v_base, stride_kn, k_desc, v_desc, row0)

    if SPLIT_PER_PROGRAM:
        sp = tl.program_id(2)
        lo = sp * SPLIT
        if lo <= pos_hi:
            hi = tl.minimum(lo + SPLIT, pos_hi + 1)
            m, l, acc = _split_state(q, kv, lo, hi, pos, pos_lo, pos_hi, qk_scale,
                                     BLOCK_M, BLOCK_N, HEAD_DIM, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
            keep = valid & (pos >= lo)
            w = q_row.to(tl.int64) * stride_wt + head * stride_wh + sp * stride_ws
            tl.store(ws_acc_ptr + w[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=keep[:, None])
            tl.store(ws_ml_ptr + 2 * w, m, mask=keep)
            tl.store(ws_ml_ptr + 2 * w + 1, l, mask=keep)
    else:
        if FLAT:
            m_run, l_run, acc_run = _attend_flat(q, kv, pos, pos_lo, pos_hi, qk_scale,
                                                 BLOCK_M, BLOCK_N, HEAD_DIM, SPLIT, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
        else:
            m_run = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_run = tl.full([BLOCK_M], 0.0, tl.float32)
            acc_run = tl.full([BLOCK_M, HEAD_DIM], 0.0, tl.float32)
            for lo in range(0, pos_hi + 1, SPLIT):
                hi = tl.minimum(lo + SPLIT, pos_hi + 1)
                m, l, acc = _split_state(q, kv, lo, hi, pos, pos_lo, pos_hi, qk_scale,
                                         BLOCK_M, BLOCK_N, HEAD_DIM, FIXED_ORDER, ACC_IN_DOT, TMA, SPANS)
                m_run, l_run, acc_run = _fold(m_run, l_run, acc_run, m, l, acc, pos >= lo, SPANS)
        out = acc_run / tl.where(l_run > 0, l_run, 1.0)[:, None]  # padding rows saw nothing: no 0/0
        tl.store(o_ptr + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _merge_kernel(ws_acc_ptr, ws_ml_ptr, o_ptr, tok_pos_ptr,
                  stride_wt, stride_wh, stride_ws, stride_ot, stride_oh,
                  G: tl.constexpr, G_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, SPLIT: tl.constexpr):
    """Merge the split states of one token's query heads of one KV head, in split order."""
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    pos = tl.load(tok_pos_ptr + t)
    g = tl.arange(0, G_POW2)
    head = kvh * G + g
    ok = g < G
    offs_d = tl.arange(0, HEAD_DIM)
    m_run = tl.full([G_POW2], float("-inf"), tl.float32)
    l_run = tl.full([G_POW2], 0.0, tl.float32)
    acc_run = tl.full([G_POW2, HEAD_DIM], 0.0, tl.float32)
    for sp in range(0, pos // SPLIT + 1):
        w = t.to(tl.int64) * stride_wt + head * stride_wh + sp * stride_ws
        m = tl.load(ws_ml_ptr + 2 * w, mask=ok, other=float("-inf"))
        l = tl.load(ws_ml_ptr + 2 * w + 1, mask=ok, other=0.0)
        acc = tl.load(ws_acc_ptr + w[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None], other=0.0)
        m_run, l_run, acc_run = _fold(m_run, l_run, acc_run, m, l, acc, ok, True)
    out = acc_run / tl.where(l_run > 0, l_run, 1.0)[:, None]
    tl.store(o_ptr + t * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=ok[:, None])


@dataclass(frozen=True)
class LaunchPlan:
    """How one call is laid out: tiles, head tiles, and whether splits run in separate programs."""

    n_tiles: int
    heads_per_tile: int  # query heads of one KV head in a tile (GT)
    tokens_per_tile: int  # TM
    n_head_tiles: int
    max_splits: int
    split_per_program: bool


def _check_inputs(q: torch.Tensor, cache: KVCache) -> tuple[int, int, int]:
    check_float_tensor("q", q)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be a detlib.attention.KVCache, got {type(cache).__name__}")
    if q.dim() != 3:
        raise ValueError(f"q must be [total_tokens, n_heads, head_dim], got shape {tuple(q.shape)}")
    n_heads, head_dim = q.shape[1], q.shape[2]
    if head_dim != cache.head_dim:
        raise ValueError(f"q has head_dim {head_dim} but the cache has {cache.head_dim}")
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if n_heads % cache.n_kv_heads:
        raise ValueError(f"q has {n_heads} heads, not a multiple of the cache's {cache.n_kv_heads} KV heads (GQA)")
    if q.dtype != cache.dtype:
        raise TypeError(f"q is {q.dtype} but the cache holds {cache.dtype}")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    if q.stride(2) != 1:
        raise ValueError("q's last dimension (head_dim) must be contiguous")
    return n_heads, head_dim, n_heads // cache.n_kv_heads


def _plan(q_lens: list[int], kv_lens: list[int], group: int, n_kv_heads: int, cfg: KernelConfig
          ) -> tuple[LaunchPlan, list[int], list[int]]:
    heads_per_tile = min(group, cfg.block_m)
    tm = cfg.block_m // heads_per_tile
    tile_seq: list[int] = []
    tile_idx: list[int] = []
    max_kv = 1
    for b, (nq, nk) in enumerate(zip(q_lens, kv_lens)):
        if nq:
            first, last = (nk - nq) // tm, (nk - 1) // tm
            if first == last:
                tile_seq.append(b)
                tile_idx.append(first)
            else:  # latest positions (most keys) first, so the longest programs do not run last
                tile_seq += [b] * (last - first + 1)
                tile_idx += range(last, first - 1, -1)
            max_kv = max(max_kv, nk)
    max_splits = (max_kv - 1) // cfg.split + 1
    n_head_tiles = -(-group // heads_per_tile)
    programs = len(tile_seq) * n_kv_heads * n_head_tiles
    plan = LaunchPlan(len(tile_seq), heads_per_tile, tm, n_head_tiles, max_splits,
                      split_per_program=max_splits > 1 and programs < cfg.min_programs)
    return plan, tile_seq, tile_idx


def invariant_attention(q: torch.Tensor, cache: KVCache, cu_seqlens: IntsLike, slots: IntsLike,
                        kv_lens: IntsLike, *, scale: float | None = None) -> torch.Tensor:
    """Causal attention of a ragged batch of queries over the KV cache, the same bits in every phase.

    ``q``: ``[total_tokens, n_heads, head_dim]``, packed: sequence ``b``'s queries are rows
    ``cu_seqlens[b]:cu_seqlens[b+1]`` and are the LAST ``q_len_b`` positions of its context of
    ``kv_lens[b]`` tokens, which :func:`~detlib.attention.write_kv` has already put in slot
    ``slots[b]``.  ``n_heads`` is a multiple of the cache's KV heads (grouped-query attention).
    Full prefill (``q_len == kv_len``), a chunk of a chunked prefill and decode (``q_len == 1``) are
    all this one call, and a token's output row is bitwise the same in each of them, whatever else is
    in the batch.  Returns ``[total_tokens, n_heads, head_dim]`` in ``q``'s dtype.
    """
    return attention_with_config(q, cache, cu_seqlens, slots, kv_lens, scale=scale, config=default_config())


def attention_with_config(q: torch.Tensor, cache: KVCache, cu_seqlens: IntsLike, slots: IntsLike,
                          kv_lens: IntsLike, *, scale: float | None, config: KernelConfig) -> torch.Tensor:
    """:func:`invariant_attention` with explicit tile sizes (for benchmarks that compare configurations)."""
    _check_inputs(q, cache)
    prepared = prepare_batch(cache, q.shape[0], q.shape[1], cu_seqlens, slots, kv_lens, config)
    return run_prepared(q, cache, prepared, scale=scale)


@dataclass(frozen=True)
class PreparedBatch:
    """A batch's checked layout and its metadata on the device: reusable by every layer of one step."""

    plan: LaunchPlan
    config: KernelConfig
    n_tokens: int
    n_heads: int
    n_kv_heads: int
    max_len: int
    batch: int
    meta: torch.Tensor  # int32: tile_seq, tile_idx, cu_seqlens, slots, kv_lens
    tok_pos: torch.Tensor | None  # int32 position of every query (for the merge kernel)


def prepare_batch(cache: KVCache, n_tokens: int, n_heads: int, cu_seqlens: IntsLike, slots: IntsLike,
                  kv_lens: IntsLike, config: KernelConfig | None = None) -> PreparedBatch:
    """Check a batch's lengths and slots against the cache and lay out its tiles (host work, one copy)."""
    config = default_config() if config is None else config
    if n_heads % cache.n_kv_heads:
        raise ValueError(f"q has {n_heads} heads, not a multiple of the cache's {cache.n_kv_heads} KV heads (GQA)")
    cu = check_cu_seqlens(cu_seqlens, n_tokens)
    batch = len(cu) - 1
    slot_list = check_slots(slots, batch, cache.num_slots)
    kv = host_ints("kv_lens", kv_lens, batch)
    q_lens = [hi - lo for lo, hi in zip(cu, cu[1:])]
    max_len = cache.max_len
    if not all(nq <= nk <= max_len for nq, nk in zip(q_lens, kv)):
        b = next(b for b in range(batch) if not q_lens[b] <= kv[b] <= max_len)
        raise ValueError(f"sequence {b}: needs q_len <= kv_len <= max_len, got q_len {q_lens[b]}, "
                         f"kv_len {kv[b]}, max_len {max_len}")
    plan, tile_seq, tile_idx = _plan(q_lens, kv, n_heads // cache.n_kv_heads, cache.n_kv_heads, config)
    host = tile_seq + tile_idx + cu + slot_list + kv
    if plan.split_per_program:  # the position of every query, for the merge kernel
        host += [p for nq, nk in zip(q_lens, kv) for p in range(nk - nq, nk)]
    packed = torch.tensor(host, dtype=torch.int32).to(cache.device)  # one copy to the device
    n_meta = 2 * plan.n_tiles + 3 * batch + 1
    meta, tok_pos = packed[:n_meta], (packed[n_meta:] if plan.split_per_program else None)
    return PreparedBatch(plan, config, n_tokens, n_heads, cache.n_kv_heads, cache.max_len, batch, meta, tok_pos)


def _descriptors(k: torch.Tensor, v: torch.Tensor, config: KernelConfig) -> tuple[object, object]:
    """The caches as ``[slots * kv_heads * max_len, head_dim]`` TMA descriptors of ``block_n``-key tiles."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, head_dim = k.numel() // k.shape[-1], k.shape[-1]
    if rows >= 2**31:
        raise ValueError(f"a KV cache of {rows} rows is too large for TMA descriptors (int32 rows); use tma=False")
    return tuple(TensorDescriptor.from_tensor(t.view(rows, head_dim), [config.block_n, head_dim]) for t in (k, v))


def run_prepared(q: torch.Tensor, cache: KVCache, prepared: PreparedBatch, *, scale: float | None = None
                 ) -> torch.Tensor:
    """Launch the attention of a prepared batch: no host-side work beyond the kernel launches."""
    n_heads, head_dim, group = _check_inputs(q, cache)
    if (q.shape[0], n_heads, cache.n_kv_heads, cache.max_len) != (
            prepared.n_tokens, prepared.n_heads, prepared.n_kv_heads, prepared.max_len):
        raise ValueError("q or the cache does not match the prepared batch (tokens, heads or max_len differ)")
    plan, config = prepared.plan, prepared.config
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if not scale > 0:  # the kernel takes the max of unscaled scores: exact only for a positive scale
        raise ValueError(f"scale must be positive, got {scale}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if plan.n_tiles == 0:
        return out
    qk, kk, vv = kernel_operand(q), kernel_operand(cache.k_cache), kernel_operand(cache.v_cache)
    o = out if out.dtype == qk.dtype else torch.empty(q.shape, dtype=qk.dtype, device=q.device)
    n_tok = q.shape[0]
    if plan.split_per_program:
        ws_acc = torch.empty((n_tok, n_heads, plan.max_splits, head_dim), dtype=torch.float32, device=q.device)
        ws_ml = torch.empty((n_tok, n_heads, plan.max_splits, 2), dtype=torch.float32, device=q.device)
        ws_strides = (ws_ml.stride(0) // 2, ws_ml.stride(1) // 2, ws_ml.stride(2) // 2)
    else:
        ws_acc = ws_ml = o  # unused by this plan
        ws_strides = (0, 0, 0)
    grid = (plan.n_tiles, cache.n_kv_heads * plan.n_head_tiles, plan.max_splits if plan.split_per_program else 1)
    k_desc, v_desc = _descriptors(kk, vv, config) if config.tma else (kk, vv)
    _attn_kernel[grid](
        qk, kk, vv, k_desc, v_desc, o, ws_acc, ws_ml, prepared.meta, plan.n_tiles, prepared.batch, scale * LOG2E,
        qk.stride(0), qk.stride(1), kk.stride(0), kk.stride(1), kk.stride(2), o.stride(0), o.stride(1),
        *ws_strides,
        G=group, GT=plan.heads_per_tile, TM=plan.tokens_per_tile, N_HEAD_TILES=plan.n_head_tiles,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, HEAD_DIM=head_dim, SPLIT=config.split,
        SPLIT_PER_PROGRAM=plan.split_per_program, FLAT=config.flat, FIXED_ORDER=is_interpreter(),
        ACC_IN_DOT=config.acc_in_dot, TMA=config.tma, SPANS=config.block_n % plan.tokens_per_tile != 0,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=False,
    )
    if plan.split_per_program:
        _merge_kernel[(n_tok, cache.n_kv_heads)](
            ws_acc, ws_ml, o, prepared.tok_pos, *ws_strides, o.stride(0), o.stride(1),
            G=group, G_POW2=triton.next_power_of_2(group), HEAD_DIM=head_dim, SPLIT=config.split,
            num_warps=4, enable_fp_fusion=False,
        )
    if o is not out:
        out.copy_(o)
    return out
