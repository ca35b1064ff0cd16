"""The correctness check a candidate must pass before it is timed.

The candidate and ``torch.nn.LSTM`` hold the same parameters and run on the same batch. For
inference (eval mode, ``no_grad``) the output, h_n and c_n must match; for a training step
(train mode) also the gradient of the input and of every parameter, under a loss that weights
every output and state element differently so that no gradient hides behind a symmetric sum.

:func:`check_values` is a looser check for modules whose gradients cannot be compared (random
masks, or float32 rounding far larger than the tolerance): values, then the gradients' names,
shapes and finiteness.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

Batch = Tensor | PackedSequence
Outputs = tuple[Batch, Tensor, Tensor]


@dataclass(frozen=True)
class Tolerance:
    """``|actual - expected| <= atol + rtol * |expected|``, element by element."""

    atol: float
    rtol: float


# fp32, the semantics of the test suite's table (tests/compare.py): both sides compute the same
# sums in a different order, so values differ by a few ulps per dependent operation; gradients
# accumulate over every step and layer, so they get a looser bound.
TOLERANCES: dict[str, Tolerance] = {
    "value": Tolerance(atol=2e-5, rtol=1e-4),
    "grad": Tolerance(atol=5e-5, rtol=2e-4),
}


def mismatch(
    actual: object,
    expected: Tensor,
    what: str,
    kind: str = "value",
    tolerance: Tolerance | None = None,
) -> str | None:
    """``None`` if ``actual`` matches ``expected`` within ``tolerance`` (default
    ``TOLERANCES[kind]``), else why not."""
    if not isinstance(actual, Tensor):
        return f"{what} is a {type(actual).__name__}, not a tensor"
    if actual.shape != expected.shape:
        return f"{what} has shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if actual.dtype != expected.dtype:
        return f"{what} has dtype {actual.dtype}, expected {expected.dtype}"
    tol = TOLERANCES[kind] if tolerance is None else tolerance
    actual, expected = actual.detach(), expected.detach()
    close = torch.isclose(actual, expected, rtol=tol.rtol, atol=tol.atol)
    if bool(close.all()):
        return None
    excess = (actual - expected).abs() - tol.rtol * expected.abs()
    # NaN and inf differences rank as the worst, so the message shows one of them.
    excess = torch.where(close, -torch.inf, excess.nan_to_num(torch.inf, torch.inf, torch.inf))
    worst = int(excess.argmax())
    return (
        f"{what}: {int((~close).sum())} of {close.numel()} values outside "
        f"|diff| <= {tol.atol:g} + {tol.rtol:g} * |expected|; worst: "
        f"{actual.flatten()[worst].item():.6g} where {expected.flatten()[worst].item():.6g} "
        f"was expected"
    )


def check(mode: str, oracle: nn.Module, candidate: nn.Module, batch: Batch) -> str | None:
    """``None`` if ``candidate`` matches ``oracle`` on ``batch`` in ``mode``, else why not.

    Args:
        mode: ``"inference"`` or ``"training"``.
        oracle: the ``torch.nn.LSTM`` that defines the right answer.
        candidate: a module with the oracle's parameter names and values.
        batch: an (L, N, H_in) tensor or a PackedSequence.

    Both modules are left with no gradients. The reason is one line (it goes into a table).
    """
    return _in_mode(
        mode,
        oracle,
        candidate,
        lambda: _check_inference(oracle, candidate, batch),
        lambda: _check_training(oracle, candidate, batch),
    )


def check_values(
    mode: str,
    oracle: nn.Module,
    candidate: nn.Module,
    batch: Batch,
    tolerance: Tolerance,
    noisy: bool = False,
) -> str | None:
    """A looser check, for a candidate whose gradients cannot be compared with the oracle's:
    ``None`` if it passes, else why not (one line).

    Inference (eval mode, ``no_grad``): output, h_n and c_n within ``tolerance``. Training
    (train mode): the same values, unless ``noisy`` (each module draws its own random masks, so
    values differ); then a backward pass of both, and the gradients of the input and of every
    parameter must have the oracle's names, shapes and dtypes and be finite. Both modules are
    left with no gradients.
    """
    return _in_mode(
        mode,
        oracle,
        candidate,
        lambda: _check_inference(oracle, candidate, batch, tolerance),
        lambda: _check_training_values(oracle, candidate, batch, None if noisy else tolerance),
    )


def _in_mode(
    mode: str,
    oracle: nn.Module,
    candidate: nn.Module,
    inference: Callable[[], str | None],
    training: Callable[[], str | None],
) -> str | None:
    """Run the check for ``mode`` (training leaves both modules without gradients) and give
    its verdict on one line."""
    if mode == "inference":
        problem = inference()
    elif mode == "training":
        try:
            problem = training()
        finally:
            oracle.zero_grad(set_to_none=True)
            candidate.zero_grad(set_to_none=True)
    else:
        raise ValueError(f"mode is 'inference' or 'training', got {mode!r}")
    return None if problem is None else " ".join(problem.split())


def _check_training_values(
    oracle: nn.Module, candidate: nn.Module, batch: Batch, tolerance: Tolerance | None
) -> str | None:
    oracle.train()
    candidate.train()
    oracle_batch, oracle_leaf = _leaf_batch(batch)
    candidate_batch, candidate_leaf = _leaf_batch(batch)
    expected = _forward(oracle, oracle_batch)
    torch.stack([t.sum() for t in _tensors(expected)]).sum().backward()
    actual = _forward_candidate(candidate, candidate_batch)
    if isinstance(actual, str):
        return actual
    names = ("output", "h_n", "c_n")
    pairs = list(zip(names, _tensors(actual), _tensors(expected), strict=True))
    if tolerance is not None:
        problem = _first(_compare_outputs(actual, expected, tolerance))
        if problem is not None:
            return problem
    try:
        torch.stack([t.sum() for t in _tensors(actual)]).sum().backward()
    except Exception as error:  # a broken backward is a failed check, not a crashed run
        return f"backward raised {type(error).__name__}: {error}"
    pairs.append(("grad input", candidate_leaf.grad, oracle_leaf.grad))
    oracle_params = dict(oracle.named_parameters())
    candidate_params = dict(candidate.named_parameters())
    if sorted(candidate_params) != sorted(oracle_params):
        return f"parameters {sorted(candidate_params)}, expected {sorted(oracle_params)}"
    for name, param in oracle_params.items():
        pairs.append((f"grad {name}", candidate_params[name].grad, param.grad))
    return _first([_unlike(actual_t, expected_t, what) for what, actual_t, expected_t in pairs])


def _unlike(actual: object, expected: Tensor | None, what: str) -> str | None:
    """Why ``actual`` is not a finite tensor of ``expected``'s shape and dtype, or ``None``."""
    if not isinstance(actual, Tensor) or expected is None:
        return f"{what} is a {type(actual).__name__}, expected a tensor"
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        return (
            f"{what} is {tuple(actual.shape)} {actual.dtype}, expected "
            f"{tuple(expected.shape)} {expected.dtype}"
        )
    finite = torch.isfinite(actual)
    if not bool(finite.all()):
        return f"{what}: {int((~finite).sum())} of {finite.numel()} values are not finite"
    return None


def _check_inference(
    oracle: nn.Module, candidate: nn.Module, batch: Batch, tolerance: Tolerance | None = None
) -> str | None:
    oracle.eval()
    candidate.eval()
    with torch.no_grad():
        expected = _forward(oracle, batch)
        actual = _forward_candidate(candidate, batch)
    if isinstance(actual, str):
        return actual
    return _first(_compare_outputs(actual, expected, tolerance))


def _check_training(oracle: nn.Module, candidate: nn.Module, batch: Batch) -> str | None:
    oracle.train()
    candidate.train()
    oracle_batch, oracle_leaf = _leaf_batch(batch)
    candidate_batch, candidate_leaf = _leaf_batch(batch)
    expected = _forward(oracle, oracle_batch)
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=generator) for t in _tensors(expected)]
    _weighted_sum(expected, weights).backward()
    actual = _forward_candidate(candidate, candidate_batch)
    if isinstance(actual, str):
        return actual
    problem = _first(_compare_outputs(actual, expected))
    if problem is not None:
        return problem
    try:
        _weighted_sum(actual, weights).backward()
    except Exception as error:  # a broken backward is a failed check, not a crashed run
        return f"backward raised {type(error).__name__}: {error}"
    problems = [mismatch(candidate_leaf.grad, oracle_leaf.grad, "grad input", "grad")]
    oracle_params = dict(oracle.named_parameters())
    candidate_params = dict(candidate.named_parameters())
    if sorted(candidate_params) != sorted(oracle_params):
        problems.append(f"parameters {sorted(candidate_params)}, expected {sorted(oracle_params)}")
    for name, param in oracle_params.items():
        if name in candidate_params:
            got = candidate_params[name].grad
            problems.append(mismatch(got, param.grad, f"grad {name}", "grad"))
    return _first(problems)


def _forward(module: nn.Module, batch: Batch) -> Outputs:
    output, (h_n, c_n) = module(batch)
    return output, h_n, c_n


def _forward_candidate(candidate: nn.Module, batch: Batch) -> Outputs | str:
    try:
        return _forward(candidate, batch)
    except Exception as error:  # a candidate that cannot run is a failed check, not a crash
        return f"forward raised {type(error).__name__}: {error}"


def _leaf_batch(batch: Batch) -> tuple[Batch, Tensor]:
    """A copy of ``batch`` whose data is a fresh leaf that records its gradient."""
    if isinstance(batch, PackedSequence):
        data = batch.data.detach().clone().requires_grad_()
        return PackedSequence(
            data, batch.batch_sizes, batch.sorted_indices, batch.unsorted_indices
        ), data
    leaf = batch.detach().clone().requires_grad_()
    return leaf, leaf


def _tensors(outputs: Outputs) -> list[Tensor]:
    output, h_n, c_n = outputs
    data = output.data if isinstance(output, PackedSequence) else output
    return [data, h_n, c_n]


def _weighted_sum(outputs: Outputs, weights: list[Tensor]) -> Tensor:
    terms = [(t * w).sum() for t, w in zip(_tensors(outputs), weights, strict=True)]
    return torch.stack(terms).sum()


def _compare_outputs(
    actual: Outputs, expected: Outputs, tolerance: Tolerance | None = None
) -> list[str | None]:
    problems: list[str | None] = []
    # A packed output must keep the input's order as well as its values.
    if isinstance(expected[0], PackedSequence):
        got = actual[0]
        if not isinstance(got, PackedSequence):
            return [f"output is a {type(got).__name__}, expected a PackedSequence"]
        for field in ("batch_sizes", "sorted_indices", "unsorted_indices"):
            if not _same_index(getattr(got, field), getattr(expected[0], field)):
                problems.append(f"output PackedSequence has different {field}")
    names = ("output", "h_n", "c_n")
    for name, got_tensor, want in zip(names, _tensors(actual), _tensors(expected), strict=True):
        problems.append(mismatch(got_tensor, want, name, tolerance=tolerance))
    return problems


def _same_index(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def _first(problems: list[str | None]) -> str | None:
    """The first problem, with a count of the others."""
    found = [p for p in problems if p is not None]
    if not found:
        return None
    more = f" (and {len(found) - 1} more mismatches)" if len(found) > 1 else ""
    return found[0] + more


def check_half(
    mode: str,
    oracle: nn.Module,
    candidate: nn.Module,
    batch: Batch,
    dtype: torch.dtype,
    autocast: bool,
) -> str | None:
    """The check of a bfloat16 or float16 run (modules of ``dtype``, or float32 modules under
    ``torch.autocast`` to it): ``None`` if the candidate passes, else why not (one line).

    The rule of lstmkit's tests (tests/compare.py): against a float64 run of the same numbers
    (the parameters and input rounded to ``dtype``), the candidate's largest error in every
    output, state and (training) gradient is at most torch's own run's by a quarter, plus one
    rounding in ``dtype`` of the largest value; dtypes must be torch's.
    """
    truth = copy.deepcopy(oracle)
    with torch.no_grad():
        for param in truth.parameters():
            param.data = param.data.to(dtype).double()
    exact = cast_batch(batch, lambda t: t.to(dtype).double())
    training = mode == "training"
    runs = []
    for module, inputs, cast in ((truth, exact, False), (oracle, batch, autocast),
                                 (candidate, batch, autocast)):  # fmt: skip
        module.train(training)
        try:
            runs.append(_half_run(module, inputs, dtype, cast, training))
        except Exception as error:  # a side that cannot run is a failed check, not a crash
            if module is truth:
                raise
            who = "torch.nn.LSTM" if module is oracle else "the candidate"
            return f"{who} raised {type(error).__name__}: {error}"
        finally:
            module.zero_grad(set_to_none=True)
    (names, expected), (_, theirs), (_, ours) = runs
    eps = torch.finfo(dtype).eps
    problems: list[str | None] = []
    for name, t, y, a in zip(names, expected, theirs, ours, strict=True):
        if a is None or y is None or a.dtype != y.dtype or a.shape != y.shape:
            problems.append(f"{name}: {_describe(a)}, torch gives {_describe(y)}")
            continue
        truth_t, scale = t.double(), float(t.abs().max()) if t.numel() else 0.0
        error = float((a.double() - truth_t).abs().max()) if t.numel() else 0.0
        torch_error = float((y.double() - truth_t).abs().max()) if t.numel() else 0.0
        bound = 1.25 * torch_error + eps * scale + 1e-6
        if not error <= bound:
            problems.append(
                f"{name}: error {error:.3g} against float64, more than {bound:.3g} (torch's "
                f"{torch_error:.3g}, largest value {scale:.3g})"
            )
    return _first(problems)


def _describe(t: Tensor | None) -> str:
    return "nothing" if t is None else f"{tuple(t.shape)} {t.dtype}"


def cast_batch(batch: Batch, cast: Callable[[Tensor], Tensor]) -> Batch:
    """``batch`` with ``cast`` applied to its tensor (a PackedSequence's data)."""
    if isinstance(batch, PackedSequence):
        order = (batch.batch_sizes, batch.sorted_indices, batch.unsorted_indices)
        return PackedSequence(cast(batch.data), *order)
    return cast(batch)


def _half_run(
    module: nn.Module, batch: Batch, dtype: torch.dtype, autocast: bool, training: bool
) -> tuple[list[str], list[Tensor | None]]:
    """Names and values of the outputs and, in training, of the gradients of the input and of
    every parameter under a fixed weighting of the outputs (rounded to ``dtype``, so that
    every run weights with the same numbers)."""
    leaf_batch, leaf = _leaf_batch(batch)
    with torch.set_grad_enabled(training), torch.autocast("cpu", dtype=dtype, enabled=autocast):
        outputs = _forward(module, leaf_batch)
    values = [t.detach() for t in _tensors(outputs)]
    names = ["output", "h_n", "c_n"]
    if not training:
        return names, values
    generator = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=generator).to(dtype).to(t.dtype) for t in values]
    _weighted_sum(outputs, weights).backward()
    params = dict(module.named_parameters())
    names += ["grad input"] + [f"grad {name}" for name in params]
    return names, values + [leaf.grad] + [p.grad for p in params.values()]
