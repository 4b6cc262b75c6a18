"""Grade notebooks: one child process per exercise, with a time limit, run in parallel.

For each notebook the runner finds the lab's exercises, cuts out each exercise's cells
(:mod:`detlib.grade.notebook`) and runs them with the check in ``python -m detlib.grade.worker``, a
fresh process in its own process group.  The child gets ``timeout_s × scale`` seconds, counted from
the end of its imports, and interrupts the learner's code when they are up; a little later the parent
kills the whole group.  Whatever happens (an exit, a crash, a
notebook that is not JSON) becomes a :class:`~detlib.grade.spec.Result`, so one learner's code never
stops the grading of the rest.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from detlib.grade.notebook import Notebook, NotebookError, lab_of, read_notebook
from detlib.grade.spec import Exercise, Result, lab_exercises
from detlib.grade.worker import OUTPUT_CAP_BYTES, TIMEOUT_HINT, megabytes, timeout_reason

#: Environment variable naming extra check modules (comma separated) to import, e.g. a test-only lab.
EXTRA_CHECKS_ENV = "DETLIB_GRADE_EXTRA_CHECKS"
#: How long a child may take to import torch and detlib before its time limit starts.
STARTUP_LIMIT_S = 120.0
#: The child stops the learner's code itself at the time limit (to say which line was running); the parent
#: kills the process group this much later, for code the child cannot interrupt (a loop inside C).
KILL_GRACE_S = 5.0
_POLL_S = 0.05
_TAIL_BYTES = 4096


def import_extra_checks() -> None:
    """Import the check modules named in ``$DETLIB_GRADE_EXTRA_CHECKS`` so their exercises register."""
    for name in filter(None, (n.strip() for n in os.environ.get(EXTRA_CHECKS_ENV, "").split(","))):
        importlib.import_module(name)


@dataclass
class NotebookReport:
    """The verdicts on one notebook, or the reason it could not be graded (``message``)."""

    path: Path
    lab: str | None
    results: list[Result] = field(default_factory=list)
    message: str = ""
    learner: str = ""

    @property
    def score(self) -> float:
        return sum(r.points for r in self.results)

    @property
    def max_score(self) -> int:
        return sum(r.max_points for r in self.results)


@dataclass(frozen=True)
class Job:
    """One exercise of one notebook, to run in a child process."""

    notebook: Notebook
    exercise: Exercise
    timeout_s: float


def _verdict(ex: Exercise, status: str, reason: str, hint: str = "", notes: list[str] | None = None) -> Result:
    return Result(ex.key, status, 0.0, ex.points, reason, hint or ex.hint, 0.0, notes or [])  # type: ignore[arg-type]


def _missing(nb: Notebook, ex: Exercise) -> Result | None:
    """A verdict without starting a child when no exercise cell defines the name (else ``None``)."""
    if any(c for c in nb.program(ex.name) if "exercise" in c.tags):
        return None
    elsewhere = nb.defining_cells(ex.name)
    if elsewhere:
        return _verdict(ex, "missing",
                        f"`{ex.name}` is defined in {elsewhere[0].label}, which is not tagged `exercise`",
                        "tag that cell `exercise` (JupyterLab: the property inspector, gear icon on the right)")
    return _verdict(ex, "missing", f"no cell tagged `exercise` defines `{ex.name}`",
                    "keep the exercise cell of the lab (tagged `exercise`) and write your code in it")


def _job_file(job: Job, job_dir: Path) -> None:
    cells = [{"label": c.label, "kind": "exercise" if "exercise" in c.tags else "setup", "code": c.code,
              "file": f"cell{c.index:03d}.py"} for c in job.notebook.program(job.exercise.name)]
    spec = {"key": job.exercise.key, "timeout_s": job.timeout_s, "cells": cells}
    (job_dir / "job.json").write_text(json.dumps(spec), encoding="utf-8")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"{code} ({signal.Signals(-code).name})"
        except ValueError:
            return str(code)
    return str(code)


def _tail(log: Path) -> str:
    """The last non-empty line the child printed (capped read), to explain a crash."""
    with log.open("rb") as f:
        f.seek(max(0, log.stat().st_size - _TAIL_BYTES))
        lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    return lines[-1][:200] if lines else ""


def _child_env(threads: int) -> dict[str, str]:
    """The parent's environment, plus: this detlib importable from the notebook's folder, no GUI, fair threads."""
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parents[2])  # the folder holding this detlib package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH", "")) if p)
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def run_job(job: Job, threads: int = 1) -> Result:
    """Run one exercise in a child process and return its verdict, whatever the child does."""
    ex = job.exercise
    missing = _missing(job.notebook, ex)
    if missing is not None:
        return missing
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="detlib-grade-") as tmp:
        job_dir = Path(tmp)
        _job_file(job, job_dir)
        log = job_dir / "output.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "detlib.grade.worker", str(job_dir)],
                cwd=job.notebook.path.parent.resolve(), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=_child_env(threads), start_new_session=True,
            )
            try:
                outcome = _wait(proc, job_dir, job.timeout_s + KILL_GRACE_S)
            finally:
                _kill_group(proc)  # grandchildren the learner started go too
                proc.wait()
        result = _collect(job, job_dir, log, outcome, proc.returncode)
    if result.seconds == 0.0:
        result.seconds = time.perf_counter() - start
    return result


def _wait(proc: subprocess.Popen[bytes], job_dir: Path, timeout_s: float) -> str:
    """Wait for the child: ``"exited"``, ``"timeout"`` (its limit passed) or ``"no start"`` (imports hung)."""
    started_file, began, started_at = job_dir / "started", time.monotonic(), None
    while True:
        try:
            proc.wait(timeout=_POLL_S)
            return "exited"
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        if started_at is None and started_file.exists():
            started_at = now
        if started_at is None and now - began > STARTUP_LIMIT_S:
            return "no start"
        if started_at is not None and now - started_at > timeout_s:
            return "timeout"


def _collect(job: Job, job_dir: Path, log: Path, outcome: str, code: int) -> Result:
    ex, result_file = job.exercise, job_dir / "result.json"
    if outcome == "exited" and result_file.exists():
        try:
            return Result(**json.loads(result_file.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as err:
            return _verdict(ex, "error", f"the grader could not read the verdict ({err})")
    notes = []
    size = log.stat().st_size
    if size >= OUTPUT_CAP_BYTES:
        notes.append(f"printed at least {megabytes(size)} of output (truncated)")
    if outcome == "timeout":
        return _verdict(ex, "timeout", timeout_reason(job.timeout_s), TIMEOUT_HINT, notes)
    if outcome == "no start":
        return _verdict(ex, "error", f"the grader's child process did not start within {STARTUP_LIMIT_S:g} s "
                        "(is the machine overloaded?)", "grade again with fewer --jobs", notes)
    last = _tail(log)
    reason = f"the process exited with code {_exit_text(code)} before reporting"
    if last:
        reason += f"; its last output: {last}"
    return _verdict(ex, "error", reason, "remove os._exit()/exit calls; a crash may come from an out-of-bounds "
                    "access in a kernel or from running out of memory", notes)


def plan(path: Path, learner: str = "") -> tuple[NotebookReport, list[Exercise], Notebook | None]:
    """Read one notebook and list its lab's exercises; problems become the report's ``message``.

    The notebook is ``None`` when there is nothing to run (unreadable, or no lab in its name).
    """
    report = NotebookReport(path, None, learner=learner)
    try:
        nb = read_notebook(path)
    except NotebookError as err:
        nb = None
        report.message = f"{path.name}: {err}"
    report.lab = lab_of(path)
    if report.lab is None:
        report.message = report.message or f"{path.name}: the file name does not start with a lab number (NN_...)"
        return report, [], None
    try:
        exercises = lab_exercises(report.lab)
    except Exception as err:  # a broken check module must not stop the grading of other labs
        report.message = f"the checks of lab {report.lab} could not be loaded ({type(err).__name__}: {err})"
        return report, [], None
    if not exercises:
        report.message = report.message or f"lab {report.lab} has no checks: nothing to grade in {path.name}"
    elif nb is None:  # every exercise of an unreadable notebook gets 0, so totals stay comparable
        hint = "open it in Jupyter and save it again, or download a fresh copy"
        report.results = [_verdict(ex, "error", f"the notebook could not be read: {report.message}", hint)
                          for ex in exercises]
    return report, exercises, nb


def grade(
    paths: Sequence[tuple[Path, str]],
    *,
    timeout_scale: float = 1.0,
    jobs: int | None = None,
    on_result: Callable[[NotebookReport, Result], None] | None = None,
) -> list[NotebookReport]:
    """Grade ``(notebook, learner)`` pairs, running up to ``jobs`` children at once; reports in input order."""
    import_extra_checks()
    jobs = max(1, jobs or os.cpu_count() or 1)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    reports, work = [], []
    for path, learner in paths:
        report, exercises, nb = plan(path, learner)
        reports.append(report)
        if nb is not None:
            report.results = [_verdict(ex, "error", "not graded") for ex in exercises]
            work += [(report, i, Job(nb, ex, ex.timeout_s * timeout_scale)) for i, ex in enumerate(exercises)]

    def run(item: tuple[NotebookReport, int, Job]) -> None:
        report, i, job = item
        try:
            report.results[i] = run_job(job, threads)
        except Exception as err:  # a grader fault on one exercise (disk full, ...) must not stop the batch
            report.results[i] = _verdict(job.exercise, "error", f"the grader failed: {type(err).__name__}: {err}")
        if on_result is not None:
            on_result(report, report.results[i])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, work))
    return reports
