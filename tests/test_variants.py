"""The variants (layer norm, recurrent dropout, weight drop, zoneout, peepholes) against an
independent, obviously correct per-step implementation written here from the papers' equations,
with the masks lstmkit drew recorded and replayed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import lstmkit
from compare import assert_close
from lstmkit import functional

VARIANTS = {
    "layer-norm": {"layer_norm": True},
    "recurrent-dropout": {"recurrent_dropout": 0.4},
    "weight-dropout": {"weight_dropout": 0.5},
    "zoneout": {"zoneout_cell": 0.3, "zoneout_hidden": 0.2},
    "peepholes": {"peepholes": True},
    "all": {
        "layer_norm": True,
        "recurrent_dropout": 0.3,
        "weight_dropout": 0.2,
        "zoneout_cell": 0.25,
        "zoneout_hidden": 0.1,
        "peepholes": True,
    },
}
SHAPES = {
    "one-layer": {"input_size": 3, "hidden_size": 5},
    "two-layers-bi-proj": {
        "input_size": 3,
        "hidden_size": 6,
        "num_layers": 2,
        "bidirectional": True,
        "proj_size": 4,
    },
}


@contextmanager
def recorded_masks() -> Iterator[dict[str, list]]:
    """Record the noise lstmkit draws in one call: per layer, the weight-drop masks and each
    direction's variant with its masks."""
    record: dict[str, list] = {"weights": [], "variants": []}
    drop, noise = functional._drop_weights, functional._with_noise

    def recording_drop(weights, p):
        dropped = drop(weights, p)
        record["weights"].append((dropped.weight_hh / weights.weight_hh).detach())
        return dropped

    def recording_noise(*args):
        variants = noise(*args)
        record["variants"].append(variants)
        return variants

    functional._drop_weights, functional._with_noise = recording_drop, recording_noise
    try:
        yield record
    finally:
        functional._drop_weights, functional._with_noise = drop, noise


def oracle(lstm: lstmkit.LSTM, x: Tensor, h0: Tensor, c0: Tensor, record: dict) -> tuple:
    """The variant LSTM written out step by step from the definitions, gate by gate."""
    spec = lstm.spec
    hidden, directions = spec.hidden_size, spec.num_directions
    layer_input, h_n, c_n = x, [], []
    drop_masks = iter(record["weights"])
    for layer in range(spec.num_layers):
        outputs = []
        for d in range(directions):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            p = {
                n[: -len(sfx)]: v
                for n, v in lstm.named_parameters()
                if n.endswith(sfx) and (d or not n.endswith("_reverse"))
            }
            w_hh = p["weight_hh"]
            if lstm.training and spec.weight_dropout:
                w_hh = w_hh * next(drop_masks)
            noise = record["variants"][layer][d] if record["variants"] else None
            h, c = h0[layer * directions + d], c0[layer * directions + d]
            steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
            out = [None] * x.shape[0]
            for t in steps:
                wx = layer_input[t] @ p["weight_ih"].t()
                h_in = h
                if noise is not None and noise.recurrent_mask is not None:
                    h_in = h * noise.recurrent_mask
                wh = h_in @ w_hh.t()
                if spec.layer_norm:
                    wx = F.layer_norm(wx, (4 * hidden,), p["ln_weight_ih"], p["ln_bias_ih"])
                    wh = F.layer_norm(wh, (4 * hidden,), p["ln_weight_hh"], p["ln_bias_hh"])
                pre = wx + wh + p.get("bias_ih", 0) + p.get("bias_hh", 0)
                pre_i, pre_f = pre[:, :hidden], pre[:, hidden : 2 * hidden]
                pre_g, pre_o = pre[:, 2 * hidden : 3 * hidden], pre[:, 3 * hidden :]
                if spec.peepholes:
                    peep = p["weight_peephole"]
                    pre_i = pre_i + peep[:hidden] * c
                    pre_f = pre_f + peep[hidden : 2 * hidden] * c
                c_new = torch.sigmoid(pre_f) * c + torch.sigmoid(pre_i) * torch.tanh(pre_g)
                if spec.peepholes:
                    pre_o = pre_o + peep[2 * hidden :] * c_new
                c_out = c_new
                if spec.layer_norm:
                    c_out = F.layer_norm(c_new, (hidden,), p["ln_weight_c"], p["ln_bias_c"])
                h_new = torch.sigmoid(pre_o) * torch.tanh(c_out)
                if spec.proj_size:
                    h_new = h_new @ p["weight_hr"].t()
                for name, z, prev, new in (
                    ("zoneout_cell", spec.zoneout_cell, c, c_new),
                    ("zoneout_hidden", spec.zoneout_hidden, h, h_new),
                ):
                    if z:
                        keep = getattr(noise, name)[t] if lstm.training else z
                        new = keep * prev + (1 - keep) * new
                    if name == "zoneout_cell":
                        c_next = new
                    else:
                        h_next = new
                h, c = h_next, c_next
                out[t] = h
            outputs.append(torch.stack(out))
            h_n.append(h)
            c_n.append(c)
        layer_input = torch.cat(outputs, dim=2)
    return layer_input, torch.stack(h_n), torch.stack(c_n)


def _inputs(lstm: lstmkit.LSTM, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    spec = lstm.spec
    rows = spec.num_layers * spec.num_directions
    x = torch.randn(5, 3, spec.input_size, dtype=dtype, requires_grad=True)
    h0 = torch.randn(rows, 3, spec.h_size, dtype=dtype, requires_grad=True)
    c0 = torch.randn(rows, 3, spec.hidden_size, dtype=dtype, requires_grad=True)
    return x, h0, c0


def _randomise(lstm: lstmkit.LSTM) -> None:
    """Move the layer-norm gains and shifts off their 1/0 init so the test sees them."""
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("ln_"):
                p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_variant_matches_the_definition(variant: str, shape: str, training: bool) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(**SHAPES[shape], **VARIANTS[variant], dtype=torch.float64)
    _randomise(lstm)
    lstm.train(training)
    x, h0, c0 = _inputs(lstm, torch.float64)
    with recorded_masks() as record:
        out, (h_n, c_n) = lstm(x, (h0, c0))
    expected = oracle(lstm, x, h0, c0, record)
    for name, a, e in zip(("output", "h_n", "c_n"), (out, h_n, c_n), expected):
        assert_close(a, e, name)
    weights = [torch.randn_like(t) for t in expected]
    loss = sum((a * w).sum() for a, w in zip((out, h_n, c_n), weights))
    grads = torch.autograd.grad(loss, [x, h0, c0, *lstm.parameters()], allow_unused=True)
    loss = sum((e * w).sum() for e, w in zip(expected, weights))
    expected_grads = torch.autograd.grad(loss, [x, h0, c0, *lstm.parameters()], allow_unused=True)
    names = ["x", "h0", "c0"] + [n for n, _ in lstm.named_parameters()]
    for name, a, e in zip(names, grads, expected_grads):
        assert (a is None) == (e is None), name
        if a is not None:
            assert_close(a, e, f"grad {name}", "grad")


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_gradcheck_float64(variant: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(2, 3, bidirectional=True, **VARIANTS[variant], dtype=torch.float64)
    _randomise(lstm)
    x, h0, c0 = _inputs(lstm, torch.float64)
    names = [n for n, _ in lstm.named_parameters()]

    def fn(x: Tensor, h0: Tensor, c0: Tensor, *params: Tensor) -> tuple[Tensor, ...]:
        torch.manual_seed(1)  # the same masks at every evaluation
        out, (h, c) = torch.func.functional_call(lstm, dict(zip(names, params)), (x, (h0, c0)))
        return out, h, c

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *lstm.parameters()))


@pytest.mark.parametrize("variant", ["recurrent-dropout", "weight-dropout"])
def test_dropouts_are_identity_in_eval(variant: str) -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 5, num_layers=2, **VARIANTS[variant]).eval()
    plain = torch.nn.LSTM(3, 5, num_layers=2)
    plain.load_state_dict(lstm.state_dict())
    x = torch.randn(6, 2, 3)
    assert_close(lstm(x)[0], plain(x)[0], "eval equals a plain LSTM")
    lstm.train()
    assert not torch.allclose(lstm(x)[0], plain(x)[0]), "training draws masks"


def test_mask_rates_in_training() -> None:
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(
        4, 64, recurrent_dropout=0.3, weight_dropout=0.2, zoneout_cell=0.25, zoneout_hidden=0.1
    )
    with recorded_masks() as record:
        lstm(torch.randn(50, 40, 4))
    (variant,) = record["variants"][0]
    (weight_mask,) = record["weights"]
    assert abs((variant.recurrent_mask == 0).double().mean().item() - 0.3) < 0.03
    kept = variant.recurrent_mask[variant.recurrent_mask != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.7)), "kept units are scaled"
    assert abs((weight_mask == 0).double().mean().item() - 0.2) < 0.02
    assert abs(variant.zoneout_cell.double().mean().item() - 0.25) < 0.01
    assert abs(variant.zoneout_hidden.double().mean().item() - 0.1) < 0.01
    assert variant.zoneout_cell.shape == (50, 40, 64)
    # Fresh zoneout masks per step; one recurrent-dropout mask for the whole sequence.
    assert not torch.equal(variant.zoneout_cell[0], variant.zoneout_cell[1])
    assert variant.recurrent_mask.shape == (40, 64)


def test_masks_are_reproducible_under_a_seed() -> None:
    lstm = lstmkit.LSTM(3, 5, **VARIANTS["all"])
    x = torch.randn(6, 2, 3)
    torch.manual_seed(3)
    first = lstm(x)[0]
    torch.manual_seed(3)
    assert torch.equal(lstm(x)[0], first)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_lengths_and_packing_with_variants(variant: str) -> None:
    """Eval mode: each sequence of a padded batch equals that sequence run alone."""
    torch.manual_seed(0)
    lstm = lstmkit.LSTM(3, 4, bidirectional=True, **VARIANTS[variant], dtype=torch.float64)
    lstm.eval()
    x = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = [2, 6, 4]
    out, (h_n, _) = lstm(x, lengths=lengths)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    packed_out, (h_p, _) = lstm(packed)
    assert_close(torch.nn.utils.rnn.pad_packed_sequence(packed_out)[0], out[:6], "packed")
    assert_close(h_p, h_n, "packed h_n")
    for b, length in enumerate(lengths):
        alone, (h_alone, _) = lstm(x[:length, b])
        assert_close(out[:length, b], alone, f"sequence {b}")
        assert_close(h_n[:, b], h_alone, f"h_n of sequence {b}")


def test_parameter_names_and_torch_state_dicts() -> None:
    lstm = lstmkit.LSTM(3, 4, num_layers=2, bidirectional=True, layer_norm=True, peepholes=True)
    plain = torch.nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    extra = [n for n in lstm.state_dict() if n not in plain.state_dict()]
    kinds = [
        "ln_weight_ih",
        "ln_bias_ih",
        "ln_weight_hh",
        "ln_bias_hh",
        "ln_weight_c",
        "ln_bias_c",
        "weight_peephole",
    ]
    expected = [k + s for s in ("_l0", "_l0_reverse", "_l1", "_l1_reverse") for k in kinds]
    assert sorted(extra) == sorted(expected)
    assert lstm.ln_weight_ih_l0.shape == (16,) and lstm.ln_weight_c_l1_reverse.shape == (4,)
    assert lstm.weight_peephole_l1.shape == (12,)
    assert torch.all(lstm.ln_weight_hh_l0 == 1) and torch.all(lstm.ln_bias_c_l0 == 0)
    result = lstm.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(expected) and not result.unexpected_keys
    # torch's own parameters come first and initialise as torch's do under a seed.
    torch.manual_seed(9)
    ours = lstmkit.LSTM(3, 4, 2, peepholes=True, layer_norm=True)
    torch.manual_seed(9)
    theirs = torch.nn.LSTM(3, 4, 2)
    for name, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name
    assert "layer_norm=True" in repr(ours) and "peepholes=True" in repr(ours)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"recurrent_dropout": 1.0}, ValueError),
        ({"weight_dropout": -0.1}, ValueError),
        ({"zoneout_cell": 1.5}, ValueError),
        ({"zoneout_hidden": "0.1"}, TypeError),
        ({"layer_norm": 1}, TypeError),
    ],
)
def test_variant_arguments_are_checked(kwargs: dict, error: type) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        lstmkit.LSTM(3, 4, **kwargs)
