"""The ``lengths=`` rows: lstmkit on the padded batch with ``lengths=``, against torch on the
same batch packed (the way torch needs it), for the grid's packed configurations."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from lstmkit.bench import report
from lstmkit.bench.check import check
from lstmkit.bench.configs import BenchConfig, make_input
from lstmkit.bench.timing import Budget, time_interleaved


class PaddedWithLengths(nn.Module):
    """For the check only: takes the packed batch, runs ``lstm(padded, lengths=...)`` and packs
    the result again, so it compares (and differentiates) like the packed oracle."""

    def __init__(self, lstm: nn.Module) -> None:
        super().__init__()
        self.lstm = lstm

    def named_parameters(self, *args: object, **kwargs: object) -> Iterator[tuple[str, Tensor]]:
        """The wrapped module's names, as the check compares them with the oracle's."""
        return self.lstm.named_parameters(*args, **kwargs)

    def forward(self, packed: PackedSequence) -> tuple[PackedSequence, tuple[Tensor, Tensor]]:
        padded, lengths = pad_packed_sequence(packed)  # (L, N, H_in), (N,) in the caller's order
        output, state = self.lstm(padded, lengths=lengths)
        repacked = pack_padded_sequence(output, lengths, enforce_sorted=False)
        return repacked, state


def bench_lengths(
    config: BenchConfig,
    mode: str,
    budget: Budget,
    make_candidate: Callable[[BenchConfig, nn.LSTM], nn.Module],
    step: Callable[..., Callable[[], None]],
    backend_used: Callable,
) -> report.Row:
    """Check ``lengths=`` against torch's packed run, then time both interleaved."""
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    candidate = make_candidate(config, oracle)
    packed = make_input(config)
    assert isinstance(packed, PackedSequence)
    named = replace(config, name=f"{config.name} lengths=")
    failure, backend = backend_used(
        lambda: check(mode, oracle, PaddedWithLengths(candidate), packed)
    )
    if failure is not None:
        return report.Row(named, mode, backend, failure)
    padded, lengths = pad_packed_sequence(packed)
    timings, _ = backend_used(
        lambda: time_interleaved(
            {
                "torch": step(oracle, packed, mode),
                "lstmkit": step(candidate, padded, mode, lengths=lengths),
            },
            budget,
        )
    )
    return report.Row(
        named, mode, backend, None, timings["torch"], timings["lstmkit"], report.load_average()
    )
