"""The one comparison helper and the one tolerance table of the test suite.

Tolerances: both sides compute the same sums in a different order (one input GEMM for all steps
versus torch's per-step calls, a different blocking inside BLAS), so results differ by a few
units in the last place per operation, growing with the number of steps a value depends on.
The gradients accumulate over every step (and every layer above), so they get a looser
relative bound. float32: about 1e-7 per rounding -> 2e-5 on values of order 1 after up to a
few dozen dependent steps; float64 the same margin scaled by 2^-29.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

TOLERANCES: dict[torch.dtype, dict[str, dict[str, float]]] = {
    torch.float32: {"value": {"atol": 2e-5, "rtol": 1e-4}, "grad": {"atol": 5e-5, "rtol": 2e-4}},
    torch.float64: {"value": {"atol": 1e-12, "rtol": 1e-10}, "grad": {"atol": 1e-11, "rtol": 1e-9}},
}


def assert_close(actual: Tensor, expected: Tensor, what: str, kind: str = "value") -> None:
    """Same shape, dtype and values within the table's tolerance for ``kind``."""
    assert isinstance(actual, Tensor), f"{what}: not a tensor but {type(actual).__name__}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(
        actual, expected, **TOLERANCES[expected.dtype][kind], msg=lambda m: f"{what}: {m}"
    )


def assert_same_policy(actual: Tensor, expected: Tensor, what: str, storage: torch.dtype) -> None:
    """Two runs of one bfloat16 or float16 call under lstmkit's precision policy (float32
    inside, rounded to ``storage`` once at the end; see lstmkit.precision): their float32
    results differ as the float32 table allows, and rounding can put the two on neighbouring
    ``storage`` numbers, so they may differ by one unit in the last place of ``storage``
    (its eps relative to the value), plus float32's absolute margin for gradients."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    eps = torch.finfo(storage).eps
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=eps, atol=1e-4, msg=lambda m: f"{what}: {m}"
    )


def assert_half_accurate(
    actual: Tensor, truth: Tensor, yardstick: Tensor | None, what: str, storage: torch.dtype
) -> None:
    """The bfloat16 / float16 rule: lstmkit's largest error against a float64 run of the same
    numbers (``truth``) is at most that of torch.nn.LSTM's own run in ``storage``
    (``yardstick``) by a quarter, plus one ``storage`` rounding of the largest value. Where
    torch has no such run (lstmkit's variants, lengths=), two roundings of the largest value:
    computing in float32 and rounding once at the end stays far within that."""
    assert actual.shape == truth.shape, f"{what}: shape {actual.shape} != {truth.shape}"
    eps = torch.finfo(storage).eps
    scale = float(truth.abs().max()) if truth.numel() else 0.0
    error = float((actual.double() - truth).abs().max()) if truth.numel() else 0.0
    if yardstick is None:
        bound, against = 2 * eps * scale, "two roundings of the largest value"
    else:
        theirs = float((yardstick.double() - truth).abs().max()) if truth.numel() else 0.0
        bound, against = 1.25 * theirs + eps * scale, f"torch's error {theirs:.3g}"
    assert error <= bound + 1e-6, (
        f"{what}: error {error:.3g} against float64 exceeds {bound:.3g} ({against}; "
        f"largest value {scale:.3g})"
    )


def run_packed(
    module: torch.nn.Module,
    x: Tensor,
    lengths: list[int] | tuple[int, ...],
    hx: tuple[Tensor, Tensor] | None,
    enforce_sorted: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``module`` on ``x`` packed with ``lengths`` (in its batch_first layout): the output's
    data (checked to be packed like the input), h_n and c_n. The same call for lstmkit and
    torch.nn.LSTM, so their results compare row for row."""
    packed = pack_padded_sequence(
        x, torch.tensor(lengths), batch_first=module.batch_first, enforce_sorted=enforce_sorted
    )
    out, (h, c) = module(packed, hx)
    assert isinstance(out, PackedSequence)
    assert torch.equal(out.batch_sizes, packed.batch_sizes)
    return out.data, h, c
