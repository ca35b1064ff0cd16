"""lstmkit.LSTMCell against torch.nn.LSTMCell, in one process, interleaved, medians of repeats.

    python benchmarks/cell.py [--repeats 15]

Prints, per shape and dtype, the time per step of each (forward only, and forward with
backward) and the ratio torch / lstmkit; then a decoder loop after pytorch/examples'
time_sequence_prediction (float64, LSTMCell(1, 51) and LSTMCell(51, 51), Linear(51, 1),
batch 97, 200 steps, MSE backward).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lstmkit

SHAPES = [(1, 16, 16), (8, 64, 64), (32, 64, 64), (64, 256, 256), (128, 512, 512)]


def timed(run, calls: int) -> float:
    begin = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - begin) / calls


def interleaved(runs: dict, calls: int, repeats: int) -> dict[str, float]:
    for run in runs.values():
        run()
    samples = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            samples[name].append(timed(run, calls))
    return {name: statistics.median(times) for name, times in samples.items()}


def step_runs(cell, x, hx, train: bool):
    def run() -> None:
        if train:
            h, c = cell(x, hx)
            (h.sum() + c.sum()).backward()
        else:
            with torch.no_grad():
                cell(x, hx)

    return run


def decoder(cell_type, steps: int = 200):
    torch.manual_seed(0)
    c1, c2 = cell_type(1, 51, dtype=torch.float64), cell_type(51, 51, dtype=torch.float64)
    linear = torch.nn.Linear(51, 1, dtype=torch.float64)
    x = torch.randn(97, steps, dtype=torch.float64)

    def run() -> None:
        h1 = c1_ = h2 = c2_ = torch.zeros(97, 51, dtype=torch.float64)
        outputs = []
        for t in range(steps):
            h1, c1_ = c1(x[:, t : t + 1], (h1, c1_))
            h2, c2_ = c2(h1, (h2, c2_))
            outputs.append(linear(h2))
        torch.nn.functional.mse_loss(torch.cat(outputs, 1), x).backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("N H_in H dtype | forward torch/lstmkit us, ratio | forward+backward us, ratio")
    for dtype in (torch.float32, torch.float64):
        for n, inputs, hidden in SHAPES:
            torch.manual_seed(0)
            ours = lstmkit.LSTMCell(inputs, hidden, dtype=dtype)
            theirs = torch.nn.LSTMCell(inputs, hidden, dtype=dtype)
            theirs.load_state_dict(ours.state_dict())
            x = torch.randn(n, inputs, dtype=dtype)
            hx = tuple(torch.randn(n, hidden, dtype=dtype) for _ in "hc")
            calls = max(1, int(2e7 / (8 * n * hidden * (inputs + hidden) + 2e5)))
            row = [f"{n} {inputs} {hidden} {str(dtype).split('.')[-1]}"]
            for train in (False, True):
                times = interleaved(
                    {
                        "torch": step_runs(theirs, x, hx, train),
                        "lstmkit": step_runs(ours, x, hx, train),
                    },
                    calls,
                    args.repeats,
                )
                row.append(
                    f"{times['torch'] * 1e6:.1f}/{times['lstmkit'] * 1e6:.1f}, "
                    f"{times['torch'] / times['lstmkit']:.2f}x"
                )
            print(" | ".join(row), flush=True)
    times = interleaved(
        {"torch": decoder(torch.nn.LSTMCell), "lstmkit": decoder(lstmkit.LSTMCell)},
        1,
        max(3, args.repeats // 3),
    )
    print(
        f"decoder loop (time_sequence_prediction, 200 steps, float64, forward+backward): "
        f"torch {times['torch'] * 1e3:.1f} ms, lstmkit {times['lstmkit'] * 1e3:.1f} ms, "
        f"{times['torch'] / times['lstmkit']:.2f}x"
    )


if __name__ == "__main__":
    main()
