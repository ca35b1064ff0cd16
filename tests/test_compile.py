"""torch.compile of models holding lstmkit.LSTM: one graph (fullgraph=True), inference and
training equal to eager, from the first call of a fresh process, and no recompile for a shape
seen before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import lstmkit
from compare import assert_close

# Importing inductor runs torch's own deprecated torch.jit.script_method (torch.utils.mkldnn).
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


class Tagger(torch.nn.Module):
    """Embedding -> lstmkit.LSTM -> Linear: a small tagger."""

    def __init__(self, **options: object) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(50, 16)
        self.lstm = lstmkit.LSTM(16, 24, batch_first=True, **options)
        directions = 2 if self.lstm.bidirectional else 1
        self.linear = torch.nn.Linear(directions * (self.lstm.proj_size or 24), 5)

    def forward(
        self,
        tokens: torch.Tensor,
        hx: tuple[torch.Tensor, torch.Tensor] | None = None,
        lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out, (_, c_n) = self.lstm(self.embedding(tokens), hx, lengths=lengths)
        return self.linear(out), c_n


class Counting:
    """A torch.compile backend (inductor) that counts the graphs it is given."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return torch._inductor.compile(graph, example_inputs)


CONFIGS = {
    "stack": ({"num_layers": 2, "bidirectional": True}, True),  # the fused stack, lengths
    "proj": ({"proj_size": 7, "bidirectional": True}, False),  # layer by layer
}


@pytest.mark.parametrize("config", CONFIGS)
def test_fullgraph_inference_and_training_equal_eager(config: str) -> None:
    options, with_lengths = CONFIGS[config]
    torch.manual_seed(0)
    model = Tagger(**options)
    backend = Counting()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    tokens = torch.randint(0, 50, (3, 6))
    rows = model.lstm.num_layers * 2
    hx = (torch.randn(rows, 3, options.get("proj_size", 24)), torch.randn(rows, 3, 24))
    lengths = torch.tensor([6, 2, 4]) if with_lengths else None
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            got, got_c = compiled(tokens, hx, lengths)
            want, want_c = model(tokens, hx, lengths)
        assert_close(got, want, f"{config} grad={grad} output")
        assert_close(got_c, want_c, f"{config} grad={grad} c_n")
    loss = got.square().sum() + got_c.sum()
    compiled_grads = torch.autograd.grad(loss, list(model.parameters()))
    eager_grads = torch.autograd.grad(want.square().sum() + want_c.sum(), list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), compiled_grads, eager_grads):
        assert_close(a, b, f"{config} d {name}", "grad")
    graphs = backend.graphs
    with torch.no_grad():
        compiled(tokens, hx, lengths)  # seen before: no new graph
    assert backend.graphs == graphs


def test_recompiles_only_when_a_shape_changes() -> None:
    torch.manual_seed(0)
    model = Tagger(num_layers=2, bidirectional=True).eval()
    backend = Counting()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    with torch.no_grad():
        for shape in ((3, 6), (3, 6), (4, 9), (5, 11), (2, 3), (4, 9)):
            tokens = torch.randint(0, 50, shape)
            assert_close(compiled(tokens)[0], model(tokens)[0], f"shape {shape}")
    # the first shape, then one more graph with dynamic batch and length for all the others
    assert backend.graphs == 2


def test_fullgraph_from_the_first_call_of_a_fresh_process() -> None:
    """Nothing of lstmkit loaded yet: the kernels are loaded at trace time, outside the graph."""
    code = textwrap.dedent(
        """
        import warnings
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", "`torch.jit.script_method`", DeprecationWarning)
        import torch, lstmkit
        lstm = lstmkit.LSTM(4, 5, num_layers=2, bidirectional=True)
        x = torch.randn(6, 2, 4)
        out, _ = torch.compile(lstm, fullgraph=True)(x)
        print(float((out - lstm(x)[0]).detach().abs().max()))
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert float(result.stdout) < 1e-5


def test_eager_use_does_not_import_dynamo() -> None:
    """An eager process never pays for torch._dynamo: importing it takes about a second and
    leaves some 120,000 objects that every full garbage collection walks."""
    code = textwrap.dedent(
        """
        import sys, torch, lstmkit
        lstm = lstmkit.LSTM(4, 5, num_layers=2, bidirectional=True)
        out, (h, c) = lstm(torch.randn(6, 2, 4), lengths=[6, 3])
        (out.sum() + h.sum() + c.sum()).backward()
        with torch.no_grad():
            lstm(torch.randn(6, 2, 4))
        print("torch._dynamo" in sys.modules)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("mode", ["bf16-module", "autocast"])
def test_fullgraph_half_equals_eager(mode: str) -> None:
    """A bf16 module, and a float32 one under autocast, compile to one graph whose outputs and
    gradients are eager's within the half rule's rounding (lstmkit.precision)."""
    import torch._inductor.config

    from compare import assert_same_policy

    torch.manual_seed(0)
    lstm = lstmkit.LSTM(4, 6, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4)
    if mode == "bf16-module":
        lstm, x = lstm.bfloat16(), x.bfloat16()
    # inductor fuses autocast's float32 -> bf16 -> float32 round trip of the weights into no
    # rounding at all unless asked to emulate the casts (its documented default); with it, the
    # graph computes what eager does
    compiled = torch.compile(lstm, fullgraph=True)
    results = []
    for module in (lstm, compiled):
        leaf = x.clone().requires_grad_()
        with (
            torch._inductor.config.patch(emulate_precision_casts=True),
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"),
        ):
            out, (h, c) = module(leaf)
        assert out.dtype == h.dtype == c.dtype == torch.bfloat16
        (out.float().sum() + h.float().sum() + c.float().sum()).backward()
        results.append([out.detach(), h.detach(), c.detach(), leaf.grad])
        results[-1] += [p.grad for p in lstm.parameters()]
        lstm.zero_grad(set_to_none=True)
    for k, (a, e) in enumerate(zip(*results, strict=True)):
        assert_same_policy(a, e, f"result {k}", torch.bfloat16)
