"""Accessibility of the notebooks, checked statically (no kernel, a few seconds).

Every figure a solution notebook draws has a title, an x label and a y label (set by the cell or by a
detlib helper the cell uses), and the cell after it is a markdown caption saying what to see. Every
ipywidgets control, in a notebook or in detlib, has a ``description``, which is the label a learner
(and a screen reader) sees next to it. The browser test checks the same things on the rendered page.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from browser.nbscan import NotebookScan, module_widget_calls

REPO = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((REPO / "solutions").glob("*.ipynb"))


def figure_problems(scan: NotebookScan) -> list[str]:
    """One line per figure cell that lacks a label or a caption."""
    problems = []
    for cell in scan.figure_cells():
        missing = cell.missing_labels()
        if missing:
            problems.append(f"cell {cell.index}: figure without {', '.join(missing)}")
        if scan.caption_after(cell.index) is None:
            problems.append(f"cell {cell.index}: figure not followed by a markdown caption cell")
    return problems


def description_problems(calls: list) -> list[str]:
    """One line per control constructor call without a description."""
    return [f"{call.where}: {call.cls}(...) without description=" for call in calls if not call.has_description]


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_figure_has_title_axis_labels_and_caption(path: Path) -> None:
    problems = figure_problems(NotebookScan.read(path))
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("path", SOLUTIONS, ids=[p.stem for p in SOLUTIONS])
def test_every_notebook_control_has_a_description(path: Path) -> None:
    problems = description_problems(NotebookScan.read(path).widget_calls())
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_every_detlib_control_has_a_description() -> None:
    calls = []
    for file in sorted((REPO / "detlib").rglob("*.py")):
        module = ".".join(file.relative_to(REPO).with_suffix("").parts)
        calls.extend(module_widget_calls(file, module))
    problems = description_problems(calls)
    assert not problems, "\n".join(problems)


# --- the scanner itself: each rule must catch what it is for --------------------------------------

def _notebook(tmp_path: Path, *cells) -> Path:
    path = tmp_path / "nb.ipynb"
    nbformat.write(new_notebook(cells=list(cells)), path)
    return path


def test_scanner_flags_missing_labels_and_caption(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path,
        new_code_cell("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nax.set_title('t')"),
        new_code_cell("print('no caption before me')"),
    )
    assert figure_problems(NotebookScan.read(path)) == [
        "cell 0: figure without xlabel, ylabel",
        "cell 0: figure not followed by a markdown caption cell",
    ]


def test_scanner_accepts_labelled_and_captioned_figure(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path,
        new_code_cell("import matplotlib.pyplot as plt\n"
                      "def draw(k):\n    plt.plot([1, k])\n    plt.title('t')\n    plt.xlabel('x')\n"
                      "    plt.ylabel('y')\n    plt.show()"),
        new_code_cell("draw(3)"),
        new_markdown_cell("The line rises."),
        new_code_cell("%matplotlib inline\nfig, axes = plt.subplots(1, 2)\n"
                      "axes[0].set(title='a', xlabel='x', ylabel='y')"),
        new_markdown_cell("# a heading is not a caption"),
    )
    scan = NotebookScan.read(path)
    assert [c.index for c in scan.figure_cells()] == [1, 3]  # defining draw() draws nothing
    assert figure_problems(scan) == ["cell 3: figure not followed by a markdown caption cell"]


def test_scanner_follows_helpers_into_their_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "fakeplots"
    package.mkdir()
    (package / "__init__.py").write_text(textwrap.dedent("""
        import matplotlib.pyplot as plt

        def _decorate(ax):
            ax.set_xlabel("x")
            ax.set_ylabel("y")

        def labelled(values, title):
            _, ax = plt.subplots()
            ax.bar(range(len(values)), values)
            ax.set_title(title)
            _decorate(ax)
            return ax

        def unlabelled(values):
            _, ax = plt.subplots()
            ax.hist(values)
            return ax
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    path = _notebook(
        tmp_path,
        new_code_cell("from fakeplots import labelled\nimport fakeplots as fp\nlabelled([1, 2], 'two bars')"),
        new_markdown_cell("Two bars."),
        new_code_cell("fp.unlabelled([1, 2])"),
        new_markdown_cell("A histogram."),
    )
    assert figure_problems(NotebookScan.read(path, follow=("fakeplots",))) == [
        "cell 2: figure without title, xlabel, ylabel",
    ]
    sys.modules.pop("fakeplots", None)


def test_scanner_flags_controls_without_description(tmp_path: Path) -> None:
    path = _notebook(
        tmp_path,
        new_code_cell("import ipywidgets as widgets\nfrom ipywidgets import Dropdown as Pick\n"
                      "a = widgets.IntSlider(description='n')\nb = Pick(options=[1, 2])\n"
                      "c = widgets.Button(description='')\nd = widgets.HTML('display only')\n"
                      "widgets.interact(lambda k: k, k=(0, 4))"),
    )
    scan = NotebookScan.read(path)
    assert scan.uses_widgets
    assert [(c.cls, c.has_description) for c in scan.widget_calls()] == [
        ("IntSlider", True), ("Dropdown", False), ("Button", False),
    ]
    assert description_problems(scan.widget_calls()) == [
        "nb.ipynb cell 0, line 4: Dropdown(...) without description=",
        "nb.ipynb cell 0, line 5: Button(...) without description=",
    ]

