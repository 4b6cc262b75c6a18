"""Tests of ``python -m detlib.bench labtimes``: a notebook that fails or kills its kernel is a result, not a crash."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from detlib.bench import labtimes


def _notebook(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / name
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.mark.notebook
def test_a_dead_kernel_and_a_failing_cell_are_reported(tmp_path: Path) -> None:
    seconds, error = labtimes.time_notebook(_notebook(tmp_path, "ok.ipynb", "x = 1 + 1"), timeout=60)
    assert error is None and seconds > 0
    _, error = labtimes.time_notebook(_notebook(tmp_path, "fails.ipynb", "raise ValueError('boom')"), timeout=60)
    assert error is not None and "boom" in error
    deep = _notebook(tmp_path, "raises_in_a_library.ipynb", "import json\njson.loads(None)")
    _, error = labtimes.time_notebook(deep, timeout=60)
    assert error is not None and error.startswith("TypeError") and "json/__init__.py" in error, error
    _, error = labtimes.time_notebook(_notebook(tmp_path, "dies.ipynb", "import os\nos._exit(1)"), timeout=60)
    assert error is not None and "Dead" in error, error


def test_a_cell_error_names_the_frame_it_came_from() -> None:
    traceback = ("\x1b[31m---------\x1b[39m\nAssertionError                Traceback (most recent call last)\n"
                 "Cell \x1b[32mIn[3], line 2\x1b[39m\n----> 2 f()\n"
                 "File \x1b[32m/opt/site/triton/runtime/jit.py:712, in JITFunction.run\x1b[39m"
                 "\x1b[34m(self, grid)\x1b[39m\n"
                 "--> 712 assert grid is not None\n\x1b[31mAssertionError\x1b[39m: ")
    assert labtimes.cell_error("AssertionError", "", traceback) == (
        "AssertionError: (File /opt/site/triton/runtime/jit.py:712, in JITFunction.run)")
    assert labtimes.cell_error("ValueError", "boom", "Cell In[1], line 1\n") == "ValueError: boom (Cell In[1], line 1)"
    assert labtimes.cell_error("ValueError", "boom", "") == "ValueError: boom"


def test_recorded_rows_of_notebooks_not_run_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    old = {"environment": {"device_name": "GPU A"},
           "results": [{"notebook": "00.ipynb", "seconds": 1.0, "error": None},
                       {"notebook": "01.ipynb", "seconds": 2.0, "error": None}]}
    monkeypatch.setattr(labtimes, "load", lambda name, subdir: old)

    class Env:
        device_name = "GPU A"

    monkeypatch.setattr(labtimes, "environment", lambda: Env())
    rows = [{"notebook": "01.ipynb", "seconds": 5.0, "error": None},
            {"notebook": "02.ipynb", "seconds": 3.0, "error": None}]
    merged = labtimes.merged_with_record(rows, "gpu")
    assert [(r["notebook"], r["seconds"]) for r in merged] == [("00.ipynb", 1.0), ("01.ipynb", 5.0), ("02.ipynb", 3.0)]
    Env.device_name = "GPU B"  # another device: its old times do not mix with these
    assert labtimes.merged_with_record(rows, "gpu") == rows
