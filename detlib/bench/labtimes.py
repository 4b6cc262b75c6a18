"""How long each solution notebook takes to run top to bottom on this machine (the syllabus's time column)."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

from detlib.backend import environment, is_interpreter
from detlib.bench.record import load, record

DESCRIPTION = "run every solution notebook headless and time it (workshop planning; --record saves data/)"
ROOT = Path(__file__).resolve().parents[2]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("notebooks", nargs="*", type=Path, help="notebooks to time (default: solutions/*.ipynb)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per cell")
    p.add_argument("--record", action="store_true",
                   help="write data/gpu/lab_times.json (or data/cpu/lab_times.json under the interpreter), keeping "
                        "the recorded times of notebooks not run this time when they were taken on the same device")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_FRAME = re.compile(r"^(File \S+:\d+, in \S+?)\(|^(Cell In\[\d+\], line \d+)", re.MULTILINE)


def cell_error(ename: str, evalue: str, traceback: str) -> str:
    """One line for a failed cell: the exception, and the innermost frame it came from (a bare
    ``AssertionError:`` says nothing until one knows whose assert it was)."""
    frames = _FRAME.findall(_ANSI.sub("", traceback))
    where = next((a or b for a, b in reversed(frames)), None)
    return f"{ename}: {evalue}".strip() + (f" ({where})" if where else "")


def time_notebook(path: Path, timeout: int) -> tuple[float, str | None]:
    """Seconds to execute ``path`` in a fresh kernel, and the first error (``None`` when it ran clean)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        return time.perf_counter() - start, cell_error(err.ename, err.evalue, err.traceback)[:500]
    except Exception as err:  # noqa: BLE001 - a dead kernel or a timeout is this notebook's result, not the end
        return time.perf_counter() - start, f"{type(err).__name__}: {err}".strip()[:300]
    return time.perf_counter() - start, None


def merged_with_record(rows: list[dict[str, object]], subdir: str) -> list[dict[str, object]]:
    """``rows`` plus the recorded rows of notebooks not run this time, when recorded on the same device."""
    try:
        old = load("lab_times", subdir=subdir)
    except FileNotFoundError:
        return rows
    if old["environment"].get("device_name") != environment().device_name:
        return rows
    ran = {r["notebook"] for r in rows}
    kept = [r for r in old["results"] if r["notebook"] not in ran]
    return sorted(kept + rows, key=lambda r: str(r["notebook"]))


def main(args: argparse.Namespace) -> int:
    paths = args.notebooks or sorted((ROOT / "solutions").glob("*.ipynb"))
    rows = []
    for path in paths:
        seconds, error = time_notebook(path, args.timeout)
        rows.append({"notebook": path.name, "seconds": round(seconds, 1), "error": error})
        print(f"{path.name:<32} {seconds:7.1f} s  {'ok' if error is None else 'ERROR: ' + error}", flush=True)
        if args.record:  # after every notebook, so an interrupted run keeps what it measured
            subdir = "cpu" if is_interpreter() else "gpu"
            where = record("lab_times", merged_with_record(rows, subdir), subdir=subdir)
    if args.record:
        print("recorded", where)
    return 1 if any(r["error"] for r in rows) else 0
