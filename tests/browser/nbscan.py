"""Static scan of the course's notebooks: which cells draw figures, label them, and create widgets.

Both the accessibility test (fast, no kernel) and the browser test (which notebooks to open, how many
controls to expect) need the same facts, read from the code without running it:

* a cell *makes a figure* when it calls matplotlib (``plt.subplots``, ``ax.plot``, ...) or a function
  that does: a detlib helper (followed into its source, through the detlib functions it calls) or a
  function defined in an earlier cell of the notebook;
* a cell *labels* its figure when it, or a helper it uses, sets a title, an x label and a y label
  (``set_title``/``suptitle``/``plt.title``, ``set_xlabel``/``plt.xlabel``, ``ax.set(title=...)``, ...);
* a cell *creates controls* when it calls an ipywidgets control class (``IntSlider``, ``Dropdown``,
  ``Button``, ...); each call site is recorded with whether it passes ``description=``.

Function bodies defined in a cell count where the function is used, not where it is defined, so a
cell that only defines ``draw()`` does not need a caption but the cell that calls it does.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import textwrap
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import nbformat

LABELS = ("title", "xlabel", "ylabel")
# Call names that set one of LABELS, whatever they are called on (Axes, Figure, pyplot).
_LABEL_METHODS = {
    "set_title": "title", "suptitle": "title",
    "set_xlabel": "xlabel", "supxlabel": "xlabel",
    "set_ylabel": "ylabel", "supylabel": "ylabel",
}
# pyplot's state-machine spellings: only counted when called on the pyplot module.
_PYPLOT_LABELS = {"title": "title", "xlabel": "xlabel", "ylabel": "ylabel"}
_PYPLOT_FIGURE = {"subplots", "figure", "subplot_mosaic", "subplot"}
# Axes (and pyplot) methods that draw data onto a figure.
_DRAW_METHODS = {
    "plot", "hist", "hist2d", "imshow", "matshow", "scatter", "bar", "barh", "step", "stairs", "stem",
    "errorbar", "fill_between", "pcolormesh", "pcolor", "contour", "contourf", "boxplot", "violinplot",
    "pie", "semilogx", "semilogy", "loglog", "heatmap",
}
# Widgets that show a value but take no input: no interaction, and a description is optional.
_DISPLAY_ONLY = {"HTML", "HTMLMath", "Label", "IntProgress", "FloatProgress", "Valid"}


def control_classes() -> frozenset[str]:
    """Names of the ipywidgets classes a learner operates: controls that carry a ``description``."""
    import ipywidgets
    from ipywidgets.widgets.widget_description import DescriptionWidget

    names = {
        name for name, cls in vars(ipywidgets).items()
        if inspect.isclass(cls) and issubclass(cls, DescriptionWidget) and issubclass(cls, ipywidgets.ValueWidget)
    }
    return frozenset((names - _DISPLAY_ONLY) | {"Button"})


CONTROL_CLASSES = control_classes()


@dataclass(frozen=True)
class WidgetCall:
    """One call site that constructs an ipywidgets control."""

    cls: str
    has_description: bool
    where: str


@dataclass
class Facts:
    """What a piece of code does, its helpers included."""

    makes_figure: bool = False
    labels: set[str] = field(default_factory=set)
    widgets: list[WidgetCall] = field(default_factory=list)
    uses_ipywidgets: bool = False

    def absorb(self, other: Facts) -> None:
        """Adds what a helper used by this code does."""
        self.makes_figure |= other.makes_figure
        self.labels |= other.labels
        self.uses_ipywidgets |= other.uses_ipywidgets
        self.widgets.extend(w for w in other.widgets if w not in self.widgets)


@dataclass
class CellScan:
    """The facts of one code cell of a notebook."""

    index: int
    facts: Facts

    def missing_labels(self) -> list[str]:
        """The labels among title, xlabel, ylabel that neither the cell nor its helpers set."""
        return [label for label in LABELS if label not in self.facts.labels]


def _dotted(node: ast.expr) -> str | None:
    """``a.b.c`` for a Name/Attribute chain, else None."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class _Namespace:
    """Resolves names of one notebook (or module) to ipywidgets, pyplot, detlib objects or local defs."""

    def __init__(self, follow: tuple[str, ...], globals_: dict[str, Any] | None = None) -> None:
        self.follow = follow                     # top-level packages whose functions are followed
        self.widget_modules: set[str] = set()    # names bound to the ipywidgets module
        self.widget_names: dict[str, str] = {}   # local name -> ipywidgets class name
        self.pyplot: set[str] = {"plt"}          # names bound to matplotlib.pyplot
        self.objects: dict[str, Any] = dict(globals_ or {})
        self.defs: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        self.results: dict[str, str] = {}        # name -> dotted callee of ``name = callee(...)``
        for name, value in self.objects.items():
            if isinstance(value, types.ModuleType):
                if value.__name__.split(".")[0] == "ipywidgets":
                    self.widget_modules.add(name)
                elif value.__name__ == "matplotlib.pyplot":
                    self.pyplot.add(name)
            elif inspect.isclass(value) and value.__module__.split(".")[0] == "ipywidgets":
                self.widget_names[name] = value.__name__

    def learn(self, tree: ast.AST) -> None:
        """Records the imports and top-level function definitions of ``tree``."""
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._bind_module(alias.asname or alias.name.split(".")[0], alias.name, alias.asname is None)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    self._bind_from(node.module, alias.name, alias.asname or alias.name)
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                  and isinstance(node.value, ast.Call) and _dotted(node.value.func)):
                self.results[node.targets[0].id] = _dotted(node.value.func)  # type: ignore[assignment]
        if isinstance(tree, ast.Module):
            for node in tree.body:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    self.defs[node.name] = node

    def _bind_module(self, name: str, module: str, top_only: bool) -> None:
        if module == "ipywidgets" or module.startswith("ipywidgets."):
            if not top_only or module == "ipywidgets":
                self.widget_modules.add(name)
        elif module == "matplotlib.pyplot" and not top_only:
            self.pyplot.add(name)
        elif module.split(".")[0] in self.follow:
            imported = importlib.import_module(module)  # ``import detlib.x`` binds ``detlib`` with x loaded
            self.objects[name] = importlib.import_module(module.split(".")[0]) if top_only else imported

    def _bind_from(self, module: str, attr: str, name: str) -> None:
        if module.split(".")[0] == "ipywidgets":
            self.widget_names[name] = attr
        elif module == "matplotlib" and attr == "pyplot":
            self.pyplot.add(name)
        elif module.split(".")[0] in self.follow:
            mod = importlib.import_module(module)
            self.objects[name] = getattr(mod, attr) if hasattr(mod, attr) else importlib.import_module(
                f"{module}.{attr}")

    def resolve(self, dotted: str, depth: int = 0) -> Any:
        """The object of a followed package that a dotted name refers to, or None.

        A name bound to the result of a followed function stands for the class its return annotation
        names, so ``report = audit(...); report.plot()`` reaches the ``plot`` method of that class.
        """
        head, *rest = dotted.split(".")
        obj = self.objects.get(head)
        if obj is None and head in self.results and depth < 3:
            obj = _returned_class(self.resolve(self.results[head], depth + 1))
        for part in rest:
            if obj is None:
                return None
            obj = getattr(obj, part, None)
        module = getattr(obj, "__module__", None) if not isinstance(obj, types.ModuleType) else obj.__name__
        return obj if module and module.split(".")[0] in self.follow else None

    def widget_class(self, func: ast.expr) -> str | None:
        """The ipywidgets class a call's function names, or None."""
        if isinstance(func, ast.Name):
            return self.widget_names.get(func.id)
        if isinstance(func, ast.Attribute) and _dotted(func.value) in self.widget_modules:
            return func.attr
        return None


class _Scanner:
    """Collects Facts from code, following detlib helpers and notebook functions it uses."""

    def __init__(self, follow: tuple[str, ...]) -> None:
        self.follow = follow
        self._active: set[int] = set()

    def facts(self, body: list[ast.stmt], ns: _Namespace, where: str) -> Facts:
        """Facts of statements; nested function bodies count only where the function is used."""
        out = Facts()
        for node in _walk_outside_defs(body):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                out.uses_ipywidgets |= any(n.split(".")[0] == "ipywidgets" for n in names)
            elif isinstance(node, ast.Call):
                self._call(node, ns, where, out)
            elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Load):
                self._reference(node, ns, out)
        for node in body:  # constructors inside local defs are still widgets this code creates
            for inner in ast.walk(node):
                if isinstance(inner, ast.Call):
                    self.record_widget(inner, ns, where, out)
        return out

    def _call(self, node: ast.Call, ns: _Namespace, where: str, out: Facts) -> None:
        func = node.func
        if isinstance(func, ast.Attribute):
            receiver = _dotted(func.value)
            on_pyplot = receiver in ns.pyplot
            if func.attr in _LABEL_METHODS:
                out.labels.add(_LABEL_METHODS[func.attr])
            elif on_pyplot and func.attr in _PYPLOT_LABELS:
                out.labels.add(_PYPLOT_LABELS[func.attr])
            if func.attr == "set":
                out.labels |= {kw.arg for kw in node.keywords if kw.arg in LABELS}
            if (on_pyplot and func.attr in _PYPLOT_FIGURE) or func.attr in _DRAW_METHODS:
                out.makes_figure = True
        if ns.widget_class(func) in ("interact", "interactive", "interact_manual") or (
            isinstance(func, ast.Attribute) and func.attr in ("interact", "interactive", "interact_manual")
            and _dotted(func.value) in ns.widget_modules
        ):
            out.uses_ipywidgets = True

    def record_widget(self, node: ast.Call, ns: _Namespace, where: str, out: Facts) -> None:
        """Records ``node`` in ``out`` when it constructs an ipywidgets control."""
        cls = ns.widget_class(node.func)
        if cls in CONTROL_CLASSES:
            described = any(
                kw.arg == "description" and not (isinstance(kw.value, ast.Constant) and not kw.value.value)
                for kw in node.keywords
            )
            call = WidgetCall(cls, described, f"{where}, line {node.lineno}")
            if call not in out.widgets:
                out.widgets.append(call)
            out.uses_ipywidgets = True

    def _reference(self, node: ast.Name | ast.Attribute, ns: _Namespace, out: Facts) -> None:
        dotted = _dotted(node)
        if dotted is None:
            return
        if dotted in ns.defs:
            fn = ns.defs[dotted]
            if id(fn) not in self._active:
                self._active.add(id(fn))
                out.absorb(self.facts(fn.body, ns, f"function {fn.name}"))
                self._active.discard(id(fn))
            return
        obj = ns.resolve(dotted)
        if inspect.isfunction(obj):
            out.absorb(self.helper(obj))

    def helper(self, fn: types.FunctionType) -> Facts:
        """Facts of a followed function, through the followed functions it uses (cycles cut)."""
        parsed = _parsed_helper(fn)
        if parsed is None or id(fn) in self._active:
            return Facts()
        body, where = parsed
        ns = _Namespace(self.follow, fn.__globals__)
        ns.learn(ast.Module(body=body, type_ignores=[]))
        ns.defs.clear()  # a helper's nested functions are reached through the helper's own code
        self._active.add(id(fn))
        try:
            return self.facts(body, ns, where)
        finally:
            self._active.discard(id(fn))


def _returned_class(fn: Any) -> type | None:
    """The class a function's return annotation names, or None."""
    if not inspect.isfunction(fn):
        return None
    try:
        returned = typing.get_type_hints(fn).get("return")
    except Exception:  # an annotation that does not evaluate (a TYPE_CHECKING-only name): not followed
        return None
    return returned if inspect.isclass(returned) else None


@lru_cache(maxsize=None)
def _parsed_helper(fn: types.FunctionType) -> tuple[list[ast.stmt], str] | None:
    """The body statements of a function's source and its dotted name; None without source."""
    try:
        source = inspect.getsource(fn)
    except (OSError, TypeError):
        return None
    node = ast.parse(textwrap.dedent(source)).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return node.body, f"{fn.__module__}.{fn.__qualname__}"


def _walk_outside_defs(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node of ``body`` except those inside function or class definitions."""
    stack: list[ast.AST] = list(reversed(body))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        stack.extend(reversed(list(ast.iter_child_nodes(node))))


def _code(source: str) -> str:
    """Cell source with IPython magics and shell escapes blanked, so that ``ast`` can parse it."""
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


@dataclass
class NotebookScan:
    """The static facts of one notebook, cell by cell."""

    path: Path
    nb: nbformat.NotebookNode
    cells: list[CellScan]

    @classmethod
    def read(cls, path: Path, follow: tuple[str, ...] = ("detlib",)) -> NotebookScan:
        """Parses every code cell of the notebook at ``path`` (a syntax error names the cell).

        Functions of the packages in ``follow`` that the notebook uses are read too.
        """
        nb = nbformat.read(path, as_version=4)
        ns = _Namespace(follow)
        trees: dict[int, ast.Module] = {}
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                trees[index] = ast.parse(_code(cell.source))
            except SyntaxError as err:
                raise SyntaxError(f"{path.name} cell {index}: {err}") from err
            ns.learn(trees[index])
        scanner = _Scanner(follow)
        cells = [CellScan(index, scanner.facts(tree.body, ns, f"{path.name} cell {index}"))
                 for index, tree in trees.items()]
        return cls(path, nb, cells)

    @property
    def uses_widgets(self) -> bool:
        """Whether the notebook's code, or a detlib helper it uses, creates ipywidgets."""
        return any(c.facts.uses_ipywidgets for c in self.cells)

    def widget_calls(self) -> list[WidgetCall]:
        """Every control constructor call site the notebook's code reaches, each once."""
        calls: list[WidgetCall] = []
        for cell in self.cells:
            calls.extend(w for w in cell.facts.widgets if w not in calls)
        return calls

    def figure_cells(self) -> list[CellScan]:
        """The code cells that draw a figure."""
        return [c for c in self.cells if c.facts.makes_figure]

    def caption_after(self, index: int) -> str | None:
        """The text of the markdown cell right after cell ``index``, if that cell is a caption."""
        if index + 1 >= len(self.nb.cells):
            return None
        nxt = self.nb.cells[index + 1]
        text = nxt.source.strip()
        if nxt.cell_type != "markdown" or not text or text.startswith("#"):
            return None
        return text

    def code_cell_count(self) -> int:
        """Code cells with something to run (JupyterLab gives empty cells no execution count)."""
        return sum(1 for c in self.nb.cells if c.cell_type == "code" and c.source.strip())


def module_widget_calls(path: Path, module: str) -> list[WidgetCall]:
    """Control constructor calls anywhere in the Python file ``path`` (imported as ``module``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ns = _Namespace(follow=())
    ns.learn(tree)
    out = Facts()
    scanner = _Scanner(follow=())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            scanner.record_widget(node, ns, module, out)
    return out.widgets
