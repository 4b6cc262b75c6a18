"""Every solution notebook is stored clean and runs top to bottom headless within its stated CPU time."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = sorted((ROOT / "solutions").glob("*.ipynb"))
LABS = sorted((ROOT / "labs").glob("*.ipynb"))
# A CI machine may be slower than the one the budgets were measured on: allow this much on top.
SLACK = float(os.environ.get("DETLAB_NOTEBOOK_SLACK", "1.3"))


def _ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.mark.parametrize("path", SOLUTIONS + LABS, ids=_ids(SOLUTIONS) + [f"labs-{p.stem}" for p in LABS])
def test_notebook_is_stored_clean(path: Path) -> None:
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3", "kernelspec python3 missing"
    meta = nb["metadata"].get("detlab", {})
    assert meta.get("lab") == path.name[:2], "metadata detlab.lab must match the file name"
    assert isinstance(meta.get("cpu_minutes"), (int, float)) and meta["cpu_minutes"] > 0
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"cell {i} has outputs"
            assert cell.get("execution_count") is None, f"cell {i} has an execution count"


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system) the process has used so far, from /proc; None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One headless run of a notebook: total wall time and, per code cell, wall and kernel CPU seconds."""

    nb: nbformat.NotebookNode
    seconds: float
    cells: list[tuple[int, float, float | None]] = field(default_factory=list)
    timed_out: str | None = None  # which cell passed the per-cell limit, if one did

    def errors(self) -> list[dict]:
        return [o for c in self.nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                if o.get("output_type") == "error"]

    def slowest(self, n: int = 3) -> str:
        """The n slowest cells: where the time went (a wall time far above its CPU time is a wait, not work)."""
        rows = sorted(self.cells, key=lambda c: -c[1])[:n]
        return "; ".join(f"cell {i}: {wall:.1f} s wall" + (f", {cpu:.1f} s CPU" if cpu is not None else "")
                         for i, wall, cpu in rows)


def _run(path: Path, budget_s: float) -> Run:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError

    nb = nbformat.read(path, as_version=4)
    run = Run(nb, 0.0)
    marks: dict[str, float | None] = {}

    def kernel_cpu() -> float | None:
        return _cpu_seconds(getattr(client.km.provisioner, "pid", None))

    def started(cell, cell_index, **_) -> None:
        marks.update(index=cell_index, wall=time.perf_counter(), cpu=kernel_cpu())

    def executed(cell, cell_index, **_) -> None:
        cpu = kernel_cpu()
        used = cpu - marks["cpu"] if cpu is not None and marks["cpu"] is not None else None
        run.cells.append((cell_index, time.perf_counter() - marks["wall"], used))

    per_cell_s = int(budget_s * SLACK) + 60  # the total is asserted by the caller
    client = NotebookClient(
        nb,
        timeout=per_cell_s,
        kernel_name="python3",
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_start=started,
        on_cell_executed=executed,
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellTimeoutError:
        run.timed_out = f"cell {marks['index']} passed the {per_cell_s} s limit of one cell"
    run.seconds = time.perf_counter() - start
    return run


@pytest.mark.notebook
@pytest.mark.parametrize("path", SOLUTIONS, ids=_ids(SOLUTIONS))
def test_solution_runs_headless_within_budget(path: Path) -> None:
    """Runs clean, within budget x SLACK. A run over budget (or with a cell past its own limit) is repeated
    once in a fresh kernel: a machine that stalls for minutes (seen once in CI: lab 03 took 300 s, against
    8-21 s on every other run) must not fail the course, a notebook that is slow every time must. Either way
    the slow cells are named."""
    budget_s = 60 * float(nbformat.read(path, as_version=4).metadata["detlab"]["cpu_minutes"])
    run = _run(path, budget_s)
    assert run.timed_out or not run.errors(), run.errors()[0]  # a timed-out cell shows as interrupted
    if run.timed_out or run.seconds > budget_s * SLACK:
        first = run
        run = _run(path, budget_s)
        assert not run.timed_out and run.seconds <= budget_s * SLACK, (
            f"{path.name} took {first.seconds:.0f} s, then {run.seconds:.0f} s again, budget {budget_s:.0f} s "
            f"(x{SLACK}); {run.timed_out or 'slowest cells: ' + run.slowest()}")
        assert not run.errors(), run.errors()[0]
        warnings.warn(f"{path.name}: a first run took {first.seconds:.0f} s "
                      f"({first.timed_out or 'slowest cells: ' + first.slowest()}), the re-run {run.seconds:.0f} s, "
                      f"within its budget of {budget_s:.0f} s (x{SLACK})")
    (ROOT / "artifacts" / "notebooks").mkdir(parents=True, exist_ok=True)
    nbformat.write(run.nb, ROOT / "artifacts" / "notebooks" / path.name)  # executed copy, for looking at in CI logs
