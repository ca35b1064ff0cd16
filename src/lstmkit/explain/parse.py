"""Reading a configuration as users copy it from their code: ``LSTM(10, 20, num_layers=2)``.

The text is parsed with :mod:`ast` and only literal arguments are accepted; nothing is ever
evaluated, so any string is safe to pass.
"""

from __future__ import annotations

import ast
import dataclasses

from lstmkit.spec import LSTMSpec

# torch.nn.LSTM's arguments in positional order (device and dtype do not change any shape);
# lstmkit's extras (the other fields of LSTMSpec) are keyword-only.
ARGUMENTS = (
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "dropout",
    "bidirectional",
    "proj_size",
)
SPELLINGS = ("LSTM", "nn.LSTM", "torch.nn.LSTM", "lstmkit.LSTM")
EXAMPLE = "LSTM(10, 20, num_layers=2, bidirectional=True)"


def parse_config(text: str) -> LSTMSpec:
    """The configuration written as ``LSTM(...)``, ``nn.LSTM(...)``, ``torch.nn.LSTM(...)``
    or ``lstmkit.LSTM(...)`` with literal arguments, e.g. a module's ``repr``.

    Raises:
        ValueError: the text is not such a call, or torch would reject its arguments (the
            message says which and why).
    """
    call = _call(text)
    values: dict[str, object] = {}
    if len(call.args) > len(ARGUMENTS):
        raise ValueError(
            f"{text.strip()!r}: LSTM takes at most {len(ARGUMENTS)} positional arguments "
            f"({', '.join(ARGUMENTS)}), got {len(call.args)}"
        )
    for name, node in zip(ARGUMENTS, call.args):
        values[name] = _literal(node, name, text)
    keywords = [field.name for field in dataclasses.fields(LSTMSpec)]
    for keyword in call.keywords:
        name = keyword.arg
        if name is None or name not in keywords:
            shown = f"**{ast.unparse(keyword.value)}" if name is None else f"{name}="
            raise ValueError(
                f"{text.strip()!r}: {shown} is not an LSTM argument that shapes depend on; "
                f"known: {', '.join(keywords)}"
            )
        if name in values:
            raise ValueError(f"{text.strip()!r}: {name} is given twice")
        values[name] = _literal(keyword.value, name, text)
    missing = [name for name in ARGUMENTS[:2] if name not in values]
    if missing:
        raise ValueError(f"{text.strip()!r}: {' and '.join(missing)} must be given, e.g. {EXAMPLE}")
    try:
        return LSTMSpec(**values)  # type: ignore[arg-type]
    except (TypeError, ValueError) as error:
        raise ValueError(f"{text.strip()!r}: {error}") from error


def _call(text: str) -> ast.Call:
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as error:
        raise ValueError(
            f"{text.strip()!r} is not an LSTM configuration: expected e.g. {EXAMPLE} ({error.msg})"
        ) from error
    call = tree.body
    if not isinstance(call, ast.Call) or ast.unparse(call.func) not in SPELLINGS:
        raise ValueError(
            f"{text.strip()!r} is not an LSTM configuration: expected a call spelled "
            f"{', '.join(s + '(...)' for s in SPELLINGS)}, e.g. {EXAMPLE}"
        )
    return call


def _literal(node: ast.expr, name: str, text: str) -> object:
    try:
        return ast.literal_eval(node)
    except ValueError as error:
        raise ValueError(
            f"{text.strip()!r}: {name}={ast.unparse(node)} is not a literal; write the value "
            f"itself (a number, True or False), as the module's repr shows it"
        ) from error
