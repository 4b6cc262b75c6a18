"""Training: a few steps of the tiny config lower the loss, write every artefact, and are reproducible."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from detlib import bitwise_equal
from detlib.model import load_model
from detlib.tokenizer import load_tokenizer
from detlib.train import lr_at, preset, train


def _quick(steps: int):
    cfg = preset("tiny", load_tokenizer().vocab_size)
    return replace(cfg, steps=steps, eval_every=steps, eval_windows=8, corpus_chars=60_000, warmup_steps=5)


def test_tiny_training_lowers_loss_and_writes_artefacts(tmp_path) -> None:
    summary = train(_quick(30), tmp_path, torch.device("cpu"), log_every=0, save_dtype=torch.float32,
                    config_name="tiny", sample_tokens=16)
    first, last = summary["history"][0], summary["history"][-1]
    assert last["val_loss"] < first["val_loss"] - 1.0, summary["history"]
    assert summary["best"]["step"] == 30
    for name in ("model.safetensors", "config.json", "train_log.json", "samples.txt", "MODEL_CARD.md"):
        assert (tmp_path / name).is_file(), name
    assert json.loads((tmp_path / "train_log.json").read_text())["steps_run"] == 30
    card = (tmp_path / "MODEL_CARD.md").read_text()
    assert f"{last['val_loss']:.4f}" in card and "python -m detlib.train --config tiny" in card
    model = load_model(tmp_path, tokenizer=load_tokenizer())  # fingerprint recorded and checked
    assert model.cfg.n_layers == 2


def test_training_is_reproducible_on_cpu(tmp_path) -> None:
    for run in ("a", "b"):
        train(_quick(4), tmp_path / run, torch.device("cpu"), log_every=0, save_dtype=torch.float32, sample_tokens=2)
    a, b = load_model(tmp_path / "a"), load_model(tmp_path / "b")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert bitwise_equal(pa, pb), name


def test_schedule_and_presets() -> None:
    cfg = preset("shipped", 4096)
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / cfg.warmup_steps)
    assert lr_at(cfg.warmup_steps, cfg) == pytest.approx(cfg.lr)
    assert lr_at(cfg.steps, cfg) == pytest.approx(cfg.min_lr)
    assert cfg.model.n_params() * 2 < 16 * 2**20, "shipped weights must fit 16 MiB in bf16"
    with pytest.raises(ValueError, match="unknown config"):
        preset("huge", 4096)
