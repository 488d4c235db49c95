"""Memory: peak bytes a callable allocates, bytes held by modules and optimizers, bytes autograd saves.

`peak_memory`: the peak number of bytes a callable allocates above what was allocated when it
started. CUDA reads `torch.cuda.max_memory_allocated`; CPU replays the allocation and free events
that `torch.profiler` (profile_memory=True) records from PyTorch's CPU allocator and takes the
running maximum. The CPU figure therefore counts tensor memory only (not MKL/oneDNN scratch buffers,
numpy arrays or Python objects), and frees of tensors that existed before the call are not seen, so
keep the measured callable self-contained (it should leave the state it found). `tensor_bytes`
counts unique storages of modules, optimizers and tensors; `saved_tensor_bytes` what autograd keeps
for backward. Not here: timing (`loralib.measure.timing`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import nn


def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            f"peak_memory on CPU needs torch.profiler with memory events ({e}); use a CUDA device or a "
            "newer torch."
        ) from e
    # Kineto prints a "USDT ... profiler_start/stop" line per profile to stderr: noise in a notebook or a
    # benchmark log. Level 6 is above its highest message type; a value the user set is kept.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            alloc = node.typed[1]
            if alloc.device.type == "cpu":
                events.append((node.start_time_ns, alloc.alloc_size))
        stack.extend(node.children)
    events.sort()
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes `fn()` allocates above the amount allocated when it starts (device: "cpu"/"cuda").

    CUDA: `max_memory_allocated() - memory_allocated()` around the call. CPU: the running maximum
    of allocation minus free events recorded by `torch.profiler` (tensor memory from PyTorch's CPU
    allocator only; see the module docstring for what that does not count).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - start)
    if dev.type != "cpu":
        raise ValueError(f"peak_memory supports 'cpu' and 'cuda' devices, got {dev}.")
    return _cpu_peak_bytes(fn)


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, nn.Module):
        for p in obj.parameters():
            yield from _tensors_in(p)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _tensors_in(state)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def tensor_bytes(*objects: Any) -> int:
    """Bytes held by the tensors in modules (parameters, their gradients, buffers), optimizers (state),
    tensors and mappings/lists of them, counting each underlying storage once."""
    seen: dict[tuple[str, int], int] = {}
    for obj in objects:
        for t in _tensors_in(obj):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (unique storages), leaving
    out those sharing storage with `exclude` (e.g. the parameters, which exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
