"""The grader's child process: run one exercise's cells and its check, write the verdict to a file.

``python -m detlib.grade.worker JOB_DIR`` reads ``JOB_DIR/job.json`` (written by
:mod:`detlib.grade.runner`), touches ``JOB_DIR/started`` once the imports are done (the time limit
counts from there), runs each cell from a real ``.py`` file (``@triton.jit`` reads its source back with
``inspect.getsource``), then the check, and writes a :class:`~detlib.grade.spec.Result` as JSON to
``JOB_DIR/result.json``.  Whatever the learner's code does short of killing the process becomes a
verdict; the parent handles the rest (time limit, exit, crash).
"""

from __future__ import annotations

import io
import json
import os
import resource
import signal
import sys
import traceback
import types
from pathlib import Path
from typing import Any

from detlib.grade.spec import Exercise, Result, find, run_check  # detlib first: it sets TRITON_INTERPRET

#: What the child keeps of the learner's printed output; the rest is counted and dropped.
OUTPUT_CAP_BYTES = 1 << 20
#: Backstop for output written below Python (C extensions writing to the file descriptor directly).
FILE_SIZE_LIMIT_BYTES = 256 << 20


class CappedStream(io.TextIOBase):
    """A text stream that writes the first ``cap`` bytes to a file descriptor and only counts the rest."""

    def __init__(self, fd: int, cap: int) -> None:
        super().__init__()
        self.fd, self.cap, self.written = fd, cap, 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        data = str(s).encode("utf-8", "replace")
        room = self.cap - self.written
        if room > 0:
            os.write(self.fd, data[:room])
        self.written += len(data)
        return len(s)

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.fd


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _cell_line(err: BaseException, files: set[str]) -> str:
    """Where in the learner's cells ``err`` was raised: the innermost frame in one of ``files``."""
    frames = [f for f in traceback.extract_tb(err.__traceback__) if f.filename in files]
    if not frames:
        return ""
    frame = frames[-1]
    return f" (line {frame.lineno}" + (f" of {frame.name}" if frame.name != "<module>" else "") + ")"


def _one_line(err: BaseException) -> str:
    lines = f"{type(err).__name__}: {err}".strip().splitlines()
    return lines[0][:300] if lines else type(err).__name__


def _exit_reason(err: SystemExit, where: str) -> str:
    return f"the code called sys.exit({err.code!r}){where}; the process would have exited before reporting"


def run_cells(cells: list[dict[str, str]], job_dir: Path, namespace: dict[str, Any]) -> dict[str, str] | None:
    """Execute the cells in ``namespace``; on the first failure return ``{status, reason, hint}``."""
    files: set[str] = set()
    for cell in cells:
        path = job_dir / cell["file"]
        path.write_text(cell["code"], encoding="utf-8")
        files.add(str(path))
        try:
            code = compile(cell["code"], str(path), "exec")
        except (SyntaxError, ValueError) as err:
            line = f" (line {err.lineno})" if isinstance(err, SyntaxError) and err.lineno else ""
            msg = err.msg if isinstance(err, SyntaxError) else str(err)
            return {"status": "error", "reason": f"{cell['label']} has a syntax error: {msg}{line}",
                    "hint": "run the cell in Jupyter to see where Python stops reading it"}
        try:
            exec(code, namespace)
        except TimeLimit:
            raise
        except NotImplementedError:
            if cell["kind"] == "exercise":
                return {"status": "not attempted", "reason": f"{cell['label']} still raises NotImplementedError"}
            return {"status": "error", "reason": f"{cell['label']} raised NotImplementedError"}
        except SystemExit as err:
            return {"status": "error", "reason": _exit_reason(err, f" in {cell['label']}"),
                    "hint": "remove sys.exit() / exit() / quit() from the notebook"}
        except BaseException as err:  # the learner's code may raise anything
            return {"status": "error",
                    "reason": f"{cell['label']} raised {_one_line(err)}{_cell_line(err, files)}",
                    "hint": "restart the kernel and run the notebook top to bottom: it should run without errors"}
    return None


class TimeLimit(BaseException):
    """Raised in the learner's code when the exercise's time is up (a BaseException: ``except Exception`` misses it)."""


def timeout_reason(seconds: float, where: str = "") -> str:
    """The verdict's reason for an exercise that ran out of time (shared with the parent's hard limit)."""
    return f"took longer than {seconds:g} s — an infinite loop?{where}"


TIMEOUT_HINT = "look for a loop whose condition never changes, or a size far larger than the check's"


def _on_alarm(signum: int, frame: object) -> None:
    raise TimeLimit


def grade(ex: Exercise, job: dict[str, Any], job_dir: Path) -> Result:
    """Run the job's cells and ``ex``'s check within ``job["timeout_s"]``; return the verdict."""
    learner = types.ModuleType("__main__")  # the cells' globals, as in a notebook kernel
    learner.__dict__["__builtins__"] = __builtins__
    sys.modules["__main__"] = learner
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, job["timeout_s"])
    try:
        failure = run_cells(job["cells"], job_dir, learner.__dict__)
        if failure is not None:
            hint = failure.get("hint") or ex.hint
            return Result(ex.key, failure["status"], 0.0, ex.points, failure["reason"], hint)  # type: ignore[arg-type]
        return run_check(ex, learner.__dict__.get(ex.name))
    except TimeLimit as err:
        where = _cell_line(err, _files(job_dir)).replace(" (line", " (it was running line")
        return Result(ex.key, "timeout", 0.0, ex.points, timeout_reason(job["timeout_s"], where), TIMEOUT_HINT)
    except SystemExit as err:
        return Result(ex.key, "error", 0.0, ex.points, _exit_reason(err, _cell_line(err, _files(job_dir))),
                      "a graded function must return its answer, not exit")
    except BaseException as err:  # e.g. KeyboardInterrupt raised by the learner: outside run_check's net
        return Result(ex.key, "error", 0.0, ex.points, f"{_one_line(err)}{_cell_line(err, _files(job_dir))}", ex.hint)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _files(job_dir: Path) -> set[str]:
    return {str(p) for p in job_dir.glob("cell*.py")}


def main(argv: list[str]) -> int:
    job_dir = Path(argv[0]).resolve()
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))
    out = CappedStream(sys.stdout.fileno(), OUTPUT_CAP_BYTES)
    sys.stdout = sys.stderr = out  # type: ignore[assignment]
    job = json.loads((job_dir / "job.json").read_text(encoding="utf-8"))

    from detlib.grade.runner import import_extra_checks

    import_extra_checks()
    ex = find(job["key"])  # imports the lab's checks: not the learner's time
    (job_dir / "started").touch()
    verdict = grade(ex, job, job_dir).as_dict()
    if out.written > OUTPUT_CAP_BYTES:
        verdict["notes"].append(f"printed {megabytes(out.written)} of output (truncated)")
    tmp = job_dir / "result.json.tmp"
    tmp.write_text(json.dumps(verdict), encoding="utf-8")
    tmp.replace(job_dir / "result.json")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
