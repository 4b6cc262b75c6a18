"""detlib's GPU kernels compile for Hopper (sm_90) with the configurations the course ships, checked on
the CPU-only CI machine (``tests/sm90_compile.py`` says how and what it cannot see)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sm90_compile.py")


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90() -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=1200)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}): {proc.stderr[-3000:]}"
    summary = json.loads(lines[-1])
    assert not summary["failed"], "\n".join(summary["failed"]) + "\n" + proc.stderr[-3000:]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary["launches"].get("_attn_kernel", 0) >= 20 and summary["launches"].get("_merge_kernel", 0) > 0
