"""Lab 07 (batch-invariant mode): an invariant override you register yourself, and the audit's hunt for
a planted variant layer."""

from __future__ import annotations

import secrets
from collections.abc import Callable

import torch

from detlib.backend import device
from detlib.grade.harness import CheckFailed, expect_bits, expect_close
from detlib.grade.spec import exercise
from detlib.numerics import bitwise_equal
from detlib.rowwise import invariant_sum as _sum_ref
from detlib.toy_transformer import ToyConfig, linear_names, plant_split_k, toy_transformer

_invariant_sum = _sum_ref.__wrapped__  # type: ignore[attr-defined]

CHECK_CONFIG = ToyConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, max_seq_len=16)


def _cpu_kernel_registration(op: str) -> str:
    dump = torch._C._dispatch_dump(f"aten::{op}")
    key = "CPU:" if device().type == "cpu" else "CUDA:"
    return next((line for line in dump.splitlines() if line.startswith(key)), "")


@exercise(
    "07",
    "register_invariant_sum",
    points=2,
    replaces=("detlib.mode.register_invariant_sum", "detlib.rowwise.invariant_sum"),
    timeout_s=90,
    hint="def kernel(x, dim=None, keepdim=False, *, dtype=None): move the summed dims last, reshape to "
    "[rows, n], detlib.rowwise.row_sums, reshape back (unsqueeze for keepdim), cast to dtype or x.dtype; "
    "then lib.impl('sum.dim_IntList', kernel, 'CPU') (and 'CUDA' on a GPU)",
)
def check_register_invariant_sum(register: Callable[[torch.library.Library], None]) -> None:
    """``register_invariant_sum(lib)`` registers an invariant ``aten::sum.dim_IntList`` in ``lib``."""
    gen = torch.Generator().manual_seed(secrets.randbelow(2**31))
    x = (torch.randn(64, 1500, generator=gen) * 2).to(device())
    x3 = torch.randn(4, 6, 300, generator=gen).to(device())
    before = _cpu_kernel_registration("sum.dim_IntList")
    lib = torch.library.Library("aten", "IMPL")
    try:
        register(lib)
        if _cpu_kernel_registration("sum.dim_IntList") == before:
            raise CheckFailed("after register_invariant_sum(lib), aten::sum.dim_IntList still runs PyTorch's kernel",
                              "call lib.impl('sum.dim_IntList', your_kernel, 'CPU') (and 'CUDA' on a GPU)")
        alone = x[:1].sum(-1)
        sums = {rows: x[:rows].sum(-1) for rows in (1, 2, 7, 64)}
        cases = {
            "x3.sum(-1)": (x3.sum(-1), _invariant_sum(x3, -1)),
            "x3.sum((0, 2), keepdim=True)": (x3.sum((0, 2), keepdim=True), _invariant_sum(x3, (0, 2), True)),
            "x3.sum(1)": (x3.sum(1), _invariant_sum(x3, 1)),
            "x3.sum(-1, dtype=torch.float32)": (x3.sum(-1, dtype=torch.float32), _invariant_sum(x3, -1)),
        }
    finally:
        lib._destroy()
    for rows, got in sums.items():
        if not bitwise_equal(got[0], alone[0]):
            raise CheckFailed(f"row 0 of x[:{rows}].sum(-1) differs from x[:1].sum(-1): not batch-invariant",
                              "use detlib.rowwise.row_sums, one fixed order per row")
    expect_bits(sums[64], _invariant_sum(x, -1), what="x.sum(-1) for x of shape (64, 1500)",
                hint="reduce with detlib.rowwise.row_sums (fp32, fixed order) and cast to x's dtype")
    for what, (got, want) in cases.items():
        expect_close(got, want.double(), rtol=1e-5, atol=1e-4, what=what,
                     hint="dims can be negative or a list; keepdim keeps size-1 dims where the summed dims were")


@exercise(
    "07",
    "find_variant_layer",
    points=2,
    replaces=("detlib.audit.AuditReport.first_variant_layer",),
    timeout_s=180,
    hint="report = audit(model, tokens, batch_sizes=(1, 16), modes=('on',)); for each probe, the first layer "
    "in report.layers whose row of report.differs('on') is True is where the bits start to differ",
)
def check_find_variant_layer(find: Callable[[torch.nn.Module, torch.Tensor], str]) -> None:
    """``find_variant_layer(model, tokens)`` names the one layer that stays variant under the mode."""
    rng = secrets.SystemRandom()
    gen = torch.Generator().manual_seed(rng.randrange(2**31))
    names = linear_names(toy_transformer(CHECK_CONFIG))
    for planted in rng.sample(names, 2):
        model = plant_split_k(toy_transformer(CHECK_CONFIG, seed=rng.randrange(1000), device=device()), planted)
        tokens = torch.randint(0, CHECK_CONFIG.vocab_size, (1, 4), generator=gen).to(device())
        got = find(model, tokens)
        if got != planted:
            order = list(dict(model.named_modules()))
            where = ("it is not a layer of the model" if got not in order else
                     "it comes after the layer where the bits first differ: it only inherits the difference"
                     if order.index(got) > order.index(planted) else
                     "it comes before the planted layer: its output does not differ")
            raise CheckFailed(f"you named {got!r} for a model with a planted layer; {where}",
                              "take the first layer, in execution order (report.layers), whose output differs; "
                              "use batch sizes large enough to change the shape a layer sees (e.g. 1 and 16)")
