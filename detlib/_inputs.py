"""Input checks shared by detlib's kernels: a clear error for bad input, never a silent wrong answer.

Every public kernel entry point calls these before launching anything, so a wrong dtype, a tensor on
the wrong device or mismatched shapes fail with a message that names the argument and what was
expected.  Under the interpreter, bf16 and fp16 inputs are widened to fp32 before the kernel runs and
the result is rounded back by torch: bf16 arithmetic inside interpreted kernels is not faithful
(see :func:`detlib.backend.compute_dtype`), while widening is exact and keeps fp32 accumulation.
"""

from __future__ import annotations

import torch

from detlib.backend import device, is_interpreter

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(name: str, t: object) -> torch.Tensor:
    """Fail unless ``t`` is a tensor of a supported float dtype on the device detlib's kernels use."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"{name} has dtype {t.dtype}; detlib's kernels take {names}")
    want = device()
    if t.device.type != want.type:
        raise ValueError(
            f"{name} is on {t.device}, but detlib's kernels run on {want} here "
            f"({'Triton interpreter' if is_interpreter() else 'GPU'}); move it with .to({str(want)!r})"
        )
    return t


def check_same_dtype(**tensors: torch.Tensor) -> torch.dtype:
    """Fail unless all named tensors share one dtype; return it."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listed = ", ".join(f"{n}: {d}" for n, d in dtypes.items())
        raise TypeError(f"dtypes differ ({listed}); cast them to one dtype first")
    return next(iter(dtypes.values()))


def kernel_operand(t: torch.Tensor) -> torch.Tensor:
    """The tensor a kernel should read: widened to fp32 under the interpreter, unchanged on a GPU."""
    if is_interpreter() and t.dtype != torch.float32:
        return t.float()
    return t
