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
