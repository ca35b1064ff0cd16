"""The cpu kernels as torch ops: torch.library.opcheck on each (schema, fake implementation,
autograd registration, AOT dispatch), double backward by default, and pickles that hold only
lstmkit's public classes."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor

import lstmkit
from compare import assert_close
from lstmkit import backends
from lstmkit.backends.cpu import ops
from lstmkit.backends.cpu.variants import variant_lists
from lstmkit.reference import Variant

STEPS, BATCH = 4, 3
LENGTHS = torch.tensor([4, 2, 1])


def flat_params(module: lstmkit.LSTM, like: Tensor) -> list[Tensor]:
    empty = like.new_empty(0)
    return [empty if t is None else t for layer in module.layer_weights() for w in layer for t in w]


def layer_args(training: bool, lengths: bool, variant: bool, proj: int) -> tuple:
    torch.manual_seed(0)
    module = lstmkit.LSTM(3, 5, bidirectional=True, proj_size=proj, dtype=torch.float64)
    h_size = proj or 5
    x = torch.randn(STEPS, BATCH, 3, dtype=torch.float64, requires_grad=training)
    h0 = torch.randn(2, BATCH, h_size, dtype=torch.float64, requires_grad=training)
    c0 = torch.randn(2, BATCH, 5, dtype=torch.float64)
    params = flat_params(module, x)
    for p in params:
        p.requires_grad_(training and p.numel() > 0)
    variant_params, masks, keep = [], [], []
    if variant:
        gain = torch.rand(20, dtype=torch.float64, requires_grad=training)
        mask = torch.bernoulli(torch.full((STEPS, BATCH, 5), 0.3, dtype=torch.float64))
        one = Variant(ln_weight_hh=gain, ln_bias_hh=torch.zeros(20, dtype=torch.float64))
        variant_params, masks, keep = variant_lists([one._replace(zoneout_cell=mask), one], x)
    chosen = LENGTHS if lengths else None
    return (x, h0, c0, params, chosen, variant_params, masks, keep, variant, training)


CASES = {
    "inference": (False, False, False, 0),
    "training": (True, False, False, 0),
    "lengths-proj": (True, True, False, 3),
    "variants": (True, True, True, 0),
}


@pytest.mark.parametrize("case", CASES)
def test_opcheck_layer(case: str) -> None:
    torch.library.opcheck(torch.ops.lstmkit.layer.default, layer_args(*CASES[case]))


@pytest.mark.parametrize("case", ["inference", "lengths-proj"])
def test_opcheck_stack(case: str) -> None:
    training, lengths, _, proj = CASES[case]
    torch.manual_seed(0)
    module = lstmkit.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=proj)
    x = torch.randn(STEPS, BATCH, 3, requires_grad=training)
    h0 = torch.randn(4, BATCH, proj or 5)
    c0 = torch.randn(4, BATCH, 5, requires_grad=training)
    params = [p.requires_grad_(training and p.numel() > 0) for p in flat_params(module, x)]
    args = (x, h0, c0, params, LENGTHS if lengths else None, 2, training)
    torch.library.opcheck(torch.ops.lstmkit.stack.default, args)


def test_opcheck_backward_ops() -> None:
    """The backward ops, fed what their forward ops returned for training."""
    x, h0, c0, params, lengths, variant_params, masks, keep, _, _ = layer_args(*CASES["variants"])
    detached = [t.detach() for t in (x, h0, c0)]
    params = [p.detach() for p in params]
    variant_params = [p.detach() for p in variant_params]
    forward = (*detached, params, lengths, variant_params, masks, keep, True, True)
    out, h_n, c_n, cells, saved = torch.ops.lstmkit.layer(*forward)
    needs = [True, True, False] + [p.numel() > 0 for p in params + variant_params]
    incoming = (torch.randn_like(out), None, torch.randn_like(c_n), torch.randn_like(cells))
    args = (*forward[:8], out, cells, saved, *incoming, needs)
    torch.library.opcheck(torch.ops.lstmkit.layer_backward.default, args)
    x, h0, c0 = detached[0], detached[1][:1], detached[2][:1]
    out, h_n, c_n, kept = torch.ops.lstmkit.stack(x, h0, c0, params[:5], None, 1, True)
    args = (x, h0, c0, params[:5], None, 1, out, kept)
    args += (torch.randn_like(out), torch.randn_like(h_n), None, [True] * 8)
    torch.library.opcheck(torch.ops.lstmkit.stack_backward.default, args)


def test_ops_check_lengths_when_they_run() -> None:
    """A traced graph skips lstmkit.checks' look at the values: the op refuses them."""
    args = list(layer_args(*CASES["inference"]))
    args[4] = torch.tensor([4, 5, 1])
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, L\] = \[0, 4\]"):
        ops.layer(*args)
    args[4] = torch.tensor([1, 2, 1])
    with pytest.raises(ValueError, match="non-increasing"):
        ops.layer(*args)


@pytest.mark.parametrize("options", [{"num_layers": 2}, {"layer_norm": True, "proj_size": 2}])
def test_gradgradcheck_by_default(options: dict) -> None:
    """Second derivatives without choosing a backend: the cpu backend runs forward, and the
    graph of its gradient is the reference's."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(2, 3, bidirectional=True, dtype=torch.float64, **options)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    h_size = options.get("proj_size") or 3
    rows = lstm.num_layers * 2
    h0 = torch.randn(rows, 2, h_size, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(rows, 2, 3, dtype=torch.float64)

    def run(x: Tensor, h0: Tensor) -> tuple[Tensor, ...]:
        out, (_, c_n) = lstm(x, (h0, c0))
        return out, c_n

    assert torch.autograd.gradgradcheck(run, (x, h0))
    assert backends.last_choice().backend == "reference"
    lstm(x)
    assert backends.last_choice().backend == "cpu"


def test_pickle_holds_only_public_classes() -> None:
    """A used module (its parameter lists cached) loads with weights_only=True allowing only
    lstmkit.LSTM and its spec, and computes the same."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True)
    x = torch.randn(5, 2, 3)
    expected = lstm(x)[0]
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals([lstmkit.LSTM, lstmkit.LSTMSpec]):
        loaded = torch.load(buffer, weights_only=True)
    assert_close(loaded(x)[0], expected, "output of the loaded module")
