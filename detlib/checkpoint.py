"""Load a Hugging Face Qwen3 checkpoint (e.g. Qwen3-0.6B) from a local directory into detlib's model.

A checkpoint directory holds ``config.json``, one or more ``*.safetensors`` files (with
``model.safetensors.index.json`` when sharded) and ``tokenizer.json``. Nothing is downloaded: learners
who have a checkpoint point :func:`load_qwen3` at it. The parameter names are Hugging Face's with the
``model.`` prefix dropped, so the mapping is one line.

``config.json`` fields fall in three groups: those that shape the model (mapped to :class:`ModelConfig`),
those that must hold the value detlib implements (``hidden_act: silu``, no sliding window, default
RoPE), and those that do not change inference (token ids, dtype, versions). A field in none of the
groups is an error: a newer Qwen3 variant could change the math, and a silent mismatch would produce
wrong logits that look plausible.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from detlib.model import ModelConfig, ModelError, Qwen3Model, load_state, read_config, read_safetensors
from detlib.tokenizer import Tokenizer

#: Hugging Face config fields that do not change a forward pass.
IGNORED_FIELDS = frozenset({
    "architectures", "attention_dropout", "bos_token_id", "eos_token_id", "pad_token_id", "dtype", "torch_dtype",
    "initializer_range", "max_window_layers", "transformers_version", "use_cache", "sliding_window",
    "model_type", "use_sliding_window", "layer_types", "rope_scaling", "rope_parameters", "hidden_act",
    "output_attentions", "output_hidden_states", "return_dict", "tie_word_embeddings", "_name_or_path",
})
#: Fields that map onto :class:`ModelConfig`.
MAPPED_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "intermediate_size": "intermediate_size", "max_position_embeddings": "max_seq_len",
    "rms_norm_eps": "rms_norm_eps", "rope_theta": "rope_theta", "attention_bias": "attention_bias",
}


def config_from_hf(d: dict, where: str = "config.json") -> ModelConfig:
    """Map a Hugging Face Qwen3 ``config.json`` to :class:`ModelConfig`, refusing what detlib does not implement."""
    unknown = sorted(set(d) - IGNORED_FIELDS - set(MAPPED_FIELDS))
    if unknown:
        raise ModelError(f"{where}: unknown field(s) {unknown}. detlib implements Qwen3 as in transformers 5.x; "
                         "if such a field does not change the model's arithmetic, add it to "
                         "detlib.checkpoint.IGNORED_FIELDS")
    if d.get("model_type", "qwen3") != "qwen3":
        raise ModelError(f"{where}: model_type {d.get('model_type')!r} is not qwen3")
    if d.get("hidden_act", "silu") != "silu":
        raise ModelError(f"{where}: hidden_act {d['hidden_act']!r} is not supported (Qwen3 uses silu)")
    if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or []):
        raise ModelError(f"{where}: sliding-window attention is not supported")
    rope = dict(d.get("rope_parameters") or {})
    if d.get("rope_scaling"):
        rope.update(d["rope_scaling"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelError(f"{where}: RoPE type {rope_type!r} is not supported (only the default)")
    fields = {ours: d[theirs] for theirs, ours in MAPPED_FIELDS.items() if theirs in d}
    if "rope_theta" in rope:
        fields["rope_theta"] = rope["rope_theta"]
    fields.setdefault("head_dim", d["hidden_size"] // d["num_attention_heads"] if "hidden_size" in d and
                      "num_attention_heads" in d else None)
    fields.setdefault("n_kv_heads", fields.get("n_heads"))
    fields["tie_embeddings"] = bool(d.get("tie_word_embeddings", False))
    fields["rope_theta"] = float(fields.get("rope_theta", 10000.0))
    fields["rms_norm_eps"] = float(fields.get("rms_norm_eps", 1e-6))
    return ModelConfig.from_dict(fields, where)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ModelError(f"{index} is not a safetensors index (needs a weight_map): {err}") from err
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelError(f"no *.safetensors weights in {directory}")
    return files


def load_qwen3(directory: str | Path, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
               load_tokenizer: bool = True) -> tuple[Qwen3Model, Tokenizer | None]:
    """The model (in ``dtype`` on ``device``, eval mode) and, if present, the tokenizer of a Qwen3 checkpoint."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"checkpoint directory not found: {directory}")
    cfg = config_from_hf(read_config(directory / "config.json"), str(directory / "config.json"))
    tensors: dict[str, torch.Tensor] = {}
    for path in _weight_files(directory):
        for name, t in read_safetensors(path)[0].items():
            tensors[name.removeprefix("model.")] = t
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports store the tied head as well
    model = Qwen3Model(cfg)
    load_state(model, tensors, str(directory))
    tokenizer = None
    if load_tokenizer and (directory / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json")
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ModelError(f"tokenizer mismatch: tokenizer.json has {tokenizer.vocab_size} tokens, the model "
                             f"embeds {cfg.vocab_size}")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
