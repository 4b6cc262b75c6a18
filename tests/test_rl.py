"""Sampler vs trainer (lab 09): under invariant kernels the engine's log-probs, sampled amid traffic, and
the trainer's teacher-forced recompute are bitwise equal for every token, so every importance ratio is
exactly 1.0 and the KL exactly 0, at every step of an RL run; under default kernels they are not."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from detlib import bitwise_equal, rl
from detlib.bench.__main__ import main as bench_main
from detlib.kernels import use_kernels


@pytest.mark.slow
def test_sampler_and_trainer_logprobs_bitwise_equal_invariant_not_default() -> None:
    model, task = rl.tiny_policy(3), rl.tiny_task(3)
    cfg = rl.SamplerConfig(group_size=4, new_tokens=6, traffic=4, arrival_window=6)
    prompts = list(task.prompts) + [(4, 11, 19, 30, 2)]  # prompts of different lengths: a padded trainer batch
    results = {}
    for mode in ("invariant", "default"):
        rollouts = rl.sample_rollouts(model, prompts, cfg, mode, traffic_pool=task.traffic_pool, seed=7)
        assert len(rollouts) == 12 and all(len(r.tokens) == 6 for r in rollouts)
        with use_kernels(mode), torch.no_grad():
            trainer = rl.trainer_logprobs(model, [r.prompt for r in rollouts], [r.tokens for r in rollouts])
        results[mode] = [bitwise_equal(t, r.sampler_logprobs) for t, r in zip(trainer, rollouts)]
        mismatch = rl.compare_logprobs([r.sampler_logprobs for r in rollouts], trainer)
        if mode == "invariant":
            assert all(results[mode]), f"sequences whose trainer log-probs differ: {results[mode]}"
            for i in (0, 5, 11):  # the trainer's batch does not matter either: each sequence alone, unpadded
                with use_kernels(mode), torch.no_grad():
                    (alone,) = rl.trainer_logprobs(model, [rollouts[i].prompt], [rollouts[i].tokens])
                assert bitwise_equal(alone, trainer[i])
            assert mismatch.n_different == 0 and mismatch.kl == 0.0
            assert mismatch.ratio_min == mismatch.ratio_max == 1.0
        else:
            assert not all(results[mode]), "default kernels gave bitwise equal log-probs for all 72 tokens"
            assert mismatch.n_different > 0 and mismatch.kl > 0.0 and mismatch.ratio_min < 1.0 < mismatch.ratio_max
            assert mismatch.max_abs_diff < 1e-4, "fp32 rounding differences, not a wrong position or token"


@pytest.mark.slow
def test_rl_loop_kl_exactly_zero_every_step_with_invariant_kernels() -> None:
    task = rl.tiny_task(0)
    small = rl.SamplerConfig(group_size=2, new_tokens=5, traffic=2, arrival_window=4)
    cfg = rl.RLConfig(steps=2, lr=3e-2, sampler=small)
    history = rl.run_rl({m: rl.tiny_policy(0) for m in ("invariant", "default")}, task, cfg, progress=False)
    for rec in history["invariant"]:
        assert rec.kl == 0.0 and rec.ratio_min == 1.0 and rec.ratio_max == 1.0 and rec.n_different == 0, rec
    assert any(rec.kl > 0.0 and rec.n_different > 0 for rec in history["default"]), history["default"]
    assert all(0.0 <= rec.reward <= 1.0 for recs in history.values() for rec in recs)
    assert "invariant" in rl.summary_table(history)


@pytest.mark.slow
def test_rl_loop_learns_and_is_reproducible_on_cpu() -> None:
    """Default kernels (fast): the reward rises, and two runs give the same records (the update is
    deterministic run to run on the CPU)."""
    cfg = rl.RLConfig(steps=5, lr=3e-2, correction="tis")
    runs = [rl.run_rl({"default": rl.tiny_policy(1)}, rl.tiny_task(1), cfg, progress=False)["default"]
            for _ in range(2)]
    strip = [[dataclasses.replace(r, seconds=0.0) for r in run] for run in runs]
    assert strip[0] == strip[1]
    assert runs[0][-1].reward > runs[0][0].reward + 0.2, [r.reward for r in runs[0]]


def test_ratios_kl_and_advantages() -> None:
    s = torch.tensor([-1.0, -2.0, -0.5])
    t = torch.tensor([-1.0, -1.0, -0.5 - 1e-7])
    r = rl.importance_ratios(s, t)
    assert r.dtype == torch.float32 and r[0] == 1.0 and abs(float(r[1]) - 2.718281828) < 1e-6
    assert float(rl.importance_ratios(s, t, cap=2.0)[1]) == 2.0
    assert rl.kl_estimate(s, s.clone()) == 0.0
    d = torch.tensor([0.0, 1.0, -1e-7], dtype=torch.float64)  # the float32 differences, exactly
    want = float(((d.exp() - 1) - d).mean())
    assert rl.kl_estimate(s, t) == pytest.approx(want, rel=1e-9) and rl.kl_estimate(s, t) > 0
    assert rl.group_advantages([1.0, 0.0, 0.5, 0.5], [0, 0, 1, 1]) == [0.5, -0.5, 0.0, 0.0]
    reward = rl.target_fraction_reward([1, 2])
    assert reward([1, 2, 3, 4]) == 0.5 and reward([]) == 0.0


def test_bad_inputs() -> None:
    model, task = rl.tiny_policy(0), rl.tiny_task(0)
    with pytest.raises(ValueError, match="differ in shape"):
        rl.importance_ratios(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty sample"):
        rl.kl_estimate(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="one completion per prompt"):
        rl.trainer_logprobs(model, [(1, 2)], [[3], [4]])
    with pytest.raises(ValueError, match="outside 0..31"):
        rl.trainer_logprobs(model, [(1, 40)], [[3]])
    with pytest.raises(ValueError, match="prompt is empty"):
        rl.sample_rollouts(model, [()], rl.SamplerConfig(), "default", traffic_pool=task.traffic_pool, seed=0)
    with pytest.raises(ValueError, match="too short"):
        rl.sample_rollouts(model, task.prompts, rl.SamplerConfig(), "default", traffic_pool=[1, 2], seed=0)
    with pytest.raises(ValueError, match="positive temperature"):
        rl.SamplerConfig(temperature=0.0)
    with pytest.raises(ValueError, match="correction"):
        rl.RLConfig(correction="clip")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kernel modes"):
        rl.run_rl({"fast": model}, task, rl.RLConfig(steps=1), progress=False)  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="at least one target"):
        rl.target_fraction_reward([])


@pytest.mark.slow
def test_bench_tiny_runs_and_prints_a_table(capsys) -> None:
    assert bench_main(["rl", "--tiny", "--steps", "1", "--group-size", "2", "--new-tokens", "4", "--traffic", "2"]) == 0
    out = capsys.readouterr().out
    assert "invariant before training: 0/" in out and "KL 0," in out
    assert "kernels steps" in out and "invariant     1" in out
    with pytest.raises(SystemExit, match="drop --tiny"):
        bench_main(["rl", "--tiny", "--record"])
