"""The autograder against hostile notebooks: every way a learner's code can go wrong gets a clear verdict.

The notebooks are planted in a temporary folder and graded against a test-only lab "99"
(``tests/fixtures/grader/planted_checks.py``: ``double(x) -> 2 * x``), which the grader's children
import through ``DETLIB_GRADE_EXTRA_CHECKS``.  To keep the file fast, all hostile cases are graded in
one batch run (one learner folder per case, children in parallel) and each test reads its own row.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from detlib.grade.__main__ import main as grade_main
from detlib.grade.notebook import defined_names, lab_of, read_notebook, strip_magics

ROOT = Path(__file__).resolve().parents[1]
PLANTED = "tests.fixtures.grader.planted_checks"
SETUP = "import torch\n%matplotlib inline\n"
REF = "tests.fixtures.grader.planted_checks"

#: learner folder -> the code of the exercise cell defining ``double`` (``None``: see ``_special``)
CASES: dict[str, str | None] = {
    "pass": "!echo shell lines are skipped\ndef double(x):\n    return x * 2\n",
    "not_attempted": "def double(x):\n    # HINT: multiply\n    raise NotImplementedError('write it')\n",
    "exception": "def double(x):\n    y = x * 2\n    return y.no_such_method()\n",
    "wrong": "def double(x):\n    return x * 3\n",
    "shape": "def double(x):\n    return (x * 2).T\n",
    "dtype": "def double(x):\n    return (x * 2).double()\n",
    "nan": "def double(x):\n    return torch.full_like(x, float('nan'))\n",
    "loop": (
        "import subprocess, pathlib\n"
        "def double(x):\n"
        "    child = subprocess.Popen(['sleep', '300'])\n"
        "    pathlib.Path('grandchild.pid').write_text(str(child.pid))\n"
        "    while True:\n"
        "        pass\n"
    ),
    "loop_swallowing": "def double(x):\n    while True:\n        try:\n            while True:\n                pass\n"
                       "        except BaseException:\n            pass\n",
    "mutate": "def double(x):\n    x.mul_(2)\n    return x\n",
    "flood": "def double(x):\n    print('spam ' * 2_000_000)\n    return x * 2\n",
    "forbidden_direct": f"import {REF}\ndef double(x):\n    return {REF}.reference_double(x)\n",
    "forbidden_alias": f"from {REF} import reference_double as twice\ndef double(x):\n    return twice(x)\n",
    "forbidden_caught": (
        f"from {REF} import reference_double as twice\n"
        "def double(x):\n    try:\n        return twice(x)\n    except Exception:\n        return x * 2\n"
    ),
    "sys_exit": "import sys\ndef double(x):\n    sys.exit(3)\n",
    "os_exit": "import os\ndef double(x):\n    os._exit(7)\n",
    "syntax": "def double(x)\n    return x * 2\n",
    "missing": "def doubel(x):\n    return x * 2\n",
    "triton": (
        "import triton\nimport triton.language as tl\n\n"
        "@triton.jit\ndef double_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):\n"
        "    offs = tl.arange(0, BLOCK)\n    mask = offs < n\n"
        "    tl.store(out_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 2, mask=mask)\n\n"
        "def double(x):\n    out = torch.empty_like(x)\n"
        "    double_kernel[(1,)](x, out, x.numel(), BLOCK=256)\n    return out\n"
    ),
    "untagged": None,
    "setup_error": None,
    "invalid_json": None,
    "no_notebook": None,
}


def _notebook(exercise_code: str, *, setup: str = SETUP, tag: str = "exercise") -> nbformat.NotebookNode:
    return new_notebook(cells=[
        new_markdown_cell("# Lab 99: doubling"),
        new_code_cell(setup, metadata={"tags": ["setup"]}),
        new_code_cell(exercise_code, metadata={"tags": [tag]} if tag else {}),
        new_code_cell('check("99.double", double)'),
    ])


def _plant(folder: Path, name: str) -> None:
    """Write learner ``name``'s submission into ``folder/name``."""
    learner = folder / name
    learner.mkdir(parents=True)
    path = learner / "99_doubling.ipynb"
    if name == "untagged":
        nbformat.write(_notebook("def double(x):\n    return x * 2\n", tag=""), path)
    elif name == "setup_error":
        nbformat.write(_notebook(CASES["pass"] or "", setup="import torch\n1 / 0\n"), path)
    elif name == "invalid_json":
        path.write_text('{"cells": [', encoding="utf-8")
    elif name != "no_notebook":
        nbformat.write(_notebook(CASES[name] or ""), path)


def _env() -> dict[str, str]:
    # No PYTHONPATH on purpose: the CLI runs from the repository root, and the runner must make detlib (and
    # with it this repository's tests package) importable in children that run in the notebook's folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "DETLIB_GRADE_EXTRA_CHECKS": PLANTED}


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "detlib.grade", *map(str, args)], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Grade every case in one batch run; the rows of the CSV, the JSON, stdout and the folder."""
    root = tmp_path_factory.mktemp("submissions")
    for name in CASES:
        _plant(root, name)
    out_csv, out_json = root.parent / "grades.csv", root.parent / "results.json"
    proc = _cli(root, "--batch", "--csv", out_csv, "--json", out_json, "--jobs", "2", "--timeout-scale", "0.25")
    assert proc.returncode == 0, proc.stderr
    with out_csv.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {"rows": {r["learner"]: r for r in rows}, "all_rows": rows, "stdout": proc.stdout,
            "json": json.loads(out_json.read_text(encoding="utf-8")), "root": root}


def _row(batch: dict[str, object], learner: str) -> dict[str, str]:
    return batch["rows"][learner]  # type: ignore[index]


def test_pass_gets_full_points(batch: dict[str, object]) -> None:
    row = _row(batch, "pass")
    assert (row["status"], row["points"], row["max_points"], row["exercise"], row["lab"]) == ("passed", "2", "2",
                                                                                              "double", "99")


def test_not_attempted(batch: dict[str, object]) -> None:
    row = _row(batch, "not_attempted")
    assert row["status"] == "not attempted" and row["points"] == "0"


def test_exception_names_type_and_line(batch: dict[str, object]) -> None:
    row = _row(batch, "exception")
    assert row["status"] == "error"
    assert "AttributeError" in row["reason"] and "no_such_method" in row["reason"]
    assert "line 3 of double" in row["reason"]


def test_wrong_answer_says_which_input(batch: dict[str, object]) -> None:
    row = _row(batch, "wrong")
    assert row["status"] == "failed"
    assert "double(randn(1, 3)) is not bitwise equal" in row["reason"]


def test_wrong_shape(batch: dict[str, object]) -> None:
    row = _row(batch, "shape")
    assert row["status"] == "failed" and "has shape (3, 1), expected (1, 3)" in row["reason"]


def test_wrong_dtype(batch: dict[str, object]) -> None:
    row = _row(batch, "dtype")
    assert row["status"] == "failed" and "dtype torch.float64, expected torch.float32" in row["reason"]


def test_nan(batch: dict[str, object]) -> None:
    row = _row(batch, "nan")
    assert row["status"] == "failed" and "NaN" in row["reason"]


def test_infinite_loop_times_out_and_kills_the_group(batch: dict[str, object]) -> None:
    row = _row(batch, "loop")
    assert row["status"] == "timeout"
    assert re.fullmatch(r"took longer than 5 s — an infinite loop\? \(it was running line [56] of double\)",
                        row["reason"]), row["reason"]
    pid = int((batch["root"] / "loop" / "grandchild.pid").read_text())  # type: ignore[operator]
    stat = Path(f"/proc/{pid}/stat")
    assert not stat.exists() or stat.read_text().split(")")[-1].split()[0] == "Z", "the learner's sleep survived"


def test_loop_that_swallows_the_interrupt_is_killed(batch: dict[str, object]) -> None:
    row = _row(batch, "loop_swallowing")
    assert row["status"] == "timeout" and row["reason"] == "took longer than 5 s — an infinite loop?"


def test_mutated_input(batch: dict[str, object]) -> None:
    row = _row(batch, "mutate")
    assert row["status"] == "failed" and "changed its input (argument 0) in place" in row["reason"]


def test_output_flood_is_noted_not_kept(batch: dict[str, object]) -> None:
    assert _row(batch, "flood")["status"] == "passed"
    result = batch["json"]["learners"]["flood"]  # type: ignore[index]
    assert "printed 30.0 MB of output (truncated)" in result["tests"][0]["output"]
    assert len(batch["stdout"]) < 100_000  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["forbidden_direct", "forbidden_alias", "forbidden_caught"])
def test_forbidden_reference_call(batch: dict[str, object], case: str) -> None:
    row = _row(batch, case)
    assert row["status"] == "forbidden call" and "reference_double" in row["reason"]


def test_sys_exit(batch: dict[str, object]) -> None:
    row = _row(batch, "sys_exit")
    assert row["status"] == "error" and "sys.exit(3)" in row["reason"]


def test_os_exit_is_a_crash_before_reporting(batch: dict[str, object]) -> None:
    row = _row(batch, "os_exit")
    assert row["status"] == "error" and "the process exited with code 7 before reporting" in row["reason"]


def test_syntax_error_names_the_cell(batch: dict[str, object]) -> None:
    row = _row(batch, "syntax")
    assert row["status"] == "error"
    assert row["reason"].startswith("cell 3 (`def double(x)`) has a syntax error") and "line 1" in row["reason"]


def test_missing_definition(batch: dict[str, object]) -> None:
    row = _row(batch, "missing")
    assert row["status"] == "missing" and "no cell tagged `exercise` defines `double`" in row["reason"]


def test_definition_in_untagged_cell(batch: dict[str, object]) -> None:
    row = _row(batch, "untagged")
    assert row["status"] == "missing" and "cell 3" in row["reason"] and "not tagged `exercise`" in row["reason"]


def test_setup_cell_error_names_the_cell(batch: dict[str, object]) -> None:
    row = _row(batch, "setup_error")
    assert row["status"] == "error" and row["reason"].startswith("cell 2 (`import torch`) raised ZeroDivisionError")


def test_triton_kernel_in_an_exercise_cell(batch: dict[str, object]) -> None:
    assert _row(batch, "triton")["status"] == "passed"  # @triton.jit needs the cell in a real file


def test_invalid_json_is_an_error_for_that_notebook(batch: dict[str, object]) -> None:
    row = _row(batch, "invalid_json")
    assert row["status"] == "error" and "not valid JSON" in row["reason"]


def test_batch_csv_and_summary(batch: dict[str, object]) -> None:
    rows = batch["all_rows"]
    assert sorted(r["learner"] for r in rows) == sorted(CASES)  # type: ignore[union-attr]
    missing = _row(batch, "no_notebook")
    assert missing["status"] == "missing" and "no notebook of lab 99" in missing["reason"]
    summary = batch["stdout"].split("learner ", 1)[1]  # type: ignore[union-attr]
    for name in CASES:
        assert f"\n{name} " in summary
    assert "\npass " in summary and "2/2" in summary.split("\npass ")[1].splitlines()[0]


def test_single_mode_json_shape(tmp_path: Path) -> None:
    nbformat.write(_notebook(CASES["pass"] or ""), tmp_path / "99_good.ipynb")
    (tmp_path / "99_broken.ipynb").write_text("not json", encoding="utf-8")
    nbformat.write(_notebook("x = 1\n"), tmp_path / "42_no_checks.ipynb")
    ckpt = tmp_path / ".ipynb_checkpoints"
    ckpt.mkdir()
    nbformat.write(_notebook("x = 1\n"), ckpt / "99_good-checkpoint.ipynb")
    out = tmp_path / "results.json"
    proc = _cli(tmp_path, "--json", out)
    assert proc.returncode == 0, proc.stderr
    assert "lab 42 has no checks" in proc.stdout and "total: 2/2 points" in proc.stdout
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result) == {"score", "max_score", "output", "tests"}
    assert (result["score"], result["max_score"]) == (2, 4)
    assert [(t["name"], t["status"], t["score"], t["max_score"]) for t in result["tests"]] == [
        ("99_broken.ipynb: 99.double", "failed", 0, 2),
        ("99_good.ipynb: 99.double", "passed", 2, 2),
    ]
    assert all(set(t) == {"name", "score", "max_score", "status", "output"} for t in result["tests"])
    assert "not valid JSON" in result["tests"][0]["output"]


@pytest.mark.parametrize("args", [["/no/such/notebook.ipynb"], ["--jobs", "0", "."], ["--batch", "a", "b"]])
def test_usage_errors_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        grade_main(args)
    assert exc.value.code == 2


def test_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        grade_main([str(tmp_path)])
    assert exc.value.code == 2


def test_defined_names_reads_the_syntax_tree() -> None:
    code = ("import numpy as np, os.path\nfrom math import fsum as f\n@deco\ndef g(): h = 1\nclass C: pass\n"
            "a, (b, *c) = 1, (2, 3)\nd: int = 4\nif True:\n    e = 5\n# k = 6\nprint(k)\n")
    assert defined_names(code) == {"np", "os", "f", "g", "C", "a", "b", "c", "d", "e"}
    assert defined_names("def f(:\n") is None


def test_strip_magics_keeps_line_numbers() -> None:
    src = "%timeit f()\nx = !ls\nif x:\n    !echo hi\ny = 1 % 2"
    assert strip_magics(src) == "pass\npass\nif x:\n    pass\ny = 1 % 2\n"


def test_program_takes_setup_then_defining_exercise_cells(tmp_path: Path) -> None:
    nb = new_notebook(cells=[
        new_code_cell("import torch", metadata={"tags": ["setup"]}),
        new_code_cell("def other(x): ...", metadata={"tags": ["exercise"]}),
        new_code_cell("K = 3", metadata={"tags": ["setup"]}),
        new_code_cell("def double(x): return x * 2  # calls other()", metadata={"tags": ["exercise"]}),
        new_code_cell("double(1)"),
    ])
    path = tmp_path / "07_demo.ipynb"
    nbformat.write(nb, path)
    parsed = read_notebook(path)
    assert parsed.lab == "07" == lab_of(path) and lab_of(tmp_path / "lab7.ipynb") is None
    assert [c.index for c in parsed.program("double")] == [1, 3, 4]


def test_real_lab_00_solution_passes_and_its_student_version_is_not_attempted(tmp_path: Path) -> None:
    solved, student = ROOT / "solutions" / "00_setup.ipynb", ROOT / "labs" / "00_setup.ipynb"
    if not (solved.exists() and student.exists()):
        pytest.skip("lab 00 is not in the repository yet")
    out = tmp_path / "results.json"
    proc = _cli(solved, student, "--json", out)
    assert proc.returncode == 0, proc.stderr
    tests = json.loads(out.read_text(encoding="utf-8"))["tests"]
    solved_tests = [t for t in tests if t["name"].startswith(f"{solved}: ")]  # same file names: full paths
    assert len(tests) == 2 * len(solved_tests) > 0
    assert all(t["status"] == "passed" for t in solved_tests), [t["output"] for t in solved_tests]
    assert all(t["output"].startswith("not attempted") for t in tests if t not in solved_tests)
