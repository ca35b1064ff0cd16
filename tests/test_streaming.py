"""Streaming: chunks equal one run, resets equal separate runs, detach cuts the graph; and
sequences of 100,000 steps."""

from __future__ import annotations

import pytest
import torch

import lstmkit
import lstmkit.backends
from compare import assert_close


@pytest.mark.parametrize("batch_first", [False, True], ids=["time-major", "batch-first"])
def test_chunks_equal_one_run(batch_first: bool, backend: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(
        3, 6, num_layers=2, proj_size=4, batch_first=batch_first, dtype=torch.float64
    )
    x = torch.randn(2, 17, 3, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    time_dim = 1 if batch_first else 0
    full, (h_n, c_n) = lstm(x)
    stream = lstm.stream()
    pieces = [stream(chunk) for chunk in x.split([5, 1, 8, 3], dim=time_dim)]
    assert_close(torch.cat(pieces, dim=time_dim), full, "chunked output")
    assert_close(stream.state[0], h_n, "h after the last chunk")
    assert_close(stream.state[1], c_n, "c after the last chunk")


def test_unbatched_chunks(backend: str) -> None:
    lstm = lstmkit.LSTM(3, 4, dtype=torch.float64)
    x = torch.randn(9, 3, dtype=torch.float64)
    stream = lstmkit.Stream(lstm)
    pieces = [stream(x[:4]), stream(x[4:])]
    assert_close(torch.cat(pieces), lstm(x)[0], "unbatched chunks")
    stream.reset()
    assert stream.state is None
    assert_close(stream(x[4:]), lstm(x[4:])[0], "after reset()")


@pytest.mark.parametrize("learned", [False, True], ids=["zeros", "learned-initial-state"])
def test_resets_equal_separate_runs(learned: bool, backend: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 5, num_layers=2, learn_initial_state=learned, dtype=torch.float64)
    if learned:
        with torch.no_grad():
            for name, p in lstm.named_parameters():
                if name.startswith(("h0_", "c0_")):
                    p.normal_()
    x = torch.randn(12, 3, 3, dtype=torch.float64)
    # Entry 0: episodes [0, 4), [4, 9), [9, 12). Entry 1: one episode. Entry 2: [0, 6), [6, 12)
    # with the boundary on a chunk start.
    reset = torch.zeros(12, 3, dtype=torch.bool)
    reset[4, 0] = reset[9, 0] = reset[6, 2] = True
    stream = lstm.stream()
    out = torch.cat([stream(x[:6], reset[:6]), stream(x[6:], reset[6:])])
    for entry, episodes in ((0, [(0, 4), (4, 9), (9, 12)]), (1, [(0, 12)]), (2, [(0, 6), (6, 12)])):
        for begin, end in episodes:
            expected, _ = lstm(x[begin:end, entry])
            assert_close(out[begin:end, entry], expected, f"entry {entry}, steps {begin}-{end}")
    final, _ = lstm(x[9:, 0:1])
    assert_close(stream.state[0][:, 0], lstm(x[9:, 0])[1][0], "state of entry 0 after reset")
    assert final.shape == (3, 1, 5)


def test_reset_masks_are_checked() -> None:
    stream = lstmkit.LSTM(3, 4).stream()
    with pytest.raises(ValueError, match=r"expected \(5, 2\)"):
        stream(torch.randn(5, 2, 3), torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        stream(torch.randn(5, 2, 3), torch.zeros(5, 2))


def test_detach_truncates_backpropagation(backend: str) -> None:
    lstm = lstmkit.LSTM(3, 4)
    first = torch.randn(4, 2, 3, requires_grad=True)
    second = torch.randn(4, 2, 3, requires_grad=True)
    stream = lstm.stream()
    stream(first)
    stream(second).sum().backward()
    assert first.grad is not None and first.grad.abs().sum() > 0, "the graph spans the chunks"
    first.grad = None
    stream.reset()
    stream(first)
    stream.detach()
    assert not stream.state[0].requires_grad
    stream(second).sum().backward()
    assert first.grad is None, "detach() stops gradients at the chunk boundary"
    assert second.grad is not None


def test_bidirectional_streaming_is_refused() -> None:
    with pytest.raises(ValueError, match="bidirectional LSTM cannot be streamed"):
        lstmkit.LSTM(3, 4, bidirectional=True).stream()


def _long_pair() -> tuple[lstmkit.LSTM, torch.nn.LSTM, torch.Tensor]:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(4, 8)
    oracle = torch.nn.LSTM(4, 8)
    oracle.load_state_dict(lstm.state_dict())
    return lstm, oracle, torch.randn(100_000, 1, 4)


def test_hundred_thousand_steps_forward(backend: str) -> None:
    """Batch 1, hidden 8, 100,000 steps, in every backend, against torch.nn.LSTM."""
    lstm, oracle, x = _long_pair()
    with torch.no_grad():
        out, (h_n, c_n) = lstm(x)
        expected, (h_t, c_t) = oracle(x)
    assert_close(out, expected, "output")
    assert_close(h_n, h_t, "h_n")
    assert_close(c_n, c_t, "c_n")


def test_hundred_thousand_steps_gradients_in_the_cpu_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Backward through 100,000 steps in the cpu kernels. (The reference's op-by-op autograd
    graph of 100,000 steps takes minutes, so its forward alone is tested above.)"""
    monkeypatch.setenv(lstmkit.backends.BACKEND_ENV, "cpu")
    lstm, oracle, x = _long_pair()
    x.requires_grad_()
    out, (h_n, _) = lstm(x)
    (out.sum() + h_n.sum()).backward()
    x2 = x.detach().clone().requires_grad_()
    expected, (h_t, _) = oracle(x2)
    (expected.sum() + h_t.sum()).backward()
    assert_close(x.grad, x2.grad, "grad input", "grad")
    theirs = dict(oracle.named_parameters())
    for name, p in lstm.named_parameters():
        assert_close(p.grad, theirs[name].grad, f"grad {name}", "grad")
