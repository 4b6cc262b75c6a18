"""Build the student notebooks (``labs/``) from the solved ones (``solutions/``).

    python -m detlib.release            # regenerate labs/ (and delete labs without a solution)
    python -m detlib.release --check    # write nothing; exit 1 listing labs that are out of sync

In every code cell, each region between a line ``### BEGIN SOLUTION`` and a line ``### END SOLUTION``
becomes, at the marker's indentation, the ``# HINT:`` lines that were inside it followed by
``raise NotImplementedError("<the exercise's hint>")``; in a markdown cell it becomes
``*Your answer here.*``.  Outputs and execution counts are cleared; tags and metadata are kept.  The
JSON is written the way nbformat writes it (indent 1, sorted keys, trailing newline), so the same
solutions always give the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat

from detlib.grade.notebook import defined_names, lab_of

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
DEFAULT_HINT = "write your solution here"
ANSWER_HERE = "*Your answer here.*"
ROOT = Path(__file__).resolve().parents[1]
_DEF = re.compile(r"^(\s*)(?:async\s+def|def|class)\s+(\w+)")
_HINT = re.compile(r"^\s*# HINT:")
_LOOKALIKE = re.compile(r"^\s*#+\s*(BEGIN|END)\s+SOLUTION\b", re.IGNORECASE)


class ReleaseError(ValueError):
    """A solution notebook cannot be released as it is (outputs, no kernelspec, unbalanced markers)."""


def _regions(lines: list[str], where: str) -> list[tuple[int, int]]:
    """``(begin, end)`` line indices of each solution region; unbalanced or nested markers are an error."""
    regions, begin = [], None
    for i, line in enumerate(lines):
        mark = line.strip()
        if mark == BEGIN:
            if begin is not None:
                raise ReleaseError(f"{where}: line {i + 1} opens a solution region inside another (line {begin + 1})")
            begin = i
        elif mark == END:
            if begin is None:
                raise ReleaseError(f"{where}: line {i + 1} closes a solution region that was never opened")
            regions.append((begin, i))
            begin = None
        elif _LOOKALIKE.match(line):  # e.g. "## BEGIN SOLUTION": silently kept, it would leak the solution
            raise ReleaseError(f"{where}: line {i + 1} looks like a marker but is not exactly {BEGIN!r} or {END!r}")
    if begin is not None:
        raise ReleaseError(f"{where}: the solution region opened at line {begin + 1} is never closed ({END!r})")
    return regions


def _enclosing_name(lines: list[str], begin: int) -> str | None:
    """The function or class the region at ``begin`` sits in (the nearest less-indented ``def``/``class``)."""
    depth = len(lines[begin]) - len(lines[begin].lstrip())
    for line in reversed(lines[:begin]):
        match = _DEF.match(line)
        if match and len(match.group(1)) < depth:
            return match.group(2)
    return None


def stub_code(source: str, hints: dict[str, str], where: str = "cell") -> str:
    """Replace each solution region of a code cell by its ``# HINT:`` lines and a ``NotImplementedError``.

    ``hints`` maps exercise names to their hint; a region uses the hint of the function it sits in,
    else of the one exercise the cell defines, else :data:`DEFAULT_HINT`.
    """
    lines = source.splitlines()
    regions = _regions(lines, where)
    if not regions:
        return source
    cell_exercises = [n for n in sorted(defined_names(source) or ()) if n in hints]
    out, last = [], 0
    for begin, end in regions:
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        name = _enclosing_name(lines, begin)
        hint = hints.get(name or "") or (hints[cell_exercises[0]] if len(cell_exercises) == 1 else "") or DEFAULT_HINT
        out += lines[last:begin]
        out += [indent + line.strip() for line in lines[begin + 1 : end] if _HINT.match(line)]
        out.append(f"{indent}raise NotImplementedError({json.dumps(hint, ensure_ascii=False)})")
        last = end + 1
    out += lines[last:]
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def stub_markdown(source: str, where: str = "cell") -> str:
    """Replace each solution region of a markdown cell by :data:`ANSWER_HERE`."""
    lines = source.splitlines()
    out, last = [], 0
    for begin, end in _regions(lines, where):
        out += lines[last:begin] + [ANSWER_HERE]
        last = end + 1
    if last == 0:
        return source
    out += lines[last:]
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def _exercise_hints(lab: str | None) -> dict[str, str]:
    if lab is None:
        return {}
    from detlib.grade.spec import lab_exercises

    return {ex.name: ex.hint for ex in lab_exercises(lab) if ex.hint}


def student_version(path: Path, hints_of: Callable[[str | None], dict[str, str]] = _exercise_hints) -> str:
    """The student notebook for solution ``path``, as the exact text to write."""
    name = path.name
    try:
        nb = nbformat.read(path, as_version=4)
    except (ValueError, nbformat.ValidationError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ReleaseError(f"{name}: not a valid notebook ({first})") from err
    meta = nb.metadata
    if meta.get("kernelspec", {}).get("name") != "python3":
        raise ReleaseError(f"{name}: the notebook needs the kernelspec python3 (metadata.kernelspec.name)")
    if not isinstance(meta.get("detlab"), dict) or not {"lab", "title", "cpu_minutes"} <= set(meta["detlab"]):
        raise ReleaseError(f"{name}: metadata.detlab must give lab, title and cpu_minutes")
    hints = hints_of(lab_of(path))
    student = copy.deepcopy(nb)
    for i, cell in enumerate(student.cells, start=1):
        where = f"{name}, cell {i}"
        if cell.cell_type == "code":
            if cell.get("outputs") or cell.get("execution_count") is not None:
                raise ReleaseError(f"{where} has outputs: clear them (Kernel → Restart Kernel and Clear Outputs)")
            cell.source = stub_code(cell.source, hints, where)
            cell.outputs, cell.execution_count = [], None
        elif cell.cell_type == "markdown":
            cell.source = stub_markdown(cell.source, where)
    return nbformat.writes(student, version=4) + "\n"


def plan(solutions: Path, labs: Path) -> tuple[dict[Path, str], list[Path]]:
    """What ``labs/`` should hold (path → text) and the lab notebooks that have no solution any more."""
    sources = sorted(solutions.glob("*.ipynb")) if solutions.is_dir() else []
    wanted = {labs / s.name: student_version(s) for s in sources}
    extra = [p for p in (sorted(labs.glob("*.ipynb")) if labs.is_dir() else []) if p not in wanted]
    return wanted, extra


def out_of_sync(wanted: dict[Path, str], extra: list[Path]) -> list[str]:
    """One line per lab notebook that differs from what the solutions give: missing, stale or extra."""
    lines = []
    for path, text in wanted.items():
        if not path.exists():
            lines.append(f"missing: {path}")
        elif path.read_text(encoding="utf-8") != text:
            lines.append(f"stale:   {path}")
    return lines + [f"extra:   {p} (no solution)" for p in extra]


def main(argv: list[str] | None = None) -> int:
    usage = "\n\n".join(__doc__.split("\n\n")[:2])  # the summary and the two commands
    parser = argparse.ArgumentParser(prog="python -m detlib.release", description=usage,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if labs/ is out of sync (2 if a solution cannot be released)")
    parser.add_argument("--solutions", type=Path, default=ROOT / "solutions", metavar="DIR",
                        help="the solved notebooks (default: the repository's solutions/)")
    parser.add_argument("--labs", type=Path, default=ROOT / "labs", metavar="DIR",
                        help="where the student notebooks go (default: the repository's labs/)")
    args = parser.parse_args(argv)
    try:
        wanted, extra = plan(args.solutions, args.labs)
    except ReleaseError as err:
        print(f"release: {err}", file=sys.stderr)
        return 2
    differences = out_of_sync(wanted, extra)
    if args.check:
        if differences:
            print("labs/ is out of sync with solutions/ (run `python -m detlib.release`):", *differences, sep="\n  ")
            return 1
        print(f"labs/ is in sync with solutions/ ({len(wanted)} notebook(s))")
        return 0
    args.labs.mkdir(parents=True, exist_ok=True)
    for path, text in wanted.items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    for path in extra:
        path.unlink()
        print(f"removed {path} (no solution)")
    if not differences:
        print(f"labs/ already in sync ({len(wanted)} notebook(s))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
