"""``lstmkit bench --variants``: the Python-loop baseline, the check that gates timing, the CSV.

The baseline is written from the papers' equations with torch ops only, so its agreement with
lstmkit in eval mode is also an independent check of every variant. Nothing here asserts a
speed; timings run with two samples only to exercise the plumbing.
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import lstmkit
from lstmkit.bench import runner, variants, variants_report
from lstmkit.bench.baselines import LoopLSTM
from lstmkit.bench.check import check
from lstmkit.bench.configs import BenchConfig, make_input
from lstmkit.bench.timing import Budget, Timing
from lstmkit.bench.variants_report import VariantRow

TINY_BI = BenchConfig("tiny-bi", seq_len=5, batch=3, input_size=4, hidden_size=6, num_layers=2,
                      bidirectional=True)  # fmt: skip
TINY_PROJ = BenchConfig("tiny-proj", 4, 2, 3, 5, num_layers=2, proj_size=3)
TWO_SAMPLES = Budget(0.0, min_repeats=2, max_repeats=2, repeats=2, warmup_s=0.0, warmup_calls=1)
README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"


class FailingBackward(torch.autograd.Function):
    """The identity, whose backward raises."""

    @staticmethod
    def forward(ctx: object, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> Tensor:
        raise RuntimeError("no backward for this shape")


def broken(how: str) -> variants.MakeVariant:
    """lstmkit.LSTM with the variant, its output 1% too large (``"value"``), NaN everywhere
    (``"nan"``), or raising in backward (``"backward"``)."""

    def make(config: BenchConfig, oracle: nn.LSTM, options: dict[str, bool | float]) -> nn.Module:
        module = variants.make_lstmkit_variant(config, oracle, options)
        forward = module.forward

        def wrong(batch: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            output, states = forward(batch)
            if how == "value":
                return output * 1.01, states
            if how == "backward":
                return FailingBackward.apply(output), states
            return output * torch.nan, states

        module.forward = wrong  # type: ignore[method-assign]
        return module

    return make


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny shapes run fastest on one thread, and a busy machine can make a two-thread call
    100x slower (each parallel region waits for a descheduled thread); the plumbing tested here
    does not depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any attempt to time a candidate fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a candidate that failed its check was timed")

    monkeypatch.setattr(variants, "time_interleaved", refuse)


# --- the baseline ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY_BI, TINY_PROJ], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", runner.MODES)
def test_plain_loop_is_torch_nn_lstm(config: BenchConfig, mode: str) -> None:
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    loop = LoopLSTM(**config.lstm_kwargs())
    loop.load_state_dict(oracle.state_dict())
    assert check(mode, oracle, loop, make_input(config)) is None


@pytest.mark.parametrize("config", [TINY_BI, TINY_PROJ], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.parametrize("variant", variants.VARIANTS)
def test_loop_matches_lstmkit(variant: str, mode: str, config: BenchConfig) -> None:
    """Values (not in training with random masks); in training also the gradients' names,
    shapes and finiteness."""
    candidates = variants.make_candidates(config, variant)
    assert set(candidates["loop"].state_dict()) == set(candidates["variant"].state_dict())
    assert variants.check_variant(candidates, variant, mode, make_input(config)) is None


@pytest.mark.parametrize("variant", ["recurrent_dropout", "weight_dropout", "zoneout"])
def test_loop_draws_its_masks_in_training_only(variant: str) -> None:
    loop = LoopLSTM(4, 6, bidirectional=True, **variants.VARIANTS[variant])
    x = torch.randn(5, 3, 4)
    first, second = loop(x)[0], loop(x)[0]
    assert not torch.equal(first, second)
    loop.eval()
    assert torch.equal(loop(x)[0], loop(x)[0])


def test_lstmkit_variant_moves_its_extra_parameters_off_their_init() -> None:
    """Layer-norm gains of 1 and shifts of 0 would let the check miss a swapped parameter."""
    torch.manual_seed(0)
    module = variants.make_lstmkit_variant(TINY_BI, nn.LSTM(**TINY_BI.lstm_kwargs()),
                                           {"layer_norm": True, "peepholes": True})  # fmt: skip
    fresh = lstmkit.LSTM(**TINY_BI.lstm_kwargs(), layer_norm=True)
    for name, param in module.named_parameters():
        if name.startswith("ln_"):
            assert not torch.equal(param, getattr(fresh, name)), name


# --- the check gates the timing -------------------------------------------------------------


@pytest.mark.usefixtures("no_timing")
@pytest.mark.parametrize("mode", runner.MODES)
def test_wrong_values_are_not_timed(mode: str) -> None:
    row = variants.bench_variant(TINY_BI, "layer_norm", mode, TWO_SAMPLES, broken("value"))
    assert row.failure is not None
    assert row.failure.startswith("lstmkit layer_norm vs the Python loop: output:")
    assert row.timings == {} and row.variant_over_plain is None


@pytest.mark.usefixtures("no_timing")
def test_a_failing_backward_is_not_timed() -> None:
    row = variants.bench_variant(TINY_BI, "peepholes", "training", TWO_SAMPLES, broken("backward"))
    assert row.failure is not None
    assert "backward raised RuntimeError: no backward for this shape" in row.failure


@pytest.mark.usefixtures("no_timing")
def test_non_finite_training_of_a_noisy_variant_is_not_timed() -> None:
    row = variants.bench_variant(TINY_BI, "zoneout", "training", TWO_SAMPLES, broken("nan"))
    assert row.failure is not None and "not finite" in row.failure


def test_a_passing_row_times_all_four_candidates() -> None:
    row = variants.bench_variant(TINY_BI, "recurrent_dropout", "inference", TWO_SAMPLES)
    assert row.failure is None and set(row.timings) == set(variants_report.CANDIDATES)
    assert row.backend in lstmkit.backends.PREFERENCE
    assert row.note == variants_report.EVAL_NOTE
    assert row.variant_over_plain is not None and row.loop_over_variant is not None


# --- the command ----------------------------------------------------------------------------


def test_default_configs_are_tagger_and_encoder() -> None:
    args = argparse.Namespace(grid=None, config=[], shape=[])
    _, _, configs = runner.load_configs(args, variants.DEFAULT_CONFIGS)
    assert [c.name for c in configs] == ["tagger", "encoder"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "layer_norm,dropout"], "--variants takes 'all' or names among"),
        (["--variants", "--config", "tagger-packed"], "packed configs: tagger-packed"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(argv) == 2
    assert message in capsys.readouterr().err


def test_csv_has_the_documented_columns(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    argv = ["--variants", "weight_dropout,peepholes", "--shape", "4,3,5,6,bi", "--quick",
            "--repeats", "2", "--peak-size", "32", "--csv", str(path)]  # fmt: skip
    assert runner.main(argv) == 0
    with path.open() as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames or ()) == variants_report.CSV_COLUMNS
        rows = list(reader)
    assert [(r["variant"], r["mode"]) for r in rows] == [
        ("weight_dropout", "inference"),
        ("weight_dropout", "training"),
        ("peepholes", "inference"),
        ("peepholes", "training"),
    ]
    assert [r["note"] for r in rows] == [variants_report.EVAL_NOTE, "", "", ""]
    assert rows[0]["variant_options"] == "weight_dropout=0.25"
    for row in rows:
        assert row["config"] == "4,3,5,6,bi" and row["check"] == "ok" and row["repeats"] == "2"
        assert row["backend"] in lstmkit.backends.PREFERENCE
        assert row["plain_backend"] in lstmkit.backends.PREFERENCE
        for name in variants_report.CANDIDATES:
            assert float(row[f"{name}_p50_ms"]) > 0
        for column in ("variant_over_plain", "loop_over_variant", "loop_over_plain"):
            assert float(row[column]) > 0
    documented = README.read_text()
    assert [c for c in variants_report.CSV_COLUMNS if f"`{c}`" not in documented] == []


@pytest.mark.usefixtures("no_timing")
def test_cli_marks_a_failing_row_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forward = lstmkit.LSTM.forward

    def wrong_with_layer_norm(self: lstmkit.LSTM, *args: object, **kwargs: object) -> object:
        output, states = forward(self, *args, **kwargs)
        return (output + 1 if self.layer_norm else output), states

    monkeypatch.setattr(lstmkit.LSTM, "forward", wrong_with_layer_norm)
    path = tmp_path / "out.csv"
    argv = ["--variants", "layer_norm", "--shape", "4,3,5,6", "--quick", "--peak-size", "32",
            "--csv", str(path)]  # fmt: skip
    assert runner.main(argv) == 1
    captured = capsys.readouterr()
    assert "FAILED lstmkit layer_norm vs the Python loop: output:" in captured.out
    assert "checks FAILED, not timed: 4,3,5,6 layer_norm inference" in captured.err
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["mode"], r["check"]) for r in rows] == [
        ("inference", "FAILED"),
        ("training", "FAILED"),
    ]
    assert all(r["loop_p50_ms"] == "" and r["variant_over_plain"] == "" for r in rows)


def test_summary_names_the_missed_targets() -> None:
    def row(variant: str, mode: str, plain: float, with_variant: float, loop: float) -> VariantRow:
        times = {"torch": 1.0, "plain": plain, "variant": with_variant, "loop": loop}
        timings = {name: Timing((value,), 1) for name, value in times.items()}
        options = variants.VARIANTS[variant]
        return VariantRow(TINY_BI, variant, options, mode, "cpu", "cpu", None, timings)

    rows = [
        row("layer_norm", "inference", 1.0, 1.2, 12.0),
        row("peepholes", "inference", 1.0, 2.0, 20.0),
        row("zoneout", "training", 1.0, 1.0, 4.0),
        VariantRow(TINY_BI, "zoneout", {}, "inference", "cpu", "", "output: 3 of 90 values"),
    ]
    lines = variants_report.summary_lines(rows)
    assert lines.pop(1) == "  inference checks FAILED, not timed: tiny-bi/zoneout"
    assert lines[1] == (
        "  inference variant/plain <= 1.5x: 2 rows, max 2.00x; missed by 1: tiny-bi/peepholes 2.00x"
    )
    assert lines[2] == "  inference loop/variant  >= 5x: 2 rows, min 10.00x; met"
    assert lines[3] == "  training  variant/plain <= 1.5x: 1 rows, max 1.00x; met"
    assert lines[4] == (
        "  training  loop/variant  >= 5x: 1 rows, min 4.00x; missed by 1: tiny-bi/zoneout 4.00x"
    )
