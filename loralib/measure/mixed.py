"""What a mixed batch costs: one forward whose rows use different named adapters, against running each
adapter's rows alone (`set_adapter`, then its sub-batch), and against one adapter for the whole batch.

Covers `measure_mixed_batch` (for benchmarks/bench_speed.py). Not here: the mechanism
(`loralib.named.adapter_batch`), its correctness (tests/test_04_named_adapters.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from loralib.measure.steps import _roberta_classifier, random_batch
from loralib.measure.timing import ratios, time_interleaved


def measure_mixed_batch(
    config,
    adapters: int = 4,
    batch_size: int = 16,
    seq_len: int = 128,
    r: int = 8,
    repeats: int = 10,
    warmup: int = 1,
    device: str = "cpu",
) -> dict[str, Any]:
    """Median seconds and ratios of three eval-mode forwards of a RoBERTa classifier holding `adapters`
    LoRA adapters (query/value, rank r, random B so that every update is non-zero):

    "mixed": one forward, row i with adapter i % adapters (`loralib.adapter_batch`);
    "separate": for each adapter, set_adapter and a forward of its rows alone (what serving groups costs);
    "single": one forward of the whole batch with one adapter active (the single-adapter fast path).
    """
    import loralib

    torch.manual_seed(0)
    model = _roberta_classifier(config, 2, 0, device).eval()
    names = [f"task{i}" for i in range(adapters)]
    loralib.inject_lora(model, ["query", "value"], r=r, lora_alpha=r, init_lora_weights=False)
    for _, layer in loralib.lora_layers(model):
        layer.rename_first_adapter(names[0])
    for name in names[1:]:
        loralib.add_adapter(
            model, name, target_modules=["query", "value"], r=r, lora_alpha=r, init_lora_weights=False
        )
    batch = {
        k: v for k, v in random_batch(config, batch_size, seq_len, device=device).items() if k != "labels"
    }
    rows = [names[i % adapters] for i in range(batch_size)]
    groups = {n: {k: v[[i for i, m in enumerate(rows) if m == n]] for k, v in batch.items()} for n in names}

    def mixed() -> None:
        with torch.inference_mode(), loralib.adapter_batch(model, rows):
            model(**batch)

    def separate() -> None:
        with torch.inference_mode():
            for n, sub in groups.items():
                loralib.set_adapter(model, n)
                model(**sub)

    def single() -> None:
        loralib.set_adapter(model, names[0])
        with torch.inference_mode():
            model(**batch)

    fns: dict[str, Callable[[], None]] = {"mixed": mixed, "separate": separate, "single": single}
    med = time_interleaved(fns, repeats=repeats, warmup=warmup, device=device)
    return {
        "adapters": adapters,
        "batch": [batch_size, seq_len],
        "r": r,
        "targets": ["query", "value"],
        "repeats": repeats,
        "median_s": med,
        "ratio": ratios(med, "separate"),
    }
