"""``lstmkit explain``: the command-line face of :func:`lstmkit.explain.explain`."""

from __future__ import annotations

import argparse
import json
import re
import sys

from lstmkit.explain import DEFAULT_CONFIG, explain
from lstmkit.explain.model import FAILED


def _sizes(text: str) -> tuple[int, ...]:
    """``5,3,10``, ``5 3 10``, ``(5, 3, 10)`` or ``5x3x10`` -> (5, 3, 10)."""
    parts = [p for p in re.split(r"[\s,x×()\[\]]+", text.strip()) if p]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected whole numbers like 5,3,10, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=DEFAULT_CONFIG,
        help=f"the LSTM as written in code or printed by repr (default: {DEFAULT_CONFIG!r}); "
        "LSTM(...), nn.LSTM(...), torch.nn.LSTM(...) and lstmkit.LSTM(...) are read, never run",
    )
    parser.add_argument(
        "--input",
        type=_sizes,
        metavar="SHAPE",
        help="the input's shape in the module's layout: L,N,H_in (N,L,H_in with batch_first) "
        "or L,H_in for one sequence (default: 5,3,H_in, an example)",
    )
    parser.add_argument(
        "--lengths",
        type=_sizes,
        metavar="LENGTHS",
        help="each sequence's valid steps in a padded batch, e.g. 5,3,2 (explained packed)",
    )
    parser.add_argument(
        "--batch-first", action="store_true", help="the module has batch_first=True"
    )
    parser.add_argument(
        "--unbatched", action="store_true", help="one sequence, 2-D input (L, H_in)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.add_argument(
        "--diagram",
        metavar="PATH",
        help="also draw the unrolled network to PATH (.svg, or .png with lstmkit[diagram])",
    )
    parser.add_argument(
        "--no-check", action="store_true", help="skip the live check (no module is run)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the live check's seed (default 0)")


def run(args: argparse.Namespace) -> int:
    try:
        explanation = explain(
            args.config,
            args.input,
            lengths=args.lengths,
            batch_first=args.batch_first,
            unbatched=args.unbatched,
            check=not args.no_check,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"lstmkit explain: error: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
    else:
        print(explanation, end="")
    if args.diagram:
        from lstmkit.explain import diagram

        try:
            diagram.write(explanation, args.diagram)
        except (ValueError, ImportError) as error:
            print(f"lstmkit explain: error: {error}", file=sys.stderr)
            return 2
        print(f"diagram written to {args.diagram}", file=sys.stderr)
    return 1 if any(c.status == FAILED for c in explanation.checks) else 0
