"""torch.export of lstmkit.LSTM: static and dynamic batch and sequence length; the exported
program holds lstmkit's ops and computes what the eager module does."""

from __future__ import annotations

import pytest
import torch

import lstmkit
from compare import assert_close

CONFIGS = {
    "stack": {"num_layers": 2, "bidirectional": True},  # one lstmkit::stack
    "proj": {"proj_size": 3, "bidirectional": True},  # lstmkit::layer
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("config", CONFIGS)
def test_export_static_and_dynamic(config: str, grad: bool) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(4, 5, batch_first=True, **CONFIGS[config])
    x = torch.randn(3, 6, 4)
    lengths = torch.tensor([6, 2, 5])
    with torch.set_grad_enabled(grad):
        static = torch.export.export(lstm, (x,), {"lengths": lengths})
        batch, steps = torch.export.Dim("batch"), torch.export.Dim("steps", min=2)
        dynamic = torch.export.export(
            lstm, (x,), dynamic_shapes=({0: batch, 1: steps},), strict=False
        )
    code = static.graph_module.code + dynamic.graph_module.code
    assert "torch.ops.lstmkit." in code
    with torch.set_grad_enabled(grad):
        got, (_, got_c) = static.module()(x, lengths=lengths)
        want, (_, want_c) = lstm(x, lengths=lengths)
        assert_close(got, want, f"{config} static output")
        assert_close(got_c, want_c, f"{config} static c_n")
        for shape in ((3, 6, 4), (5, 9, 4), (1, 2, 4)):
            x = torch.randn(shape)
            got, (_, got_c) = dynamic.module()(x)
            want, (_, want_c) = lstm(x)
            assert_close(got, want, f"{config} dynamic {shape} output")
            assert_close(got_c, want_c, f"{config} dynamic {shape} c_n")
