"""torch.jit.trace of an lstmkit module runs the kernels on each call's tensors: right at the
traced shape and at other lengths and batch sizes, under no_grad and with grad."""

from __future__ import annotations

import warnings

import pytest
import torch

import lstmkit
from compare import assert_close

CONFIGS = {
    "stack": {"num_layers": 2, "bidirectional": True},  # the fused stack
    "proj": {"proj_size": 3},
    "layer-norm": {"layer_norm": True},  # the variant kernels
}


def traced(module: torch.nn.Module, x: torch.Tensor, grad: bool) -> torch.jit.ScriptModule:
    """The trace, without the warnings it prints: torch 2.13 deprecates jit.trace, and the
    tracer notes that lstmkit's shape checks run once, at trace time."""
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(module, (x,), check_trace=False)


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_trace_runs_the_kernels_at_every_shape(
    config: str, grad: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(lstmkit.backends.BACKEND_ENV, "cpu")
    torch.manual_seed(0)
    module = lstmkit.LSTM(4, 6, **CONFIGS[config])
    trace = traced(module, torch.randn(7, 2, 4), grad)
    for shape in ((7, 2, 4), (11, 3, 4), (2, 1, 4)):
        x = torch.randn(shape, requires_grad=grad)
        with torch.set_grad_enabled(grad):
            out, (h_n, c_n) = trace(x)
            want, (want_h, want_c) = module(x)
        for name, got, expected in (("out", out, want), ("h_n", h_n, want_h), ("c_n", c_n, want_c)):
            assert_close(got, expected, f"{config} {shape} {name}")
        if grad:
            (got_grad,) = torch.autograd.grad((out.sum() + c_n.sum()), x)
            (want_grad,) = torch.autograd.grad((want.sum() + want_c.sum()), x)
            assert_close(got_grad, want_grad, f"{config} {shape} d x", "grad")


def test_trace_refuses_the_reference_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A trace of the reference's Python loop would be unrolled to the traced length."""
    monkeypatch.setenv(lstmkit.backends.BACKEND_ENV, "reference")
    module = lstmkit.LSTM(4, 6)
    with pytest.raises(RuntimeError, match="would unroll its Python time loop"):
        traced(module, torch.randn(7, 2, 4), False)


def test_script_refuses_naming_the_keyword_only_argument() -> None:
    with (
        warnings.catch_warnings(),
        pytest.raises(torch.jit.frontend.NotSupportedError, match="keyword-only"),
    ):
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates jit.script
        warnings.filterwarnings("ignore", "The TorchScript type system", UserWarning)
        torch.jit.script(lstmkit.LSTM(4, 6))
