"""Choose where detlib's Triton kernels run: natively on a CUDA GPU, or in Triton's interpreter on the CPU.

Triton reads ``TRITON_INTERPRET`` once, when it is first imported, so the choice has to be made before
anything imports ``triton``.  ``detlib/__init__.py`` imports this module first for that reason.

The ``DETLIB_BACKEND`` environment variable forces the choice:

* ``auto`` (default): GPU when ``torch.cuda.is_available()``, interpreter otherwise;
* ``gpu``: require a CUDA GPU (an error if there is none);
* ``interpreter``: run every kernel in the interpreter, even on a GPU machine (kernels then read
  and write CPU tensors).
"""

from __future__ import annotations

import os
import platform
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Literal

import torch

Backend = Literal["gpu", "interpreter"]
_VALID = ("auto", "gpu", "interpreter")


class BackendError(RuntimeError):
    """The backend asked for cannot be used on this machine."""


def _choose_backend() -> Backend:
    wanted = os.environ.get("DETLIB_BACKEND", "auto").strip().lower() or "auto"
    if wanted not in _VALID:
        raise BackendError(f"DETLIB_BACKEND={wanted!r}: expected one of {', '.join(_VALID)}")
    has_gpu = torch.cuda.is_available()
    if wanted == "gpu" and not has_gpu:
        raise BackendError("DETLIB_BACKEND=gpu but torch sees no CUDA GPU (torch.cuda.is_available() is False)")
    if wanted == "interpreter" or (wanted == "auto" and not has_gpu):
        return "interpreter"
    return "gpu"


def _configure_triton(backend: Backend) -> None:
    want = "1" if backend == "interpreter" else "0"
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") != want:
        warnings.warn(
            "triton was imported before detlib, so detlib could not choose its mode "
            f"(wanted TRITON_INTERPRET={want}). Import detlib first, or restart the kernel.",
            RuntimeWarning,
            stacklevel=3,
        )
    os.environ["TRITON_INTERPRET"] = want


BACKEND: Backend = _choose_backend()
_configure_triton(BACKEND)


def is_interpreter() -> bool:
    """True when Triton kernels run in Triton's CPU interpreter."""
    return BACKEND == "interpreter"


def device() -> torch.device:
    """The device detlib's kernels read and write: ``cuda`` natively, ``cpu`` under the interpreter."""
    return torch.device("cpu" if is_interpreter() else "cuda")


def compute_dtype() -> torch.dtype:
    """The dtype the labs use for model-like work on this backend.

    bf16 on a GPU, as real servers run; fp32 under the interpreter, because bf16 arithmetic inside
    interpreted kernels is not faithful to a GPU's (it was measured wrong with triton 3.9).
    """
    return torch.float32 if is_interpreter() else torch.bfloat16


@dataclass(frozen=True)
class Environment:
    """What lab 00 prints: where kernels run and with which versions."""

    backend: Backend
    device: str
    device_name: str
    torch_version: str
    triton_version: str
    cuda_version: str | None
    python_version: str
    platform: str
    cpu_count: int
    triton_interpret: bool

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def __str__(self) -> str:
        width = max(len(k) for k in self.as_dict())
        return "\n".join(f"{k:<{width}}  {v}" for k, v in self.as_dict().items())


def environment() -> Environment:
    """Report the device, the versions and whether Triton runs in its interpreter."""
    import triton  # imported here so the mode above is already set

    gpu = not is_interpreter()
    return Environment(
        backend=BACKEND,
        device=str(device()),
        device_name=torch.cuda.get_device_name(0) if gpu else (platform.processor() or platform.machine()),
        torch_version=torch.__version__,
        triton_version=triton.__version__,
        cuda_version=torch.version.cuda,
        python_version=platform.python_version(),
        platform=platform.platform(),
        cpu_count=os.cpu_count() or 1,
        triton_interpret=os.environ.get("TRITON_INTERPRET") == "1",
    )
