"""The benchmark runner: grid and shapes, packed lengths, the check that gates timing, the CSV.

Nothing here asserts a speed; timings run with two samples only to exercise the plumbing.
"""

from __future__ import annotations

import csv
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import lstmkit
from lstmkit.bench import configs, report, runner, timing
from lstmkit.bench.check import Batch, check
from lstmkit.bench.configs import BenchConfig
from lstmkit.bench.lengths import bench_lengths
from lstmkit.bench.timing import Budget, Timing

TINY = BenchConfig("tiny", seq_len=4, batch=3, input_size=5, hidden_size=6)
TINY_PACKED = BenchConfig(
    "tiny-packed", 5, 4, 3, 4, bidirectional=True, proj_size=2, num_layers=2, lengths=(2, 5)
)
TWO_SAMPLES = Budget(0.0, min_repeats=2, max_repeats=2, repeats=2, warmup_s=0.0, warmup_calls=1)
README = Path(__file__).resolve().parents[1] / "benchmarks" / "README.md"


def shipped_grid() -> list[BenchConfig]:
    return configs.load_grid(resources.files("lstmkit").joinpath("data", "grid.json"))


def off_by(output: Batch, where: str, factor: float = 1.01) -> Batch:
    """``output`` with its values ``factor`` times too large (1% by default), or the same
    values with a gradient that much larger."""
    data = output.data if isinstance(output, PackedSequence) else output
    # (data - data.detach()) is zero with a gradient of one: it scales the gradient only.
    data = data * factor if where == "value" else data + (factor - 1) * (data - data.detach())
    if isinstance(output, PackedSequence):
        return PackedSequence(
            data, output.batch_sizes, output.sorted_indices, output.unsorted_indices
        )
    return data


def perturbed(where: str, factor: float = 1.01) -> runner.MakeCandidate:
    """Builds a broken candidate: lstmkit.LSTM with its output off by ``factor`` (see above)."""

    def make(config: BenchConfig, oracle: nn.LSTM) -> nn.Module:
        module = runner.make_lstmkit(config, oracle)
        forward = module.forward

        def broken(batch: Batch, **kwargs: object) -> tuple[Batch, tuple[Tensor, Tensor]]:
            output, states = forward(batch, **kwargs)
            return off_by(output, where, factor), states

        module.forward = broken  # type: ignore[method-assign]
        return module

    return make


def raising(config: BenchConfig, oracle: nn.LSTM) -> nn.Module:
    class Raising(nn.Module):
        def forward(self, batch: Tensor) -> None:
            raise RuntimeError("no kernel for this shape")

    return Raising()


@pytest.fixture
def no_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Makes any attempt to time a candidate fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a candidate that failed its check was timed")

    monkeypatch.setattr(runner, "time_interleaved", refuse)


# --- configurations ---------------------------------------------------------------------------


def test_shipped_grid_parses_with_defaults() -> None:
    grid = {c.name: c for c in shipped_grid()}
    assert len(grid) == 11
    assert grid["tutorial-1"] == BenchConfig("tutorial-1", 7, 64, 300, 100)
    assert grid["tutorial-2"].bidirectional and grid["tutorial-2"].num_layers == 2
    assert grid["tagger-packed"].lengths == (10, 40)
    assert grid["speech-proj"].proj_size == 128
    groups = {name: c.group for name, c in grid.items()}
    assert [n for n, g in groups.items() if g == "latency"] == [
        "tutorial-2",
        "sensor",
        "stream-128",
    ]
    assert [n for n, g in groups.items() if g == "packed+proj"] == ["tagger-packed", "speech-proj"]


def test_default_grid_is_the_shared_one_in_a_checkout() -> None:
    root = configs.repo_root()
    assert root is not None
    shared = root.parent / "shared" / "bench" / "grid.json"
    packaged = resources.files("lstmkit").joinpath("data", "grid.json")
    assert configs.default_grid() == (shared if shared.is_file() else packaged)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "a", "seq_len": 2, "batch": 1, "input_size": 3, "hidden": 4}, "unknown keys"),
        ({"name": "a", "seq_len": 2, "batch": 1, "input_size": 3, "hidden_size": 4,
          "dtype": "float64"}, "only float32"),
        ({"name": "a", "seq_len": 2, "batch": 1, "input_size": 3, "hidden_size": 4,
          "lengths": [1, 2]}, "lengths is"),
        ({"name": "a", "seq_len": 2, "batch": 1, "input_size": 3, "hidden_size": 4,
          "lengths": {"min": 1, "max": 3}}, "max <= seq_len"),
        ({"name": "a", "seq_len": 0, "batch": 1, "input_size": 3, "hidden_size": 4},
         "seq_len must be a positive int"),
    ],
)  # fmt: skip
def test_grid_rejects_bad_entries(tmp_path: Path, entry: dict, message: str) -> None:
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"configs": [entry]}))
    with pytest.raises(ValueError, match=message):
        configs.load_grid(path)


def test_grid_rejects_duplicate_names(tmp_path: Path) -> None:
    entry = {"name": "a", "seq_len": 2, "batch": 1, "input_size": 3, "hidden_size": 4}
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"configs": [entry, entry]}))
    with pytest.raises(ValueError, match="unique"):
        configs.load_grid(path)


def test_select_keeps_the_order_given_and_names_the_known_configs() -> None:
    grid = shipped_grid()
    assert [c.name for c in configs.select(grid, ["wide", "sensor"])] == ["wide", "sensor"]
    with pytest.raises(ValueError, match="tutorial-1"):
        configs.select(grid, ["no-such-config"])


def test_parse_shape() -> None:
    config = configs.parse_shape("100, 8,128,128,layers=2,bi,proj=64,lengths=10:100,latency")
    assert config == BenchConfig(
        "100,8,128,128,layers=2,bi,proj=64,lengths=10:100,latency",
        100, 8, 128, 128, num_layers=2, bidirectional=True, proj_size=64, latency=True,
        lengths=(10, 100),
    )  # fmt: skip
    assert configs.parse_shape("7,64,300,100") == BenchConfig("7,64,300,100", 7, 64, 300, 100)
    for bad in ("7,64,300", "7,64,300,100,bidirectional", "7,64,300,100,layers=x"):
        with pytest.raises(ValueError, match="L,N,H_in,H"):
            configs.parse_shape(bad)
    with pytest.raises(ValueError, match="proj_size"):
        configs.parse_shape("7,64,300,100,proj=100")


def test_bad_shape_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        runner.main(["--shape", "7,64,300"])
    assert exit_info.value.code == 2
    assert "L,N,H_in,H" in capsys.readouterr().err


def test_unknown_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--config", "no-such-config"]) == 2
    assert "known: tutorial-1" in capsys.readouterr().err


def test_forward_flops() -> None:
    assert BenchConfig("a", 7, 64, 300, 100).forward_flops() == 2 * 4 * 100 * 400 * 7 * 64
    proj = BenchConfig("p", 10, 2, 8, 16, num_layers=2, bidirectional=True, proj_size=4)
    layer0 = 2 * 4 * 16 * (8 + 4) + 2 * 16 * 4
    layer1 = 2 * 4 * 16 * (2 * 4 + 4) + 2 * 16 * 4
    assert proj.forward_flops() == 2 * (layer0 + layer1) * 10 * 2
    packed = BenchConfig("k", 5, 5, 3, 4, lengths=(1, 5))
    assert packed.forward_flops() == 2 * 4 * 4 * 7 * (1 + 2 + 3 + 4 + 5)


# --- the packed batch -------------------------------------------------------------------------


def test_packed_lengths_follow_the_grid_definition() -> None:
    config = {c.name: c for c in shipped_grid()}["tagger-packed"]
    evenly = torch.linspace(10, 40, 32).round().long()
    torch.manual_seed(0)
    shuffled = evenly[torch.randperm(32)]
    lengths = configs.packed_lengths(config)
    assert torch.equal(lengths, shuffled)
    assert torch.equal(lengths.sort().values, evenly)
    assert (int(lengths.min()), int(lengths.max())) == (10, 40)
    assert not torch.equal(lengths, evenly), "the lengths are shuffled"
    small = BenchConfig("s", 5, 5, 3, 4, lengths=(1, 5))
    assert sorted(configs.packed_lengths(small).tolist()) == [1, 2, 3, 4, 5]


def test_packed_input_is_the_seeded_batch_packed_unsorted() -> None:
    config = {c.name: c for c in shipped_grid()}["tagger-packed"]
    batch = configs.make_input(config)
    assert isinstance(batch, PackedSequence)
    assert batch.sorted_indices is not None, "enforce_sorted=False keeps the batch order"
    padded, lengths = pad_packed_sequence(batch, total_length=config.seq_len)
    assert torch.equal(lengths, configs.packed_lengths(config))
    dense = configs.make_input(BenchConfig("d", 40, 32, 100, 128))
    assert isinstance(dense, Tensor)
    mask = torch.arange(40).unsqueeze(1) < lengths  # (L, N)
    assert torch.equal(padded[mask], dense[mask])


# --- the check gates the timing ---------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_PACKED], ids=lambda c: c.name)
@pytest.mark.parametrize("mode", runner.MODES)
def test_lstmkit_passes_the_check(config: BenchConfig, mode: str) -> None:
    torch.manual_seed(0)
    oracle = nn.LSTM(**config.lstm_kwargs())
    candidate = runner.make_lstmkit(config, oracle)
    assert check(mode, oracle, candidate, configs.make_input(config)) is None
    assert all(p.grad is None for p in candidate.parameters())


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.usefixtures("no_timing")
def test_wrong_values_are_not_timed(mode: str) -> None:
    row = runner.bench_config(TINY, mode, TWO_SAMPLES, perturbed("value"))
    assert row.failure is not None and row.failure.startswith("output:")
    assert row.torch is None and row.lstmkit is None and row.ratio is None


@pytest.mark.usefixtures("no_timing")
def test_wrong_gradients_are_not_timed() -> None:
    row = runner.bench_config(TINY_PACKED, "training", TWO_SAMPLES, perturbed("grad"))
    assert row.failure is not None and row.failure.startswith("grad ")


def test_right_values_with_wrong_gradients_pass_inference() -> None:
    row = runner.bench_config(TINY, "inference", TWO_SAMPLES, perturbed("grad"))
    assert row.failure is None and row.ratio is not None


@pytest.mark.usefixtures("no_timing")
def test_a_candidate_that_raises_is_not_timed() -> None:
    row = runner.bench_config(TINY, "inference", TWO_SAMPLES, raising)
    assert row.failure == "forward raised RuntimeError: no kernel for this shape"


@pytest.mark.usefixtures("no_timing")
def test_cli_marks_a_failing_config_and_exits_non_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    forward = lstmkit.LSTM.forward

    def wrong(self: lstmkit.LSTM, *args: object, **kwargs: object) -> object:
        output, states = forward(self, *args, **kwargs)
        return output + 1, states

    monkeypatch.setattr(lstmkit.LSTM, "forward", wrong)
    path = tmp_path / "out.csv"
    argv = ["--shape", "4,3,5,6", "--quick", "--peak-size", "32", "--csv", str(path)]
    assert runner.main(argv) == 1
    assert "FAILED output:" in capsys.readouterr().out
    with path.open() as file:
        rows = list(csv.DictReader(file))
    assert [(r["mode"], r["check"]) for r in rows] == [
        ("inference", "FAILED"),
        ("training", "FAILED"),
    ]
    assert all(r["torch_p50_ms"] == "" and r["ratio"] == "" for r in rows)


# --- output -----------------------------------------------------------------------------------


def test_csv_has_the_documented_columns(tmp_path: Path) -> None:
    path = tmp_path / "out.csv"
    argv = ["--shape", "4,3,5,6", "--shape", "5,4,3,4,bi,proj=2,lengths=2:5", "--quick",
            "--repeats", "2", "--peak-size", "32", "--csv", str(path)]  # fmt: skip
    assert runner.main(argv) == 0
    with path.open() as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames or ()) == report.CSV_COLUMNS
        rows = list(reader)
    assert [(r["config"], r["mode"]) for r in rows] == [
        ("4,3,5,6", "inference"),
        ("4,3,5,6", "training"),
        ("5,4,3,4,bi,proj=2,lengths=2:5", "inference"),
        ("5,4,3,4,bi,proj=2,lengths=2:5", "training"),
        ("5,4,3,4,bi,proj=2,lengths=2:5 lengths=", "inference"),
        ("5,4,3,4,bi,proj=2,lengths=2:5 lengths=", "training"),
    ]
    for row in rows:
        assert row["check"] == "ok" and row["repeats"] == "2" and row["threads"]
        assert row["backend"] in lstmkit.backends.PREFERENCE
        for column in ("torch_p20_ms", "torch_p50_ms", "lstmkit_p80_ms", "ratio", "gflop"):
            assert float(row[column]) > 0
    documented = README.read_text()
    assert [c for c in report.CSV_COLUMNS if f"`{c}`" not in documented] == []


def test_samples_alternate_the_candidates() -> None:
    calls: list[str] = []
    candidates = {name: (lambda name=name: calls.append(name)) for name in ("a", "b")}
    budget = Budget(0.0, 1, 1, repeats=3, min_sample_s=0.0, warmup_s=0.0, warmup_calls=1)
    result = timing.time_interleaved(candidates, budget)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then a b, b a, a b
    assert [len(t.per_call) for t in result.values()] == [3, 3]


def test_percentiles_interpolate_linearly() -> None:
    t = Timing((5.0, 1.0, 2.0, 3.0, 4.0, 6.0), calls=1)
    assert (t.p20, t.p50, t.p80) == (2.0, 3.5, 5.0)
    assert timing.percentile([7.0], 80) == 7.0


def _row(config: BenchConfig, ratio: float, mode: str = "inference") -> report.Row:
    return report.Row(config, mode, "cpu", None, Timing((ratio,), 1), Timing((1.0,), 1))


def test_summary_names_the_missed_targets() -> None:
    env = report.Environment(
        "2026-01-01 00:00:00", "cpu", 2, 2, "t", "p", "l", "", "g", 100.0, load=0.1
    )
    dense = [_row(BenchConfig(n, 10, 8, 16, 16), r) for n, r in (("a", 2.0), ("b", 1.2))]
    exception = _row(BenchConfig("stream-512", 100, 1, 256, 512), 0.96)
    latency = _row(BenchConfig("l", 5, 3, 10, 20, latency=True), 4.0)
    failed = report.Row(BenchConfig("p", 5, 3, 10, 20, proj_size=4), "inference", "", "output: x")
    lines = report.summary_lines(env, [*dense, exception, latency, failed])
    text = "\n".join(lines)
    assert "stream-512 >= 0.95x" in text
    dense_line = next(line for line in lines if "dense" in line)
    assert dense_line.endswith("NOT MET: geomean 1.32x"), dense_line
    assert next(line for line in lines if "latency" in line).endswith("NOT MET: l 4.00x")
    assert next(line for line in lines if "packed+proj" in line).endswith(
        "NOT MET: p failed its check"
    )
    assert "largest config stream-512 inference" in text


def test_a_busy_machine_is_announced() -> None:
    quiet = report.Environment("d", "cpu", 2, 2, "t", "p", "l", "", "g", 100.0, load=0.4)
    assert report.busy_warning(quiet) is None
    busy = report.Environment("d", "cpu", 2, 2, "t", "p", "l", "", "g", 100.0, load=3.0)
    assert "load average 3.0 on 2 cores" in (report.busy_warning(busy) or "")


# --- lengths= rows of packed configurations ---------------------------------------------------


@pytest.mark.parametrize("mode", runner.MODES)
def test_lengths_rows_are_checked_against_the_packed_oracle(mode: str) -> None:
    row = bench_lengths(
        TINY_PACKED, mode, TWO_SAMPLES, runner.make_lstmkit, runner.step, runner.backend_used
    )
    assert row.failure is None, row.failure
    assert row.config.name == "tiny-packed lengths="
    assert row.lstmkit is not None and row.torch is not None


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.usefixtures("no_timing")
def test_wrong_lengths_rows_are_not_timed(mode: str) -> None:
    row = bench_lengths(
        TINY_PACKED, mode, TWO_SAMPLES, perturbed("value"), runner.step, runner.backend_used
    )
    assert row.failure is not None and row.failure.startswith("output")


def test_cap_reruns_the_benchmark_capped_in_a_fresh_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = []

    class Done:
        returncode = 0

    def fake_run(command: list[str], env: dict[str, str]) -> Done:
        started.append((command, env))
        return Done()

    monkeypatch.setattr(runner.subprocess, "run", fake_run)
    argv = ["--cap", "avx2", "--config", "tagger", "--quick"]
    assert runner.main(argv) == 0
    ((command, env),) = started
    assert command[1:] == ["-m", "lstmkit.bench", "--config", "tagger", "--quick"]
    for name, value in runner.CAPS["avx2"].items():
        assert env[name] == value
    assert env["LSTMKIT_CPU_TARGET"] == "avx2" and env["ONEDNN_MAX_CPU_ISA"] == "AVX2"


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.parametrize(
    ("dtype", "autocast"),
    [(torch.bfloat16, False), (torch.float16, False), (torch.bfloat16, True)],
    ids=["bf16", "fp16", "autocast-bf16"],
)
@pytest.mark.parametrize("config", [TINY, TINY_PACKED], ids=["dense", "packed"])
def test_half_rows_pass_the_half_check(config, dtype, autocast: bool, mode: str) -> None:
    row = runner.bench_config(config, mode, TWO_SAMPLES, runner.make_lstmkit, dtype, autocast)
    assert row.failure is None and row.ratio is not None
    assert row.backend == "cpu"


@pytest.mark.parametrize("mode", runner.MODES)
@pytest.mark.usefixtures("no_timing")
def test_wrong_half_values_are_not_timed(mode: str) -> None:
    """Off by a tenth: far past bfloat16's rounding, so the half check refuses it."""
    row = runner.bench_config(TINY, mode, TWO_SAMPLES, perturbed("value", 1.1), torch.bfloat16)
    assert row.failure is not None and row.failure.startswith("output:")


def test_autocast_needs_a_half_dtype(capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.main(["--autocast", "--quick"]) == 2
    assert "--autocast needs --dtype bfloat16 or float16" in capsys.readouterr().err
