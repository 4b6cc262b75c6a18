"""The Qwen3-style model: prefill, chunked prefill and decode agree (close with PyTorch's kernels, bitwise
with detlib's invariant ones); the shipped model loads and writes text; bad input gives clear errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from detlib import bitwise_equal
from detlib.kernels import current_mode, use_kernels
from detlib.model import (Batch, ModelConfig, ModelError, Qwen3Model, default_model_dir, generate, load_model,
                          save_model)
from detlib.tokenizer import load_tokenizer, train_bpe

SMALL = ModelConfig(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                    intermediate_size=96, max_seq_len=64)


@pytest.fixture(scope="module")
def small() -> Qwen3Model:
    model = Qwen3Model(SMALL)
    model.init_weights(seed=0)
    with torch.no_grad():  # weights of a trained model's size, so that logits are not all near zero
        for p in model.parameters():
            p.mul_(5.0) if p.dim() == 2 else p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _three_ways(model: Qwen3Model, ids: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """Logits of every position of ``ids``: one prefill, chunks of ``chunk``, and one token at a time."""
    n = len(ids)
    with torch.no_grad():
        cache = model.allocate_cache(1, n)
        prefill = model(ids, Batch.build([n], [0], [0]), cache)
        cache = model.allocate_cache(1, n)
        chunked = torch.cat([model(ids[s:s + chunk], Batch.build([len(ids[s:s + chunk])], [s], [0]), cache)
                             for s in range(0, n, chunk)])
        cache = model.allocate_cache(1, n)
        decode = torch.cat([model(ids[i:i + 1], Batch.build([1], [i], [0]), cache) for i in range(n)])
        dense = model.forward_dense(ids[None])[0]
    return prefill, chunked, decode, dense


def test_prefill_chunked_decode_close_with_default_kernels(small: Qwen3Model) -> None:
    ids = torch.randint(0, SMALL.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    prefill, chunked, decode, dense = _three_ways(small, ids, chunk=7)
    for name, other in (("chunked", chunked), ("decode", decode), ("dense", dense)):
        err = (other - prefill).abs().max().item()
        assert err < 1e-4, f"{name} differs from prefill by {err:.3g} (fp32, default kernels)"


def test_prefill_chunked_decode_bitwise_with_invariant_kernels(small: Qwen3Model) -> None:
    ids = torch.randint(0, SMALL.vocab_size, (12,), generator=torch.Generator().manual_seed(1))
    with use_kernels("invariant"):
        assert current_mode() == "invariant"
        prefill, chunked, decode, dense = _three_ways(small, ids, chunk=5)
    assert current_mode() == "default"
    for name, other in (("chunked", chunked), ("decode", decode), ("dense", dense)):
        assert bitwise_equal(other, prefill), f"{name} logits are not bitwise equal to prefill's"


def test_batch_of_others_does_not_change_a_sequence_invariant(small: Qwen3Model) -> None:
    """Sequence A's decode step, alone and packed with a prefill of B and a decode of C: same bits."""
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randint(0, SMALL.vocab_size, (n,), generator=g) for n in (6, 9, 4))
    with use_kernels("invariant"), torch.no_grad():
        cache = small.allocate_cache(3, 16)
        small(a[:5], Batch.build([5], [0], [0]), cache)
        small(c[:3], Batch.build([3], [0], [2]), cache)
        alone = small(a[5:], Batch.build([1], [5], [0]), cache)
        cache_again = small.allocate_cache(3, 16)
        small(a[:5], Batch.build([5], [0], [0]), cache_again)
        small(c[:3], Batch.build([3], [0], [2]), cache_again)
        mixed = small(torch.cat([b, a[5:], c[3:]]), Batch.build([9, 1, 1], [0, 5, 3], [1, 0, 2]), cache_again)
    assert bitwise_equal(mixed[9:10], alone)


def test_generate_greedy_is_prefill_chunk_independent(small: Qwen3Model) -> None:
    prompt = list(range(3, 20))
    whole = generate(small, prompt, 8)
    assert whole == generate(small, prompt, 8, prefill_chunk=4)
    assert len(whole) == 8 and all(0 <= t < SMALL.vocab_size for t in whole)
    a = generate(small, prompt, 8, temperature=1.0, top_k=20, seed=5)
    assert a == generate(small, prompt, 8, temperature=1.0, top_k=20, seed=5)


def test_bad_inputs(small: Qwen3Model) -> None:
    with pytest.raises(ModelError, match="exceeds the model's context"):
        generate(small, list(range(60)), 10)
    with pytest.raises(ModelError, match="empty"):
        generate(small, [], 5)
    with pytest.raises(ModelError, match="outside 0..511"):
        generate(small, [600], 5)
    cache = small.allocate_cache(1, 8)
    with pytest.raises(ModelError, match="cache holds 8"):
        small(torch.arange(10), Batch.build([10], [0], [0]), cache)
    with pytest.raises(ModelError, match="1-D integer"):
        small(torch.zeros(3), Batch.build([3], [0], [0]), cache)
    with pytest.raises(ModelError, match="exceeds the model's context"):
        small.allocate_cache(1, 65)
    with pytest.raises(ModelError, match="once per batch"):
        Batch.build([1, 1], [0, 0], [0, 0])
    with pytest.raises(ModelError, match="longer than the context"):
        small.forward_dense(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="kernels mode"):
        with use_kernels("fast"):  # type: ignore[arg-type]
            pass


def test_save_load_and_bad_files(tmp_path, small: Qwen3Model) -> None:
    tok = train_bpe("to be or not to be " * 30, SMALL.vocab_size)
    save_model(small, tmp_path, dtype=torch.float32, metadata={"tokenizer_fingerprint": tok.fingerprint()})
    back = load_model(tmp_path, tokenizer=tok)
    ids = torch.arange(10)
    assert bitwise_equal(back.forward_dense(ids[None]), small.forward_dense(ids[None]))

    with pytest.raises(ModelError, match="tokenizer mismatch: the model was trained with"):
        load_model(tmp_path, tokenizer=train_bpe("something else entirely " * 30, SMALL.vocab_size))
    with pytest.raises(ModelError, match="tokenizer mismatch: the tokenizer has 4096"):
        load_model(tmp_path, tokenizer=load_tokenizer())

    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "n_experts": 8}))
    with pytest.raises(ModelError, match=re.escape("unknown field(s) ['n_experts']")):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    with pytest.raises(ModelError, match="weights do not match|shape"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))

    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="corrupt"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="weights file not found"):
        load_model(tmp_path)
    shutil.rmtree(tmp_path)
    with pytest.raises(ModelError, match="config file not found"):
        load_model(tmp_path)


@pytest.mark.skipif(not (default_model_dir() / "model.safetensors").is_file(), reason="data/model not trained yet")
def test_shipped_model_writes_text() -> None:
    tok = load_tokenizer()
    model = load_model(tokenizer=tok)
    prompt = "Ham.\nTo be, or not to be,"
    text = tok.decode(generate(model, tok.encode(prompt), 60))
    words = re.findall(r"[A-Za-z']+", text)
    corpus = (default_model_dir().parent / "corpus" / "shakespeare_plays.txt").read_text()
    known = set(re.findall(r"[A-Za-z']+", corpus))
    assert len(words) >= 20, f"too few words in {text!r}"
    share = sum(w in known for w in words) / len(words)
    assert share > 0.9, f"only {share:.0%} of the generated words are English words of the plays: {text!r}"
