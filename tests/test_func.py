"""torch.func with lstmkit.LSTM: grad, functional_call, jacrev, per-sample gradients
(vmap(grad)), jvp, and vmap over a leading batch of independent inputs, each against eager
lstmkit (the differentiating transforms run the reference; vmap of inference runs the
kernels' ops, the vmapped dimension folded into N)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.func import functional_call, grad, jacrev, jvp, vmap

import lstmkit
from compare import assert_close
from lstmkit import backends

DTYPE = torch.float64


def module() -> lstmkit.LSTM:
    torch.manual_seed(0)
    return lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=DTYPE)


def loss_of(lstm: lstmkit.LSTM) -> object:
    def loss(params: dict[str, Tensor], x: Tensor) -> Tensor:
        out, (_, c_n) = functional_call(lstm, params, (x,))
        return out.square().sum() + c_n.sum()

    return loss


def test_grad_and_functional_call_equal_autograd() -> None:
    lstm = module()
    params = dict(lstm.named_parameters())
    x = torch.randn(5, 2, 3, dtype=DTYPE)
    got = grad(loss_of(lstm))(params, x)
    assert backends.last_choice().backend == "reference"
    assert "torch.func" in str(backends.last_choice())
    loss_of(lstm)(params, x).backward()
    assert backends.last_choice().backend == "cpu"
    for name, p in params.items():
        assert_close(got[name], p.grad, f"d {name}", "grad")


def test_per_sample_gradients() -> None:
    lstm = module()
    params = dict(lstm.named_parameters())
    xs = torch.randn(3, 5, 1, 3, dtype=DTYPE)
    got = vmap(grad(loss_of(lstm)), in_dims=(None, 0))(params, xs)
    for index in range(3):
        expected = torch.autograd.grad(loss_of(lstm)(params, xs[index]), list(params.values()))
        for (name, _), want in zip(params.items(), expected):
            assert_close(got[name][index], want, f"sample {index} d {name}", "grad")


# torch loads its forward-mode decompositions through its own deprecated torch.jit.script.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jacrev_and_jvp() -> None:
    lstm = module()
    x = torch.randn(4, 2, 3, dtype=DTYPE, requires_grad=True)
    tangent = torch.randn_like(x)

    def last_output(x: Tensor) -> Tensor:
        return lstm(x)[0][-1]  # (N, D*H_out)

    jacobian = jacrev(last_output)(x)  # (N, D*H_out, L, N, H_in)
    _, directional = jvp(last_output, (x,), (tangent,))
    out = last_output(x)
    rows = []
    for index in range(out.numel()):
        (row,) = torch.autograd.grad(out.reshape(-1)[index], x, retain_graph=True)
        rows.append(row)
    expected = torch.stack(rows).reshape(jacobian.shape)
    assert_close(jacobian, expected, "jacrev", "grad")
    assert_close(directional, (expected * tangent).sum((2, 3, 4)), "jvp", "grad")


def test_vmap_of_inference_runs_the_kernels() -> None:
    lstm = module()
    xs = torch.randn(3, 5, 2, 3, dtype=DTYPE)
    for lengths in (None, [5, 2]):
        with torch.no_grad():
            got = vmap(lambda x, lengths=lengths: lstm(x, lengths=lengths)[0])(xs)
            assert backends.last_choice().backend == "cpu"
            for index in range(3):
                want = lstm(xs[index], lengths=lengths)[0]
                assert_close(got[index], want, f"vmapped {index} lengths={lengths}")
