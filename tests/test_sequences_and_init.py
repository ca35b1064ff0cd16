"""Every layer's h and c sequences; learned initial states; forget_bias."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import lstmkit
from compare import assert_close


def single_layer(lstm: lstmkit.LSTM, layer: int) -> torch.nn.LSTM:
    """torch's one-layer LSTM holding ``lstm``'s layer ``layer``."""
    spec = lstm.spec
    one = torch.nn.LSTM(
        spec.layer_input_size(layer),
        spec.hidden_size,
        bias=spec.bias,
        bidirectional=spec.bidirectional,
        proj_size=spec.proj_size,
        dtype=torch.float64,
    )
    one.load_state_dict(
        {
            name.replace(f"_l{layer}", "_l0"): value
            for name, value in lstm.state_dict().items()
            if f"_l{layer}" in name
        }
    )
    return one


def oracle_cells(one: torch.nn.LSTM, x: torch.Tensor, length: int) -> torch.Tensor:
    """c after every step of one sequence x (L, H_in) of valid length ``length``, from torch:
    the forward cell at t is c_n after x[:t+1]; the backward one is c_n after x[t:length]."""
    steps, hidden = x.shape[0], one.hidden_size
    cells = torch.zeros(steps, hidden * (2 if one.bidirectional else 1), dtype=x.dtype)
    for t in range(length):
        _, (_, c_fwd) = one(x[: t + 1])
        cells[t, :hidden] = c_fwd[0]
        if one.bidirectional:
            _, (_, c_bwd) = one(x[t:length])
            cells[t, hidden:] = c_bwd[1]
    return cells


@pytest.mark.parametrize(
    "kwargs",
    [
        {"input_size": 3, "hidden_size": 4, "num_layers": 3},
        {"input_size": 3, "hidden_size": 5, "num_layers": 2, "bidirectional": True},
        {"input_size": 2, "hidden_size": 5, "num_layers": 2, "proj_size": 3, "bias": False},
    ],
    ids=["3-layers", "2-layers-bi", "proj-no-bias"],
)
@pytest.mark.parametrize("lengths", [None, (5, 2, 0)], ids=["full", "lengths"])
def test_layer_sequences_equal_a_stack_of_torch_layers(
    kwargs: dict, lengths: tuple[int, ...] | None, backend: str
) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(**kwargs, dtype=torch.float64)
    x = torch.randn(5, 3, kwargs["input_size"], dtype=torch.float64)
    result = lstm.forward_all(x, lengths=lengths)
    out, (h_n, _) = lstm(x, lengths=lengths)
    assert torch.equal(result.output, out) and torch.equal(result.h_n, h_n)
    assert len(result.layer_outputs) == len(result.layer_cells) == lstm.num_layers
    assert torch.equal(result.layer_outputs[-1], result.output)
    valid = [5, 5, 5] if lengths is None else list(lengths)
    layer_input = x
    with torch.no_grad():
        for layer in range(lstm.num_layers):
            one = single_layer(lstm, layer)
            expected_h = torch.zeros_like(result.layer_outputs[layer])
            for b, length in enumerate(valid):
                if length:
                    expected_h[:length, b] = one(layer_input[:length, b])[0]
                expected_cells = oracle_cells(one, layer_input[:, b], length)
                assert_close(result.layer_cells[layer][:, b], expected_cells, f"c layer {layer}")
            assert_close(result.layer_outputs[layer], expected_h, f"h layer {layer}")
            layer_input = expected_h


def test_layer_sequences_for_packed_input_and_their_gradients(backend: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    packed = pack_padded_sequence(x, [2, 6, 4], enforce_sorted=False)
    result = lstm.forward_all(packed)
    padded_cells = [pad_packed_sequence(c)[0] for c in result.layer_cells]
    by_lengths = lstm.forward_all(x, lengths=[2, 6, 4])
    for layer in range(2):
        assert_close(padded_cells[layer], by_lengths.layer_cells[layer], "packed vs lengths")
    (result.layer_cells[0].data.sum() + result.layer_outputs[0].data.sum()).backward()
    grad = x.grad.clone()
    x.grad = None
    lengths_result = lstm.forward_all(x, lengths=[2, 6, 4])
    (lengths_result.layer_cells[0].sum() + lengths_result.layer_outputs[0].sum()).backward()
    assert_close(grad, x.grad, "grad through the cell sequences", "grad")


def test_learned_initial_state(backend: str) -> None:
    torch.manual_seed(0)
    kwargs = {
        "input_size": 3,
        "hidden_size": 5,
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 2,
    }
    lstm = lstmkit.LSTM(**kwargs, learn_initial_state=True, dtype=torch.float64)
    names = [n for n, _ in lstm.named_parameters()]
    extra = [
        "h0_l0",
        "h0_l0_reverse",
        "h0_l1",
        "h0_l1_reverse",
        "c0_l0",
        "c0_l0_reverse",
        "c0_l1",
        "c0_l1_reverse",
    ]
    assert names[-8:] == extra
    assert lstm.h0_l1_reverse.shape == (2,) and lstm.c0_l1_reverse.shape == (5,)
    plain = torch.nn.LSTM(**kwargs, dtype=torch.float64)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    # Zero at init: behaves like torch.
    plain.load_state_dict({k: v for k, v in lstm.state_dict().items() if k not in extra})
    assert_close(lstm(x)[0], plain(x)[0], "zero initial state equals torch's default")
    with torch.no_grad():
        for p in lstm.parameters():
            if p.dim() == 1 and p.shape[0] in (2, 5):
                p.normal_()
    h_init, c_init = lstm.initial_state()
    hx = (
        h_init.detach().unsqueeze(1).expand(4, 3, 2).clone().requires_grad_(),
        c_init.detach().unsqueeze(1).expand(4, 3, 5).clone().requires_grad_(),
    )
    out, (h_n, c_n) = lstm(x)
    out2, (h2, c2) = lstm(x, tuple(s.detach() for s in hx))
    assert_close(out, out2, "learned state used when hx is None")
    assert_close(h_n, h2, "h_n with the learned state")
    assert_close(c_n, c2, "c_n with the learned state")
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    out3, (h3, c3) = lstm(x, hx)
    (out3.sum() + h3.sum() + c3.sum()).backward()
    assert_close(lstm.h0_l1_reverse.grad, hx[0].grad[3].sum(0), "grad h0_l1_reverse", "grad")
    assert_close(lstm.c0_l0.grad, hx[1].grad[0].sum(0), "grad c0_l0", "grad")
    # state_dict round trip, and a plain torch state_dict reports exactly the extras missing.
    copy = lstmkit.LSTM(**kwargs, learn_initial_state=True, dtype=torch.float64)
    copy.load_state_dict(lstm.state_dict(), strict=True)
    assert_close(copy(x)[0], out.detach(), "round trip")
    missing = copy.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(missing.missing_keys) == sorted(extra) and not missing.unexpected_keys
    assert "learn_initial_state=True" in repr(lstm)


def test_forget_bias() -> None:
    torch.manual_seed(5)
    lstm = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, forget_bias=1.0)
    torch.manual_seed(5)
    plain = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    forget = slice(4, 8)
    for name, value in plain.state_dict().items():
        ours = lstm.state_dict()[name]
        if name.startswith("bias"):
            keep = torch.ones(16, dtype=torch.bool)
            keep[forget] = False
            assert torch.equal(ours[keep], value[keep]), name
        else:
            assert torch.equal(ours, value), name
    for suffix in ("_l0", "_l0_reverse", "_l1", "_l1_reverse"):
        total = getattr(lstm, "bias_ih" + suffix) + getattr(lstm, "bias_hh" + suffix)
        assert torch.equal(total[forget], torch.ones(4))
    assert "forget_bias=1.0" in repr(lstm)
    torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True).load_state_dict(lstm.state_dict())
    with pytest.raises(ValueError, match="bias=False"):
        lstmkit.LSTM(3, 4, bias=False, forget_bias=1.0)
    with pytest.raises(TypeError, match="forget_bias"):
        lstmkit.LSTM(3, 4, forget_bias="1")
