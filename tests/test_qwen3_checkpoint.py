"""detlib's Qwen3 against the reference implementation in Hugging Face ``transformers`` (a test-only dependency).

A small, randomly initialised Qwen3 is built and saved by ``transformers``; :func:`detlib.checkpoint.load_qwen3`
loads the directory; the logits must match in fp32 within 1e-4 absolute (observed: ~1e-6; the two
implementations differ only in the order of a few fp32 operations), for a whole-prompt prefill and
for decode steps that go through each side's KV cache.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from detlib.checkpoint import config_from_hf, load_qwen3
from detlib.model import Batch, ModelError
from detlib.tokenizer import load_tokenizer

transformers = pytest.importorskip("transformers")

ATOL = 1e-4
# transformers 5.2x renamed ``past_key_values`` to ``cache`` (argument and output field)
CACHE = "cache" if "cache" in inspect.signature(transformers.Qwen3ForCausalLM.forward).parameters else "past_key_values"


def _build(tmp_path, *, tie: bool, bias: bool, seed: int = 0):
    cfg = transformers.Qwen3Config(
        vocab_size=4096, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=tie,
        attention_bias=bias, rope_theta=1_000_000.0, rms_norm_eps=1e-6)
    torch.manual_seed(seed)
    ref = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights and biases too, so that a forgotten one shows
        for name, p in ref.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    load_tokenizer().save(tmp_path / "tokenizer.json")
    return ref


@pytest.mark.parametrize("tie, bias", [(True, False), (False, True)])
def test_prefill_and_decode_match_transformers(tmp_path, tie: bool, bias: bool) -> None:
    ref = _build(tmp_path, tie=tie, bias=bias)
    model, tok = load_qwen3(tmp_path)
    assert tok is not None and model.cfg.tie_embeddings == tie and model.cfg.attention_bias == bias
    assert model.cfg.rope_theta == 1_000_000.0

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 4096, (24,), generator=gen)
    n_prompt = 16
    with torch.no_grad():
        want = ref(ids[None]).logits[0]
        cache = model.allocate_cache(1, 24)
        got = model(ids, Batch.build([24], [0], [0]), cache)
        assert (got - want).abs().max() < ATOL, "prefill logits differ from transformers"

        # prefill the prompt, then decode one token at a time through both KV caches
        out = ref(ids[None, :n_prompt], use_cache=True)
        past = out[CACHE]
        cache = model.allocate_cache(1, 24)
        got = model(ids[:n_prompt], Batch.build([n_prompt], [0], [0]), cache)
        assert (got - out.logits[0]).abs().max() < ATOL
        for pos in range(n_prompt, 24):
            out = ref(ids[None, pos:pos + 1], use_cache=True, **{CACHE: past})
            past = out[CACHE]
            got = model(ids[pos:pos + 1], Batch.build([1], [pos], [0]), cache)
            assert (got[0] - out.logits[0, -1]).abs().max() < ATOL, f"decode at position {pos} differs"


def test_packed_batch_matches_transformers_per_sequence(tmp_path) -> None:
    """Two sequences of different lengths in one packed forward (a prefill beside a decode step)."""
    ref = _build(tmp_path, tie=True, bias=False, seed=3)
    model, _ = load_qwen3(tmp_path)
    a = torch.randint(0, 4096, (11,))
    b = torch.randint(0, 4096, (6,))
    with torch.no_grad():
        cache = model.allocate_cache(2, 16)
        model(b[:5], Batch.build([5], [0], [1]), cache)  # sequence b already holds 5 tokens in slot 1
        got = model(torch.cat([a, b[5:]]), Batch.build([11, 1], [0, 5], [0, 1]), cache)
        assert (got[:11] - ref(a[None]).logits[0]).abs().max() < ATOL
        assert (got[11] - ref(b[None]).logits[0, -1]).abs().max() < ATOL


def _write_config(tmp_path, **changes) -> None:
    path = tmp_path / "config.json"
    d = json.loads(path.read_text())
    d.update(changes)
    path.write_text(json.dumps(d))


def test_bad_checkpoints(tmp_path) -> None:
    _build(tmp_path, tie=True, bias=False)
    good = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"use_sliding_window": True}, "sliding-window"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, "RoPE type"),
        ({"some_new_field": 1}, "unknown field"),
        ({"model_type": "llama"}, "not qwen3"),
    ]:
        with pytest.raises(ModelError, match=message):
            config_from_hf({**good, **change})
    _write_config(tmp_path, vocab_size=100)  # tokenizer has 4096 tokens: a mismatch
    with pytest.raises(ModelError, match="weights do not match|shape"):
        load_qwen3(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(good))
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelError, match="corrupt"):
        load_qwen3(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no \\*.safetensors"):
        load_qwen3(tmp_path)
    with pytest.raises(ModelError, match="not found"):
        load_qwen3(tmp_path / "missing")


def test_real_qwen3_config_fields_are_accepted() -> None:
    """The config.json of Qwen/Qwen3-0.6B as published (transformers 4.51 format)."""
    cfg = config_from_hf({
        "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
        "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
        "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
        "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
        "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936})
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rope_theta) == (28, 16, 8, 128, 1e6)
    assert 590e6 < cfg.n_params() < 600e6  # Qwen3-0.6B: 596M parameters with the tied head
