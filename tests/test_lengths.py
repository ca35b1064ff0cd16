"""``lengths=`` on a padded batch equals pack, run, unpack with torch.nn.LSTM; zeros allowed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from compare import assert_close

CONFIGS = [
    {"input_size": 3, "hidden_size": 5},
    {"input_size": 3, "hidden_size": 5, "num_layers": 2, "bidirectional": True},
    {"input_size": 4, "hidden_size": 6, "proj_size": 2, "bidirectional": True},
    {"input_size": 3, "hidden_size": 4, "batch_first": True, "bidirectional": True},
]
LENGTHS = [(4, 7, 1, 7, 2), (3, 0, 7, 0, 5), (0, 0, 0, 0, 0), (7, 7, 7, 7, 7)]
STEPS = 7


def _batch(t: torch.Tensor, rows: torch.Tensor, batch_first: bool) -> torch.Tensor:
    return t.index_select(0 if batch_first else 1, rows)


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda v: "-".join(map(str, v)))
@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: str(lstmkit.LSTMSpec(**k)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_lengths_equal_pack_run_unpack(
    kwargs: dict, lengths: tuple[int, ...], dtype: torch.dtype, backend: str
) -> None:
    torch.manual_seed(0)
    ours = lstmkit.LSTM(**kwargs, dtype=dtype)
    theirs = torch.nn.LSTM(**kwargs, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    spec, batch_first = ours.spec, ours.batch_first
    batch = len(lengths)
    shape = (batch, STEPS) if batch_first else (STEPS, batch)
    x = torch.randn(*shape, spec.input_size, dtype=dtype, requires_grad=True)
    rows = spec.num_layers * spec.num_directions
    h0 = torch.randn(rows, batch, spec.h_size, dtype=dtype, requires_grad=True)
    c0 = torch.randn(rows, batch, spec.hidden_size, dtype=dtype, requires_grad=True)
    out, (h_n, c_n) = ours(x, (h0, c0), lengths=torch.tensor(lengths))
    w_out, w_h, w_c = torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n)
    ((out * w_out).sum() + (h_n * w_h).sum() + (c_n * w_c).sum()).backward()

    live = torch.tensor([b for b in range(batch) if lengths[b] > 0], dtype=torch.long)
    dead = torch.tensor([b for b in range(batch) if lengths[b] == 0], dtype=torch.long)
    time_index = torch.arange(STEPS)
    padding = time_index.unsqueeze(1) >= torch.tensor(lengths).unsqueeze(0)  # (L, N)
    padded_out = out.transpose(0, 1) if batch_first else out
    assert torch.all(padded_out[padding] == 0), "outputs at padded steps are zero"
    assert torch.equal(h_n[:, dead], h0[:, dead]) and torch.equal(c_n[:, dead], c0[:, dead])
    if len(dead):
        grad_x = x.grad.transpose(0, 1) if batch_first else x.grad
        assert torch.all(grad_x[:, dead] == 0)
        assert_close(h0.grad[:, dead], w_h[:, dead], "grad h0 of empty sequences", "grad")
    if not len(live):
        assert all(p.grad is None or torch.all(p.grad == 0) for p in ours.parameters())
        return

    x2 = _batch(x.detach(), live, batch_first).requires_grad_()
    h2 = h0.detach()[:, live].requires_grad_()
    c2 = c0.detach()[:, live].requires_grad_()
    live_lengths = torch.tensor(lengths)[live]
    packed = pack_padded_sequence(x2, live_lengths, batch_first=batch_first, enforce_sorted=False)
    packed_out, (h_t, c_t) = theirs(packed, (h2, c2))
    out_t, _ = pad_packed_sequence(packed_out, batch_first=batch_first, total_length=STEPS)
    loss = (out_t * _batch(w_out, live, batch_first)).sum()
    (loss + (h_t * w_h[:, live]).sum() + (c_t * w_c[:, live]).sum()).backward()

    assert_close(_batch(out, live, batch_first), out_t, "output")
    assert_close(h_n[:, live], h_t, "h_n")
    assert_close(c_n[:, live], c_t, "c_n")
    assert_close(_batch(x.grad, live, batch_first), x2.grad, "grad input", "grad")
    assert_close(h0.grad[:, live], h2.grad, "grad h0", "grad")
    assert_close(c0.grad[:, live], c2.grad, "grad c0", "grad")
    theirs_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, theirs_params[name].grad, f"grad {name}", "grad")


def test_lengths_accept_lists_tensors_and_unbatched(backend: str) -> None:
    lstm = lstmkit.LSTM(3, 4, bidirectional=True)
    x = torch.randn(5, 2, 3)
    as_list, _ = lstm(x, lengths=[2, 5])
    as_tensor, _ = lstm(x, lengths=torch.tensor([2, 5], dtype=torch.int32))
    assert torch.equal(as_list, as_tensor)
    single, (h, _) = lstm(x[:, 0], lengths=2)
    assert_close(single, as_list[:, 0], "unbatched with a length")
    assert torch.equal(single[2:], torch.zeros(3, 8))
    assert h.shape == (2, 4)


@pytest.mark.parametrize(
    "lengths",
    [
        np.array([2, 5]),
        np.array([2, 5], dtype=np.uint8),
        [np.int64(2), np.int32(5)],
        (np.int16(2), 5),
        torch.tensor([2.0, 5.0]),
        [2.0, 5],
        np.array([2.0, 5.0], dtype=np.float32),
    ],
    ids=[
        "numpy",
        "numpy-uint8",
        "numpy-ints",
        "numpy-tuple",
        "whole-tensor",
        "whole-list",
        "np-f32",
    ],
)
def test_lengths_accept_what_pack_padded_sequence_accepts(lengths: object) -> None:
    lstm = lstmkit.LSTM(3, 4)
    x = torch.randn(5, 2, 3)
    expected, _ = lstm(x, lengths=[2, 5])
    got, _ = lstm(x, lengths=lengths)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("length", [np.int64(2), np.array(2), 2.0], ids=["numpy", "0-d", "float"])
def test_one_length_of_an_unbatched_sequence(length: object) -> None:
    lstm = lstmkit.LSTM(3, 4)
    x = torch.randn(5, 3)
    expected, _ = lstm(x, lengths=2)
    got, _ = lstm(x, lengths=length)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    ("lengths", "error", "fragment"),
    [
        ([1, 2, 3], ValueError, "N = 2"),
        ([1, 6], ValueError, "[0, 5]"),
        ([-1, 2], ValueError, "[0, 5]"),
        (torch.tensor([1.0, 2.5]), TypeError, "whole numbers, got 2.5"),
        ([1, 2.5], TypeError, "whole numbers, got 2.5"),
        (np.array([3.0, float("nan")]), TypeError, "whole numbers, got nan"),
        ([float("inf"), 1], TypeError, "whole numbers, got inf"),
        ([2.0000001, 1], TypeError, "whole numbers, got 2.0000001"),
        ([True, 2], TypeError, "got a bool"),
        (torch.tensor([True, True]), TypeError, "dtype torch.bool"),
        (np.array([True, True]), TypeError, "dtype torch.bool"),
        (torch.tensor([1j, 2]), TypeError, "dtype torch.complex64"),
        ("12", TypeError, "list of ints"),
        ([1, None], TypeError, "list of ints"),
    ],
    ids=[
        "count",
        "too-long",
        "negative",
        "fraction-tensor",
        "fraction-list",
        "nan",
        "inf",
        "nearly-whole",
        "bool-list",
        "bool-tensor",
        "bool-numpy",
        "complex",
        "string",
        "none",
    ],
)
def test_bad_lengths_are_explained(lengths: object, error: type, fragment: str) -> None:
    lstm = lstmkit.LSTM(3, 4)
    with pytest.raises(error) as info:
        lstm(torch.randn(5, 2, 3), lengths=lengths)
    assert fragment in str(info.value)
    assert "lstmkit explain" in str(info.value)


def test_lengths_with_a_packed_sequence_is_refused() -> None:
    lstm = lstmkit.LSTM(3, 4)
    packed = pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="already carries its lengths"):
        lstm(packed, lengths=[5, 3])
