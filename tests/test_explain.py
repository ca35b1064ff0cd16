"""lstmkit explain: golden text and JSON, shapes that agree with the modules, statements that
are true Python, the parser, the CLI, and the teaching errors that point to explain."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import json
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor
from torch.nn.utils.rnn import pack_padded_sequence

import lstmkit
from lstmkit import cli
from lstmkit.explain import DEFAULT_CONFIG, Explanation, explain, live, parse_config
from lstmkit.explain.model import Pitfall
from lstmkit.spec import LSTMSpec

GOLDEN = Path(__file__).parent / "golden"

# name -> `lstmkit explain` arguments; each has a text and a JSON golden file.
GOLDEN_CASES = {
    "default": [],
    "packed": ["LSTM(10, 20, bidirectional=True)", "--lengths", "2,5,3"],
    "proj": ["nn.LSTM(4, 7, proj_size=3, num_layers=2)", "--input", "6,2,4"],
    "unbatched": ["torch.nn.LSTM(4, 6, batch_first=True)", "--unbatched"],
    "batch-first": ["lstmkit.LSTM(8, 16, num_layers=3, bidirectional=True)", "--batch-first"],
}

# (config, explain keyword arguments): every form of input, with and without the extras.
CONFIGS = [
    (DEFAULT_CONFIG, {}),
    ("LSTM(4, 6)", {"input": (7, 2, 4)}),
    ("LSTM(4, 6, num_layers=3)", {}),
    ("LSTM(3, 5, bias=False, bidirectional=True)", {"input": (1, 4, 3)}),
    ("LSTM(4, 7, proj_size=3, bidirectional=True, num_layers=2)", {}),
    ("LSTM(4, 6, batch_first=True, bidirectional=True)", {"input": (2, 5, 4)}),
    ("LSTM(4, 6, num_layers=2, dropout=0.5)", {}),
    ("LSTM(4, 6, num_layers=2, bidirectional=True)", {"unbatched": True}),
    ("LSTM(4, 6, batch_first=True, proj_size=2)", {"input": (5, 4)}),
    ("LSTM(4, 6)", {"lengths": (6, 4, 4, 1)}),
    ("LSTM(4, 5, num_layers=2, bidirectional=True)", {"lengths": (2, 6, 1, 4, 6)}),
    ("LSTM(3, 6, proj_size=4, bidirectional=True, batch_first=True)", {"lengths": (3, 5, 1)}),
    ("LSTM(3, 4, bidirectional=True)", {"input": (7, 6, 3), "lengths": (2, 5, 1, 3, 4, 5)}),
]
CONFIG_IDS = [f"{config}-{sorted(kwargs.items())}" for config, kwargs in CONFIGS]


def run_cli(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["explain", *args])
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_golden_text_and_json(name: str, golden) -> None:
    code, text, _ = run_cli(GOLDEN_CASES[name])
    assert code == 0
    golden(GOLDEN / f"explain-{name}.txt", text)
    code, data, _ = run_cli([*GOLDEN_CASES[name], "--json"])
    assert code == 0
    golden(GOLDEN / f"explain-{name}.json", data)


def test_no_arguments_is_the_tutorial_with_every_identity_checked() -> None:
    code, text, _ = run_cli([])
    assert code == 0
    assert text.startswith(f"lstmkit explain: {DEFAULT_CONFIG}\n")
    assert "input x (L, N, H_in) = (5, 3, 10)" in text
    for identity in ("output[4, :, :20] == h_n[2]", "output[0, :, 20:] == h_n[3]"):
        assert f"[checked] {identity}" in text
    assert "[FAILED]" not in text and "[not run]" not in text
    count = len(explain().checks)
    assert f"Live check: {count} of {count} statements checked (seed 0)" in text


@pytest.mark.parametrize(("config", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_every_statement_is_checked_and_every_identity_marked(config: str, kwargs: dict) -> None:
    e = explain(config, **kwargs)
    assert e.all_checked, [c for c in e.checks if c.status != "checked"]
    for line in str(e).splitlines():
        if " == " in line or " != " in line:
            assert "[checked]" in line, f"an identity printed without its check: {line!r}"


def _tensors(config: str, kwargs: dict, module: type) -> dict[str, Tensor]:
    """An independent run of ``module`` (lstmkit.LSTM or torch.nn.LSTM) on the described input,
    with every tensor the JSON names."""
    from torch.nn.utils.rnn import pad_packed_sequence

    spec = parse_config(config)
    torch_args = {
        k: getattr(spec, k)
        for k in (
            "input_size",
            "hidden_size",
            "num_layers",
            "bias",
            "batch_first",
            "dropout",
            "bidirectional",
            "proj_size",
        )
    }
    lstm = module(**torch_args).eval()
    data = explain(config, check=False, **kwargs).to_dict()
    x = torch.randn(data["shapes"]["input"]["shape"])
    h0 = torch.randn(data["shapes"]["h0"]["shape"])
    c0 = torch.randn(data["shapes"]["c0"]["shape"])
    lengths = kwargs.get("lengths")
    with torch.no_grad(), live.one_thread():
        if lengths is None:
            output, (h_n, c_n) = lstm(x, (h0, c0))
            return {"input": x, "h0": h0, "c0": c0, "output": output, "h_n": h_n, "c_n": c_n}
        packed = pack_padded_sequence(x, torch.tensor(lengths), spec.batch_first, False)
        output, (h_n, c_n) = lstm(packed, (h0, c0))
        padded, _ = pad_packed_sequence(output, spec.batch_first)
    return {
        "input": x,
        "packed.data": packed.data,
        "packed.batch_sizes": packed.batch_sizes,
        "h0": h0,
        "c0": c0,
        "output.data": output.data,
        "padded": padded,
        "h_n": h_n,
        "c_n": c_n,
    }


@pytest.mark.parametrize("module", [lstmkit.LSTM, torch.nn.LSTM], ids=["lstmkit", "torch"])
@pytest.mark.parametrize(("config", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_json_shapes_agree_with_the_modules(config: str, kwargs: dict, module: type) -> None:
    data = explain(config, check=False, **kwargs).to_dict()
    tensors = _tensors(config, kwargs, module)
    assert list(data["shapes"]) == list(tensors)
    for name, entry in data["shapes"].items():
        assert tuple(entry["shape"]) == tuple(tensors[name].shape), name
        assert [d["size"] for d in entry["dims"]] == entry["shape"], name
        assert entry["layout"] == "(" + ", ".join(d["name"] for d in entry["dims"]) + (
            ",)" if len(entry["dims"]) == 1 else ")"
        )
    spec = parse_config(config)
    reference = torch.nn.LSTM(
        spec.input_size,
        spec.hidden_size,
        spec.num_layers,
        spec.bias,
        spec.batch_first,
        spec.dropout,
        spec.bidirectional,
        spec.proj_size,
    )
    expected = [(n, list(p.shape)) for n, p in reference.named_parameters()]
    assert [(p["name"], p["shape"]) for p in data["parameters"]] == expected
    assert data["total_parameters"] == sum(p.numel() for p in reference.parameters())


# --- the statements are true Python over the printed script --------------------------------


def _namespace(e: Explanation) -> dict[str, object]:
    """Run the printed script, then each pitfall's printed code, as a reader would."""
    namespace: dict[str, object] = {}
    exec("\n".join(e.script), namespace)
    for pitfall in e.pitfalls:
        exec(pitfall.code, namespace)
    return namespace


ERRORS = {"RuntimeError": RuntimeError, "ValueError": ValueError, "TypeError": TypeError}


def _holds(statement: str, namespace: dict[str, object]) -> bool:
    """A printed statement, read as torch users read it: ``a == b`` of tensors is equality of
    every element, ``a != b`` a clear difference, ``call raises Error`` an exception."""
    if " raises " in statement:
        call, error = statement.split(" raises ", 1)
        with pytest.raises(ERRORS[error.split()[0]]):
            eval(call, namespace)
        return True
    tree = ast.parse(statement, mode="eval").body
    if isinstance(tree, ast.Compare) and len(tree.ops) == 1:
        left = eval(compile(ast.Expression(tree.left), "<left>", "eval"), namespace)
        right = eval(compile(ast.Expression(tree.comparators[0]), "<right>", "eval"), namespace)
        if isinstance(left, Tensor) and isinstance(right, Tensor):
            if isinstance(tree.ops[0], ast.Eq):
                return left.shape == right.shape and torch.equal(left, right)
            if isinstance(tree.ops[0], ast.NotEq):
                return left.shape != right.shape or not torch.allclose(left, right)
    return bool(eval(statement, namespace))


@pytest.mark.parametrize(("config", "kwargs"), CONFIGS, ids=CONFIG_IDS)
def test_printed_statements_hold_when_the_printed_code_is_pasted(config: str, kwargs: dict) -> None:
    e = explain(config, **kwargs)
    with live.one_thread():
        _check_pasted(e)


def _check_pasted(e: Explanation) -> None:
    namespace = _namespace(e)
    prose = [c.statement for c in e.checks if c.statement.startswith("lstm.named_parameters()")]
    assert len(prose) == 1
    for check in e.checks:
        if check.statement not in prose:
            assert _holds(check.statement, namespace), check.statement


def test_the_live_check_marks_a_false_statement_failed(monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = live.run

    def broken_run(*args: object) -> live.Run:
        # A wrong h_n, as a bug in lstmkit would give.
        run = real_run(*args)
        return dataclasses.replace(run, h_n=run.h_n + 1)

    monkeypatch.setattr(live, "run", broken_run)
    e = explain()
    failed = [c.statement for c in e.checks if c.status == "FAILED"]
    assert "output[4, :, :20] == h_n[2]" in failed
    assert not e.all_checked
    code, text, _ = run_cli([])
    assert code == 1
    assert "[FAILED]  output[4, :, :20] == h_n[2]" in text
    assert "FAILED: lstmkit disagrees with its own explanation" in text


def test_without_the_live_check_nothing_is_marked_checked() -> None:
    e = explain(check=False)
    assert {c.status for c in e.checks} == {"not run"}
    code, text, _ = run_cli(["--no-check"])
    assert code == 0
    assert "[checked]" not in text
    assert f"Live check: not run ({len(e.checks)} statements not checked)" in text


def test_the_live_check_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    explain()
    assert torch.equal(torch.rand(3), expected)


# --- reading the configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "LSTM(10, 20, num_layers=2, bidirectional=True)",
        "nn.LSTM(10, 20, 2, bidirectional=True)",
        "torch.nn.LSTM(input_size=10, hidden_size=20, num_layers=2, bidirectional=True)",
        "  lstmkit.LSTM(10, 20, num_layers=2, bias=True, bidirectional=True)\n",
        str(lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)),
    ],
)
def test_parse_accepts_the_spellings_users_copy(text: str) -> None:
    assert parse_config(text) == LSTMSpec(10, 20, num_layers=2, bidirectional=True)


def test_parse_reads_every_argument() -> None:
    spec = parse_config("LSTM(3, 8, 2, False, True, 0.25, True, 4)")
    assert spec == LSTMSpec(3, 8, 2, False, True, 0.25, True, 4)
    assert parse_config(str(spec)) == spec


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("GRU(10, 20)", "is not an LSTM configuration"),
        ("LSTM(10, 20", "is not an LSTM configuration"),
        ("10, 20", "is not an LSTM configuration"),
        ("LSTM(10)", "hidden_size must be given"),
        ("LSTM(10, 20, 1, True, False, 0.0, False, 0, 7)", "at most 8 positional"),
        ("LSTM(10, 20, layers=2)", "layers= is not an LSTM argument"),
        ("LSTM(10, 20, **extra)", "**extra is not an LSTM argument"),
        ("LSTM(10, 20, hidden_size=5)", "hidden_size is given twice"),
        ("LSTM(10, hidden)", "hidden_size=hidden is not a literal"),
        ("LSTM(10, 20, proj_size=20)", "proj_size projects h down"),
        ("LSTM(10, 20, num_layers=0)", "num_layers must be greater than zero"),
        ("LSTM(10, 20, bias=1)", "'LSTM(10, 20, bias=1)': bias should be of type bool"),
    ],
)
def test_parse_rejects_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_config(text)


def test_parse_never_evaluates(tmp_path: Path) -> None:
    target = tmp_path / "touched"
    for text in (
        f"LSTM(10, open({str(target)!r}, 'w'))",
        f"__import__('pathlib').Path({str(target)!r}).touch()",
        f"LSTM(10, 20, num_layers=[open({str(target)!r}, 'w')][0])",
    ):
        with pytest.raises(ValueError):
            parse_config(text)
    assert not target.exists()


def test_explain_takes_a_spec_or_a_module() -> None:
    assert lstmkit.explain is explain
    expected = explain("LSTM(4, 6, num_layers=2, proj_size=3)").to_dict()
    assert explain(LSTMSpec(4, 6, num_layers=2, proj_size=3)).to_dict() == expected
    assert explain(lstmkit.LSTM(4, 6, num_layers=2, proj_size=3)).to_dict() == expected
    assert explain(torch.nn.LSTM(4, 6, num_layers=2, proj_size=3)).to_dict() == expected
    with pytest.raises(TypeError, match="configuration string"):
        explain(torch.nn.Linear(3, 4))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["LSTM(4, 6)", "--input", "5,3,7"], "last dimension must be input_size = 4"),
        (["LSTM(4, 6)", "--input", "5,4,3"], "the features seem to be on another axis"),
        (["LSTM(4, 6)", "--input", "5,3,2,4"], "3-D (L, N, H_in) for a batch"),
        (["LSTM(4, 6)", "--input", "5,3,4", "--unbatched"], "2-D (L, H_in) for one sequence"),
        (["LSTM(4, 6)", "--lengths", "3,0"], "one positive number of valid steps"),
        (["LSTM(4, 6)", "--input", "5,3,4", "--lengths", "5,3"], "one length per sequence (N = 3)"),
        (["LSTM(4, 6)", "--input", "5,2,4", "--lengths", "6,3"], "each at most L = 5"),
        (["LSTM(4, 6)", "--unbatched", "--lengths", "3,2"], "unbatched input is one sequence"),
        (["LSTM(4, 6)", "--input", "5,4", "--lengths", "3"], "lengths need a batch"),
        (["nn.GRU(4, 6)"], "is not an LSTM configuration"),
    ],
)
def test_cli_errors_say_why(args: list[str], words: str) -> None:
    code, out, err = run_cli(args)
    assert code == 2
    assert out == ""
    assert err.startswith("lstmkit explain: error: ")
    assert words in err


def test_cli_input_and_batch_first_describe_the_layout() -> None:
    code, text, _ = run_cli(["LSTM(4, 6)", "--batch-first", "--input", "(3, 7, 4)"])
    assert code == 0
    assert "input x (N, L, H_in) = (3, 7, 4): N = 3 sequences of L = 7 steps" in text
    data = json.loads(run_cli(["LSTM(4, 6)", "--input", "7x4", "--json"])[1])
    assert data["input"] == {
        "steps": 7,
        "batch": None,
        "lengths": None,
        "batch_first": False,
        "unbatched": True,
        "packed": False,
        "given": True,
    }


def test_constructor_warnings_become_notes() -> None:
    e = explain("LSTM(4, 6, dropout=0.5)")
    assert len(e.notes) == 1 and "dropout=0.5 has no effect with num_layers=1" in e.notes[0]
    assert "  note: dropout=0.5 has no effect" in str(e)


# --- teaching errors: every forward check names the configuration and the explain command --

BI = {"input_size": 10, "hidden_size": 20, "num_layers": 2, "bidirectional": True}
ERRORS_CASES = [
    (BI, lambda m: m([1.0, 2.0]), TypeError),
    (BI, lambda m: m(torch.zeros(1, 5, 3, 10)), ValueError),
    (BI, lambda m: m(torch.zeros(5, 3, 10, dtype=torch.float64)), ValueError),
    (BI, lambda m: m(torch.zeros(5, 3, 11)), RuntimeError),
    (BI, lambda m: m(torch.zeros(0, 3, 10)), RuntimeError),
    (BI, lambda m: m(torch.zeros(5, 3, 10), torch.zeros(4, 3, 20)), RuntimeError),
    (BI, lambda m: m(torch.zeros(5, 3, 10), 3), TypeError),
    (BI, lambda m: m(torch.zeros(5, 3, 10), (torch.zeros(4, 3, 20),) * 3), RuntimeError),
    (
        BI,
        lambda m: m(torch.zeros(5, 3, 10), (torch.zeros(4, 20), torch.zeros(4, 20))),
        RuntimeError,
    ),
    (BI, lambda m: m(torch.zeros(5, 3, 10), (torch.zeros(2, 3, 20),) * 2), RuntimeError),
    (
        BI,
        lambda m: m(torch.zeros(5, 3, 10), (torch.zeros(4, 3, 20, dtype=torch.float64),) * 2),
        RuntimeError,
    ),
    (BI, lambda m: m(torch.zeros(5, 3, 10), lengths=[5, 3]), ValueError),
    (
        {"input_size": 10, "hidden_size": 20, "proj_size": 5, "batch_first": True},
        lambda m: m(pack_padded_sequence(torch.zeros(5, 3, 11), [5, 3, 2])),
        RuntimeError,
    ),
]


@pytest.mark.parametrize(("kwargs", "call", "error"), ERRORS_CASES)
def test_forward_errors_name_the_configuration_and_the_explain_command(
    kwargs: dict, call, error: type[Exception]
) -> None:
    lstm = lstmkit.LSTM(**kwargs)
    with pytest.raises(error) as raised:
        call(lstm)
    message = str(raised.value)
    command = re.search(r'see every shape with: lstmkit explain "(.+)"\]$', message)
    assert command, message
    assert f"[{lstm.spec}; " in message
    assert parse_config(command.group(1)) == lstm.spec
    assert explain(command.group(1)).all_checked


@pytest.mark.parametrize(
    ("kwargs", "states", "words"),
    [
        (BI, ((3, 4, 20), (3, 4, 20)), "looks batch-first (N, num_layers*D, H)"),
        (BI, ((3, 4, 20), (3, 4, 20)), "pass h0.transpose(0, 1)"),
        ({**BI, "proj_size": 5}, ((4, 3, 5), (4, 3, 5)), "c0 keeps hidden_size = 20 features"),
        ({**BI, "proj_size": 5}, ((4, 3, 20), (4, 3, 20)), "h0 has proj_size = 5 features"),
        (BI, ((4, 20), (4, 20)), "give them the batch dimension N"),
    ],
)
def test_state_errors_say_what_was_likely_meant(kwargs: dict, states: tuple, words: str) -> None:
    lstm = lstmkit.LSTM(**kwargs)
    with pytest.raises(RuntimeError, match=re.escape(words)):
        lstm(torch.zeros(5, 3, 10), tuple(torch.zeros(shape) for shape in states))


def test_unbatched_states_error_says_batch_first_does_not_apply() -> None:
    lstm = lstmkit.LSTM(10, 20, batch_first=True)
    with pytest.raises(RuntimeError, match="one sequence \\(batch_first does not apply to it\\)"):
        lstm(torch.zeros(5, 10), (torch.zeros(1, 1, 20), torch.zeros(1, 1, 20)))


# --- the ten pitfalls: each shown on torch.nn.LSTM, and answered by explain, a helper or an error


def pitfall(e: Explanation, number: int) -> Pitfall:
    """Pitfall ``number`` of the explanation; it must apply and all its checks must hold."""
    found = [p for p in e.pitfalls if p.number == number]
    assert found, f"pitfall {number} not explained for {e.spec}"
    assert all(c.status == "checked" for c in found[0].checks)
    assert found[0].checks, f"pitfall {number} checks nothing"
    return found[0]


def applies(e: Explanation, number: int) -> bool:
    numbers = [p.number for p in e.pitfalls]
    assert sorted(numbers + [o.number for o in e.other_pitfalls]) == list(range(1, 11))
    return number in numbers


def oracle(**kwargs: object) -> torch.nn.LSTM:
    torch.manual_seed(0)
    return torch.nn.LSTM(**{"input_size": 10, "hidden_size": 20, **kwargs}).eval()


@torch.no_grad()
def test_pitfall_1_output_last_step_of_a_bidirectional_lstm() -> None:
    output, (h_n, _) = oracle(num_layers=2, bidirectional=True)(torch.randn(5, 3, 10))
    final = torch.cat([h_n[-2], h_n[-1]], dim=-1)
    assert not torch.allclose(output[-1], final)
    assert torch.equal(final, torch.cat([output[-1, :, :20], output[0, :, 20:]], dim=-1))
    assert torch.equal(lstmkit.states.final_hidden(output, bidirectional=True), final)
    p = pitfall(explain(), 1)
    assert "final = torch.cat([h_n[-2], h_n[-1]], dim=-1)" in p.code
    assert not applies(explain("LSTM(10, 20, num_layers=2)"), 1)


@torch.no_grad()
def test_pitfall_2_output_last_step_of_a_padded_batch() -> None:
    lstm, x, lengths = oracle(), torch.randn(5, 3, 10), [2, 5, 3]
    unpacked, _ = lstm(x)
    packed, (h_n, _) = lstm(pack_padded_sequence(x, lengths, enforce_sorted=False))
    assert not torch.allclose(unpacked[-1, 0], h_n[-1, 0])  # sequence 0 ran 3 padding steps
    assert torch.equal(lstmkit.states.final_hidden(packed, bidirectional=False), h_n[-1])
    p = pitfall(explain("LSTM(10, 20)", lengths=lengths), 2)
    assert "lstmkit.states.final_hidden(output, bidirectional=False)" in p.code
    assert not applies(explain("LSTM(10, 20)"), 2)


@torch.no_grad()
def test_pitfall_3_h_n_rows_are_layer_major() -> None:
    _, (h_n, _) = oracle(num_layers=3, bidirectional=True)(torch.randn(5, 3, 10))
    by_layer = h_n.view(3, 2, 3, 20)
    named = lstmkit.states.layers(h_n, num_layers=3)
    for layer in range(3):
        for direction, name in enumerate(("forward", "backward")):
            assert torch.equal(by_layer[layer, direction], h_n[2 * layer + direction])
            assert torch.equal(named[layer, name], h_n[2 * layer + direction])
    assert torch.equal(h_n[-1], named[2, "backward"])
    p = pitfall(explain("LSTM(10, 20, num_layers=3, bidirectional=True)"), 3)
    assert "h_n.view(3, 2, 3, 20)" in p.code and "h_n[-1] is the top layer's backward" in p.text
    assert not applies(explain("LSTM(10, 20)"), 3)


@torch.no_grad()
def test_pitfall_4_batch_first_does_not_apply_to_states() -> None:
    output, (h_n, c_n) = oracle(num_layers=2, batch_first=True)(torch.randn(3, 5, 10))
    assert output.shape == (3, 5, 20) and h_n.shape == c_n.shape == (2, 3, 20)
    lstm = lstmkit.LSTM(10, 20, num_layers=2, batch_first=True)
    with pytest.raises(RuntimeError, match="batch_first does not apply to states"):
        lstm(torch.randn(3, 5, 10), (torch.zeros(3, 2, 20), torch.zeros(3, 2, 20)))
    p = pitfall(explain("LSTM(10, 20, num_layers=2)", batch_first=True), 4)
    assert "h0_zeros = torch.zeros(2, 3, 20)  # not (3, 2, 20)" in p.code
    assert not applies(explain("LSTM(10, 20, num_layers=2)"), 4)


@torch.no_grad()
def test_pitfall_5_output_is_the_top_layer_h_n_every_layer() -> None:
    output, (h_n, _) = oracle(num_layers=2)(torch.randn(5, 3, 10))
    assert torch.equal(output[-1], h_n[-1])
    assert not any(torch.allclose(output[t], h_n[0]) for t in range(5))  # layer 0: h_n only
    p = pitfall(explain("LSTM(10, 20, num_layers=2)"), 5)
    assert "top_layer[0] == output[4]" in [c.statement for c in p.checks]
    assert not applies(explain("LSTM(10, 20)"), 5)


@torch.no_grad()
def test_pitfall_6_swapped_axes_run_silently() -> None:
    lstm = oracle()
    batch_first_data = torch.randn(3, 5, 10)  # meant as 3 sequences of 5 steps
    output, (h_n, _) = lstm(batch_first_data)  # no error: read as 5 sequences of 3 steps
    assert output.shape == (3, 5, 20) and h_n.shape[1] == 5
    p = pitfall(explain("LSTM(10, 20)", (5, 3, 10)), 6)
    assert "x.shape[0] must be your number of steps (5)" in p.text
    assert "lstm(x.transpose(0, 1))[0].shape == (3, 5, 20)" in [c.statement for c in p.checks]
    assert not applies(explain("LSTM(10, 20)", unbatched=True), 6)


@torch.no_grad()
def test_pitfall_7_packing_lengths_order_and_true_last_steps() -> None:
    lstm, x = oracle(bidirectional=True), torch.randn(5, 3, 10)
    with pytest.raises(RuntimeError, match="enforce_sorted"):
        pack_padded_sequence(x, [2, 5, 3])
    _, (h_n, _) = lstm(pack_padded_sequence(x, torch.tensor([2, 5, 3]), enforce_sorted=False))
    _, (alone, _) = lstm(x[:2, 0])
    assert torch.allclose(h_n[:, 0], alone, atol=1e-6)
    p = pitfall(explain("LSTM(10, 20, bidirectional=True)", lengths=[2, 5, 3]), 7)
    assert "lengths on the CPU" in p.text and "enforce_sorted=False" in p.code
    assert not applies(explain("LSTM(10, 20)"), 7)


@torch.no_grad()
def test_pitfall_8_projection_sizes_h_not_c() -> None:
    output, (h_n, c_n) = oracle(proj_size=5)(torch.randn(5, 3, 10))
    assert output.shape == (5, 3, 5) and h_n.shape == (1, 3, 5) and c_n.shape == (1, 3, 20)
    with pytest.raises(RuntimeError, match="c0 keeps hidden_size = 20"):
        lstmkit.LSTM(10, 20, proj_size=5)(torch.randn(5, 3, 10), (h_n, h_n))
    p = pitfall(explain("LSTM(10, 20, proj_size=5)"), 8)
    assert "torch.zeros(1, 3, 5), torch.zeros(1, 3, 20)" in p.code
    assert not applies(explain("LSTM(10, 20)"), 8)


@torch.no_grad()
def test_pitfall_9_gate_order() -> None:
    cell = torch.nn.LSTMCell(10, 20)
    x, h, c = torch.randn(3, 10), torch.randn(3, 20), torch.randn(3, 20)
    gates = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh

    def step(i: Tensor, f: Tensor, g: Tensor, o: Tensor) -> Tensor:
        c1 = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c1)

    i, f, g, o = gates.chunk(4, dim=-1)
    expected, _ = cell(x, (h, c))
    assert torch.allclose(step(i, f, g, o), expected, atol=1e-6)
    assert not torch.allclose(step(i, g, o, f), expected)  # read as ONNX's i, o, f, c
    p = pitfall(explain("LSTM(10, 20)"), 9)
    assert "i [0:20], f [20:40], g [40:60], o [60:80]" in p.text and "ONNX: i, o, f, c" in p.text


@torch.no_grad()
def test_pitfall_10_unbatched_input_ignores_batch_first() -> None:
    lstm = oracle(batch_first=True, bidirectional=True)
    sequence = torch.randn(5, 10)
    output, (h_n, _) = lstm(sequence)
    assert output.shape == (5, 40) and h_n.shape == (2, 20)
    assert torch.allclose(output, lstm(sequence.unsqueeze(0))[0].squeeze(0))
    p = pitfall(explain("LSTM(10, 20, batch_first=True)", unbatched=True), 10)
    assert "batch_first=True is ignored" in p.text
    assert not applies(explain("LSTM(10, 20)"), 10)
