"""The machine facts are read from the machine, and the tier follows the CPU's features."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

from lstmkit.backends import report
from lstmkit.backends.cpu import library, machine, tuner

SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")


def sysfs_size(level: int, kinds: tuple[str, ...]) -> int | None:
    for index in SYSFS.glob("index*"):
        if int((index / "level").read_text()) == level and (
            (index / "type").read_text().strip() in kinds
        ):
            return machine._bytes((index / "size").read_text().strip())
    return None


def test_cache_sizes_are_this_machines() -> None:
    facts = machine.read()
    assert facts.cores == len(os.sched_getaffinity(0))
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():  # MemTotal is the same physical memory, less what the kernel holds
        total = int(meminfo.read_text().split("MemTotal:")[1].split()[0]) * 1024
        assert total <= facts.memory < total * 1.1
    if not SYSFS.is_dir():  # then they come from sysconf, or are assumed and said to be
        assert facts.caches_from in ("sysconf", "assumed")
        return
    assert facts.caches_from == "sysfs"
    assert facts.l1d == sysfs_size(1, ("Data", "Unified"))
    assert facts.l2 == sysfs_size(2, ("Unified", "Data"))
    assert facts.l3 == (sysfs_size(3, ("Unified",)) or 0)


def test_native_is_the_best_tier_this_cpu_executes() -> None:
    facts = machine.read()
    tier, native, why = machine.select(facts, "native")
    assert native and "best tier" in why
    assert facts.runs(tier) is None
    better = machine.TIERS[: machine.TIERS.index(tier)]
    assert all(facts.runs(t) is not None for t in better)
    if facts.arch == "x86_64" and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= facts.features:
        assert tier.name == "avx512"


def fake(arch: str, features: set[str]) -> machine.Machine:
    return dataclasses.replace(machine.read(), arch=arch, features=frozenset(features))


@pytest.mark.parametrize(
    ("arch", "features", "best"),
    [
        ("x86_64", {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}, "avx512"),
        ("x86_64", {"avx512f", "avx2", "fma"}, "avx2"),  # AVX-512 foundation alone is not enough
        ("x86_64", {"avx2"}, "generic"),  # AVX2 without FMA
        ("aarch64", {"asimd", "fp"}, "generic"),
    ],
)
def test_tier_follows_the_features(arch: str, features: set[str], best: str) -> None:
    assert machine.select(fake(arch, features), "native")[0].name == best


def test_a_tier_the_cpu_cannot_execute_is_refused_with_the_reason() -> None:
    with pytest.raises(RuntimeError, match=r"lacks avx512bw, avx512dq, avx512f, avx512vl"):
        machine.select(fake("x86_64", {"avx2", "fma"}), "avx512")
    with pytest.raises(RuntimeError, match="x86_64 tier and this CPU is aarch64"):
        machine.select(fake("aarch64", {"asimd"}), "avx2")
    with pytest.raises(ValueError, match="known: native, avx512, avx2, generic"):
        machine.select(fake("x86_64", set()), "sse9")


def test_target_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(machine.TARGET_ENV, "generic")
    tier, native, why = machine.select(machine.read())
    assert (tier.name, native) == ("generic", False)
    assert machine.TARGET_ENV in why


def test_sysfs_lists_and_sizes_are_parsed(tmp_path: Path) -> None:
    for index, (level, kind, size, shared) in enumerate(
        [
            (1, "Data", "48K", "0"),
            (1, "Instruction", "32K", "0"),
            (2, "Unified", "2048K", "0"),
            (3, "Unified", "105M", "0-55,112-167"),
        ]
    ):
        folder = tmp_path / f"index{index}"
        folder.mkdir()
        for name, value in (
            ("level", level),
            ("type", kind),
            ("size", size),
            ("shared_cpu_list", shared),
        ):
            (folder / name).write_text(f"{value}\n")
    assert machine._sysfs_caches(tmp_path) == (48 * 1024, 2048 * 1024, 105 * 1024**2, 112)
    assert machine._sysfs_caches(tmp_path / "missing") is None


def test_the_plan_follows_the_machine() -> None:
    small = dataclasses.replace(machine.read(), l1d=16 * 1024, l2=256 * 1024, cores=1)
    big = dataclasses.replace(machine.read(), l1d=48 * 1024, l2=2048 * 1024)
    avx2, avx512 = machine.tier_named("avx2"), machine.tier_named("avx512")
    on_small, on_big = machine.plan(small, avx2), machine.plan(big, avx512)
    assert (on_small.row_bytes, on_small.small_bytes, on_small.pass_bytes) == (
        256 * 1024,
        16 * 1024,
        32 * 1024,
    )
    assert (on_big.row_bytes, on_big.fuse_bytes, on_big.pass_bytes) == (
        2048 * 1024,
        48 * 1024,
        256 * 1024,
    )
    assert on_big.serial_flops == 2 * machine.plan(big, avx2).serial_flops  # twice the width
    # the workspace kept between calls: a sixteenth of the memory, at least 64 MiB
    roomy = dataclasses.replace(big, memory=32 * 1024**3)
    tight = dataclasses.replace(small, memory=512 * 1024**2)
    assert machine.plan(roomy, avx512).keep_bytes == 2 * 1024**3
    assert machine.plan(tight, avx2).keep_bytes == 64 * 1024**2


def test_the_loaded_kernels_have_this_machines_plan() -> None:
    loaded = library.load()
    derived = machine.plan(machine.machine(), loaded.tier)
    kept = tuner.stored(loaded.path)[0]
    assert loaded.plan == (derived if kept is None else kept.applied_to(derived))
    shown = "\n".join(report.report_lines())
    assert f"tier {loaded.tier.name}" in shown
    assert f"up to {machine._size(int(loaded.plan.row_bytes))}" in shown
    assert f"barrier spins {machine._micros(loaded.plan.barrier_spin_ns)}" in shown
    # the waits are counted in the kernels' clock, measured against the monotonic clock
    assert 0.05 < library.ticks_per_ns(loaded) < 20.0
    assert f"{library.ticks_per_ns(loaded):.3g} ticks per ns" in shown


@pytest.mark.parametrize(
    ("hidden", "narrow"),
    [(1, True), (7, True), (8, True), (9, False), (16, False), (17, True), (20, True),
     (24, True), (32, False), (33, False), (40, False), (100, False), (1024, False)],
)  # fmt: skip
def test_few_units_take_the_narrow_vectors(hidden: int, narrow: bool) -> None:
    # 16-lane wide vectors (64 bytes of float32) against 8-lane narrow ones
    assert machine.narrow_pays(hidden, 16, 8) is narrow


@pytest.mark.parametrize(
    ("hidden", "threads", "cost", "narrow"),
    [(100, 2, 1.0, True), (100, 2, 1.08, True), (100, 2, 2.0, False), (100, 2, None, False),
     (100, 1, 1.0, False), (128, 2, 1.0, False), (200, 2, 1.0, True), (300, 2, 1.0, False),
     (20, 2, 2.0, True)],
)  # fmt: skip
def test_an_uneven_split_takes_the_narrow_vectors_where_they_cost_less(
    hidden: int, threads: int, cost: float | None, narrow: bool
) -> None:
    """100 units over two threads: 64 lanes on the slower one in 16-lane vectors, 56 in 8-lane
    ones, worth it while a narrow lane costs under 0.95 * 64 / 56 of a wide one."""
    assert machine.narrow_pays(hidden, 16, 8, threads, cost) is narrow


@pytest.mark.parametrize("target", ["avx512", "avx2", "generic"])
def test_a_library_has_narrow_kernels_where_its_vectors_are_wider(target: str) -> None:
    tier = machine.tier_named(target)
    reason = machine.machine().runs(tier)
    if reason is not None:
        pytest.skip(f"this CPU cannot execute {target}: {reason}")
    loaded = library.load(target)
    wide = tier.vector_bytes > machine.NARROW_BYTES
    assert bool(loaded.narrow) is wide
    for dtype, few in ((torch.float32, 20), (torch.float64, 10)):  # 16 and 8 lanes pad more
        chosen = loaded.kernels_for(dtype, few)
        expected = loaded.narrow[dtype] if wide else loaded.kernels[dtype]
        assert chosen is expected
        assert loaded.kernels_for(dtype, 512) is loaded.kernels[dtype]
