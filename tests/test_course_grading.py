"""The grader on the course itself: every solution notebook gets full marks, every student notebook zero
with "not attempted" verdicts, and every lab's exercises are where its checks expect them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from detlib.grade.spec import lab_exercises

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_exercise_has_a_check_and_a_tagged_cell(path: Path) -> None:
    exercises = lab_exercises(path.name[:2])
    nb = nbformat.read(path, as_version=4)
    tagged = "\n".join(c.source for c in nb.cells if "exercise" in c.metadata.get("tags", []))
    checks = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for ex in exercises:
        assert f"def {ex.name}" in tagged or f"{ex.name} =" in tagged, f"no exercise cell defines {ex.name}"
        assert f'check("{ex.key}"' in checks, f"no instant check of {ex.key} in the notebook"


def _grade(folder: str, tmp_path: Path) -> tuple[list[dict[str, str]], dict]:
    out_csv, out_json = tmp_path / f"{folder}.csv", tmp_path / f"{folder}.json"
    proc = subprocess.run(
        [sys.executable, "-m", "detlib.grade", str(ROOT / folder), "--csv", str(out_csv), "--json", str(out_json),
         "--timeout-scale", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=1500,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads(out_json.read_text())


@pytest.mark.slow
def test_solutions_get_full_marks_and_labs_get_zero(tmp_path: Path) -> None:
    solved, solved_json = _grade("solutions", tmp_path)
    assert solved, "no exercises graded"
    failures = [r for r in solved if r["status"] != "passed"]
    assert not failures, failures[:3]
    assert solved_json["score"] == sum(float(r["max_points"]) for r in solved)

    student, student_json = _grade("labs", tmp_path)
    assert len(student) == len(solved)
    assert {r["status"] for r in student} == {"not attempted"}, [r for r in student if r["status"] != "not attempted"][:3]
    assert student_json["score"] == 0
