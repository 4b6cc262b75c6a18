"""detlib.mode: torch ops routed to invariant kernels while active, PyTorch's kernels restored on exit."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import detlib
from detlib.attention import KVCache, invariant_attention
from detlib.matmul import invariant_linear, invariant_matmul
from detlib.mode import NotInvariantError, fallback_counts, invariant_mode, is_active, register_invariant_sum, \
    trace_outside
from detlib.rmsnorm import invariant_rms_norm
from detlib.rowwise import invariant_log_softmax, invariant_mean, invariant_softmax
from detlib.toy_transformer import ToyConfig, toy_transformer

DEV = detlib.device()
# against PyTorch's own result: fp32 arithmetic on the CPU; tf32 tensor cores (invariant matmul) on a GPU
TOL = {"rtol": 1e-4, "atol": 1e-5} if detlib.is_interpreter() else {"rtol": 2e-2, "atol": 2e-2}
TINY = ToyConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, max_seq_len=16)


def _r(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def _cpu_kernel_source(op: str) -> str:
    """Where the dispatcher's CPU kernel for ``op`` was registered (a file of PyTorch, or detlib/mode.py)."""
    dump = torch._C._dispatch_dump(f"aten::{op}")
    return next(line for line in dump.splitlines() if line.startswith("CPU:"))


def _plain_results() -> dict[str, torch.Tensor]:
    x, w, b = _r(2, 5, 32), _r(16, 32, seed=1), _r(16, seed=2)
    q, k, v = _r(2, 2, 8, 16, seed=3), _r(2, 1, 8, 16, seed=4), _r(2, 1, 8, 16, seed=6)
    return {
        "linear": F.linear(x, w, b),
        "matmul": x @ w.t(),
        "bmm": torch.bmm(x, x.transpose(1, 2)),
        "softmax": torch.softmax(x, -1),
        "log_softmax": F.log_softmax(x, -1),
        "mean": x.mean(-1),
        "rms_norm": F.rms_norm(x, (32,), _r(32, seed=5), 1e-6),
        "sdpa": F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
    }


def test_ops_route_to_detlib_kernels() -> None:
    x, w, b = _r(2, 5, 32), _r(16, 32, seed=1), _r(16, seed=2)
    nw = _r(32, seed=5)
    q, k, v = _r(2, 2, 8, 16, seed=3), _r(2, 1, 8, 16, seed=4), _r(2, 1, 8, 16, seed=6)
    with invariant_mode():
        got = {
            "linear": F.linear(x, w, b),
            "linear_nobias": F.linear(x, w),
            "matmul": x @ w.t(),
            "bmm": torch.bmm(x, x.transpose(1, 2)),
            "softmax": torch.softmax(x, -1),
            "log_softmax": F.log_softmax(x, -1),
            "mean": x.mean(-1),
            "rms_norm": F.rms_norm(x, (32,), nw, 1e-6),
            "sdpa": F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        }
    x2 = x.reshape(10, 32)
    cache = KVCache(k.contiguous(), v.contiguous())
    packed = q.transpose(1, 2).reshape(16, 2, 16)
    want = {
        "linear": invariant_linear(x2, w, b).reshape(2, 5, 16),
        "linear_nobias": invariant_matmul(x2, w.t()).reshape(2, 5, 16),
        "matmul": invariant_matmul(x2, w.t()).reshape(2, 5, 16),
        "bmm": torch.stack([invariant_matmul(x[i], x[i].t()) for i in range(2)]),
        "softmax": invariant_softmax(x, -1),
        "log_softmax": invariant_log_softmax(x, -1),
        "mean": invariant_mean(x, -1),
        "rms_norm": invariant_rms_norm(x2, nw, 1e-6).reshape(2, 5, 32),
        "sdpa": invariant_attention(packed, cache, [0, 8, 16], [0, 1], [8, 8]).reshape(2, 8, 2, 16).transpose(1, 2),
    }
    for name in want:
        assert detlib.bitwise_equal(got[name], want[name]), f"{name}: {detlib.diff_summary(got[name], want[name])}"
    plain = _plain_results()
    for name in plain:  # and they compute the same function as PyTorch
        torch.testing.assert_close(got[name], plain[name], **TOL)


def test_leaving_the_mode_restores_pytorch_kernels() -> None:
    before_src = _cpu_kernel_source("mm")
    before = _plain_results()
    with invariant_mode():
        assert "detlib" in _cpu_kernel_source("mm") and "detlib" not in before_src
        inside = _plain_results()
    assert _cpu_kernel_source("mm") == before_src
    after = _plain_results()
    for name in before:
        assert detlib.bitwise_equal(after[name], before[name]), name
    assert any(not detlib.bitwise_equal(inside[n], before[n]) for n in before), "the mode changed nothing"


def test_mode_is_restored_after_an_exception() -> None:
    src = _cpu_kernel_source("bmm")
    with pytest.raises(ZeroDivisionError), invariant_mode():
        1 / 0
    assert _cpu_kernel_source("bmm") == src and not is_active()


def test_nesting_and_decorator() -> None:
    src = _cpu_kernel_source("addmm")

    @invariant_mode()
    def inner() -> bool:
        return is_active()

    with invariant_mode():
        with invariant_mode():
            assert is_active()
        assert is_active() and "detlib" in _cpu_kernel_source("addmm")
        assert inner() and is_active()
    assert not is_active() and _cpu_kernel_source("addmm") == src
    assert inner() and not is_active()


def test_other_threads_keep_pytorch_kernels() -> None:
    x, w = _r(6, 32), _r(16, 32, seed=1)
    plain = F.linear(x, w)
    inside_entered, outside_done = threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}

    def outside() -> None:
        inside_entered.wait(10)
        results["outside"] = F.linear(x, w)
        outside_done.set()

    t = threading.Thread(target=outside)
    t.start()
    with invariant_mode():
        inside_entered.set()
        outside_done.wait(10)
        results["inside"] = F.linear(x, w)
    t.join()
    assert detlib.bitwise_equal(results["outside"], plain)
    assert detlib.bitwise_equal(results["inside"], invariant_matmul(x, w.t()))


def test_unservable_calls_fall_back_and_strict_mode_refuses_them() -> None:
    a = _r(4, 8).double()
    want = a @ a.t()
    before = fallback_counts().get(("mm.default", "dtype torch.float64"), 0)
    with invariant_mode():
        assert detlib.bitwise_equal(a @ a.t(), want)
        ints = torch.arange(6, device=DEV).reshape(2, 3)
        assert torch.equal(ints.float().mean(-1), torch.tensor([1.0, 4.0]).to(DEV))
    assert fallback_counts()[("mm.default", "dtype torch.float64")] == before + 1
    with pytest.raises(NotInvariantError, match="float64"), invariant_mode(strict=True):
        a @ a.t()
    q = _r(1, 2, 4, 16)
    with pytest.raises(NotInvariantError, match="dropout"), invariant_mode(strict=True):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)


def test_sdpa_variants_match_pytorch_and_are_batch_invariant() -> None:
    q, k, v = _r(3, 4, 8, 16), _r(3, 2, 8, 16, seed=1), _r(3, 2, 8, 16, seed=2)
    mask = torch.rand(8, 8, generator=torch.Generator().manual_seed(3)).to(DEV) > 0.3
    mask[:, 0] = True
    calls = {
        "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "decode": lambda q, k, v: F.scaled_dot_product_attention(q[:, :, -1:], k, v, enable_gqa=True, scale=0.2),
        "mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
        "full": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    }
    for name, call in calls.items():
        want = call(q, k, v)
        with invariant_mode(strict=True):
            got = call(q, k, v)
            alone = call(q[1:2], k[1:2], v[1:2])
        torch.testing.assert_close(got, want, **TOL, msg=name)
        assert detlib.bitwise_equal(got[1:2], alone), f"{name}: batch of 3 vs alone"


def test_trace_lists_reductions_outside_the_mode() -> None:
    x, w = _r(2, 4, 32), _r(16, 32, seed=1)

    def f(x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(F.linear(x, w), (16,), eps=1e-6)
        keep = (h > 0).sum()  # integer sum: exact, not reported
        return h.sum(-1).cumsum(0) + torch.softmax(h, -1).amax(-1) + keep + h.double().mean()

    report = trace_outside(f, x)
    outside = {u.op for u in report.outside}
    assert outside == {"sum.dim_IntList", "cumsum.default", "mean.default"}, str(report)
    assert "aten::mean.dim: dtype torch.float64" in report.ops["mean.default"].reasons
    assert {"mm.default", "rms_norm.default", "_softmax.default"} <= {
        u.op for u in report.ops.values() if u.status == "invariant"}
    assert "OUTSIDE" in str(report) and "cumsum.default" in str(report)
    covered = trace_outside(f, x, covered=("sum.dim_IntList",))
    assert "sum.dim_IntList" not in {u.op for u in covered.outside}


def test_register_invariant_sum_extends_the_dispatcher() -> None:
    x = _r(5, 300)
    lib = torch.library.Library("aten", "IMPL")
    try:
        register_invariant_sum(lib)
        rows = [x[:n].sum(-1) for n in (1, 3, 5)]
        ints = torch.arange(6, device=DEV).reshape(2, 3).sum(-1)  # falls back to PyTorch
    finally:
        lib._destroy()
    assert all(detlib.bitwise_equal(r[0], rows[0][0]) for r in rows)
    assert torch.equal(ints, torch.tensor([3, 12]))
    torch.testing.assert_close(rows[-1].double(), x.double().sum(-1), rtol=1e-5, atol=1e-4)


def test_toy_transformer_is_bitwise_invariant_under_the_mode() -> None:
    """One sequence, at rows 0, middle and last of batches of 1..64, and as every prefix of itself."""
    model = toy_transformer(TINY, device=DEV)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, TINY.vocab_size, (1, 3), generator=g).to(DEV)
    with torch.no_grad(), invariant_mode(strict=True):
        ref = model(seq)
        for t in (1, 2):
            assert detlib.bitwise_equal(model(seq[:, :t]), ref[:, :t]), f"prefix of {t}"
        for batch in (2, 3, 4, 5, 7, 8, 9, 16, 17, 32, 33, 64):
            tokens = torch.randint(0, TINY.vocab_size, (batch, 3), generator=g).to(DEV)
            rows = sorted({0, batch // 2, batch - 1})
            tokens[rows] = seq[0]
            out = model(tokens)
            for r in rows:
                assert detlib.bitwise_equal(out[r:r + 1], ref), f"batch {batch}, row {r}"
    with torch.no_grad():
        torch.testing.assert_close(ref, model(seq), rtol=max(TOL["rtol"], 1e-4), atol=max(TOL["atol"], 1e-4))


def test_lab07_sum_check_grades_full_or_zero() -> None:
    from detlib.grade import find, run_check

    ex = find("07.register_invariant_sum")
    assert run_check(ex, register_invariant_sum.__wrapped__).status == "passed"  # type: ignore[attr-defined]
    assert run_check(ex, register_invariant_sum).status == "forbidden call"
    assert run_check(ex, lambda lib: None).status == "failed"

    def wrong_keepdim(lib: torch.library.Library) -> None:
        from detlib.rowwise import row_sums

        def kernel(x, dim=None, keepdim=False, *, dtype=None):  # type: ignore[no-untyped-def]
            return row_sums(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1]).to(dtype or x.dtype)

        lib.impl("sum.dim_IntList", kernel, "CPU" if DEV.type == "cpu" else "CUDA")

    res = run_check(ex, wrong_keepdim)
    assert res.status in ("failed", "error") and res.points == 0
