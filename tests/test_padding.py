"""Padded steps are never read: NaN or Inf in the padding of a ``lengths=`` batch changes no
output, no final state and no gradient, in every backend, configuration and variant.

Each case runs twice from the same RNG state (so training noise is the same): once with zero
padding, once with the padding poisoned; everything must match and every gradient be finite.
"""

from __future__ import annotations

import pytest
import torch

import lstmkit
from compare import assert_close

PLAIN = {"input_size": 3, "hidden_size": 4}
DEEP = {"input_size": 3, "hidden_size": 5, "num_layers": 2, "bidirectional": True, "proj_size": 2}
# name -> (LSTM arguments, training, forward_all with every layer's h and c instead of forward)
CASES = {
    "plain": (PLAIN, False, False),
    "deep-bidirectional-proj": (DEEP, False, False),
    "deep-dropout-train": ({**DEEP, "dropout": 0.3}, True, False),
    "batch-first-sequences": (
        {"input_size": 3, "hidden_size": 4, "batch_first": True, "bidirectional": True},
        False,
        True,
    ),
    "layer-norm-peepholes": (
        {**DEEP, "proj_size": 0, "layer_norm": True, "peepholes": True},
        False,
        True,
    ),
    "noise-train": (
        {
            **DEEP,
            "proj_size": 3,
            "recurrent_dropout": 0.3,
            "weight_dropout": 0.2,
            "zoneout_cell": 0.3,
            "zoneout_hidden": 0.2,
        },
        True,
        True,
    ),
}
LENGTHS = (2, 5, 0, 4)
STEPS = 5
POISONS = {"nan": float("nan"), "inf": float("inf")}


def _run(
    lstm: lstmkit.LSTM, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, sequences: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Results (output, h_n, c_n, and with ``sequences`` every layer's h and c) and gradients
    (input, h0, c0, every parameter) of a fixed random weighting of the results."""
    lstm.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, c0)]
    torch.manual_seed(1)
    hx = (leaves[1], leaves[2])
    if sequences:
        result = lstm.forward_all(leaves[0], hx, lengths=list(LENGTHS))
        results = [result.output, result.h_n, result.c_n]
        results += [*result.layer_outputs, *result.layer_cells]
    else:
        out, (h_n, c_n) = lstm(leaves[0], hx, lengths=list(LENGTHS))
        results = [out, h_n, c_n]
    weighting = torch.Generator().manual_seed(2)
    loss = sum(
        (r * torch.randn(r.shape, dtype=r.dtype, generator=weighting)).sum() for r in results
    )
    loss.backward()
    grads = [t.grad for t in leaves] + [p.grad for p in lstm.parameters()]
    return results, grads


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_padding_is_never_read(
    case: tuple[dict, bool, bool], dtype: torch.dtype, poison: float, backend: str
) -> None:
    kwargs, training, sequences = case
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(**kwargs, dtype=dtype).train(training)
    spec = lstm.spec
    batch = len(LENGTHS)
    rows = spec.num_layers * spec.num_directions
    x = torch.randn(STEPS, batch, spec.input_size, dtype=dtype)
    padding = torch.arange(STEPS).unsqueeze(1) >= torch.tensor(LENGTHS)  # (L, N)
    x[padding] = 0.0
    poisoned = x.clone()
    poisoned[padding] = poison
    if spec.batch_first:
        x, poisoned = x.transpose(0, 1), poisoned.transpose(0, 1)
    h0 = torch.randn(rows, batch, spec.h_size, dtype=dtype)
    c0 = torch.randn(rows, batch, spec.hidden_size, dtype=dtype)

    results, grads = _run(lstm, x, h0, c0, sequences)
    poisoned_results, poisoned_grads = _run(lstm, poisoned, h0, c0, sequences)

    names = ["output", "h_n", "c_n"]
    names += [f"layer {k} {what}" for what in ("h", "c") for k in range(spec.num_layers)]
    for name, got, expected in zip(names, poisoned_results, results):
        assert torch.isfinite(got).all(), f"{name} holds NaN or Inf from the padding"
        assert_close(got, expected, name)
    names = ["input", "h0", "c0"] + [name for name, _ in lstm.named_parameters()]
    for name, got, expected in zip(names, poisoned_grads, grads):
        assert got is not None, f"grad {name} missing"
        assert torch.isfinite(got).all(), f"grad {name} holds NaN or Inf from the padding"
        assert_close(got, expected, f"grad {name}", "grad")
