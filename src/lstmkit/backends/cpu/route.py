"""When a call may skip the cpu backend's torch ops (:mod:`.ops`) and run their
implementation directly: in plain eager code, where no compiler, exporter, tracer, torch.func
transform or dispatch mode would see the difference, and autograd has nothing to record. Going
through the dispatcher into Python costs tens of microseconds per op on a small machine."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode


def direct(x: Tensor, training: bool) -> bool:
    """Whether a call on ``x`` may run the implementation; ``training``: autograd records it."""
    # torch._C._is_tracing: torch.jit.is_tracing without its check for TorchScript, which
    # never compiles lstmkit (after is_compiling, which dynamo answers: it cannot trace it)
    if torch.compiler.is_compiling() or training or torch._C._is_tracing():
        return False
    return (
        type(x) is Tensor
        and not torch._C._are_functorch_transforms_active()
        and _get_current_dispatch_mode() is None
    )
