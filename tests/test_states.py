"""lstmkit.states against hand-indexed tensors of torch.nn.LSTM (the oracle) and lstmkit.LSTM."""

from __future__ import annotations

import re

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from lstmkit.states import final_hidden, layers, split_directions

H = 5


def make(module: type, layers_: int = 2, bidirectional: bool = True) -> torch.nn.Module:
    torch.manual_seed(0)
    return module(3, H, num_layers=layers_, bidirectional=bidirectional).eval()


def by_hand(output: Tensor, lengths: list[int], bidirectional: bool) -> Tensor:
    """(L, N, D*H) -> (N, D*H): forward at lengths[n] - 1, backward at step 0, one n at a time."""
    rows = []
    for n, length in enumerate(lengths):
        forward = output[length - 1, n, :H]
        rows.append(torch.cat([forward, output[0, n, H:]]) if bidirectional else forward)
    return torch.stack(rows)


@pytest.mark.parametrize("module", [torch.nn.LSTM, lstmkit.LSTM], ids=["torch", "lstmkit"])
def test_split_directions_tensor_and_packed(module: type) -> None:
    lstm = make(module)
    x = torch.randn(6, 4, 3)
    with torch.no_grad():
        output, _ = lstm(x)
        forward, backward = split_directions(output)
        assert torch.equal(forward, output[:, :, :H]) and torch.equal(backward, output[:, :, H:])
        packed, _ = lstm(pack_padded_sequence(x, [2, 6, 1, 4], enforce_sorted=False))
    forward, backward = split_directions(packed)
    assert torch.equal(forward.data, packed.data[:, :H])
    assert torch.equal(backward.data, packed.data[:, H:])
    assert torch.equal(forward.batch_sizes, packed.batch_sizes)
    assert torch.equal(backward.unsorted_indices, packed.unsorted_indices)
    padded, _ = pad_packed_sequence(backward)
    assert padded.shape == (6, 4, H)


def test_split_directions_needs_two_halves() -> None:
    with pytest.raises(ValueError, match="D\\*H_out = 2\\*H_out holds the forward half"):
        split_directions(torch.zeros(4, 2, 5))


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("batched", [True, False])
def test_layers_names_every_row(bidirectional: bool, batched: bool) -> None:
    d = 2 if bidirectional else 1
    h_n = torch.arange(3 * d * 4 * H, dtype=torch.float32).view(3 * d, 4, H)
    if not batched:
        h_n = h_n[:, 0]
    named = layers(h_n, num_layers=3)
    assert len(named) == 3 and named.num_directions == d
    assert named.view.shape == (3, d, *h_n.shape[1:])
    assert named.view.data_ptr() == h_n.data_ptr()
    for layer in range(3):
        assert torch.equal(named[layer], h_n[layer * d : (layer + 1) * d])
        for k, direction in enumerate(("forward", "backward")[:d]):
            assert torch.equal(named[layer, direction], h_n[layer * d + k])
            assert torch.equal(named[layer, k], h_n[layer * d + k])
            assert named.row(layer, direction) == layer * d + k
    assert torch.equal(named[-1, "forward"], h_n[-d])


def test_layers_explain_mistakes() -> None:
    h_n = torch.zeros(4, 3, H)
    with pytest.raises(KeyError, match="it is not bidirectional"):
        layers(h_n, num_layers=4)[0, "backward"]
    with pytest.raises(KeyError, match="'forward' \\(0\\) or 'backward' \\(1\\)"):
        layers(h_n, num_layers=2)[0, "up"]
    with pytest.raises(IndexError, match="layer 2 out of range for num_layers=2"):
        layers(h_n, num_layers=2)[2]
    with pytest.raises(ValueError, match="cannot belong to an LSTM with num_layers=3"):
        layers(h_n, num_layers=3)
    with pytest.raises(ValueError, match="num_layers\\*D, N, H"):
        layers(torch.zeros(4), num_layers=2)


@pytest.mark.parametrize("module", [torch.nn.LSTM, lstmkit.LSTM], ids=["torch", "lstmkit"])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_final_hidden_of_a_full_batch_is_the_top_of_h_n(module: type, bidirectional: bool) -> None:
    lstm = make(module, bidirectional=bidirectional)
    x = torch.randn(6, 4, 3)
    with torch.no_grad():
        output, (h_n, _) = lstm(x)
    expected = torch.cat([h_n[-2], h_n[-1]], -1) if bidirectional else h_n[-1]
    assert torch.equal(final_hidden(output, bidirectional=bidirectional), expected)
    assert torch.equal(final_hidden(output, [6] * 4, bidirectional=bidirectional), expected)
    assert torch.equal(by_hand(output, [6] * 4, bidirectional), expected)
    # The mistake it replaces: for a bidirectional LSTM output[-1] is not the final state.
    assert bidirectional == (not torch.allclose(output[-1], expected))


@pytest.mark.parametrize("lengths", [[2, 6, 1, 4], [6, 4, 4, 1]], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("module", [torch.nn.LSTM, lstmkit.LSTM], ids=["torch", "lstmkit"])
def test_final_hidden_of_a_packed_batch(module: type, lengths: list[int]) -> None:
    lstm = make(module)
    x = torch.randn(6, 4, 3)
    with torch.no_grad():
        packed = pack_padded_sequence(x, lengths, enforce_sorted=lengths == sorted(lengths)[::-1])
        output, (h_n, _) = lstm(packed)
    padded, _ = pad_packed_sequence(output)
    expected = torch.cat([h_n[-2], h_n[-1]], dim=-1)
    assert torch.equal(by_hand(padded, lengths, True), expected)
    assert torch.equal(final_hidden(output, bidirectional=True), expected)
    assert torch.equal(final_hidden(output, lengths, bidirectional=True), expected)
    assert torch.equal(final_hidden(padded, lengths, bidirectional=True), expected)
    assert torch.equal(final_hidden(padded, torch.tensor(lengths), bidirectional=True), expected)
    batch_first = padded.transpose(0, 1)
    assert torch.equal(
        final_hidden(batch_first, lengths, bidirectional=True, batch_first=True), expected
    )
    # The mistake it replaces: the padded output's last step is zero for shorter sequences.
    short = lengths.index(min(lengths))
    assert torch.equal(padded[-1, short], torch.zeros(2 * H))


def test_final_hidden_one_direction_on_an_unpacked_padded_batch() -> None:
    """Forward only, padding after the end does not reach earlier steps: the unpacked run's
    output at each sequence's last valid step is its final state."""
    lstm = make(torch.nn.LSTM, layers_=1, bidirectional=False)
    x, lengths = torch.randn(6, 4, 3), [2, 6, 1, 4]
    with torch.no_grad():
        output, _ = lstm(x)
        _, (h_n, _) = lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
    assert torch.allclose(final_hidden(output, lengths, bidirectional=False), h_n[-1], atol=1e-6)
    assert not torch.allclose(output[-1], h_n[-1])


def test_final_hidden_unbatched() -> None:
    lstm = make(torch.nn.LSTM)
    with torch.no_grad():
        output, (h_n, _) = lstm(torch.randn(6, 3))
    assert torch.equal(final_hidden(output, bidirectional=True), torch.cat([h_n[-2], h_n[-1]]))
    with pytest.raises(ValueError, match="one sequence of L valid steps"):
        final_hidden(output, [3], bidirectional=True)


@pytest.mark.parametrize(
    ("lengths", "kwargs", "words"),
    [
        ([2, 6, 1], {}, "lengths has 3 entries but the output (L, N, D*H_out) holds N = 4"),
        ([2, 6, 1], {}, "is the output batch-first? pass batch_first=True"),
        ([2, 7, 1, 4], {}, "between 1 and L = 6 (the output's steps), got lengths[1] = 7"),
        ([2, 0, 1, 4], {}, "got lengths[1] = 0"),
        (torch.tensor([2.0, 6.0, 1.0, 4.0]), {}, "1-D integer tensor"),
    ],
)
def test_final_hidden_explains_bad_lengths(lengths: object, kwargs: dict, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        final_hidden(torch.zeros(6, 4, 2 * H), lengths, bidirectional=True, **kwargs)  # type: ignore[arg-type]


def test_final_hidden_checks_its_other_arguments() -> None:
    with pytest.raises(ValueError, match="the output's last dimension 5 is odd"):
        final_hidden(torch.zeros(6, 4, 5), bidirectional=True)
    with pytest.raises(ValueError, match="a 4-D"):
        final_hidden(torch.zeros(6, 4, 2, 2), bidirectional=True)
    lstm = make(torch.nn.LSTM)
    with torch.no_grad():
        output, _ = lstm(pack_padded_sequence(torch.randn(6, 2, 3), [6, 2]))
    with pytest.raises(ValueError, match="disagree with the PackedSequence's own lengths"):
        final_hidden(output, [6, 3], bidirectional=True)
