"""Backend choice: interpreter without a GPU, forced modes, and the environment report."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import detlib
from detlib import backend

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DETLIB_BACKEND")}
    full_env.update(env)
    full_env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120)


def test_auto_mode_matches_the_machine() -> None:
    expected = "gpu" if torch.cuda.is_available() else "interpreter"
    assert backend.BACKEND == expected
    assert os.environ["TRITON_INTERPRET"] == ("1" if expected == "interpreter" else "0")
    assert detlib.device().type == ("cuda" if expected == "gpu" else "cpu")
    assert detlib.compute_dtype() == (torch.bfloat16 if expected == "gpu" else torch.float32)


def test_interpreter_is_set_before_triton_loads() -> None:
    out = _run("import detlib, os, triton; print(os.environ['TRITON_INTERPRET'], detlib.is_interpreter())",
               DETLIB_BACKEND="interpreter")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True"]


def test_forcing_gpu_without_one_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = _run("import detlib", DETLIB_BACKEND="gpu")
    assert out.returncode != 0
    assert "DETLIB_BACKEND=gpu but torch sees no CUDA GPU" in out.stderr


def test_unknown_backend_is_rejected() -> None:
    out = _run("import detlib", DETLIB_BACKEND="tpu")
    assert out.returncode != 0
    assert "DETLIB_BACKEND='tpu'" in out.stderr


def test_importing_triton_first_warns() -> None:
    if torch.cuda.is_available():
        pytest.skip("on a GPU machine the default mode matches triton's own default")
    out = _run("import warnings; warnings.simplefilter('always'); import triton; import detlib")
    assert out.returncode == 0, out.stderr
    assert "triton was imported before detlib" in out.stderr


def test_environment_report_names_device_and_versions() -> None:
    env = detlib.environment()
    text = str(env)
    for field in ("backend", "device", "torch_version", "triton_version", "triton_interpret"):
        assert field in text
    assert env.torch_version == torch.__version__
    assert env.triton_interpret == detlib.is_interpreter()


def test_a_kernel_runs_on_this_backend() -> None:
    import triton
    import triton.language as tl

    @triton.jit
    def double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)

    x = torch.randn(1000, device=detlib.device())
    y = torch.empty_like(x)
    double[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
    assert detlib.bitwise_equal(y, x * 2)
