"""detlib: the reference library of the detlab course on deterministic, batch-invariant LLM inference.

Importing detlib first decides where Triton kernels run (see :mod:`detlib.backend`); import it before
``triton``.
"""

from detlib import backend as backend  # must come first: it sets TRITON_INTERPRET before triton loads
from detlib.backend import compute_dtype, device, environment, is_interpreter
from detlib.numerics import bitwise_equal, diff_summary, ulp_distance

__all__ = [
    "backend",
    "bitwise_equal",
    "compute_dtype",
    "device",
    "diff_summary",
    "environment",
    "is_interpreter",
    "ulp_distance",
]
__version__ = "0.1.0"
