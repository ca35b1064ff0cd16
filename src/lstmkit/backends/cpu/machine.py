"""What the machine is, read from it: the CPU's identity and vector features, its caches and
cores, and the ISA tier the kernels are built for.

Nothing here is assumed for a particular CPU. Caches come from sysfs
(``/sys/devices/system/cpu/cpu0/cache``), else from ``sysconf``; only when neither says
anything is a size assumed, and the facts then say so. Features and identity come from
``/proc/cpuinfo`` (x86 ``flags``, aarch64 ``Features``); cores are those this process may run
on.

Tiers, best first: ``avx512`` (64-byte vectors, 32 vector registers, mask registers),
``avx2`` (AVX2 + FMA: 32-byte vectors, 16 registers) and ``generic`` (plain C and GCC's
vectors of 16 bytes: what aarch64 and any other CPU get). ``LSTMKIT_CPU_TARGET`` selects one:
``native`` (the default: the best tier this CPU runs, tuned for this CPU) or a tier's name
(built for that tier's common denominator, e.g. for a cluster of mixed machines); a tier the
CPU cannot execute is refused with the reason.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from lstmkit import env

TARGET_ENV = "LSTMKIT_CPU_TARGET"
SYSFS_CACHE = Path("/sys/devices/system/cpu/cpu0/cache")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Tier:
    """An instruction-set tier the kernels are built for."""

    name: str
    vector_bytes: int  # bytes per vector register
    registers: int  # architectural vector registers
    needs: frozenset[str]  # CPU features (cpuinfo flag names) it executes
    arch: str  # "x86_64", or "" for any architecture
    flags: tuple[str, ...]  # compiler flags that build for exactly this tier


TIERS: tuple[Tier, ...] = (
    Tier(
        "avx512",
        64,
        32,
        frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"}),
        "x86_64",
        ("-march=x86-64-v4", "-mprefer-vector-width=512"),
    ),
    Tier("avx2", 32, 16, frozenset({"avx2", "fma"}), "x86_64", ("-march=x86-64-v3",)),
    Tier("generic", 16, 16, frozenset(), "", ()),
)


@dataclass(frozen=True)
class Machine:
    """The facts the kernels' plan is derived from."""

    arch: str  # platform.machine(): x86_64, aarch64, ...
    identity: str  # vendor, family, model, stepping (x86) or implementer, part (aarch64)
    model_name: str
    features: frozenset[str]
    cores: int  # CPUs this process may run on
    l1d: int  # bytes of L1 data cache per core
    l2: int  # bytes of L2 per core
    l3: int  # bytes of L3 in all (0: none)
    l3_shared_by: int  # CPUs that share that L3
    caches_from: str  # where the cache sizes came from: "sysfs", "sysconf" or "assumed"
    memory: int = 0  # bytes of physical memory (sysconf; 0: unknown)

    def runs(self, tier: Tier) -> str | None:
        """``None`` if this CPU executes ``tier``, else why not."""
        if tier.arch and self.arch not in (tier.arch, "amd64", "AMD64"):
            return f"{tier.name} is an {tier.arch} tier and this CPU is {self.arch}"
        missing = sorted(tier.needs - self.features)
        if missing:
            return f"this CPU lacks {', '.join(missing)}, which {tier.name} needs"
        return None


def read() -> Machine:
    """The facts of the machine this process runs on (read once, see :func:`machine`)."""
    info = _cpuinfo()
    arch = platform.machine()
    if "vendor_id" in info:
        keys = ("vendor_id", "cpu family", "model", "stepping")
        flags = info.get("flags", "")
    else:
        keys = ("CPU implementer", "CPU architecture", "CPU variant", "CPU part", "CPU revision")
        flags = info.get("Features", "")
    identity = " ".join(f"{key}={info[key]}" for key in keys if key in info) or arch
    model_name = info.get("model name") or info.get("Hardware") or platform.processor() or arch
    caches, source = _caches()
    return Machine(
        arch=arch,
        identity=identity,
        model_name=model_name,
        features=frozenset(flags.split()),
        cores=_cores(),
        l1d=caches[0],
        l2=caches[1],
        l3=caches[2],
        l3_shared_by=caches[3],
        caches_from=source,
        memory=_memory(),
    )


@functools.cache
def machine() -> Machine:
    return read()


@dataclass(frozen=True)
class Plan:
    """The thresholds a call's plan takes from the machine (lk_plan in lstm.h, same order)."""

    row_bytes: float  # batch 1: the row path where W_hh fits one core's L2
    small_bytes: float  # batch 1: [W_ih W_hh]^T packed for broadcasts where it fits L1d
    fuse_bytes: float  # batch 1: W_ih read inside the step where it fits L1d
    pass_bytes: float  # panel path: bytes of a weight panel per pass, kept in L2
    serial_flops: float  # below this many flops a call runs on one thread
    one_team: float = 0.0  # nonzero: two directions share one team (tuned), else a team each
    # waits, in nanoseconds; the kernels count them in their clock's ticks (see describe)
    barrier_spin_ns: float = 20_000.0  # a team's barrier spins, then yields its core
    claimed_spin_ns: float = 50_000.0  # batch 1: the wait for a half the partner claimed
    slack_ns: float = 1_000.0  # batch 1: the partner's head start before a thread takes its half
    idle_spin_ns: float = 50_000.0  # the pair's helper spins for the next job, then sleeps
    join_spin_ns: float = 5_000.0  # the caller spins for a helper still in the job, then sleeps
    keep_bytes: float = float(64 << 20)  # the biggest workspace kept between calls

    def describe(self) -> list[str]:
        return [
            f"batch 1 runs by rows of torch's W_hh where it fits one core's L2: up to "
            f"{_size(int(self.row_bytes))}; packed for broadcasts where [W_ih W_hh] fits L1d: "
            f"up to {_size(int(self.small_bytes))}; W_ih inside the step up to "
            f"{_size(int(self.fuse_bytes))}",
            f"panels pass over {_size(int(self.pass_bytes))} of a weight at a time (an eighth "
            "of L2, which keeps it there beside the rows and gates)",
            f"calls below {self.serial_flops:.3g} flops run on one thread (a second thread "
            "costs more there; measured where tuned, else about a millisecond of one core's "
            "work at the tier's vector width)",
            "two directions on two or more threads run "
            + (
                "one after the other, each on every thread"
                if self.one_team
                else "side by side, each on its own half of the threads"
            ),
            f"waits: a team's barrier spins {_micros(self.barrier_spin_ns)} before it yields "
            f"its core, a batch-1 thread {_micros(self.claimed_spin_ns)} for a half its partner "
            f"is computing and gives the partner {_micros(self.slack_ns)} of head start; the "
            f"helper thread spins {_micros(self.idle_spin_ns)} for the next job, the caller "
            f"{_micros(self.join_spin_ns)} for the helper to finish, before they sleep (a few "
            "wake-ups of a thread: a shorter spin costs a wake-up on every step, a longer one "
            "the core of a process that needs it)",
            f"workspaces: the biggest, up to {_size(int(self.keep_bytes))}, is kept for the "
            "next call (a sixteenth of the memory: a fresh one faults and zeroes every page on "
            "first use)",
        ]


# About a millisecond of one core's work at 32-byte vectors: when the kernels were first tuned
# (an AVX2 Zen 3), two threads on less were up to 10-35x slower whenever another process held a
# core. Wider vectors do the same work in less time, so the bound grows with their width.
_SERIAL_FLOPS_PER_VECTOR_BYTE = 4.0e7 / 32


# A workspace bigger than what is kept is allocated afresh on every call, and each of its pages
# faults and is zeroed on first use: for H = 1024, N = 256 (170 MB in backward) that was a
# quarter of the backward pass. The biggest one is kept up to a sixteenth of the memory.
_KEEP_SHARE = 16
_KEEP_AT_LEAST = 64 << 20


def plan(facts: Machine, tier: Tier) -> Plan:
    """The thresholds for ``tier`` on the machine ``facts`` describes."""
    return Plan(
        row_bytes=float(facts.l2),
        small_bytes=float(facts.l1d),
        fuse_bytes=float(facts.l1d),
        pass_bytes=facts.l2 / 8,
        serial_flops=_SERIAL_FLOPS_PER_VECTOR_BYTE * tier.vector_bytes,
        keep_bytes=float(max(_KEEP_AT_LEAST, facts.memory // _KEEP_SHARE >> 20 << 20)),
    )


NARROW_BYTES = 32  # the second vector width of a library whose tier's vectors are wider


NARROW_WIN = 0.95  # a split over threads: the narrow kernels' share of the wide ones' time


def narrow_pays(
    hidden: int,
    wide_lanes: int,
    narrow_lanes: int,
    threads: int = 1,
    narrow_cost: float | None = None,
) -> bool:
    """Whether a layer of ``hidden`` units runs with the narrower vectors.

    Always when padding its units to whole wide vectors adds at least a quarter of them more
    than narrow ones do (20 units: 32 in 16-lane vectors, 24 in 8-lane ones; every gate,
    product and step of the layer then does a quarter less work, more than the wider vectors
    give back on so few units). Also, where ``narrow_cost`` was measured (the tuner: a narrow
    lane's time over a wide lane's, 1 where the CPU runs both widths at one flop rate), when
    the units split over ``threads`` more evenly in narrow vectors by more than they cost:
    each thread takes whole vectors of units, so 100 units are 7 wide vectors of 16, 4 on one
    thread and 3 on the other (64 lanes on the slower one), or 13 narrow ones of 8 (7 and 6:
    56 lanes)."""

    def padded(lanes: int) -> int:
        return -(-hidden // lanes) * lanes

    if 4 * (padded(wide_lanes) - padded(narrow_lanes)) >= hidden:
        return True
    if narrow_cost is None or threads < 2:
        return False

    def slowest(lanes: int) -> int:  # lanes of the thread with the most vectors
        return -(-padded(lanes) // lanes // threads) * lanes

    return slowest(narrow_lanes) * narrow_cost < NARROW_WIN * slowest(wide_lanes)


def describe(facts: Machine) -> list[str]:
    """The facts in words, a line each, for ``lstmkit backends``."""
    l3 = f"L3 {_size(facts.l3)} shared by {facts.l3_shared_by} CPUs" if facts.l3 else "no L3"
    vector = sorted(f for f in facts.features if f.startswith(("avx", "fma", "amx", "sve")))
    vector += sorted(f for f in facts.features if f in ("asimd", "neon"))
    return [
        f"CPU: {facts.model_name} ({facts.arch}; {facts.identity}), {facts.cores} cores for "
        "this process",
        f"caches ({facts.caches_from}): L1d {_size(facts.l1d)} and L2 {_size(facts.l2)} per "
        f"core, {l3}",
        f"vector features: {' '.join(vector) or 'none known'}",
        f"memory: {_size(facts.memory >> 20 << 20) if facts.memory else 'unknown'}",
    ]


def _memory() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return 0


def _micros(nanos: float) -> str:
    return f"{nanos / 1000:g} us"


def _size(count: int) -> str:
    for unit, scale in (("MiB", 1024**2), ("KiB", 1024)):
        if count >= scale and count % scale == 0:
            return f"{count // scale} {unit}"
    return f"{count} B"


def tier_named(name: str) -> Tier:
    for tier in TIERS:
        if tier.name == name:
            return tier
    known = ", ".join(["native", *(t.name for t in TIERS)])
    raise ValueError(f"{TARGET_ENV}={name!r} is not a cpu target; known: {known}")


def select(facts: Machine, target: str | None = None) -> tuple[Tier, bool, str]:
    """The tier to build for, whether it is ``native`` (tuned for this very CPU), and why.

    ``target`` defaults to ``$LSTMKIT_CPU_TARGET`` (else ``native``). A tier the CPU cannot
    execute raises ``RuntimeError`` with the reason; an unknown name ``ValueError``.
    """
    if target is None:
        target = env.read(TARGET_ENV) or "native"
    if target == "native":
        for tier in TIERS:
            if facts.runs(tier) is None:
                passed = [f"{t.name}: {facts.runs(t)}" for t in TIERS[: TIERS.index(tier)]]
                why = f"the best tier this CPU executes ({TARGET_ENV} unset or native)"
                return tier, True, why + "".join(f"; not {p}" for p in passed)
    tier = tier_named(target)
    reason = facts.runs(tier)
    if reason is not None:
        raise RuntimeError(
            f"{TARGET_ENV}={target} asks for kernels this CPU cannot execute: {reason}. "
            f"Unset {TARGET_ENV} (or set it to native) to build for this CPU."
        )
    return tier, False, f"asked for by {TARGET_ENV}={target}"


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    fields: dict[str, str] = {}
    try:
        text = CPUINFO.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if "flags" in fields or "Features" in fields:
                break  # the first processor's block is complete
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Sizes used only when the machine says nothing (the facts then say "assumed"): a common
# modern core's L1d and L2, and no L3.
_ASSUMED = (32 * 1024, 1024 * 1024, 0, 1)


def _caches() -> tuple[tuple[int, int, int, int], str]:
    """(L1d, L2 per core, L3 total, CPUs sharing L3) and where they came from."""
    found = _sysfs_caches(SYSFS_CACHE)
    if found is not None:
        return found, "sysfs"
    found = _sysconf_caches()
    if found is not None:
        return found, "sysconf"
    return _ASSUMED, "assumed"


def _sysfs_caches(root: Path) -> tuple[int, int, int, int] | None:
    sizes = {}
    try:
        for index in sorted(root.glob("index*")):
            kind = (index / "type").read_text().strip()
            if kind == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _bytes((index / "size").read_text().strip())
            shared = _cpu_count((index / "shared_cpu_list").read_text().strip())
            sizes[level] = (size, shared)
    except (OSError, ValueError):
        return None
    if 1 not in sizes or 2 not in sizes:
        return None
    l3, l3_shared = sizes.get(3, (0, 1))
    return sizes[1][0], sizes[2][0], l3, l3_shared


def _sysconf_caches() -> tuple[int, int, int, int] | None:
    try:
        l1d = os.sysconf("SC_LEVEL1_DCACHE_SIZE")
        l2 = os.sysconf("SC_LEVEL2_CACHE_SIZE")
        l3 = os.sysconf("SC_LEVEL3_CACHE_SIZE")
    except (ValueError, OSError):
        return None
    if l1d <= 0 or l2 <= 0:
        return None
    return l1d, l2, max(l3, 0), _cores()


def _bytes(text: str) -> int:
    """sysfs sizes: "48K", "2048K", "32M"."""
    units = {"K": 1024, "M": 1024**2, "G": 1024**3}
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def _cpu_count(cpu_list: str) -> int:
    """The number of CPUs in a sysfs list such as "0-3,8-11"."""
    count = 0
    for part in cpu_list.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count
