"""Write and read measured results in ``data/``, always together with where they were measured."""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

from detlib.backend import environment

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


def record(name: str, results: Any, *, subdir: str = "gpu") -> Path:
    """Save ``results`` as ``data/<subdir>/<name>.json`` with the environment and the date."""
    path = DATA_DIR / subdir / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "measured_on": _dt.date.today().isoformat(),
        "environment": environment().as_dict(),
        "results": results,
    }
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    return path


def load(name: str, *, subdir: str = "gpu") -> dict[str, Any]:
    """Load a recorded result (a dict with ``environment`` and ``results``)."""
    path = DATA_DIR / subdir / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no recorded result {path}; run `python -m detlib.bench ... --record` on a GPU")
    return json.loads(path.read_text())
