"""The release tool: student notebooks from solutions, byte-stable, and the repository's labs/ in sync."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from detlib.release import ANSWER_HERE, ROOT, ReleaseError, main, stub_code, stub_markdown, student_version

SOLVED = '''import torch

def pairwise_sum(x):
    """Sum by halves."""
    ### BEGIN SOLUTION
    # HINT: split the list in two halves
    if len(x) == 1:
        return x[0]
    # HINT: recurse on each half
    mid = len(x) // 2
    return pairwise_sum(x[:mid]) + pairwise_sum(x[mid:])
    ### END SOLUTION

def helper():
    ### BEGIN SOLUTION
    return 1
    ### END SOLUTION
'''


def test_stub_keeps_indentation_hints_and_uses_the_exercise_hint() -> None:
    # helper() (a kernel, say) sits in the cell of exercise pairwise_sum: it gets that exercise's hint
    got = stub_code(SOLVED, {"pairwise_sum": 'halve it until one element is left ("leaf")'})
    assert got == '''import torch

def pairwise_sum(x):
    """Sum by halves."""
    # HINT: split the list in two halves
    # HINT: recurse on each half
    raise NotImplementedError("halve it until one element is left (\\"leaf\\")")

def helper():
    raise NotImplementedError("halve it until one element is left (\\"leaf\\")")
'''
    compile(got, "stub", "exec")  # still valid Python
    assert stub_code(SOLVED, {}).count('raise NotImplementedError("write your solution here")') == 2


def test_stub_at_top_level_uses_the_cells_exercise() -> None:
    src = "THRESHOLD = None\n### BEGIN SOLUTION\nTHRESHOLD = 3\n### END SOLUTION\n"
    want = 'THRESHOLD = None\nraise NotImplementedError("a small int")\n'
    assert stub_code(src, {"THRESHOLD": "a small int"}) == want
    assert stub_code("x = 1", {}) == "x = 1"


def test_markdown_region() -> None:
    src = "Why?\n\n### BEGIN SOLUTION\nBecause (a+b)+c != a+(b+c).\n### END SOLUTION\nMore."
    assert stub_markdown(src) == f"Why?\n\n{ANSWER_HERE}\nMore."


@pytest.mark.parametrize("src", [
    "### BEGIN SOLUTION\nx = 1\n",
    "x = 1\n### END SOLUTION\n",
    "### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION\n",
    "## BEGIN SOLUTION\nx = 1\n## END SOLUTION\n",
])
def test_unbalanced_or_malformed_markers_are_refused(src: str) -> None:
    with pytest.raises(ReleaseError):
        stub_code(src, {})


def _solution(path: Path, *, outputs: bool = False, kernelspec: bool = True) -> Path:
    nb = new_notebook(cells=[
        new_markdown_cell("# Lab 98\n### BEGIN SOLUTION\nsecret prose\n### END SOLUTION"),
        new_code_cell("import detlib", metadata={"tags": ["setup"]}),
        new_code_cell(SOLVED, metadata={"tags": ["exercise"]}),
        new_code_cell('check("98.pairwise_sum", pairwise_sum)'),
    ])
    nb.metadata["detlab"] = {"lab": "98", "title": "Release test", "cpu_minutes": 1}
    if kernelspec:
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if outputs:
        nb.cells[1].outputs = [new_output("stream", name="stdout", text="hi\n")]
        nb.cells[1].execution_count = 1
    nbformat.write(nb, path)
    return path


def test_student_version_clears_outputs_and_keeps_metadata(tmp_path: Path) -> None:
    text = student_version(_solution(tmp_path / "98_release.ipynb"))
    assert text.endswith("}\n") and "secret prose" not in text and "BEGIN SOLUTION" not in text
    nb = nbformat.reads(text, as_version=4)
    assert nb.metadata["detlab"]["lab"] == "98" and nb.metadata["kernelspec"]["name"] == "python3"
    assert nb.cells[2].metadata["tags"] == ["exercise"] and "raise NotImplementedError" in nb.cells[2].source
    assert nb.cells[0].source.endswith(ANSWER_HERE)
    assert all(c.outputs == [] and c.execution_count is None for c in nb.cells if c.cell_type == "code")
    assert text == nbformat.writes(nb, version=4) + "\n"  # nbformat's own layout


@pytest.mark.parametrize("problem", ["outputs", "kernelspec", "not a valid notebook"])
def test_bad_solutions_are_refused(tmp_path: Path, problem: str) -> None:
    path = _solution(tmp_path / "98_release.ipynb", outputs=problem == "outputs", kernelspec=problem != "kernelspec")
    if problem == "not a valid notebook":
        path.write_text("{", encoding="utf-8")
    with pytest.raises(ReleaseError, match=problem):
        student_version(path)
    assert main(["--solutions", str(tmp_path), "--labs", str(tmp_path / "labs")]) == 2


def test_release_is_idempotent_and_check_detects_drift(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    solutions, labs = tmp_path / "solutions", tmp_path / "labs"
    solutions.mkdir()
    _solution(solutions / "98_release.ipynb")
    nb = nbformat.read(solutions / "98_release.ipynb", as_version=4)
    for cell in nb.cells:  # an older notebook without cell ids must be stable too
        cell.pop("id", None)
    nb.nbformat_minor = 4
    (solutions / "97_old.ipynb").write_text(json.dumps(nb), encoding="utf-8")
    args = ["--solutions", str(solutions), "--labs", str(labs)]

    assert main([*args, "--check"]) == 1 and "missing" in capsys.readouterr().out
    assert main(args) == 0
    first = {p.name: p.read_bytes() for p in labs.iterdir()}
    assert sorted(first) == ["97_old.ipynb", "98_release.ipynb"]
    assert main(args) == 0 and {p.name: p.read_bytes() for p in labs.iterdir()} == first
    assert main([*args, "--check"]) == 0

    (labs / "98_release.ipynb").write_text(first["98_release.ipynb"].decode().replace("NotImplementedError", "Oops"))
    (labs / "99_orphan.ipynb").write_text("{}")
    assert main([*args, "--check"]) == 1
    out = capsys.readouterr().out
    assert "stale:   " in out and "98_release.ipynb" in out and "extra:   " in out and "99_orphan.ipynb" in out
    assert main(args) == 0
    assert {p.name: p.read_bytes() for p in labs.iterdir()} == first  # stale rewritten, orphan removed


def test_repository_labs_are_in_sync_with_solutions() -> None:
    assert main(["--check", "--solutions", str(ROOT / "solutions"), "--labs", str(ROOT / "labs")]) == 0, (
        "labs/ is out of sync: run `python -m detlib.release`"
    )
