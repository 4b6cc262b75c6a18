"""A throwaway JupyterLab server for the browser test: loopback only, token auth, own settings.

``running_lab`` starts ``python -m jupyterlab`` from the interpreter that runs the tests (the repo's
venv) in a new process group, with every Jupyter directory a learner's own setup could leak into
(config, data, runtime, lab settings and workspaces, IPython profile) pointed into a temporary folder,
and stops it by its process id whatever happens: first the kernels through the REST API, then SIGTERM
to the server's process group, SIGKILL if it lingers, and SIGKILL to any kernel still holding a
connection file of this server's runtime folder (kernels run in sessions of their own).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 20.0

# User settings a fresh profile gets: every cell rendered (no virtual scrolling, so the page shows
# the whole notebook, and no blank space after it), the kernel started without a dialog, and no news or update checks.
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {
        "windowingMode": "none",
        "scrollPastEnd": False,
        "autoStartDefaultKernel": True,
    },
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}


@dataclass(frozen=True)
class LabServer:
    """Where a running server answers, and how to authenticate to it."""

    port: int
    token: str
    root: Path
    log: Path
    pid: int

    def url(self, path: str) -> str:
        """The browser URL of ``path`` (relative to the server), token included."""
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str, method: str = "GET") -> object:
        """Calls the server's REST API and returns the decoded JSON (None for an empty body)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{path.lstrip('/')}", method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def shutdown_kernels(self) -> None:
        """Stops every kernel of the server (each notebook's test starts its own)."""
        for kernel in self.api("kernels"):  # type: ignore[union-attr]
            self.api(f"kernels/{kernel['id']}", method="DELETE")

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log, for failure messages."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else "(no log)"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def lab_environment(base: Path) -> dict[str, str]:
    """The process environment with every Jupyter and IPython directory inside ``base``."""
    dirs = {
        "JUPYTER_CONFIG_DIR": "config",
        "JUPYTER_DATA_DIR": "data",
        "JUPYTER_RUNTIME_DIR": "runtime",
        "JUPYTERLAB_SETTINGS_DIR": "lab-settings",
        "JUPYTERLAB_WORKSPACES_DIR": "lab-workspaces",
        "IPYTHONDIR": "ipython",
    }
    env = dict(os.environ)
    env.pop("JUPYTER_PATH", None)
    env.pop("JUPYTER_CONFIG_PATH", None)
    for var, name in dirs.items():
        (base / name).mkdir(parents=True, exist_ok=True)
        env[var] = str(base / name)
    for relative, values in SETTINGS.items():
        path = base / "lab-settings" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values, indent=2))
    return env


@contextmanager
def running_lab(base: Path, root: Path) -> Iterator[LabServer]:
    """A JupyterLab server serving ``root``, its state in ``base``; stopped on exit, always."""
    env = lab_environment(base)
    port, token = free_port(), secrets.token_hex(24)
    command = [
        sys.executable, "-m", "jupyterlab",
        "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
        "--ServerApp.open_browser=False", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
        "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
    ]
    if os.geteuid() == 0:  # CI runs as root; Jupyter refuses root unless told
        command.append("--allow-root")
    log = base / "jupyterlab.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, start_new_session=True)
    server = LabServer(port=port, token=token, root=root, log=log, pid=proc.pid)
    try:
        _wait_until_ready(server, proc)
        yield server
    finally:
        _stop(server, proc, Path(env["JUPYTER_RUNTIME_DIR"]))


def _wait_until_ready(server: LabServer, proc: subprocess.Popen[bytes]) -> None:
    """Returns once the server answers an authenticated API call; raises if it exits or stalls."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode} before answering:\n"
                               f"{server.log_tail()}")
        try:
            server.api("status")
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    raise TimeoutError(f"jupyter lab did not answer on port {server.port} within {START_TIMEOUT_S:.0f} s:\n"
                       f"{server.log_tail()}")


def _stop(server: LabServer, proc: subprocess.Popen[bytes], runtime_dir: Path) -> None:
    """Stops the kernels, then the server's process group, then any kernel left of this server."""
    if proc.poll() is None:
        try:
            server.shutdown_kernels()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # the server is stuck or gone: the signals below and the runtime-dir sweep still apply
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=STOP_TIMEOUT_S)
    for pid in _pids_using(runtime_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)  # the server leads its own group (start_new_session)
    except ProcessLookupError:
        pass


def _pids_using(runtime_dir: Path) -> list[int]:
    """Processes whose command line names a file in ``runtime_dir``: kernels of this server only."""
    marker = str(runtime_dir).encode()
    pids: list[int] = []
    if not Path("/proc").is_dir():  # not Linux: the REST shutdown and SIGTERM above have to do
        return pids
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
