"""``lstmkit demo``: the tutorial's two examples, computed by lstmkit, with checked identities."""

from __future__ import annotations

import argparse

import torch

from lstmkit import backends
from lstmkit.modules import LSTM


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(n) for n in t.shape) + ")"


def _check(ok: bool, text: str) -> str:
    if not ok:
        raise AssertionError(f"identity does not hold: {text}")
    return f"  [checked] {text}"


def demo_lines(seed: int = 0) -> list[str]:
    """The demo's text; raises ``AssertionError`` if any printed fact does not hold."""
    torch.manual_seed(seed)
    lines = ["Example 1: one layer", "  lstm = lstmkit.LSTM(300, 100, 1)"]
    lstm = LSTM(300, 100, 1)
    x = torch.randn(7, 64, 300)
    with torch.no_grad():
        output, (h_n, c_n) = lstm(x)
    lines.append(f"  input  (L, N, H_in) = {_shape(x)}")
    lines.append(f"  output (L, N, D*H_out) = {_shape(output)}")
    lines.append(f"  h_n, c_n (num_layers*D, N, H_out) = {_shape(h_n)}, {_shape(c_n)}")
    lines.append(_check(output.shape == (7, 64, 100), "output has shape (7, 64, 100)"))
    lines.append(_check(h_n.shape == c_n.shape == (1, 64, 100), "h_n, c_n have shape (1, 64, 100)"))
    lines.append(_check(torch.equal(output[-1], h_n[0]), "output[-1] == h_n[0] (one direction)"))
    lines.append(f"  computed by the {backends.last_choice().backend} backend")

    lines += ["", "Example 2: two layers, bidirectional"]
    lines.append("  lstm = lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)")
    lstm = LSTM(10, 20, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 10)
    h0, c0 = torch.randn(4, 3, 20), torch.randn(4, 3, 20)
    with torch.no_grad():
        output, (h_n, c_n) = lstm(x, (h0, c0))
    lines.append(f"  input  (L, N, H_in) = {_shape(x)}")
    lines.append(f"  h0, c0 (num_layers*D, N, H_out) = {_shape(h0)}, {_shape(c0)}")
    lines.append(f"  output (L, N, D*H_out) = {_shape(output)}")
    lines.append(f"  h_n, c_n (num_layers*D, N, H_out) = {_shape(h_n)}, {_shape(c_n)}")
    lines.append(_check(output.shape == (5, 3, 40), "output has shape (5, 3, 40)"))
    lines.append(_check(h_n.shape == c_n.shape == (4, 3, 20), "h_n, c_n have shape (4, 3, 20)"))
    lines.append(
        _check(
            torch.equal(output[4, :, :20], h_n[2]),
            "output[4, :, :20] == h_n[2]: the top layer's forward state after the last step",
        )
    )
    lines.append(
        _check(
            torch.equal(output[0, :, 20:], h_n[3]),
            "output[0, :, 20:] == h_n[3]: the top layer's backward state after step 0",
        )
    )
    lines.append(f"  computed by the {backends.last_choice().backend} backend")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def run(args: argparse.Namespace) -> int:
    print("\n".join(demo_lines(args.seed)))
    return 0
