"""Read a learner's notebook and cut out what the grader runs for one exercise.

The grader does not execute a whole notebook: for each exercise it takes the cells tagged ``setup``
(in order) and the cells tagged ``exercise`` that define the exercise's name, with IPython magics and
shell lines removed.  Which names a cell defines is read from its syntax tree, so a comment or a call
that merely mentions the name does not count.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

_LAB = re.compile(r"^(\d\d)(?!\d)")
_MAGIC = re.compile(r"^(\s*)(%|!)")
_MAGIC_ASSIGN = re.compile(r"^(\s*)[\w.]+\s*=\s*[%!]")


class NotebookError(ValueError):
    """The file cannot be graded as a notebook (not JSON, or not the nbformat 4 layout)."""


@dataclass(frozen=True)
class Cell:
    """One code cell: its 1-based position among all cells of the notebook, its tags and its code."""

    index: int
    tags: frozenset[str]
    source: str

    @property
    def label(self) -> str:
        """How verdicts name the cell: position and first line, so the learner can find it."""
        first = next((line.strip() for line in self.source.splitlines() if line.strip()), "")
        if len(first) > 40:
            first = first[:37] + "..."
        return f"cell {self.index} (`{first}`)" if first else f"cell {self.index}"

    @property
    def code(self) -> str:
        """The source with IPython magics and shell lines turned into ``pass`` (line numbers kept)."""
        return strip_magics(self.source)


@dataclass(frozen=True)
class Notebook:
    """The code cells of one notebook file and the lab it belongs to (``None`` if the name has no NN_)."""

    path: Path
    lab: str | None
    cells: tuple[Cell, ...]

    def tagged(self, tag: str) -> list[Cell]:
        return [c for c in self.cells if tag in c.tags]

    def program(self, name: str) -> list[Cell]:
        """The cells to run for the exercise ``name``: every setup cell, then the exercise cells defining it.

        An exercise cell that does not parse is included when it mentions ``name``, so that the learner
        hears about the syntax error instead of "not defined".
        """
        chosen = [c for c in self.cells if "setup" in c.tags]
        for cell in self.tagged("exercise"):
            if cell in chosen:
                continue
            names = defined_names(cell.code)
            if (name in names) if names is not None else re.search(rf"\b{re.escape(name)}\b", cell.source):
                chosen.append(cell)
        return chosen

    def defining_cells(self, name: str) -> list[Cell]:
        """Every code cell, tagged or not, that defines ``name`` (to explain a missing tag)."""
        return [c for c in self.cells if name in (defined_names(c.code) or set())]


def lab_of(path: Path) -> str | None:
    """The lab a notebook belongs to: the two digits its file name starts with (``01_x.ipynb`` → ``"01"``)."""
    match = _LAB.match(path.name)
    return match.group(1) if match else None


def strip_magics(source: str) -> str:
    """Replace ``%magic``, ``%%cell magic``, ``!shell`` and ``x = !cmd`` lines with ``pass`` at their indentation."""
    out = []
    for line in source.splitlines():
        match = _MAGIC.match(line) or _MAGIC_ASSIGN.match(line)
        out.append(f"{match.group(1)}pass" if match else line)
    return "\n".join(out) + "\n"


def _targets(node: ast.AST) -> Iterator[str]:
    if isinstance(node, ast.Name):
        yield node.id
    elif isinstance(node, (ast.Tuple, ast.List)):
        for elt in node.elts:
            yield from _targets(elt)
    elif isinstance(node, ast.Starred):
        yield from _targets(node.value)


def _statement_names(stmts: Iterable[ast.stmt]) -> Iterator[str]:
    for node in stmts:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node.name
            continue  # names bound inside a def or class body are not module-level
        if isinstance(node, ast.Assign):
            for target in node.targets:
                yield from _targets(target)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            yield from _targets(node.target)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                yield alias.asname or alias.name.split(".")[0]
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            yield from _targets(node.target)
        # definitions nested in compound statements still land in the module namespace
        for field in ("body", "orelse", "finalbody"):
            yield from _statement_names(getattr(node, field, None) or [])
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    yield from _targets(item.optional_vars)
        if isinstance(node, ast.Try):
            for handler in node.handlers:
                yield from _statement_names(handler.body)


def defined_names(code: str) -> set[str] | None:
    """Names a cell binds at module level (defs, classes, assignments, imports); ``None`` if it does not parse."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return None
    return set(_statement_names(tree.body))


def _source(cell: dict, index: int) -> str:
    src = cell.get("source", "")
    if isinstance(src, list) and all(isinstance(s, str) for s in src):
        return "".join(src)
    if isinstance(src, str):
        return src
    raise NotebookError(f"cell {index} has a source that is neither text nor a list of lines")


def read_notebook(path: Path) -> Notebook:
    """Load the code cells of ``path``; raise :class:`NotebookError` saying what is wrong with the file."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise NotebookError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from err
    except UnicodeDecodeError as err:
        raise NotebookError(f"not UTF-8 text ({err.reason} at byte {err.start})") from err
    except OSError as err:
        raise NotebookError(f"cannot be read ({err.strerror})") from err
    if not isinstance(raw, dict) or not isinstance(raw.get("cells"), list):
        raise NotebookError("not a Jupyter notebook (no list of cells; nbformat 4 expected)")
    cells = []
    for index, cell in enumerate(raw["cells"], start=1):
        if not isinstance(cell, dict):
            raise NotebookError(f"cell {index} is not a JSON object")
        if cell.get("cell_type") != "code":
            continue
        meta = cell.get("metadata") if isinstance(cell.get("metadata"), dict) else {}
        tags = meta.get("tags") if isinstance(meta.get("tags"), list) else []
        cells.append(Cell(index, frozenset(str(t) for t in tags), _source(cell, index)))
    return Notebook(path, lab_of(path), tuple(cells))


def find_notebooks(root: Path) -> list[Path]:
    """``root`` itself if it is a file, else every ``*.ipynb`` below it (checkpoints skipped), sorted."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts and p.is_file())
