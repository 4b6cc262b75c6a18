"""The labs as a learner meets them: JupyterLab in a real browser, every cell run, every widget moved.

For each solution notebook whose code creates ipywidgets (found by scanning its source and the detlib
helpers it uses), plus a planted demo notebook that tests the harness itself, the test copies the
notebook into the server's scratch folder, opens it in Chromium, runs Run → Run All Cells and checks:

* no output shows an exception (a warning on stderr is fine) or a widget that failed to render;
* every widget control the code creates is on the page, with a visible description, and each one,
  changed once (slider by the keyboard, dropdown by selecting another option, ...), makes some output
  change, which means the kernel answered;
* every plot rendered (an image with a non-zero size), each figure cell shows one, and the cell
  after each plot is a markdown caption.

A screenshot of the whole notebook goes to ``artifacts/browser/<name>.png`` (kept when a check fails),
with a JSON summary of counts and timings beside it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from .lab_page import LabNotebook
from .lab_server import LabServer
from .nbscan import NotebookScan

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "artifacts" / "browser"
FIXTURE = Path(__file__).parent / "fixtures" / "widgets_demo.ipynb"
OPERATE_TIMEOUT_S = 90.0
MIN_INK = 0.5


def widget_notebooks() -> list[Path]:
    """The solution notebooks that create widgets, then the planted harness self-test."""
    solutions = sorted((REPO / "solutions").glob("*.ipynb"))
    return [p for p in solutions if NotebookScan.read(p).uses_widgets] + [FIXTURE]


def run_budget_s(scan: NotebookScan) -> float:
    """Time allowed for Run All: twice the notebook's CPU budget (browser and server share 2 cores)."""
    minutes = scan.nb.metadata.get("detlab", {}).get("cpu_minutes", 1)
    return 120.0 * float(minutes) + 60.0


@pytest.mark.parametrize("notebook", widget_notebooks(), ids=lambda p: p.stem)
def test_notebook_runs_and_widgets_respond_in_jupyterlab(notebook: Path, page: Any, lab_server: LabServer) -> None:
    scan = NotebookScan.read(notebook)
    shutil.copy(notebook, lab_server.root / "solutions" / notebook.name)  # the repo's copy stays untouched
    lab = LabNotebook(page, lab_server, f"solutions/{notebook.name}")
    summary: dict[str, Any] = {"notebook": notebook.name}
    try:
        start = time.monotonic()
        lab.open()
        summary["open_s"] = round(time.monotonic() - start, 1)
        summary["run_all_s"] = round(lab.run_all(scan.code_cell_count(), run_budget_s(scan)), 1)
        errors = lab.errors()
        assert not errors, f"{notebook.name}: error output after Run All Cells:\n" + "\n---\n".join(errors)

        cells = lab.cells()
        assert len(cells) == len(scan.nb.cells), (
            f"{notebook.name}: the page shows {len(cells)} cells, the notebook has {len(scan.nb.cells)}")
        _check_plots(notebook.name, scan, cells)

        controls = lab.controls()
        expected = scan.widget_calls()
        summary["controls"] = [f"{c.kind} {c.description!r} (cell {c.cell})" for c in controls]
        assert controls, f"{notebook.name} creates widgets, but no widget control rendered"
        assert len(controls) >= len(expected), (
            f"{notebook.name}: {len(controls)} controls rendered, the code creates at least {len(expected)}: "
            f"{[w.where + ' ' + w.cls for w in expected]}")
        unlabelled = [c for c in controls if not c.description]
        assert not unlabelled, f"{notebook.name}: controls without a visible description: {unlabelled}"

        summary["operate_s"] = {}
        for control in controls:
            seconds = lab.operate(control, OPERATE_TIMEOUT_S)
            summary["operate_s"][f"{control.kind} {control.description}"] = round(seconds, 1)
            errors = lab.errors()
            assert not errors, (f"{notebook.name}: error output after operating {control.description!r}:\n"
                                + "\n---\n".join(errors))
        _check_plots(notebook.name, scan, lab.cells())
    finally:
        lab.screenshot(ARTIFACTS / f"{notebook.stem}.png")
        ARTIFACTS.joinpath(f"{notebook.stem}.json").write_text(json.dumps(summary, indent=2) + "\n")


def _check_plots(name: str, scan: NotebookScan, cells: list) -> None:
    """Every image rendered and shows a plot; every figure cell shows one; a caption follows every plot."""
    broken = [(i, img) for i, cell in enumerate(cells) for img in cell.images
              if not (img["complete"] and min(img["natural"]) > 0 and min(img["shown"]) > 0)]
    assert not broken, f"{name}: images that did not render (cell, sizes): {broken}"
    empty = [(i, img["ink"]) for i, cell in enumerate(cells) for img in cell.images if min(img["ink"]) < MIN_INK]
    assert not empty, (f"{name}: plots that are (nearly) blank: (cell, [fraction of rows, of columns] with "
                       f"anything drawn; a plot's axes span at least {MIN_INK:.0%} of both): {empty}")
    blank = [c.index for c in scan.figure_cells() if not cells[c.index].images]
    assert not blank, f"{name}: figure cells that show no image: {blank}"
    uncaptioned = [i for i, cell in enumerate(cells) if cell.images
                   and not (i + 1 < len(cells) and cells[i + 1].markdown)]
    assert not uncaptioned, f"{name}: cells whose plot is not followed by a markdown caption: {uncaptioned}"


def test_harness_reports_planted_errors(page: Any, lab_server: LabServer) -> None:
    """The checks above can fail: a raising cell and a raising widget callback are reported, a warning not."""
    notebook = Path(__file__).parent / "fixtures" / "error_demo.ipynb"
    shutil.copy(notebook, lab_server.root / "solutions" / notebook.name)
    lab = LabNotebook(page, lab_server, f"solutions/{notebook.name}")
    lab.open()
    lab.run_all(NotebookScan.read(notebook).code_cell_count(), timeout_s=120)  # stops at the first error
    errors = lab.errors()
    assert len(errors) == 1 and errors[0].startswith("cell 3: ") and "RuntimeError" in errors[0], errors
    (divisor,) = lab.controls()
    assert (divisor.kind, divisor.description, divisor.cell) == ("slider", "divisor", 2)
    lab.operate(divisor, OPERATE_TIMEOUT_S)  # the slider is at its maximum: it moves down, to 0
    errors = lab.errors()
    assert len(errors) == 2 and errors[0].startswith("cell 2: ") and "ZeroDivisionError" in errors[0], errors
