"""Batch-invariant mode: run an unmodified PyTorch model on detlib's invariant kernels.

Inside ``with invariant_mode():`` (or under ``@invariant_mode()``), PyTorch's own kernels for the ops a
transformer reduces with are replaced by detlib's batch-invariant ones:

================================  ===========================================================
aten op                           detlib kernel
================================  ===========================================================
``mm``, ``addmm``                 :func:`detlib.matmul.invariant_matmul` / ``invariant_linear``
``bmm``                           one invariant matmul per batch entry
``_softmax``, ``_log_softmax``    :func:`detlib.rowwise.invariant_softmax` / ``..._log_softmax``
``mean.dim``                      :func:`detlib.rowwise.invariant_mean`
``rms_norm``                      :func:`detlib.rmsnorm.invariant_rms_norm`
``scaled_dot_product_attention``  :func:`detlib.attention.invariant_attention` (causal, decode),
                                  else PyTorch's math formula on the invariant bmm and softmax
================================  ===========================================================

``F.linear``, ``torch.matmul`` and ``@`` need no entry of their own: PyTorch decomposes them into
``mm``, ``addmm`` and ``bmm`` before any backend kernel runs, so they land on the invariant kernels.

How: a ``torch.library.Library("aten", "IMPL")`` registers a Python kernel for each op at the backend
dispatch keys (``CPU`` and, where there is a GPU, ``CUDA``).  Those keys sit *below* autograd: the
autograd kernel of ``mm`` still records the graph and then calls whatever ``mm`` kernel the backend key
holds, ours.  So for ``mm``, ``bmm``, ``addmm``, softmax and mean, gradients keep working (the backward
formulas call the same ops, which also run invariantly).  ``rms_norm`` and
``scaled_dot_product_attention`` are composite ops (no autograd formula of their own); a kernel at the
backend key replaces their decomposition, so under the mode they are for inference (``no_grad``):
their outputs carry no usable gradient.  We do not register at ``AutogradCPU``/``AutogradCUDA``: a kernel
there would have to record the graph itself, and calling the original op from it would recurse.

Inside an override the original aten op cannot be called (it would come back to us); each override
calls a Triton kernel instead, and calls that kernel cannot serve (float64, a tensor on another
device, attention dropout) go to PyTorch's original kernel, fetched with ``torch.library.get_kernel``
before ours was registered.  Those calls *ran outside the mode*: they are counted, listed by
:func:`trace_outside`, and raise :class:`NotInvariantError` under ``invariant_mode(strict=True)``.

Scope: the dispatcher is process-wide, so the Library is registered when the first thread enters the
mode and destroyed (PyTorch's kernels restored) when the last one leaves; a lock guards that.  Whether
a call runs invariantly is decided per thread: a thread that is not inside the mode gets PyTorch's
kernels even while another thread is (it pays a Python call per op meanwhile).  Entries nest.
"""

from __future__ import annotations

import collections
import contextlib
import math
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from detlib._inputs import SUPPORTED_DTYPES
from detlib.backend import device as backend_device
from detlib.grade import reference

__all__ = [
    "COVERED_OPS",
    "NotInvariantError",
    "OpUse",
    "TraceReport",
    "fallback_counts",
    "invariant_mode",
    "is_active",
    "register_invariant_sum",
    "trace_outside",
]


class NotInvariantError(RuntimeError):
    """Under ``invariant_mode(strict=True)``, an op had to run on PyTorch's own (variant) kernel."""


class _Unsupported(Exception):
    """Raised by an override before doing any work: this call goes to PyTorch's original kernel."""


# ----------------------------------------------------------------------------------------------------
# input checks shared by the overrides


def _servable(*tensors: torch.Tensor | None) -> None:
    """Raise :class:`_Unsupported` unless detlib's kernels can take every tensor given."""
    want = backend_device().type
    for t in tensors:
        if t is None:
            continue
        if t.layout != torch.strided:
            raise _Unsupported(f"layout {t.layout}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise _Unsupported(f"dtype {t.dtype}")
        if t.device.type != want:
            raise _Unsupported(f"a tensor on {t.device.type} (detlib's kernels run on {want})")


def _same_dtype(*tensors: torch.Tensor) -> None:
    if len({t.dtype for t in tensors}) > 1:
        raise _Unsupported("mixed dtypes " + ", ".join(str(t.dtype) for t in tensors))


# ----------------------------------------------------------------------------------------------------
# the overrides: each takes the aten op's arguments and returns what the op returns


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from detlib.matmul import invariant_matmul

    _servable(a, b)
    _same_dtype(a, b)
    return invariant_matmul(a, b)


def _addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, beta: float = 1, alpha: float = 1
           ) -> torch.Tensor:
    from detlib.matmul import invariant_linear, invariant_matmul

    _servable(bias, a, b)
    _same_dtype(bias, a, b)
    if beta == 1 and alpha == 1 and bias.shape == (b.shape[1],):
        return invariant_linear(a, b.t(), bias)  # F.linear's case: the bias is added in the kernel's epilogue
    product = invariant_matmul(a, b)
    if alpha != 1:
        product = product * alpha
    return product if beta == 0 else product + (bias if beta == 1 else bias * beta)


def _bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from detlib.matmul import invariant_matmul

    _servable(a, b)
    _same_dtype(a, b)
    if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0] or a.shape[2] != b.shape[1]:
        raise _Unsupported(f"shapes {tuple(a.shape)} and {tuple(b.shape)}")  # PyTorch will explain
    out = torch.empty((a.shape[0], a.shape[1], b.shape[2]), dtype=a.dtype, device=a.device)
    for i in range(a.shape[0]):  # each entry alone: its bits cannot depend on the others
        out[i] = invariant_matmul(a[i], b[i])
    return out


def _softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    from detlib.rowwise import invariant_softmax

    _servable(x)
    return invariant_softmax(x, dim, dtype=torch.float32 if half_to_float else x.dtype)


def _log_softmax(x: torch.Tensor, dim: int, half_to_float: bool) -> torch.Tensor:
    from detlib.rowwise import invariant_log_softmax

    _servable(x)
    return invariant_log_softmax(x, dim, dtype=torch.float32 if half_to_float else x.dtype)


def _mean_dim(x: torch.Tensor, dim: list[int] | None = None, keepdim: bool = False, *,
              dtype: torch.dtype | None = None) -> torch.Tensor:
    from detlib.rowwise import invariant_mean

    _servable(x)
    if dtype is not None and dtype not in SUPPORTED_DTYPES:
        raise _Unsupported(f"dtype={dtype}")
    return invariant_mean(x, dim, keepdim, dtype=dtype)


def _rms_norm(x: torch.Tensor, normalized_shape: list[int], weight: torch.Tensor | None = None,
              eps: float | None = None) -> torch.Tensor:
    from detlib.rmsnorm import invariant_rms_norm

    _servable(x, weight)
    n_dims = len(normalized_shape)
    if n_dims == 0 or tuple(x.shape[x.dim() - n_dims:]) != tuple(normalized_shape):
        raise _Unsupported(f"normalized_shape {list(normalized_shape)} for input {tuple(x.shape)}")
    if weight is not None:
        _same_dtype(x, weight)
        if tuple(weight.shape) != tuple(normalized_shape):
            raise _Unsupported(f"weight of shape {tuple(weight.shape)}")
    hidden = math.prod(normalized_shape)
    w = torch.ones(hidden, dtype=x.dtype, device=x.device) if weight is None else weight.reshape(hidden)
    if eps is None:  # PyTorch's default: the epsilon of the type the op computes in
        eps = torch.finfo(torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype).eps
    out = invariant_rms_norm(x.reshape(-1, hidden), w, eps)
    return out.reshape(x.shape)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
          dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
          enable_gqa: bool = False) -> torch.Tensor:
    """SDPA on invariant kernels: the attention kernel when it expresses the call, else the math formula.

    ``detlib.attention.invariant_attention`` is causal with queries at the *end* of the keys.  It serves
    ``is_causal`` with as many queries as keys (prefill) and maskless calls with one query (a decode step
    over a cache).  Other calls (a mask, causal with fewer queries than keys, which PyTorch aligns at
    the top-left, an odd head size) take PyTorch's math formula, whose matmuls and softmax are the mode's
    invariant ``bmm`` and ``_softmax``.  Dropout is random by design and goes to PyTorch.
    """
    _servable(q, k, v)
    _same_dtype(q, k, v)
    if dropout_p > 0:
        raise _Unsupported(f"dropout_p={dropout_p}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise _Unsupported(f"{q.dim()}-D inputs (the invariant path takes [batch, heads, seq, head_dim])")
    B, H, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if k.shape != (B, Hkv, S, D) or v.shape != k.shape or (Hkv != H and not enable_gqa) or H % Hkv:
        raise _Unsupported(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    kernel_fits = attn_mask is None and ((is_causal and L == S) or (not is_causal and L == 1))
    if not kernel_fits or D < 16 or D & (D - 1):
        if attn_mask is not None and attn_mask.device.type != q.device.type:
            raise _Unsupported(f"attn_mask on {attn_mask.device.type}")
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # as SDPA does: True means "attend"
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                attn_mask.logical_not(), float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_attention_math(
            q, k, v, attn_mask, 0.0, is_causal, None, scale=scale, enable_gqa=enable_gqa)
        return out
    from detlib.attention import KVCache, invariant_attention

    cache = KVCache(k.contiguous(), v.contiguous())  # [B, Hkv, S, D] is the cache layout: no copy if contiguous
    packed = q.transpose(1, 2).reshape(B * L, H, D)
    if packed.stride(2) != 1:
        packed = packed.contiguous()
    cu = list(range(0, (B + 1) * L, L))
    out = invariant_attention(packed, cache, cu, list(range(B)), [S] * B, scale=scale)
    return out.reshape(B, L, H, D).transpose(1, 2)


@dataclass(frozen=True)
class _Override:
    op: str  # aten name as lib.impl takes it: "mm" (default overload), "mean.dim"
    kernel: Callable[..., torch.Tensor]


_OVERRIDES: tuple[_Override, ...] = (
    _Override("mm", _mm),
    _Override("addmm", _addmm),
    _Override("bmm", _bmm),
    _Override("_softmax", _softmax),
    _Override("_log_softmax", _log_softmax),
    _Override("mean.dim", _mean_dim),
    _Override("rms_norm", _rms_norm),
    _Override("scaled_dot_product_attention", _sdpa),
)


def _qualified(op: str) -> str:
    """``"mm"`` -> ``"mm.default"``: the ``packet.overload`` spelling of an aten op."""
    return op if "." in op else f"{op}.default"


COVERED_OPS: frozenset[str] = frozenset(_qualified(o.op) for o in _OVERRIDES) | {"mean.default"}
"""The aten ops the mode runs on invariant kernels, as ``packet.overload`` (``mean()`` without a dim
is PyTorch's own composite of ``mean.dim``, so it is covered through it)."""

# ----------------------------------------------------------------------------------------------------
# activation state


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.strict: list[bool] = []  # one entry per nested invariant_mode in this thread


_thread = _ThreadState()
_lock = threading.Lock()
_entries = 0  # invariant_mode entries over all threads
_library: torch.library.Library | None = None
_fallbacks: collections.Counter[tuple[str, str]] = collections.Counter()


def is_active() -> bool:
    """True when this thread is inside :func:`invariant_mode`."""
    return bool(_thread.strict)


def fallback_counts() -> dict[tuple[str, str], int]:
    """How many calls ran on PyTorch's kernel inside the mode since import, by ``(op, reason)``."""
    with _lock:
        return dict(_fallbacks)


def _dispatch_keys() -> list[str]:
    return ["CPU", "CUDA"] if torch.cuda.is_available() else ["CPU"]


def _wrap(override: _Override, original: Any) -> Callable[..., torch.Tensor]:
    """The kernel registered with the dispatcher: detlib's kernel in a thread inside the mode, else PyTorch's."""
    op = _qualified(override.op)

    def kernel(keyset: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not _thread.strict:
            return original.call_boxed(keyset, *args, **kwargs)
        try:
            return override.kernel(*args, **kwargs)
        except _Unsupported as why:
            with _lock:
                _fallbacks[(op, str(why))] += 1
            if _thread.strict[-1]:
                raise NotInvariantError(f"aten::{op} cannot run invariantly here ({why}); "
                                        "it would run on PyTorch's own kernel") from None
            return original.call_boxed(keyset, *args, **kwargs)

    return kernel


def _register() -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    try:
        with warnings.catch_warnings():  # "overriding a previously registered kernel" is the point here
            warnings.simplefilter("ignore", UserWarning)
            for key in _dispatch_keys():
                for ov in _OVERRIDES:
                    original = torch.library.get_kernel(f"aten::{ov.op}", key)
                    lib.impl(ov.op, _wrap(ov, original), key, with_keyset=True)
    except BaseException:
        lib._destroy()
        raise
    return lib


def _enter(strict: bool) -> None:
    global _entries, _library
    with _lock:
        if _entries == 0:
            _library = _register()
        _entries += 1
    _thread.strict.append(strict)


def _exit() -> None:
    global _entries, _library
    _thread.strict.pop()
    with _lock:
        _entries -= 1
        if _entries == 0 and _library is not None:
            _library._destroy()  # PyTorch's own kernels are back in the dispatch table
            _library = None


class invariant_mode(contextlib.ContextDecorator):  # noqa: N801  (used like a function: `with invariant_mode():`)
    """Run the enclosed PyTorch code on detlib's batch-invariant kernels (a context manager or decorator).

    ``strict=True`` raises :class:`NotInvariantError` when a covered op gets a call the invariant
    kernels cannot serve, instead of running it on PyTorch's kernel.  Entries nest; leaving the
    outermost one restores PyTorch's kernels.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.strict = strict

    def __enter__(self) -> invariant_mode:
        _enter(self.strict)
        return self

    def __exit__(self, *exc: object) -> None:
        _exit()


# ----------------------------------------------------------------------------------------------------
# what ran outside the mode

_EXACT_REDUCTIONS = {"amax", "amin", "max", "min", "argmax", "argmin", "aminmax", "all", "any", "count_nonzero"}
"""Reductions whose result does not depend on the order of the elements (max, logical ops)."""
_ORDER_SENSITIVE = {
    "cumsum", "cumprod", "logcumsumexp", "native_layer_norm", "native_group_norm", "native_batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "_fused_rms_norm", "rms_norm",
    "mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "vdot", "_addmm_activation",
    "convolution", "_convolution", "_softmax", "_log_softmax", "_safe_softmax", "embedding_bag",
    "_embedding_bag", "index_add", "scatter_add", "scatter_reduce", "index_reduce", "_cdist_forward",
    "linalg_vector_norm", "trace", "scaled_dot_product_attention",
}
"""Ops that add many numbers but carry no ``reduction`` tag in PyTorch's op registry."""


def _reduces(func: torch._ops.OpOverload) -> bool:
    """Does this op combine many floats in an order a kernel chooses (so that order could change)?"""
    packet = func._schema.name.split("::")[-1]
    if packet in _EXACT_REDUCTIONS:
        return False
    attention_backend = packet.startswith(("_scaled_dot_product", "_flash_attention", "_efficient_attention"))
    return torch.Tag.reduction in func.tags or packet in _ORDER_SENSITIVE or attention_backend


@dataclass
class OpUse:
    """One aten op seen while tracing: how often, and how it ran."""

    op: str  # packet.overload, e.g. "sum.dim_IntList"
    count: int = 0
    invariant: int = 0  # calls served by detlib's kernels
    outside: int = 0  # calls that reduced floats on PyTorch's kernels
    reasons: set[str] = field(default_factory=set)

    @property
    def status(self) -> str:
        if self.outside:
            return "OUTSIDE"
        return "invariant" if self.invariant else "elementwise/exact"


@dataclass
class TraceReport:
    """The aten ops one traced call ran, and which of them reduced floats outside the mode."""

    ops: dict[str, OpUse]

    @property
    def outside(self) -> list[OpUse]:
        """Ops that reduced floats on PyTorch's own kernels: where batch variance can still come from."""
        return [u for u in self.ops.values() if u.outside]

    def __str__(self) -> str:
        rows = sorted(self.ops.values(), key=lambda u: (u.status != "OUTSIDE", u.status != "invariant", u.op))
        width = max([len(u.op) for u in rows] + [10])
        lines = [f"{'aten op':<{width}}  {'calls':>5}  status", f"{'-' * width}  {'-' * 5}  {'-' * 30}"]
        for u in rows:
            why = f" ({'; '.join(sorted(u.reasons))})" if u.reasons else ""
            lines.append(f"{u.op:<{width}}  {u.count:>5}  {u.status}{why}")
        verdict = (f"{len(self.outside)} op(s) reduced outside the mode: "
                   + ", ".join(u.op for u in self.outside)) if self.outside else "every reduction ran invariantly"
        return "\n".join(lines + [verdict])


def trace_outside(fn: Callable[..., Any], *args: Any, covered: tuple[str, ...] = (), **kwargs: Any) -> TraceReport:
    """Call ``fn(*args, **kwargs)`` once inside :func:`invariant_mode` and report every aten op it ran.

    An op counts as *outside* when it reduces floats (sums, norms, matmuls, attention, cumulative
    sums: see :func:`_reduces`) and either the mode does not cover it or a call fell back to PyTorch's
    kernel.  ``covered`` names extra ops (``"sum.dim_IntList"``) you have made invariant yourself.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    covered_ops = COVERED_OPS | {_qualified(o) for o in covered}
    uses: dict[str, OpUse] = {}

    class _Tracer(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
            use = uses.setdefault(name, OpUse(name))
            use.count += 1
            before = fallback_counts()
            out = func(*args, **(kwargs or {}))  # covered ops may fall back inside (also in a sub-op)
            fell_back = {f"aten::{op}: {why}" for (op, why), n in fallback_counts().items()
                         if n > before.get((op, why), 0)}
            floats = any(isinstance(t, torch.Tensor) and t.is_floating_point()
                         for t in (out if isinstance(out, (tuple, list)) else (out,)))
            if fell_back:
                use.outside += 1
                use.reasons |= fell_back
            elif name in covered_ops:
                use.invariant += 1
            elif floats and _reduces(func):
                use.outside += 1
                use.reasons.add("not covered by the mode")
            return out

    with invariant_mode(), _Tracer():
        fn(*args, **kwargs)
    return TraceReport(uses)


# ----------------------------------------------------------------------------------------------------
# extending the mode yourself (lab 07's first exercise)


@reference
def register_invariant_sum(lib: torch.library.Library) -> None:
    """Register a batch-invariant kernel for ``aten::sum.dim_IntList`` (``x.sum(dim)``) in ``lib``.

    The mode leaves ``sum`` to PyTorch; this is how to cover it: a kernel with the op's signature,
    registered at the backend keys.  Calls it cannot serve (integer sums, float64) go to PyTorch's
    original kernel, fetched before the registration, so that ``mask.sum()`` keeps working.
    """
    from detlib.rowwise import invariant_sum

    sum_kernel = invariant_sum.__wrapped__  # type: ignore[attr-defined]  # unguarded: both are one exercise's answer
    for key in _dispatch_keys():
        original = torch.library.get_kernel("aten::sum.dim_IntList", key)

        def kernel(keyset: Any, x: torch.Tensor, dim: list[int] | None = None, keepdim: bool = False, *,
                   dtype: torch.dtype | None = None, _original: Any = original) -> torch.Tensor:
            try:
                _servable(x)
                if dtype is not None and dtype not in SUPPORTED_DTYPES:
                    raise _Unsupported(f"dtype={dtype}")
            except _Unsupported:
                return _original.call_boxed(keyset, x, dim, keepdim, dtype=dtype)
            return sum_kernel(x, dim, keepdim, dtype=dtype)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            lib.impl("sum.dim_IntList", kernel, key, with_keyset=True)
