"""The ten classic LSTM shape mistakes: when each applies, the right code, and its checks.

Each pitfall's code runs after the live check's script (see :mod:`.live`) and after the code
of the pitfalls before it; it rebinds a script's name only to an equal value (``packed`` in
pitfall 7), so every statement holds once all the code has run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

from lstmkit.explain.live import Run, differ, equal
from lstmkit.explain.model import Check, OtherPitfall, Pitfall
from lstmkit.explain.shapes import Index, Setting, gate_rows, index_text
from lstmkit.states import final_hidden, layers

Explained = tuple[str, str, tuple[Check, ...]]  # text, code, checks


@dataclass(frozen=True)
class Rule:
    """One pitfall: when it applies to a setting, and how it is explained and checked there."""

    number: int
    title: str
    applies: Callable[[Setting], bool]
    explain: Callable[[Setting], Explained]
    shown_by: str  # what makes it apply, for the list of the others


def _sizes(sizes: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, sizes)) + ("," if len(sizes) == 1 else "") + ")"


def _out(s: Setting, index: Index) -> str:
    return f"{s.out_name}[{index_text(index)}]"


def _final_code(s: Setting) -> str:
    """Both directions' final states of the top layer, from h_n, as code."""
    return "torch.cat([h_n[-2], h_n[-1]], dim=-1)" if s.directions == 2 else "h_n[-1]"


def _final(s: Setting, run: Run) -> Tensor:
    if s.directions == 2:
        return torch.cat([run.h_n[-2], run.h_n[-1]], dim=-1)
    return run.h_n[-1]


def _final_shape(s: Setting) -> str:
    width = s.directions * s.h
    if s.batch.batch is None:
        return f"(D*H_out,) = ({width},)"
    return f"(N, D*H_out) = ({s.batch.batch}, {width})"


def _final_hidden_code(s: Setting, on_padded: bool) -> str:
    """``lstmkit.states.final_hidden`` called on the output, or on padded with lengths."""
    args = ["padded", "lengths"] if on_padded else ["output"]
    args.append(f"bidirectional={s.spec.bidirectional}")
    batch_first = s.spec.batch_first and not s.batch.unbatched
    if batch_first and (on_padded or not s.batch.packed):
        args.append("batch_first=True")
    return f"lstmkit.states.final_hidden({', '.join(args)})"


def _final_hidden(s: Setting, run: Run, on_padded: bool) -> Tensor:
    """What :func:`_final_hidden_code` computes."""
    bidirectional, batch_first = s.spec.bidirectional, s.spec.batch_first
    if on_padded:
        assert run.padded is not None
        return final_hidden(
            run.padded, run.lengths, bidirectional=bidirectional, batch_first=batch_first
        )
    batch_first = batch_first and not s.batch.packed
    return final_hidden(run.output, bidirectional=bidirectional, batch_first=batch_first)


def _one_bidirectional(s: Setting) -> Explained:
    last_index = s.out_index(-1, 1)
    after_one = (
        f"is the backward direction after a single step: it starts at t = {s.out_steps - 1} "
        f"and ends at t = 0"
    )
    if s.batch.packed:
        after_one = (
            f"is padding for the shorter sequences (pitfall 2), and for the longest it {after_one}"
        )
    text = (
        f"{_out(s, last_index)} {after_one}. The final states are h_n[-2] (top layer, forward) "
        f"and h_n[-1] (top layer, backward):"
    )
    code = f"final = {_final_code(s)}  # {_final_shape(s)}"
    checks = []
    if s.out_steps > 1:
        checks.append(
            s.check(
                f"{_out(s, last_index)} != h_n[-1]",
                lambda run: differ(run.dense_output[last_index], run.h_n[-1]),
            )
        )
    if not s.batch.packed:
        forward, backward = s.out_index(-1, 0), s.out_index(0, 1)
        joined = f"torch.cat([{_out(s, forward)}, {_out(s, backward)}], dim=-1)"
        checks.append(
            s.check(
                f"final == {joined}",
                lambda run: equal(
                    _final(s, run),
                    torch.cat([run.dense_output[forward], run.dense_output[backward]], dim=-1),
                ),
            )
        )
    checks.append(
        s.check(
            f"final == {_final_hidden_code(s, on_padded=False)}",
            lambda run: equal(_final(s, run), _final_hidden(s, run, on_padded=False)),
        )
    )
    return text, code, tuple(checks)


def _two_padded(s: Setting) -> Explained:
    assert s.batch.lengths is not None
    steps, lengths = s.batch.steps, s.batch.lengths
    short = next((n for n, length in enumerate(lengths) if length < steps), None)
    if short is None:
        where = (
            f"a shorter sequence's output[-1] comes after its padding (here all {len(lengths)} "
            f"sequences have all {steps} steps)."
        )
    else:
        where = (
            f"sequence {short} has {lengths[short]} steps, so its output[-1] would come after "
            f"{steps - lengths[short]} padding steps."
        )
    text = (
        f"Without packing, the LSTM runs every sequence for all L = {steps} steps: {where} "
        f"Pack the batch so each sequence stops at its own length, and take each sequence's "
        f"last valid step with lstmkit.states.final_hidden (or from h_n). lstmkit can also "
        f"skip the packing: lstm(x, (h0, c0), lengths=lengths) gives the same results."
    )
    code = "\n".join(
        [
            f"final = {_final_hidden_code(s, on_padded=False)}  # {_final_shape(s)}",
            "same = lstm(x, (h0, c0), lengths=lengths)  # lstmkit only: no packing needed",
        ]
    )
    checks = []
    if short is not None:
        # The same batch, not packed: its last step is not sequence `short`'s final state.
        last = s.out_index(-1, 0, short)
        row = s.rows - s.directions
        checks.append(
            s.check(
                f"lstm(x, (h0, c0))[0][{index_text(last)}] != h_n[{row - s.rows}, {short}]",
                lambda run: differ(run.lstm(run.x, (run.h0, run.c0))[0][last], run.h_n[row, short]),
            )
        )
    checks.append(
        s.check(
            f"final == {_final_code(s)}",
            lambda run: equal(_final_hidden(s, run, on_padded=False), _final(s, run)),
        )
    )
    checks.append(
        s.check(
            f"final == {_final_hidden_code(s, on_padded=True)}",
            lambda run: equal(_final(s, run), _final_hidden(s, run, on_padded=True)),
        )
    )
    checks.append(
        s.check(
            "torch.allclose(same[1][0], h_n, atol=1e-6)",
            lambda run: torch.allclose(
                run.lstm(run.x, (run.h0, run.c0), lengths=run.lengths)[1][0], run.h_n, atol=1e-6
            ),
        )
    )
    return text, code, tuple(checks)


def _three_rows(s: Setting) -> Explained:
    num_layers, d = s.spec.num_layers, s.directions
    if d == 2:
        text = (
            "Row k of h_n and c_n is layer k // 2, direction k % 2 (0 forward, 1 backward): "
            "h_n[-1] is the top layer's backward state and h_n[-2] its forward state. View "
            "h_n as (num_layers, D, N, H_out), or index it by name:"
        )
    else:
        text = (
            "Row k of h_n and c_n is layer k (with D = 2 it would be layer k // 2, direction "
            "k % 2); h_n[-1] is the top layer. View h_n as (num_layers, D, N, H_out), or index "
            "it by name:"
        )
    view = (num_layers, d, *s.state_sizes(s.h)[1:])
    by_hand = f"h_n.view({', '.join(map(str, view))})"
    by_name = f"lstmkit.states.layers(h_n, num_layers={num_layers})"
    layout = "(num_layers, D, H_out)" if s.batch.unbatched else "(num_layers, D, N, H_out)"
    code = f'by_layer = {by_hand}  # {layout}\ntop_forward = {by_name}[-1, "forward"]'

    k = s.rows - d
    checks = (
        s.check(
            f"by_layer[{num_layers - 1}, 0] == h_n[{k}]",
            lambda run: equal(run.h_n.view(view)[num_layers - 1, 0], run.h_n[k]),
        ),
        s.check(
            f"top_forward == h_n[{k - s.rows}]",
            lambda run: equal(layers(run.h_n, num_layers)[-1, "forward"], run.h_n[k]),
        ),
    )
    return text, code, checks


def _four_batch_first(s: Setting) -> Explained:
    assert s.batch.batch is not None
    sizes = s.state_sizes(s.h)
    n = s.batch.batch
    text = (
        f"Only the input and the output are batch-first (N, L, ...). h0, c0, h_n and c_n stay "
        f"(num_layers*D, N, H) = {_sizes(sizes)}; a batch-first state is rejected with a "
        f"message saying so."
    )
    code = (
        f"h0_zeros = torch.zeros({', '.join(map(str, sizes))})  # not ({n}, {sizes[0]}, {sizes[2]})"
    )
    checks = [
        s.check(
            f"x.shape[0] == h_n.shape[1] == {n}",
            lambda run: run.x.shape[0] == run.h_n.shape[1] == n,
        )
    ]
    if n != sizes[0]:
        checks.append(
            s.check(
                "lstm(x, (h0.transpose(0, 1), c0.transpose(0, 1))) raises RuntimeError",
                lambda run: _raises(
                    lambda: run.lstm(run.x, (run.h0.transpose(0, 1), run.c0.transpose(0, 1))),
                    RuntimeError,
                    "batch_first does not apply to states",
                ),
            )
        )
    return text, code, tuple(checks)


def _raises(call: Callable[[], object], error: type[Exception], words: str) -> bool:
    """Whether ``call`` raises ``error`` with ``words`` in its message (a stated fact)."""
    try:
        call()
    except error as raised:
        return words in str(raised)
    return False


def _five_layers(s: Setting) -> Explained:
    d, top = s.directions, s.spec.num_layers - 1
    text = (
        f"output holds the top layer's (layer {top}'s) h at every step; h_n holds every "
        f"layer's h after its last step. The lower layers' steps are not returned: h_n[:{d}] "
        f"(layer 0) appears nowhere in output."
    )
    width = "(D, H_out)" if s.batch.unbatched else "(D, N, H_out)"
    code = "\n".join(
        [
            f"top_layer = h_n[-{d}:]  # {width}: the rows output shares",
            f"layer_0 = h_n[:{d}]  # {width}: in h_n only",
        ]
    )
    if s.batch.lengths is None:
        out_index, state_index = s.out_index(s.batch.steps - 1, 0), (0,)
    else:
        out_index, state_index = s.out_index(s.batch.lengths[0] - 1, 0, 0), (0, 0)
    k = s.rows - d
    statement = f"top_layer[{index_text(state_index)}] == {_out(s, out_index)}"
    full = (k, *state_index[1:])
    check = s.check(statement, lambda run: equal(run.h_n[full], run.dense_output[out_index]))
    return text, code, (check,)


def _six_layout(s: Setting) -> Explained:
    assert s.batch.batch is not None
    steps, n, h_in = s.batch.steps, s.batch.batch, s.spec.input_size
    width = s.directions * s.h
    if s.spec.batch_first:
        time_dim = 1
        text = (
            f"With batch_first=True, dim 0 of x is the batch: x is (N, L, H_in) = "
            f"({n}, {steps}, {h_in}). A time-first tensor ({steps}, {n}, {h_in}) is accepted "
            f"as well, as {steps} sequences of {n} steps, and gives wrong results without any "
            f"error. To tell: x.shape[1] must be your number of steps ({steps}) and "
            f"h_n.shape[1] your batch size ({n})."
        )
    else:
        time_dim = 0
        text = (
            f"Without batch_first=True, dim 0 of x is time: x is (L, N, H_in) = ({steps}, {n}, "
            f"{h_in}). A batch-first tensor ({n}, {steps}, {h_in}) is accepted as well, as "
            f"{n} steps of {steps} sequences, and gives wrong results without any error. To "
            f"tell: x.shape[0] must be your number of steps ({steps}) and h_n.shape[1] your "
            f"batch size ({n}); for batch-first data build the LSTM with batch_first=True."
        )
    code = f"steps, batch = x.shape[{time_dim}], h_n.shape[1]  # must be your L and N"
    swapped = (n, steps, width) if not s.spec.batch_first else (steps, n, width)
    checks = (
        s.check(
            f"(x.shape[{time_dim}], h_n.shape[1]) == {(steps, n)}",
            lambda run: (run.x.shape[time_dim], run.h_n.shape[1]) == (steps, n),
        ),
        s.check(
            f"lstm(x.transpose(0, 1))[0].shape == {swapped}",
            lambda run: tuple(run.lstm(run.x.transpose(0, 1))[0].shape) == swapped,
        ),
    )
    return text, code, checks


def _seven_packing(s: Setting) -> Explained:
    assert s.batch.lengths is not None
    lengths = list(s.batch.lengths)
    unsorted = lengths != sorted(lengths, reverse=True)
    bf = ", batch_first=True" if s.spec.batch_first else ""
    text = (
        "pack_padded_sequence needs lengths on the CPU (a list or a CPU tensor, even for a GPU "
        "batch) and, unless they are sorted from longest to shortest, enforce_sorted=False"
        + (f" (lengths {lengths} are not sorted)" if unsorted else "")
        + ". With packed input, h_n[:, n] comes from sequence n's own last step (t = "
        "lengths[n] - 1 forward, t = 0 backward), in the original batch order: the same as "
        "running sequence n alone."
    )
    first = lengths[0]
    alone_x: Index = (0, slice(None, first)) if s.spec.batch_first else (slice(None, first), 0)
    code = "\n".join(
        [
            f"packed = pack_padded_sequence(x, lengths.cpu(){bf}, enforce_sorted=False)",
            f"alone = lstm(x[{index_text(alone_x)}], (h0[:, 0], c0[:, 0]))[1][0]"
            f"  # sequence 0 alone, its {first} steps",
        ]
    )
    checks = [
        s.check(
            "torch.allclose(h_n[:, 0], alone, atol=1e-6)",
            lambda run: torch.allclose(
                run.h_n[:, 0],
                run.lstm(run.x[alone_x], (run.h0[:, 0], run.c0[:, 0]))[1][0],
                atol=1e-6,
            ),
        )
    ]
    if unsorted:
        checks.append(
            s.check(
                f"pack_padded_sequence(x, lengths{bf}) raises RuntimeError (not sorted)",
                lambda run: _raises(
                    lambda: pack_padded_sequence(run.x, run.lengths, s.spec.batch_first),
                    RuntimeError,
                    "sorted",
                ),
            )
        )
    return text, code, tuple(checks)


def _eight_projection(s: Setting) -> Explained:
    p, h = s.spec.proj_size, s.spec.hidden_size
    text = (
        f"h (h0, output, h_n) has H_out = proj_size = {p} features and c (c0, c_n) keeps "
        f"H_cell = hidden_size = {h}: each step's h is projected by weight_hr_l* ({p}, {h}). "
        f"Build the two states with their own sizes:"
    )
    h_sizes, c_sizes = s.state_sizes(p), s.state_sizes(h)
    code = (
        f"h0_zeros, c0_zeros = torch.zeros({', '.join(map(str, h_sizes))}), "
        f"torch.zeros({', '.join(map(str, c_sizes))})  # H_out, H_cell"
    )
    sizes = (p, h, p, h)
    checks = (
        s.check(
            f"(h0_zeros.shape[-1], c0_zeros.shape[-1], h_n.shape[-1], c_n.shape[-1]) == {sizes}",
            lambda run: tuple(t.shape[-1] for t in (run.h0, run.c0, run.h_n, run.c_n)) == sizes,
        ),
        s.check(
            f"lstm.weight_hr_l0.shape == {(p, h)}",
            lambda run: tuple(run.lstm.weight_hr_l0.shape) == (p, h),
        ),
    )
    return text, code, checks


def _nine_gates(s: Setting) -> Explained:
    spec = s.spec
    biases = (
        "the bias is bias_ih + bias_hh (two biases, summed)"
        if spec.bias
        else "bias=False: no biases"
    )
    text = (
        f"Every weight_ih_l*, weight_hh_l* and bias_*_l* stacks the rows of four gates in the "
        f"order input i, forget f, cell g, output o: {gate_rows(spec)}; {biases}. Other "
        f"systems order gates differently (ONNX: i, o, f, c; Keras: i, f, c, o, with "
        f"transposed kernels and one bias): reorder the row blocks when porting weights. "
        f"Step 0 of layer 0, forward, by hand:"
    )
    batch_first = spec.batch_first and not s.batch.unbatched
    step: Index = (slice(None), 0) if batch_first else (0,)
    first: Index = (slice(None), slice(None, 1)) if batch_first else (slice(None, 1),)
    gate = "(H_cell,)" if s.batch.unbatched else "(N, H_cell)"
    from_x = f"x[{index_text(step)}] @ lstm.weight_ih_l0.T"
    from_h = "h0[0] @ lstm.weight_hh_l0.T"
    if spec.bias:
        from_x += " + lstm.bias_ih_l0"
        from_h += " + lstm.bias_hh_l0"
    h_1 = "torch.sigmoid(o) * torch.tanh(c_1)"
    if spec.proj_size:
        h_1 = f"({h_1}) @ lstm.weight_hr_l0.T"
    code = "\n".join(
        [
            "W_i, W_f, W_g, W_o = lstm.weight_ih_l0.chunk(4)  # ONNX: cat([W_i, W_o, W_f, W_g])",
            f"gates_x = {from_x}",
            f"gates = gates_x + {from_h}",
            f"i, f, g, o = gates.chunk(4, dim=-1)  # each {gate}",
            "c_1 = torch.sigmoid(f) * c0[0] + torch.sigmoid(i) * torch.tanh(g)",
            f"h_1 = {h_1}",
            f"_, (h_step0, c_step0) = lstm(x[{index_text(first)}], (h0, c0))"
            "  # step 0 only: row 0 is layer 0, forward",
        ]
    )

    done: dict[int, tuple[Tensor, Tensor, Tensor, Tensor]] = {}

    def by_hand(run: Run) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """h_1 and the module's h after step 0, then c_1 and the module's c (computed once)."""
        if id(run) in done:
            return done[id(run)]
        lstm = run.lstm
        z = run.x[step] @ lstm.weight_ih_l0.T + run.h0[0] @ lstm.weight_hh_l0.T
        if spec.bias:
            z = z + lstm.bias_ih_l0 + lstm.bias_hh_l0
        i, f, g, o = z.chunk(4, dim=-1)
        c_1 = torch.sigmoid(f) * run.c0[0] + torch.sigmoid(i) * torch.tanh(g)
        h_1 = torch.sigmoid(o) * torch.tanh(c_1)
        if spec.proj_size:
            h_1 = h_1 @ lstm.weight_hr_l0.T
        _, (h_step0, c_step0) = lstm(run.x[first], (run.h0, run.c0))
        done[id(run)] = (h_1, h_step0[0], c_1, c_step0[0])
        return done[id(run)]

    checks = (
        s.check(
            "torch.allclose(h_1, h_step0[0], atol=1e-6)",
            lambda run: torch.allclose(*by_hand(run)[:2], atol=1e-6),
        ),
        s.check(
            "torch.allclose(c_1, c_step0[0], atol=1e-6)",
            lambda run: torch.allclose(*by_hand(run)[2:], atol=1e-6),
        ),
    )
    return text, code, checks


def _ten_unbatched(s: Setting) -> Explained:
    steps, h_in, width = s.batch.steps, s.spec.input_size, s.directions * s.h
    rows = s.rows
    ignored = (
        " batch_first=True is ignored: unbatched input is always (L, H_in)."
        if s.spec.batch_first
        else ""
    )
    text = (
        f"A 2-D x (L, H_in) = ({steps}, {h_in}) is one sequence: output is (L, D*H_out) = "
        f"({steps}, {width}) and the states are 2-D (num_layers*D, H) = ({rows}, {s.h}), with "
        f"no N dimension.{ignored} It computes what a batch of one computes:"
    )
    dim = 0 if s.spec.batch_first else 1
    layout = "(1, L, D*H_out)" if dim == 0 else "(L, 1, D*H_out)"
    code = f"batched = lstm(x.unsqueeze({dim}), (h0.unsqueeze(1), c0.unsqueeze(1)))[0]  # {layout}"

    def holds(run: Run) -> bool:
        batched = run.lstm(run.x.unsqueeze(dim), (run.h0.unsqueeze(1), run.c0.unsqueeze(1)))[0]
        return torch.allclose(run.dense_output, batched.squeeze(dim))

    return text, code, (s.check(f"torch.allclose(output, batched.squeeze({dim}))", holds),)


RULES = (
    Rule(
        1,
        "output[-1] is not the final state of a bidirectional LSTM",
        lambda s: s.spec.bidirectional,
        _one_bidirectional,
        "bidirectional=True",
    ),
    Rule(
        2,
        "output[-1] of a padded batch comes after the padding",
        lambda s: s.batch.packed,
        _two_padded,
        "--lengths",
    ),
    Rule(
        3,
        "h_n rows are layer-major, direction-minor",
        lambda s: s.rows > 1,
        _three_rows,
        "num_layers > 1 or bidirectional=True",
    ),
    Rule(
        4,
        "batch_first does not apply to h0, c0, h_n, c_n",
        lambda s: s.spec.batch_first and not s.batch.unbatched,
        _four_batch_first,
        "--batch-first",
    ),
    Rule(
        5,
        "output is the top layer at every step; h_n is every layer at its last step",
        lambda s: s.spec.num_layers > 1,
        _five_layers,
        "num_layers > 1",
    ),
    Rule(
        6,
        "Time first (L, N, H_in) unless batch_first=True: swapped axes run silently",
        lambda s: not s.batch.unbatched,
        _six_layout,
        "batched input",
    ),
    Rule(
        7,
        "Packing: lengths on the CPU, enforce_sorted, h_n at each sequence's own end",
        lambda s: s.batch.packed,
        _seven_packing,
        "--lengths",
    ),
    Rule(
        8,
        "With proj_size, h has proj_size features but c keeps hidden_size",
        lambda s: s.spec.proj_size > 0,
        _eight_projection,
        "proj_size > 0",
    ),
    Rule(
        9,
        "Gate order i, f, g, o in the weights, and two biases",
        lambda s: True,
        _nine_gates,
        "always",
    ),
    Rule(
        10,
        "Unbatched 2-D input (L, H_in) is accepted; batch_first is then ignored",
        lambda s: s.batch.unbatched,
        _ten_unbatched,
        "--unbatched",
    ),
)


def pitfalls(s: Setting) -> tuple[tuple[Pitfall, ...], tuple[OtherPitfall, ...]]:
    """The pitfalls that apply to this setting (explained and checked), and the others."""
    applying, others = [], []
    for rule in RULES:
        if rule.applies(s):
            text, code, checks = rule.explain(s)
            applying.append(Pitfall(rule.number, rule.title, text, code, checks))
        else:
            others.append(OtherPitfall(rule.number, rule.title, rule.shown_by))
    return tuple(applying), tuple(others)
