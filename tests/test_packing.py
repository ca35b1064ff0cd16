"""Packed weights kept between short calls (backends/cpu/packing.py, kernel.c): a call never
reads weights packed from values they no longer have, however they were changed; buffers go
with their weights and stay within their bound; threads and tiers do not share a buffer's
packing by accident."""

from __future__ import annotations

import gc
import threading
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lstmkit
from compare import assert_close
from lstmkit.backends.cpu import packing

Change = Callable[[nn.Module], None]


def _numpy_write(module: nn.Module) -> None:
    module.weight_hh_l0.detach().numpy()[3, :] += 0.5  # no autograd, no _version


CHANGES: dict[str, Change] = {
    "optimizer-step": lambda m: torch.optim.SGD(m.parameters(), lr=0.1).step(),
    "in-place-no-grad": lambda m: m.weight_ih_l1_reverse.mul_(-1),
    "data-in-place": lambda m: m.bias_hh_l0.data.add_(1.0),  # moves no _version
    "data-assigned": lambda m: setattr(m.weight_hh_l1, "data", torch.randn(80, 20)),
    "numpy-view": _numpy_write,
    "load-state-dict": lambda m: m.load_state_dict(
        {k: torch.randn_like(v) for k, v in m.state_dict().items()}
    ),
}


def reference_of(module: lstmkit.LSTM) -> torch.nn.LSTM:
    reference = torch.nn.LSTM(10, 20, num_layers=2, bidirectional=True)
    reference.load_state_dict(module.state_dict())
    return reference


@pytest.mark.parametrize("change", CHANGES, ids=str)
@pytest.mark.parametrize("mode", ["inference", "training"])
def test_changed_weights_are_packed_again(change: str, mode: str, cpu_tier: str) -> None:
    torch.manual_seed(0)
    module = lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 10)
    for step in range(3):  # a call that packs, one that reuses, then the change
        if step == 2:
            module.zero_grad()
            if module.weight_ih_l0.grad is None:
                for p in module.parameters():
                    p.grad = torch.ones_like(p)
            with torch.no_grad():
                CHANGES[change](module)
        with torch.set_grad_enabled(mode == "training"):
            out, (h, c) = module(x)
        with torch.no_grad():
            expected, (eh, ec) = reference_of(module)(x)
        assert_close(out, expected, f"{change} step {step}")
        assert_close(h, eh, f"{change} step {step}")
        assert_close(c, ec, f"{change} step {step}")
        assert packing.held_bytes() > 0


def test_buffers_go_with_their_weights_and_stay_within_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gc.collect()
    before = packing.held_bytes()
    modules = [lstmkit.LSTM(10, 20, num_layers=2) for _ in range(3)]
    x = torch.randn(4, 2, 10)
    with torch.no_grad():
        modules[0](x)
    one = packing.held_bytes() - before
    assert one > 0
    monkeypatch.setattr(packing, "LIMIT_BYTES", before + one)
    with torch.no_grad():
        for module in modules:
            module(x)
            assert packing.held_bytes() <= before + one
    assert_close(modules[0](x)[0], reference_of_plain(modules[0])(x)[0], "after eviction")
    del modules, module
    gc.collect()
    assert packing.held_bytes() == before


def reference_of_plain(module: lstmkit.LSTM) -> torch.nn.LSTM:
    reference = torch.nn.LSTM(10, 20, num_layers=2)
    reference.load_state_dict(module.state_dict())
    return reference


def test_long_calls_keep_nothing() -> None:
    gc.collect()
    before = packing.held_bytes()
    module = lstmkit.LSTM(10, 20)
    with torch.no_grad():
        module(torch.randn(packing.SHORT_ROWS + 1, 1, 10).expand(-1, 2, -1).contiguous())
    assert packing.held_bytes() == before


def test_threads_calling_one_module_at_once() -> None:
    torch.manual_seed(0)
    module = lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)
    reference = reference_of(module)
    inputs = [torch.randn(5, 3, 10) for _ in range(4)]
    with torch.no_grad():
        expected = [reference(x)[0] for x in inputs]
    failures: list[str] = []

    def work(index: int) -> None:
        with torch.no_grad():
            for _ in range(200):
                if not torch.allclose(module(inputs[index])[0], expected[index], atol=1e-5):
                    failures.append(f"thread {index}")
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_another_tier_in_the_same_process_packs_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    module = lstmkit.LSTM(10, 20, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 10)
    with torch.no_grad():
        expected = reference_of(module)(x)[0]
        for target in ("native", "generic", "avx2", "native", "generic"):
            monkeypatch.setenv("LSTMKIT_CPU_TARGET", target)
            assert_close(module(x)[0], expected, target)
