"""What a model scores without learning anything: the line a learning curve must clear.

Covers, for one `TrainConfig` (the same data source and evaluation subset its run is scored on):
`majority_class` (GLUE classification: always predict the training set's most frequent label, scored
with the task's own metrics), `no_answer` (SQuAD v2: answer "" to every question, which scores the
share of unanswerable questions), `untrained_qa` (SQuAD: the run's model before its first step, i.e.
LoRA with B = 0 and a freshly initialised span head) and `trivial_baseline`, which picks the one that
fits the task. Not here: the references from published runs (`loralib.benchmark.references`).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from loralib.benchmark.config import TrainConfig, is_qa, resolve_model_id, task_spec
from loralib.benchmark.trainer import load_raw_data


def majority_class(cfg: TrainConfig) -> dict[str, Any]:
    """{"name", "label", "metrics": {split: metrics}} of predicting the training set's commonest label."""
    from loralib.metrics import glue_metrics

    spec = task_spec(cfg.task)
    if is_qa(cfg.task) or cfg.task == "stsb":
        raise ValueError(
            f"majority_class needs a classification task, got {cfg.task!r}; use trivial_baseline(cfg), which "
            "picks no_answer / untrained_qa for SQuAD and the mean for stsb."
        )
    train, evals = load_raw_data(cfg)
    label = Counter(train["label"]).most_common(1)[0][0]
    metrics = {split: glue_metrics(cfg.task, [label] * len(ds), ds["label"]) for split, ds in evals.items()}
    return {
        "name": f"majority class ({spec.label_names[label] if spec.label_names else label})",
        "label": label,
        "metrics": metrics,
    }


def no_answer(cfg: TrainConfig) -> dict[str, Any]:
    """{"name", "metrics": {split: metrics}} of answering "" (no answer) to every SQuAD v2 question."""
    from loralib.metrics import squad_metrics

    if cfg.task != "squad_v2":
        raise ValueError(
            f"no_answer is a SQuAD v2 baseline (v1 has no unanswerable questions), got {cfg.task!r}."
        )
    _, evals = load_raw_data(cfg)
    metrics = {
        split: squad_metrics({row["id"]: "" for row in ds}, ds, version_2=True) for split, ds in evals.items()
    }
    return {"name": 'always "no answer"', "metrics": metrics}


def untrained_qa(cfg: TrainConfig, device: str | None = None) -> dict[str, Any]:
    """{"name", "metrics": {split: metrics}} of the run's QA model before training (same seed, same init)."""
    from transformers import AutoTokenizer

    from loralib.benchmark.backends import build_model
    from loralib.benchmark.trainer import squad_scores
    from loralib.qa import predict_qa
    from loralib.utils import default_device

    if not is_qa(cfg.task):
        raise ValueError(f"untrained_qa needs a SQuAD task, got {cfg.task!r}.")
    _, evals = load_raw_data(cfg)
    model = build_model(cfg).to(device or default_device())
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_id(cfg))
    metrics = {}
    for split, rows in evals.items():
        feats, start, end = predict_qa(
            model,
            tokenizer,
            rows,
            max_length=cfg.qa_max_length,
            stride=cfg.qa_stride,
            batch_size=cfg.eval_batch_size,
        )
        metrics[split] = squad_scores(cfg, rows, feats, start, end)
    return {"name": "before training", "metrics": metrics}


def trivial_baseline(cfg: TrainConfig) -> dict[str, Any]:
    """The baseline that fits cfg.task: all "no answer" (SQuAD v2), the untrained model (v1), else the majority class."""
    if cfg.task == "squad_v2":
        return no_answer(cfg)
    if is_qa(cfg.task):
        return untrained_qa(cfg)
    return majority_class(cfg)
