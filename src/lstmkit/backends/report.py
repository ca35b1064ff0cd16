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
    lines += [
        "cpu bfloat16 and float16 (modules of those dtypes, and torch.autocast): stored so and "
        "computed in float32 (lstmkit.precision), so they run as float32 calls above; the cpu "
        "kernels have no bf16 or fp16 products yet, whatever the CPU has (this one: "
        f"{_half_features()})",
        "",
    ]
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


def _half_features() -> str:
    from lstmkit.backends.cpu import machine

    have = [
        f
        for f in ("avx512_bf16", "amx_bf16", "avx512_fp16", "bf16", "fphp")
        if f in machine.machine().features
    ]
    return ", ".join(have) if have else "no bf16 or fp16 arithmetic"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    print("\n".join(report_lines()))
    return 0
