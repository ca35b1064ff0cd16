"""``lstmkit backends``: every backend, whether it can run a typical call, and why not."""

from __future__ import annotations

import argparse

import torch

from lstmkit import backends


def report_lines() -> list[str]:
    lines = []
    forced = backends.forced_name()
    if forced:
        lines.append(f"{backends.BACKEND_ENV}={forced} forces the {forced!r} backend")
    for dtype in (torch.float32, torch.float64):
        for grad in (False, True):
            request = backends.Request("cpu", dtype, grad, False, False, False)
            lines.append(
                f"cpu {str(dtype).replace('torch.', '')}, {'training' if grad else 'inference'}:"
            )
            for name in backends.PREFERENCE:
                backend = backends.get(name)
                reason = backend.unavailable_reason(request)
                status = "can run" if reason is None else f"cannot run: {reason}"
                lines.append(f"  {name:<10} {status}")
    lines.append("")
    for name in backends.PREFERENCE:
        backend = backends.get(name)
        lines.append(f"{name}: {backend.description}")
        lines += [f"  {line}" for line in backend.details()]
        variants = ", ".join(sorted(backend.variants)) or "none yet (calls using one go elsewhere)"
        lines.append(f"  step variants: {variants}")
    last = backends.last_choice()
    if last is not None:
        lines += ["", f"last call in this thread: {last}"]
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    print("\n".join(report_lines()))
    return 0
