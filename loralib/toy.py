"""A bundled toy sentiment task and a minimal training loop, for notebooks that must run offline in seconds.

The data are short English sentences whose label is decided by one clear sentiment word ("The movie
was great." -> 1, "I thought the hotel was awful." -> 0). They are expanded deterministically from
`resources/toy/templates.json` by `generate_toy_sentiment()` and shipped as `train.jsonl` (200) and
`validation.jsonl` (64), balanced, with no sentence in both splits. On the random tiny RoBERTa a few
seconds of LoRA training take validation accuracy well above chance: enough to show that the
plumbing learns, not a benchmark (GLUE lives in `loralib.benchmark`).

Covers: loading the splits, turning them into padded batches, `train_steps` (a plain teaching loop:
forward, loss, backward, step) and `evaluate_accuracy`. Not here: schedulers, mixed precision,
checkpointing or metrics beyond accuracy (see `loralib.benchmark`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

SPLITS = ("train", "validation")
LABELS = ("negative", "positive")
# Tuned on the tiny random RoBERTa with LoRA r=8, alpha=16 on query/value plus a trained classifier
# head: 15 epochs of 13 batches (195 steps) take 2-4 s on one CPU thread and reach 0.81-0.92
# validation accuracy over seeds 0-3 (chance is 0.5). Fewer epochs or a 2x larger rate do worse.
DEFAULT_EPOCHS = 15
DEFAULT_LR = 5e-3


def toy_dir() -> Path:
    """The folder holding the toy task's templates and JSONL splits (shipped with the package)."""
    return Path(str(resources.files("loralib") / "resources" / "toy"))


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown toy split {split!r}; choose one of {SPLITS}.")


def generate_toy_sentiment(templates_path: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Expand the templates file into {"train": [...], "validation": [...]} exactly as shipped.

    Every (template, subject, word) combination is a candidate; a seeded shuffle picks half of each
    split from the positive and half from the negative candidates, without overlap between splits.
    """
    spec = json.loads(Path(templates_path or toy_dir() / "templates.json").read_text())
    rng = random.Random(spec["seed"])
    sizes = spec["sizes"]
    pools = {}
    for label, key in ((1, "positive"), (0, "negative")):
        pool = [
            (t, s, w) for t in spec["templates"] for s in spec["subjects"] for w in spec[key]
        ]  # fixed order, so the shuffle below alone decides the selection
        rng.shuffle(pool)
        pools[label] = pool
    out: dict[str, list[dict[str, Any]]] = {}
    start = 0
    for split in SPLITS:
        half = sizes[split] // 2
        rows = []
        for label in (1, 0):
            for template, subject, word in pools[label][start : start + half]:
                text = template.format(subject=subject, word=word)
                rows.append({"text": text[0].upper() + text[1:], "label": label})
        rng.shuffle(rows)
        out[split] = rows
        start += half
    return out


def load_toy_sentiment(split: str = "train") -> list[dict[str, Any]]:
    """The shipped split as a list of {"text": str, "label": 0 | 1} (1 = positive)."""
    _check_split(split)
    path = toy_dir() / f"{split}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def toy_batches(
    tokenizer,
    split: str = "train",
    batch_size: int = 16,
    seed: int = 0,
    max_length: int = 32,
    shuffle: bool | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of a toy split: dicts of input_ids, attention_mask and labels (int64).

    The train split is shuffled with `seed` (shuffle=None means "shuffle train only"); each batch is
    padded to its own longest sentence, truncated at `max_length` tokens.
    """
    _check_split(split)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    rows = load_toy_sentiment(split)
    if shuffle if shuffle is not None else split == "train":
        rows = rows[:]
        random.Random(seed).shuffle(rows)
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        enc = tokenizer(
            [r["text"] for r in chunk],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        batches.append(
            {
                "input_ids": enc["input_ids"],
                "attention_mask": enc["attention_mask"],
                "labels": torch.tensor([r["label"] for r in chunk], dtype=torch.long),
            }
        )
    return batches


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _loss_of(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, dict) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "the model returned no loss; pass batches that contain 'labels' to a model that computes a "
            "loss from them (e.g. AutoModelForSequenceClassification), or return {'loss': ...}."
        )
    return loss


def train_steps(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    epochs: int = DEFAULT_EPOCHS,
    lr: float = DEFAULT_LR,
    optimizer: str = "adamw",
    progress: bool = True,
    weight_decay: float = 0.0,
) -> list[float]:
    """Train the parameters that require grad for `epochs` passes over `batches`; return each step's loss.

    The loop is the textbook one (forward, loss, backward, step, zero_grad) so a notebook can show
    exactly what LoRA training is. `model(**batch)` must return an object with `.loss` or a dict with
    "loss". optimizer: "adamw" or "sgd" (momentum 0.9). Weight decay defaults to 0 so that frozen
    directions of a zero gradient stay put and the toy numbers are easy to reason about.
    """
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "no parameter requires grad, so nothing would train; call mark_only_lora_as_trainable(model) "
            "(or set requires_grad) first."
        )
    if not batches:
        raise ValueError("batches is empty; build them with toy_batches(tokenizer, 'train').")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}.")
    if optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose 'adamw' or 'sgd'.")
    device = _device_of(model)
    was_training = model.training
    model.train()
    losses: list[float] = []
    bar = tqdm(total=epochs * len(batches), disable=not progress, desc="train", leave=False, mininterval=0.5)
    try:
        for _ in range(epochs):
            for batch in batches:
                loss = _loss_of(model(**_to(batch, device)))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
                bar.update()
    finally:
        bar.close()
        model.train(was_training)
    return losses


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Fraction of examples whose argmax over `.logits` (or ["logits"]) equals the label, in eval mode."""
    if not batches:
        raise ValueError("batches is empty; build them with toy_batches(tokenizer, 'validation').")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        for batch in batches:
            batch = _to(batch, device)
            labels = batch["labels"]
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out = model(**inputs)
            logits = out["logits"] if isinstance(out, dict) else out.logits
            correct += (logits.argmax(-1) == labels).sum().item()
            total += labels.numel()
    finally:
        model.train(was_training)
    return correct / total
