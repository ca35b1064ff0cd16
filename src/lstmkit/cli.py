"""The ``lstmkit`` command. Each subcommand lives in its own module, imported only when run."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module defining ``add_arguments(parser)`` and ``run(args) -> int``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("lstmkit.demo", "run the tutorial's two examples and check their identities"),
    "backends": ("lstmkit.backends.report", "list the backends and which one each call uses"),
    "warmup": (
        "lstmkit.backends.warmup",
        "do every backend's one-time work (compiling, tuning) now",
    ),
    "tune": (
        "lstmkit.backends.cpu.tuner",
        "measure the cpu kernels' choices on this machine again",
    ),
    "explain": ("lstmkit.explain.cli", "every shape, parameter and pitfall of an LSTM, checked"),
    "bench": ("lstmkit.bench.runner", "check, then time, lstmkit against torch.nn.LSTM"),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lstmkit",
        description="lstmkit: torch.nn.LSTM, exactly, implemented by lstmkit. "
        "With no command, runs the demo.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module=module)
        add_arguments = getattr(importlib.import_module(module), "add_arguments", None)
        if add_arguments is not None:
            add_arguments(sub)
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    return int(importlib.import_module(args.module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
