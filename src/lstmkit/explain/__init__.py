"""``lstmkit explain``: every shape, parameter and pitfall of an LSTM configuration, checked.

``explain("LSTM(10, 20, num_layers=2, bidirectional=True)")`` returns an :class:`Explanation`:
``str()`` of it is the report, ``.to_dict()`` the same as JSON-ready data, and
:func:`lstmkit.explain.diagram.write` draws the unrolled network. Every statement in it is
verified on a live module (the "live check") unless ``check=False``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import nn

from lstmkit.explain import live, pitfalls, shapes
from lstmkit.explain.model import Batch, Check, Explanation
from lstmkit.explain.parse import parse_config
from lstmkit.spec import LSTMSpec

DEFAULT_CONFIG = "LSTM(10, 20, num_layers=2, bidirectional=True)"
EXAMPLE_STEPS, EXAMPLE_BATCH = 5, 3  # the tutorial's input, (5, 3, 10)


def explain(
    config: str | LSTMSpec | nn.LSTM = DEFAULT_CONFIG,
    input: Sequence[int] | None = None,
    *,
    lengths: Sequence[int] | None = None,
    batch_first: bool = False,
    unbatched: bool = False,
    check: bool = True,
    seed: int = 0,
) -> Explanation:
    """Explain an LSTM configuration for one input.

    Args:
        config: ``"LSTM(10, 20, num_layers=2)"`` as copied from code or a ``repr`` (also
            ``nn.LSTM(...)``, ``torch.nn.LSTM(...)``, ``lstmkit.LSTM(...)``; parsed, never
            evaluated), an :class:`~lstmkit.LSTMSpec`, or an ``lstmkit.LSTM`` /
            ``torch.nn.LSTM`` module.
        input: the input's shape in the module's layout: (L, N, H_in), (N, L, H_in) with
            batch_first, or (L, H_in) for one sequence. Default: L = 5, N = 3 (an example).
        lengths: each sequence's valid steps, for a padded batch (explained packed).
        batch_first: the module has ``batch_first=True`` (also read from ``config``).
        unbatched: explain unbatched input (L, H_in).
        check: run the live check; otherwise every statement is marked "not run".
        seed: the live check's random seed.

    Raises:
        ValueError: the configuration or the input is not one that ``torch.nn.LSTM`` takes;
            the message says why.
    """
    spec = _spec(config)
    if batch_first and not spec.batch_first:
        spec = dataclasses.replace(spec, batch_first=True)
    batch = _batch(spec, input, lengths, unbatched)
    with live.one_thread():
        checker = live.Checker(live.run(spec, batch, seed) if check else None)
        setting = shapes.Setting(spec, batch, checker)
        table, shape_checks = shapes.shapes(setting)
        described, notes = live.build(spec, device="meta")
        parameters, parameter_checks = shapes.parameters(setting, described)
        applying, others = pitfalls.pitfalls(setting)
    return Explanation(
        spec=spec,
        input=batch,
        shapes=table,
        shape_checks=shape_checks,
        parameters=parameters,
        parameter_checks=parameter_checks,
        state_rows=shapes.state_rows(setting),
        pitfalls=applying,
        other_pitfalls=others,
        script=live.script(spec, batch, seed),
        seed=seed,
        notes=notes,
    )


def _spec(config: str | LSTMSpec | nn.LSTM) -> LSTMSpec:
    if isinstance(config, LSTMSpec):
        return config
    if isinstance(config, str):
        return parse_config(config)
    if isinstance(config, nn.Module) and hasattr(config, "hidden_size"):
        # torch.nn.LSTM lacks lstmkit's extras: they keep their defaults.
        fields = dataclasses.fields(LSTMSpec)
        return LSTMSpec(**{f.name: getattr(config, f.name, f.default) for f in fields})
    raise TypeError(
        f"explain takes a configuration string such as {DEFAULT_CONFIG!r}, an LSTMSpec or an "
        f"LSTM module, got {type(config).__name__}"
    )


def _batch(
    spec: LSTMSpec,
    shape: Sequence[int] | None,
    lengths: Sequence[int] | None,
    unbatched: bool,
) -> Batch:
    """The input, checked the way the module would check it, with teaching messages."""
    given_lengths = None if lengths is None else tuple(int(n) for n in lengths)
    if given_lengths is not None:
        if unbatched:
            raise ValueError("lengths describe a padded batch; unbatched input is one sequence")
        if not given_lengths or min(given_lengths) < 1:
            raise ValueError(
                f"lengths must be one positive number of valid steps per sequence, got "
                f"{list(given_lengths)}"
            )
    if shape is None:
        if given_lengths is not None:
            return Batch(max(given_lengths), len(given_lengths), given_lengths)
        return Batch(EXAMPLE_STEPS, None if unbatched else EXAMPLE_BATCH, given=False)
    sizes = tuple(int(n) for n in shape)
    layout = "(N, L, H_in)" if spec.batch_first else "(L, N, H_in)"
    if len(sizes) not in (2, 3) or (unbatched and len(sizes) == 3) or min(sizes) < 1:
        raise ValueError(
            f"input {sizes}: an LSTM takes 3-D {layout} for a batch or 2-D (L, H_in) for one "
            f"sequence, every size at least 1 [{spec}]"
        )
    if sizes[-1] != spec.input_size:
        transposed = spec.input_size in sizes[:-1]
        raise ValueError(
            f"input {sizes}: the last dimension must be input_size = {spec.input_size} "
            f"features, got {sizes[-1]}"
            + ("; the features seem to be on another axis" if transposed else "")
            + f" [{spec}]"
        )
    if len(sizes) == 2:
        if given_lengths is not None:
            raise ValueError(f"input {sizes} is one sequence (L, H_in); lengths need a batch")
        return Batch(sizes[0], None)
    steps, n = (sizes[1], sizes[0]) if spec.batch_first else (sizes[0], sizes[1])
    if given_lengths is not None and (len(given_lengths) != n or max(given_lengths) > steps):
        raise ValueError(
            f"lengths {list(given_lengths)} do not fit input {sizes} {layout}: one length "
            f"per sequence (N = {n}), each at most L = {steps}"
        )
    return Batch(steps, n, given_lengths)


__all__ = ["DEFAULT_CONFIG", "Batch", "Check", "Explanation", "explain", "parse_config"]
