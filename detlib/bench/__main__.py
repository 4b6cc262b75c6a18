"""Dispatch ``python -m detlib.bench SUBCOMMAND`` to the module of that name in this package."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import detlib  # noqa: F401  (chooses GPU or interpreter before any benchmark imports triton)
import detlib.bench as bench_pkg

_NOT_SUBCOMMANDS = {"record", "timing"}


def _subcommands() -> dict[str, object]:
    names = sorted(m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if not m.name.startswith("_"))
    return {n: importlib.import_module(f"detlib.bench.{n}") for n in names if n not in _NOT_SUBCOMMANDS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detlib.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in _subcommands().items():
        p = sub.add_parser(name, help=getattr(module, "DESCRIPTION", ""), description=getattr(module, "DESCRIPTION", ""))
        module.add_arguments(p)  # type: ignore[attr-defined]
        p.set_defaults(_module=module)
    args = parser.parse_args(argv)
    return int(args._module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
