"""Interleaved timing: run several callables round-robin and take medians.

A noisy, shared machine then slows every case alike, so the *ratios* between cases measured in one
run stay meaningful; absolute times are not. Covers `time_interleaved_samples`, `time_interleaved`
and `ratios`. Not here: memory (`loralib.measure.memory`), what is timed (`loralib.measure.layer`,
`loralib.measure.steps`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def _sync(device: torch.device | str | None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved_samples(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of every call of every callable, run round-robin `repeats` times.

    Each round starts at a different case (a rotation), so no case always runs right after the same
    neighbour; `warmup` untimed rounds come first. On CUDA pass `device` so each call is synchronised.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one callable, got an empty mapping.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return samples


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median seconds per call of each callable, measured interleaved (see `time_interleaved_samples`)."""
    samples = time_interleaved_samples(fns, repeats=repeats, warmup=warmup, device=device)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def ratios(medians: Mapping[str, float], reference: str) -> dict[str, float]:
    """Each median divided by the reference case's median (1.0 for the reference itself)."""
    if reference not in medians:
        raise KeyError(f"reference case {reference!r} is not among the measured cases {list(medians)}.")
    ref = medians[reference]
    return {name: value / ref for name, value in medians.items()}
