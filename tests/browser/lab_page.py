"""Drives one notebook in JupyterLab the way a learner does, and reads back what the page shows.

Everything goes through the page: the notebook is opened by URL, run with the menu (Run → Run All
Cells), widgets are moved with the keyboard or the mouse, and the checks read the rendered DOM
(prompts, error outputs, widget views, images), so a broken widget extension, a plot that does not
render or a traceback in a callback shows up as it would for a learner.
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .lab_server import LabServer

if TYPE_CHECKING:  # the module imports without Playwright, so a missing install skips instead of erroring
    from playwright.sync_api import Locator, Page

POLL_S = 0.25
# The notebook on show (JupyterLab hides the panels of other tabs); "$NB" in the scripts below.
_PANEL = ".jp-NotebookPanel:not(.lm-mod-hidden)"
_NB = f"{_PANEL} .jp-Notebook"


def _script(js: str) -> str:
    """A page script with $PANEL and $NB filled in."""
    return js.replace("$PANEL", _PANEL).replace("$NB", _NB)


# Output text that only an exception produces (a warning on stderr has none of these).
_ERROR_PATTERN = (r"Traceback \(most recent call last\)|^\s*Cell In\[\d+\], line \d+"
                  r"|^[A-Za-z_.]*(Error|Exception|Interrupt)\b(: |$)")

# Widget view classes the harness knows how to operate, by the kind of interaction they take.
_CONTROL_KINDS = {
    "widget-slider": "slider",
    "widget-dropdown": "select",
    "widget-select": "select",
    "widget-radio": "radio",
    "widget-checkbox": "checkbox",
    "widget-toggle-buttons": "toggles",
    "widget-toggle-button": "click",
    "widget-button": "click",
    "widget-text": "text",
    "widget-textarea": "text",
}
# Widget views that take no input: containers, outputs, text, progress bars (tqdm's among them).
_PASSIVE = ("widget-container", "widget-box", "widget-output", "widget-html", "widget-htmlmath", "widget-label",
            "widget-hprogress", "widget-vprogress", "widget-valid", "widget-interact", "widget-image")

_JS_CONTROLS = _script("""
([kinds, passive]) => {
  const found = [];
  for (const el of document.querySelectorAll('$NB .jp-OutputArea-output .lm-Widget')) {
    const classes = Array.from(el.classList).filter(c => c.startsWith('widget-') || c === 'jupyter-button');
    if (!classes.length || classes.some(c => passive.includes(c))) continue;
    const known = classes.find(c => c in kinds);
    el.setAttribute('data-detlab-control', String(found.length));
    const label = el.querySelector(':scope > .widget-label, .widget-label-basic span');
    const text = ((label ? label.textContent : el.textContent) || '').replace(/[\\u200b\\s]+/g, ' ').trim();
    const cell = el.closest('.jp-Cell');
    found.push({index: found.length, kind: known ? kinds[known] : 'unknown: ' + classes.join(' '),
                description: text, cell: Array.from(cell.parentElement.children).indexOf(cell)});
  }
  return found;
}
""")

_JS_PROMPTS = _script("""
() => Array.from(document.querySelectorAll('$NB .jp-CodeCell .jp-InputPrompt'))
           .map(e => e.textContent.trim())
""")

_JS_ERRORS = _script("""
(pattern) => {
  const re = new RegExp(pattern, 'm');
  const found = [];
  for (const el of document.querySelectorAll('$NB .jp-OutputArea-output')) {
    const text = el.innerText || '';
    const stderr = el.getAttribute('data-mime-type') === 'application/vnd.jupyter.stderr';
    if ((stderr && re.test(text)) || /Error displaying widget|Loading widget\\.\\.\\./.test(text)) {
      const cell = el.closest('.jp-Cell');
      found.push('cell ' + Array.from(cell.parentElement.children).indexOf(cell) + ': ' + text.slice(-1500));
    }
  }
  return found;
}
""")

# Per cell: markdown or not, and for each output image its load state, sizes, and "ink": the fraction
# of pixel rows and of pixel columns that hold anything but the background colour (a plot's axes
# span most of both; a figure that drew nothing but a title does not).
_JS_CELLS = _script("""
async () => {
  const ink = img => {
    if (!img.complete || !img.naturalWidth || !img.naturalHeight) return [0, 0];
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth;
    canvas.height = img.naturalHeight;
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = '#ffffff';  // as on JupyterLab's light page: a transparent plot shows white
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
    const bg = [data[0], data[1], data[2]];
    const rows = new Uint8Array(canvas.height), cols = new Uint8Array(canvas.width);
    for (let y = 0; y < canvas.height; y++) {
      for (let x = 0; x < canvas.width; x++) {
        const i = 4 * (y * canvas.width + x);
        if (Math.abs(data[i] - bg[0]) + Math.abs(data[i + 1] - bg[1]) + Math.abs(data[i + 2] - bg[2]) > 60) {
          rows[y] = 1;
          cols[x] = 1;
        }
      }
    }
    return [rows.reduce((a, b) => a + b, 0) / canvas.height, cols.reduce((a, b) => a + b, 0) / canvas.width];
  };
  const images = Array.from(document.querySelectorAll('$NB .jp-OutputArea-output img'));
  await Promise.all(images.map(img => img.decode().catch(() => null)));  // let new plots finish decoding
  return Array.from(document.querySelectorAll('$NB .jp-Cell')).map(cell => ({
    markdown: cell.classList.contains('jp-MarkdownCell'),
    images: Array.from(cell.querySelectorAll('.jp-OutputArea-output img')).map(img => ({
      complete: img.complete, natural: [img.naturalWidth, img.naturalHeight],
      shown: [img.getBoundingClientRect().width, img.getBoundingClientRect().height], ink: ink(img)})),
  }));
}
""")

# What the outputs show, minus the controls' own state: a change here means the kernel answered.
_JS_SIGNATURE = _script("""
() => Array.from(document.querySelectorAll(
    '$NB .jp-OutputArea-output img, $NB .jp-OutputArea-output pre, $NB .widget-html-content'))
  .map(e => e.tagName === 'IMG' ? e.getAttribute('src') : e.textContent).join('\\n\\u0000')
""")

# Scrolls the notebook to its top and returns how much taller than its pane it is.
_JS_TOP_AND_OVERFLOW = _script("""
() => {
  const panel = document.querySelector('$PANEL .jp-WindowedPanel-outer')
             || document.querySelector('$NB');
  if (!panel) return 0;
  panel.scrollTop = 0;
  return Math.max(0, panel.scrollHeight - panel.clientHeight);
}
""")


@dataclass(frozen=True)
class Control:
    """One rendered ipywidgets control: where it is, how to operate it, the label it shows."""

    index: int
    kind: str
    description: str
    cell: int


@dataclass(frozen=True)
class CellView:
    """A rendered cell: whether it is markdown, and the images in its outputs."""

    markdown: bool
    images: list[dict[str, list[float] | bool]]


class LabNotebook:
    """One notebook open in a JupyterLab page."""

    def __init__(self, page: Page, server: LabServer, path: str) -> None:
        self.page = page
        self.server = server
        self.path = path

    def open(self, timeout_s: float = 90.0) -> None:
        """Opens the notebook in a fresh workspace, hides the file browser, waits until its kernel is idle.

        A workspace of its own keeps JupyterLab from reopening the notebooks of earlier tests.
        """
        workspace = f"detlab-{secrets.token_hex(4)}"
        self.page.goto(self.server.url(f"lab/workspaces/{workspace}/tree/{self.path}?reset"), timeout=timeout_s * 1000)
        self.page.wait_for_selector(f"{_NB} .jp-Cell", timeout=timeout_s * 1000)
        current_tab = self.page.locator(".jp-SideBar.jp-mod-left .lm-TabBar-tab.lm-mod-current")
        if current_tab.count():
            current_tab.first.click()  # collapses the left sidebar: the notebook gets the width
        self.wait_kernel_idle(timeout_s)

    def kernel_state(self) -> str:
        """The kernel state the status bar shows ('Idle', 'Busy', 'Starting', ...), or ''."""
        text = self.page.locator(".jp-StatusBar-Widget").all_inner_texts()
        for item in text:
            match = re.search(r"\|\s*(\w+)", item)
            if match:
                return match.group(1)
        return ""

    def wait_kernel_idle(self, timeout_s: float) -> None:
        """Waits until the status bar says the notebook's kernel is idle."""
        deadline = time.monotonic() + timeout_s
        while self.kernel_state() != "Idle":
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: kernel not idle after {timeout_s:.0f} s "
                                   f"(status bar: {self.kernel_state()!r})")
            time.sleep(POLL_S)

    def run_all(self, code_cells: int, timeout_s: float) -> float:
        """Run → Run All Cells; returns the seconds until every code cell ran or an error showed."""
        self.page.click('.lm-MenuBar-itemLabel:text-is("Run")')
        self.page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            prompts = self.page.evaluate(_JS_PROMPTS)
            done = sum(1 for p in prompts if re.fullmatch(r"\[\d+\]:", p))
            running = any("*" in p for p in prompts)
            if not running and (done >= code_cells or self.errors()) and self.kernel_state() == "Idle":
                return time.monotonic() - start
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: Run All Cells not finished after {timeout_s:.0f} s: "
                                   f"{done}/{code_cells} code cells ran; prompts {prompts}")
            time.sleep(POLL_S)

    def errors(self) -> list[str]:
        """Outputs that show an exception or a widget that failed to render."""
        return list(self.page.evaluate(_JS_ERRORS, _ERROR_PATTERN))

    def cells(self) -> list[CellView]:
        """Every cell of the notebook as rendered, in order."""
        return [CellView(**c) for c in self.page.evaluate(_JS_CELLS)]

    def controls(self) -> list[Control]:
        """Every interactive widget view on the page (progress bars, labels, containers excluded)."""
        return [Control(**c) for c in self.page.evaluate(_JS_CONTROLS, [_CONTROL_KINDS, list(_PASSIVE)])]

    def signature(self) -> str:
        """What the outputs show, apart from the controls' own state."""
        return str(self.page.evaluate(_JS_SIGNATURE))

    def operate(self, control: Control, timeout_s: float) -> float:
        """Changes ``control`` once and returns the seconds until an output changed in answer."""
        before = self.signature()
        element = self.page.locator(f'[data-detlab-control="{control.index}"]')
        element.scroll_into_view_if_needed()
        start = time.monotonic()
        _OPERATIONS.get(control.kind, _unknown)(element)
        deadline = start + timeout_s
        settled = 0  # consecutive polls with a changed output and an idle kernel
        while settled < 2:
            answered = self.signature() != before and self.kernel_state() == "Idle"
            settled = settled + 1 if answered else 0
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.path}: no output changed within {timeout_s:.0f} s after operating "
                                   f"the {control.kind} {control.description!r} in cell {control.cell}")
            time.sleep(POLL_S)
        return time.monotonic() - start

    def screenshot(self, path: Path) -> None:
        """Saves the whole notebook as one image: the viewport grows to the notebook's height."""
        path.parent.mkdir(parents=True, exist_ok=True)
        viewport = self.page.viewport_size or {"width": 1280, "height": 900}
        extra = int(self.page.evaluate(_JS_TOP_AND_OVERFLOW))
        self.page.set_viewport_size({"width": viewport["width"], "height": min(viewport["height"] + extra, 30000)})
        self.page.wait_for_timeout(500)  # one layout pass at the new size
        self.page.screenshot(path=str(path))
        self.page.set_viewport_size(viewport)


def _slider(element: Locator) -> None:
    handle = element.locator(".noUi-handle").first
    before = handle.get_attribute("aria-valuenow")
    handle.focus()
    handle.press("ArrowRight")
    if handle.get_attribute("aria-valuenow") == before:  # already at the maximum
        handle.press("ArrowLeft")


def _select(element: Locator) -> None:
    select = element.locator("select").first
    count = select.locator("option").count()
    current = int(select.evaluate("s => s.selectedIndex"))
    if count < 2:
        raise AssertionError("a selection widget with fewer than two options cannot be operated")
    select.select_option(index=(current + 1) % count)


def _radio(element: Locator) -> None:
    element.locator("input[type=radio]:not(:checked)").first.check()


def _checkbox(element: Locator) -> None:
    element.locator("input[type=checkbox]").first.click()


def _toggles(element: Locator) -> None:
    element.locator("button:not(.mod-active)").first.click()


def _click(element: Locator) -> None:
    element.click()


def _text(element: Locator) -> None:
    box = element.locator("input, textarea").first
    value = box.input_value()
    number = re.fullmatch(r"-?\d+(\.\d+)?", value.strip())
    box.fill(str(float(value) + 1) if number and "." in value else str(int(value) + 1) if number else value + "x")
    box.press("Enter")


def _unknown(element: Locator) -> None:
    classes = element.get_attribute("class")
    raise AssertionError(f"the browser test does not know how to operate a widget with classes {classes!r}: "
                         "add its interaction to tests/browser/lab_page.py")


_OPERATIONS = {"slider": _slider, "select": _select, "radio": _radio, "checkbox": _checkbox, "toggles": _toggles,
               "click": _click, "text": _text}
