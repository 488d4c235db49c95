"""Serving the benchmark's adapters from one model: score a task with whatever adapter is active, and
count what one backbone plus N adapters holds against N fine-tuned copies (notebook 04, section 11).

Covers: `score_glue_task` (the exact evaluation rows a finished run was scored on, through any model),
`eval_batch` and `serving_memory`. Not here: switching adapters (`loralib.named`), training (`loralib.benchmark.run`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from loralib.benchmark.config import config_from_results
from loralib.benchmark.trainer import eval_rows
from loralib.data import get_task, tokenize_glue
from loralib.metrics import glue_metrics


@torch.no_grad()
def score_glue_task(model: nn.Module, tokenizer, results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{eval split: GLUE metrics} of `model` on the rows the run behind `results` (its results.json) was
    evaluated on, batched as the Trainer batched them (same batch size, padding per batch)."""
    from transformers import DataCollatorWithPadding

    cfg = config_from_results(results)
    spec = get_task(cfg.task)
    collate = DataCollatorWithPadding(tokenizer)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores = {}
    try:
        for split in spec.eval_splits:
            feats = _features(tokenizer, results, split)
            preds, labels = [], []
            for start in range(0, len(feats), cfg.eval_batch_size):
                batch = collate(
                    [feats[i] for i in range(start, min(start + cfg.eval_batch_size, len(feats)))]
                )
                labels.append(batch.pop("labels").numpy())
                logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu().numpy()
                preds.append(logits.reshape(-1) if spec.is_regression else logits.argmax(-1))
            scores[split] = glue_metrics(cfg.task, np.concatenate(preds), np.concatenate(labels).reshape(-1))
    finally:
        model.train(was_training)
    return scores


def _features(tokenizer, results: dict[str, Any], split: str | None = None):
    from loralib.logs import no_progress_bars

    cfg = config_from_results(results)
    with no_progress_bars():  # a bar per tokenised split is noise in a cell that loops over tasks
        feats = tokenize_glue(eval_rows(results, split), tokenizer, cfg.task, max_length=cfg.max_length)
    return feats.select_columns(["input_ids", "attention_mask", "labels"])


def eval_batch(tokenizer, results: dict[str, Any], rows: int = 8) -> dict[str, torch.Tensor]:
    """The first `rows` evaluation rows of the run behind `results`, as one padded model input (no labels)."""
    from transformers import DataCollatorWithPadding

    feats = _features(tokenizer, results)
    batch = DataCollatorWithPadding(tokenizer)([feats[i] for i in range(min(rows, len(feats)))])
    batch.pop("labels")
    return dict(batch)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def serving_memory(model: nn.Module, adapter_count: int) -> dict[str, int]:
    """Bytes of parameters: `model` as it holds its adapters ("one_model"), its backbone alone (what no
    adapter owns), and `adapter_count` separate fine-tuned models of the backbone's size plus one adapter
    each ("separate_models": what serving each task from its own model holds)."""
    from loralib.layers import LORA_TENSORS
    from loralib.named import _all_layers, _heads, _values

    everything = {id(p): p for p in model.parameters()}
    owned = {}
    for _, layer in _all_layers(model):
        for name in layer.adapter_names():
            with layer.using_adapter(name):
                for t in LORA_TENSORS:
                    p = getattr(layer, t, None)
                    if p is not None:
                        owned[id(p)] = p
    for _, h in _heads(model):
        for p in h.heads.parameters():
            owned[id(p)] = p
    carried = sum(_bytes(v for k, v in slot.items() if k != "__base__") for slot in _values(model).values())
    backbone = _bytes(p for i, p in everything.items() if i not in owned)
    one_model = _bytes(everything.values()) + carried
    per_adapter = (one_model - backbone) / max(adapter_count, 1)
    return {
        "one_model": int(one_model),
        "backbone": int(backbone),
        "separate_models": int(adapter_count * (backbone + per_adapter)),
    }
