"""Compile every Triton kernel detlib launches on a GPU, for Hopper (sm_90), on a machine without a GPU.

CI has no GPU, so without this the GPU side of every kernel (its tile configurations, TMA descriptors,
constexpr combinations, shared-memory budget) is checked only when someone borrows one.  Run as a script
(``tests/test_sm90_compile.py`` runs it in a subprocess, because the backend is chosen once per process):
detlib is made to choose its GPU backend, Triton's driver is replaced by one that only names the target,
every launch becomes a compile (``warmup``: nothing runs, outputs stay unwritten), and detlib's kernels are
called on CPU tensors with the shapes and configurations the course uses.  Prints one line per compiled
launch and, last, a JSON line: ``{"launches": {kernel: count}, "failed": [...]}``; a kernel that detlib
defines and no case launches is a failure too.

What it cannot see: anything that happens at run time on the GPU (results, speed, host/device mix-ups).
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import json
import os
import pkgutil
import sys
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

SM_COUNT = 132  # an H100 SXM: persistent kernels and split heuristics size their grids from it
torch.cuda.is_available = lambda: True  # type: ignore[assignment]
torch.cuda.get_device_properties = lambda *_: types.SimpleNamespace(  # type: ignore[assignment]
    multi_processor_count=SM_COUNT, name="sm_90 (compile only)")
torch.cuda.get_device_name = lambda *_: "sm_90 (compile only)"  # type: ignore[assignment]
os.environ["DETLIB_BACKEND"] = "gpu"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import detlib  # noqa: E402  (first: it sets TRITON_INTERPRET=0 before Triton loads)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """The part of Triton's driver interface a compile needs: which device, stream and target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


launches: Counter[str] = Counter()
_real_run = JITFunction.run


def _compile_only(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
    start = time.perf_counter()
    kernel = _real_run(self, *args, grid=grid, warmup=True, **kwargs)  # compiled, or found in the cache
    launches[self.__name__] += 1
    print(f"  {self.__name__:<30} {time.perf_counter() - start:5.1f} s  shared {kernel.metadata.shared:>6} B",
          flush=True)
    return kernel


def _tensors_stay_on_the_cpu() -> None:
    """detlib's kernels take tensors on ``detlib.device()`` (CUDA here): let them take CPU tensors instead."""
    cpu = lambda: torch.device("cpu")  # noqa: E731
    for name, module in list(sys.modules.items()):
        if name.startswith("detlib") and module is not None:
            for attr in ("device", "backend_device"):
                fn = vars(module).get(attr)
                if callable(fn) and getattr(fn, "__module__", "") == "detlib.backend":
                    setattr(module, attr, cpu)


def _randn(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return torch.randn(*shape).to(dtype)


def cases() -> list[tuple[str, Callable[[], object]]]:
    """What the course launches on a GPU: (label, call) pairs."""
    from detlib import matmul, reduce, rmsnorm, rowwise
    from detlib.attention import KVCache, invariant, teaching, write_kv

    out: list[tuple[str, Callable[[], object]]] = []
    x = torch.randn(1 << 20)
    out += [("atomic sum", lambda: reduce.atomic_sum(x)), ("tree sum", lambda: reduce.tree_sum(x))]

    for dtype in (torch.bfloat16, torch.float32):
        for hidden in (16, 64, 384, 4096):  # q/k norms of the tiny and course models, their hidden size, 4k
            xs, w = _randn(8, hidden, dtype=dtype), _randn(hidden, dtype=dtype)
            out += [(f"rmsnorm rows {hidden} {dtype}", lambda xs=xs, w=w: rmsnorm.rms_norm_rows(xs, w)),
                    (f"rmsnorm split {hidden} {dtype}", lambda xs=xs, w=w: rmsnorm.rms_norm_split(xs, w)),
                    *[(f"rmsnorm invariant {path} {hidden} {dtype}",
                       lambda xs=xs, w=w, path=path: rmsnorm.invariant_rms_norm_path(xs, w, 1e-6, path))
                      for path in ("rows", "chunks")]]

    k = 4096
    for dtype in (torch.bfloat16, torch.float32):
        a, b = _randn(64, k, dtype=dtype), _randn(k, 1024, dtype=dtype)
        out += [(f"tiled matmul {dtype}", lambda a=a, b=b: matmul.tiled_matmul(a, b)),
                (f"split-K matmul {dtype}", lambda a=a, b=b: matmul.splitk_matmul(a, b, split_k=4)),
                (f"library matmul {dtype}", lambda a=a, b=b: matmul.library_matmul(a, b))]
    configs = sorted({matmul.gpu_config(m, k, SM_COUNT) for m in (1, 100, 200, 512, 4096)}, key=str)
    for cfg in configs:
        for dtype in (torch.bfloat16, torch.float32):
            a, w, bias = _randn(300, k, dtype=dtype), _randn(k, k, dtype=dtype), _randn(k, dtype=dtype)
            out += [(f"invariant matmul a@b {cfg} {dtype}",
                     lambda a=a, w=w, cfg=cfg: matmul.invariant_mm_with_config(a, w, None, cfg)),
                    (f"invariant matmul x@W.T+bias {cfg} {dtype}",
                     lambda a=a, w=w, bias=bias, cfg=cfg: matmul.invariant_mm_with_config(a, w.t(), bias, cfg))]

    logits = _randn(16, 4096)
    out += [("softmax", lambda: rowwise.row_softmax(logits)),
            ("log-softmax fp32 out", lambda: rowwise.row_softmax(logits, log=True, out_dtype=torch.float32)),
            ("row sums", lambda: rowwise.row_sums(logits)), ("row means", lambda: rowwise.row_means(logits))]

    for d in (64, 128):
        q, kk, v = (_randn(2, 4, 512, d) for _ in range(3))
        out += [(f"teaching flash prefill d={d}", lambda q=q, kk=kk, v=v: teaching.flash_prefill(q, kk, v)),
                (f"teaching split-KV decode d={d}",
                 lambda q=q, kk=kk, v=v: teaching.split_kv_decode(q[:, :, -1].contiguous(), kk, v, num_splits=8))]

    base = invariant.GPU_CONFIG
    variants = {"default": base, "tma": dataclasses.replace(base, tma=True)}
    # (query heads, KV heads, head dim): the benchmark's shapes, the course model's, the tiny RL policy's
    for heads, kv_heads, d in ((32, 8, 128), (32, 32, 128), (16, 2, 64), (6, 2, 64), (2, 1, 16)):
        for name, cfg in variants.items():
            for label, lens, q_lens in (("prefill", [700, 300], [700, 300]), ("decode", [4096] * 4, [1] * 4)):
                cache = KVCache.allocate(len(lens), kv_heads, max(lens), d, torch.bfloat16, "cpu")
                cu = list(itertools.accumulate(q_lens, initial=0))
                slots = list(range(len(lens)))
                write_kv(cache, _randn(cu[-1], kv_heads, d), _randn(cu[-1], kv_heads, d), cu, slots,
                         [n - q for n, q in zip(lens, q_lens)])
                q = _randn(cu[-1], heads, d)
                out.append((f"invariant attention {label} {heads}/{kv_heads}x{d} {name}",
                            lambda q=q, cache=cache, cu=cu, slots=slots, lens=lens, cfg=cfg:
                            invariant.attention_with_config(q, cache, cu, slots, lens, scale=None, config=cfg)))
    return out


def defined_kernels() -> set[str]:
    """Every ``*_kernel`` that detlib's modules define (the benchmarks and the grader define none)."""
    skip = ("detlib.bench", "detlib.grade")
    for info in pkgutil.walk_packages(detlib.__path__, "detlib."):
        if not info.name.startswith(skip) and not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    return {name for mod_name, module in list(sys.modules.items()) if mod_name.startswith("detlib") and module
            for name, obj in vars(module).items() if isinstance(obj, JITFunction) and name.endswith("_kernel")}


def main() -> int:
    driver.set_active(CompileOnlyDriver())
    JITFunction.run = _compile_only  # type: ignore[method-assign]
    kernels = defined_kernels()  # imports every module first, so that the next line reaches them all
    _tensors_stay_on_the_cpu()
    print(f"detlib backend: {detlib.environment().backend}, triton {triton.__version__}, target sm_90", flush=True)
    failed = []
    for label, call in cases():
        print(label, flush=True)
        try:
            call()
        except Exception as err:  # noqa: BLE001 - every failure is reported, the rest still compiles
            text = str(err).strip()
            failed.append(f"{label}: {type(err).__name__}: {text.splitlines()[-1] if text else ''}")
            traceback.print_exc()
    failed += [f"{name}: defined in detlib but no case here launches it" for name in sorted(kernels - set(launches))]
    print(json.dumps({"launches": dict(launches), "failed": failed}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
