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

CONFIGS = {
    "plain": {"input_size": 3, "hidden_size": 4},
    "deep-bidirectional-proj": {
        "input_size": 3,
        "hidden_size": 5,
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 2,
        "dropout": 0.3,
    },
    "batch-first": {"input_size": 3, "hidden_size": 4, "batch_first": True, "bidirectional": True},
    "layer-norm-peepholes": {
        "input_size": 3,
        "hidden_size": 4,
        "num_layers": 2,
        "bidirectional": True,
        "layer_norm": True,
        "peepholes": True,
    },
    "noise": {
        "input_size": 3,
        "hidden_size": 4,
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 3,
        "recurrent_dropout": 0.3,
        "weight_dropout": 0.2,
        "zoneout_cell": 0.3,
        "zoneout_hidden": 0.2,
    },
}
LENGTHS = (2, 5, 0, 4)
STEPS = 5
POISONS = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _run(
    lstm: lstmkit.LSTM, x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, weights: list
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Results (output, h_n, c_n) and gradients (input, h0, c0, every parameter)."""
    lstm.zero_grad()
    leaves = [t.detach().clone().requires_grad_() for t in (x, h0, c0)]
    torch.manual_seed(1)
    out, (h_n, c_n) = lstm(leaves[0], (leaves[1], leaves[2]), lengths=list(LENGTHS))
    loss = sum((r * w).sum() for r, w in zip((out, h_n, c_n), weights))
    loss.backward()
    grads = [t.grad for t in leaves] + [p.grad for p in lstm.parameters()]
    return [out, h_n, c_n], grads


@pytest.mark.parametrize("poison", POISONS.values(), ids=POISONS.keys())
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kwargs", CONFIGS.values(), ids=CONFIGS.keys())
def test_padding_is_never_read(kwargs: dict, training: bool, poison: float, backend: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(**kwargs, dtype=torch.float64).train(training)
    spec = lstm.spec
    batch = len(LENGTHS)
    rows = spec.num_layers * spec.num_directions
    x = torch.randn(STEPS, batch, spec.input_size, dtype=torch.float64)
    padding = torch.arange(STEPS).unsqueeze(1) >= torch.tensor(LENGTHS)  # (L, N)
    x[padding] = 0.0
    poisoned = x.clone()
    poisoned[padding] = poison
    if spec.batch_first:
        x, poisoned = x.transpose(0, 1), poisoned.transpose(0, 1)
    h0 = torch.randn(rows, batch, spec.h_size, dtype=torch.float64)
    c0 = torch.randn(rows, batch, spec.hidden_size, dtype=torch.float64)
    out_shape = (*x.shape[:2], spec.num_directions * spec.h_size)
    weights = [
        torch.randn(out_shape, dtype=torch.float64),
        torch.randn_like(h0),
        torch.randn_like(c0),
    ]

    results, grads = _run(lstm, x, h0, c0, weights)
    poisoned_results, poisoned_grads = _run(lstm, poisoned, h0, c0, weights)

    for name, got, expected in zip(("output", "h_n", "c_n"), poisoned_results, results):
        assert torch.isfinite(got).all(), f"{name} holds NaN or Inf from the padding"
        assert_close(got, expected, name)
    names = ["input", "h0", "c0"] + [name for name, _ in lstm.named_parameters()]
    for name, got, expected in zip(names, poisoned_grads, grads):
        assert got is not None, f"grad {name} missing"
        assert torch.isfinite(got).all(), f"grad {name} holds NaN or Inf from the padding"
        assert_close(got, expected, f"grad {name}", "grad")
