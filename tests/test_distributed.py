"""Training under DistributedDataParallel (gloo, two processes on 127.0.0.1) gives the same
parameters as one process training on the whole batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import lstmkit
from compare import assert_close

STEPS = 20
BATCH = 8  # split in halves between the two ranks

# One script for both: with RANK set it trains its half of the batch under DDP, without it the
# whole batch in one process. Either way it saves the initial and final parameters to argv[1].
TRAIN = textwrap.dedent(
    f"""
    import os, sys
    import torch
    from torch import nn
    import lstmkit

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 16)
            self.lstm = lstmkit.LSTM(16, 24, num_layers=2, bidirectional=True, batch_first=True)
            self.head = nn.Linear(48, 5)

        def forward(self, tokens):
            output, _ = self.lstm(self.embed(tokens))
            return self.head(output)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = Tagger()
    initial = {{name: value.clone() for name, value in model.state_dict().items()}}
    tokens = torch.randint(0, 50, ({BATCH}, 12))
    targets = torch.randint(0, 5, ({BATCH}, 12))
    rows, trained = slice(None), model
    if "RANK" in os.environ:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo")
        rank = dist.get_rank()
        rows = slice(rank * {BATCH // 2}, (rank + 1) * {BATCH // 2})
        trained = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.5)
    for _ in range({STEPS}):
        optimizer.zero_grad()
        logits = trained(tokens[rows])
        nn.functional.cross_entropy(logits.flatten(0, 1), targets[rows].flatten()).backward()
        optimizer.step()
    if os.environ.get("RANK", "0") == "0":
        torch.save({{"initial": initial, "final": model.state_dict()}}, sys.argv[1])
    if "RANK" in os.environ:  # gloo's threads must stop before the process exits
        dist.barrier()
        dist.destroy_process_group()
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    src = str(Path(lstmkit.__file__).resolve().parents[1])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": src + (os.pathsep + path if path else ""), **extra}


def test_ddp_with_two_processes_trains_like_one_process(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(TRAIN)
    alone = tmp_path / "alone.pt"
    subprocess.run([sys.executable, str(script), str(alone)], check=True, env=_env(), timeout=300)
    port = str(_free_port())
    shared = tmp_path / "ddp.pt"
    ranks = [
        subprocess.Popen(
            [sys.executable, str(script), str(shared)],
            env=_env(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in range(2)
    ]
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0]
    expected = torch.load(alone, weights_only=True)
    got = torch.load(shared, weights_only=True)
    assert got["final"].keys() == expected["final"].keys()
    for name, value in expected["final"].items():
        assert not torch.equal(value, expected["initial"][name]), f"{name} was not trained"
        assert_close(got["final"][name], value, name)
