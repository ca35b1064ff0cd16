"""ONNX export of lstmkit.LSTM with both of torch's exporters, run by onnxruntime: outputs and
final states equal eager lstmkit's at the exported sizes and at another sequence length and
batch (dynamic axes); plain layers become ONNX's LSTM node, projections a loop; what cannot
be exported is refused by name."""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch
from torch import Tensor, nn

import lstmkit
import lstmkit.onnx
from compare import assert_close

# name -> (constructor keywords, pass (h0, c0), pass lengths, the ONNX op that runs the layers)
CONFIGS = {
    "plain": ({}, False, False, "LSTM"),
    "stack": ({"num_layers": 2, "bidirectional": True, "batch_first": True}, True, True, "LSTM"),
    "peepholes": ({"peepholes": True, "bias": False}, True, False, "LSTM"),
    "proj": ({"proj_size": 2, "bidirectional": True}, False, True, None),
}
LOOP = {"dynamo": "Scan", "torchscript": "Loop"}
EXPORTED, OTHER = (5, 3), (7, 2)  # (L, N) exported, and run again at
EXPORTERS = ["dynamo", "torchscript"]
# Warnings of torch's exporters about themselves: the TorchScript exporter is deprecated, as
# is torch.jit, which both exporters still call; its tracer warns about every Python-level
# comparison of a shape (lstmkit's input checks included); torch.export calls a deprecated
# pytree check of its own; dynamo's exporter notes that h0, c0 and lengths share the input's
# batch dimension, as they must.
pytestmark = [
    pytest.mark.filterwarnings(f"ignore:{message}")
    for message in (
        "You are using the legacy TorchScript-based ONNX export",
        "The feature will be removed:DeprecationWarning",
        "`torch.jit.script(_method)?` is deprecated",
        ":torch.jit.TracerWarning",
        "`isinstance\\(treespec, LeafSpec\\)`",
        "# The axis name. N will not be used",
    )
]


class Model(nn.Module):
    """A user's model holding an lstmkit.LSTM; its forward takes every input positionally,
    as the TorchScript exporter calls it."""

    def __init__(self, lstm: lstmkit.LSTM) -> None:
        super().__init__()
        self.lstm = lstm

    def forward(
        self, x: Tensor, hx: tuple[Tensor, Tensor] | None = None, lengths: Tensor | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self.lstm(x, hx, lengths=lengths)


def inputs(lstm: lstmkit.LSTM, size: tuple[int, int], hx: bool, lengths: bool) -> list[Tensor]:
    """x, then h0 and c0, then lengths: unsorted, one of them 0 (then h_n and c_n are the
    initial state), and L with N = 3."""
    steps, batch = size
    x = torch.randn(
        (batch, steps, lstm.input_size) if lstm.batch_first else (steps, batch, lstm.input_size)
    )
    result = [x]
    if hx:
        rows = lstm.num_layers * (2 if lstm.bidirectional else 1)
        h_size = lstm.proj_size or lstm.hidden_size
        result += [torch.randn(rows, batch, h_size), torch.randn(rows, batch, lstm.hidden_size)]
    if lengths:
        result.append(torch.tensor([steps - 3, 0, steps])[:batch])
    return result


def export(lstm: lstmkit.LSTM, exporter: str, feed: list[Tensor], path: Path) -> None:
    """``torch.onnx.export`` to ``path`` with dynamic L and N; dynamo exports the bare module
    (``lengths=`` as a keyword), TorchScript a model holding it."""
    hx, lengths = len(feed) > 2, len(feed) % 2 == 0
    time, batch = (1, 0) if lstm.batch_first else (0, 1)
    if exporter == "dynamo":
        steps_dim, batch_dim = torch.export.Dim("L"), torch.export.Dim("N")
        shapes: dict[str, object] = {"input": {time: steps_dim, batch: batch_dim}}
        if hx:
            shapes["hx"] = ({1: batch_dim}, {1: batch_dim})
        if lengths:
            shapes["lengths"] = {0: batch_dim}
        args = (feed[0], (feed[1], feed[2])) if hx else (feed[0],)
        kwargs = {"lengths": feed[-1]} if lengths else None
        torch.onnx.export(
            lstm, args, path, kwargs=kwargs, dynamic_shapes=shapes, dynamo=True, verbose=False
        )
        return
    names = ["input", *(["h0", "c0"] if hx else []), *(["lengths"] if lengths else [])]
    axes = {"input": {time: "L", batch: "N"}, "output": {time: "L", batch: "N"}}
    axes |= {name: {1: "N"} for name in ("h0", "c0", "h_n", "c_n")}
    axes["lengths"] = {0: "N"}
    args = (feed[0], (feed[1], feed[2]) if hx else None, feed[-1] if lengths else None)
    torch.onnx.export(
        Model(lstm),
        args,
        path,
        input_names=names,
        output_names=["output", "h_n", "c_n"],
        dynamic_axes={name: axes[name] for name in [*names, "output", "h_n", "c_n"]},
        dynamo=False,
    )


def run_onnx(path: Path, feed: list[Tensor]) -> list[Tensor]:
    session = onnxruntime.InferenceSession(str(path))
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(feed), f"graph inputs {names} for {len(feed)} tensors"
    outputs = session.run(None, {n: t.numpy() for n, t in zip(names, feed)})
    return [torch.from_numpy(o) for o in outputs]


def check_runs(lstm: lstmkit.LSTM, path: Path, feed: list[Tensor], what: str) -> None:
    hx = (feed[1], feed[2]) if len(feed) > 2 else None
    lengths = feed[-1] if len(feed) % 2 == 0 else None
    output, (h_n, c_n) = lstm(feed[0], hx, lengths=lengths)
    got = run_onnx(path, feed)
    for name, actual, expected in zip(("output", "h_n", "c_n"), got, (output, h_n, c_n)):
        assert_close(actual, expected, f"{what} {name}")


def op_types(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("config", CONFIGS)
def test_export_runs_in_onnxruntime(config: str, exporter: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    keywords, hx, lengths, op = CONFIGS[config]
    lstm = lstmkit.LSTM(3, 4, **keywords).eval()
    path = tmp_path / "lstm.onnx"
    export(lstm, exporter, inputs(lstm, EXPORTED, hx, lengths), path)
    ops = op_types(path)
    expected = op or LOOP[exporter]
    assert expected in ops and not (op is None and "LSTM" in ops), f"{config}: ops {ops}"
    for size in (EXPORTED, OTHER):
        check_runs(lstm, path, inputs(lstm, size, hx, lengths), f"{config} {exporter} {size}")


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_variants_are_a_scan_with_dynamo_and_refused_by_torchscript(
    exporter: str, tmp_path: Path
) -> None:
    """Layer norm and zoneout (its expectation, in evaluation) have no ONNX LSTM form."""
    torch.manual_seed(0)
    keywords = {"layer_norm": True, "zoneout_cell": 0.2, "zoneout_hidden": 0.1}
    lstm = lstmkit.LSTM(3, 4, bidirectional=True, peepholes=True, **keywords).eval()
    path = tmp_path / "lstm.onnx"
    if exporter == "torchscript":
        with pytest.raises(RuntimeError, match="cannot export layer_norm, zoneout; the dynamo"):
            export(lstm, exporter, inputs(lstm, EXPORTED, False, True), path)
        return
    export(lstm, exporter, inputs(lstm, EXPORTED, False, True), path)
    assert "Scan" in op_types(path)
    for size in (EXPORTED, OTHER):
        check_runs(lstm, path, inputs(lstm, size, False, True), f"variants {size}")


@pytest.mark.filterwarnings("ignore:Exporting a model while it is in training mode")
def test_training_noise_is_refused(tmp_path: Path) -> None:
    """The dynamo exporter reports lstmkit's reason (its TorchExportError is a RuntimeError)."""
    lstm = lstmkit.LSTM(3, 4, num_layers=2, dropout=0.5, recurrent_dropout=0.1).train()
    with pytest.raises(RuntimeError, match=r"dropout=0.5, recurrent_dropout=0.1 in training"):
        export(lstm, "dynamo", inputs(lstm, EXPORTED, False, False), tmp_path / "lstm.onnx")


def test_helper_exports_a_bare_module_with_torchscript(tmp_path: Path) -> None:
    """torch's TorchScript exporter passes lengths= positionally to a bare lstmkit.LSTM, and
    takes no kwargs; lstmkit.onnx.export takes both, like the dynamo exporter."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 4, bidirectional=True).eval()
    feed = inputs(lstm, EXPORTED, True, True)
    path = tmp_path / "lstm.onnx"
    args = (feed[0], (feed[1], feed[2]))
    lstmkit.onnx.export(lstm, args, path, kwargs={"lengths": feed[3]}, dynamo=False)
    assert "LSTM" in op_types(path)
    check_runs(lstm, path, feed, "bare module")
