"""``lstmkit warmup``: every backend's one-time work (such as compiling a kernel), done now."""

from __future__ import annotations

import argparse
import time

from lstmkit import backends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


def run(args: argparse.Namespace) -> int:
    for name in backends.PREFERENCE:
        start = time.perf_counter()
        done = backends.get(name).warmup()
        print(f"{name}: {done} ({time.perf_counter() - start:.2f} s)")
    return 0
