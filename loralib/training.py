"""Fine-tune RoBERTa with LoRA on one GLUE or SQuAD task with the Hugging Face `Trainer`, and record the run.

Covers: `TrainConfig` (the article's recipe as defaults), the run profiles ("smoke", "cpu", "gpu"), the four
model backends ("loralib", "article", "peft", "qlora"), `run_task` / `run_benchmark`, the per-epoch
evaluation (GLUE via `loralib.metrics.glue_metrics`, SQuAD via `loralib.qa` post-processing and
`loralib.metrics.squad_metrics`), saving the adapter, `load_trained_model` to get it back, and the results
file. Not here: datasets and tokenisation (`loralib.data`), metric formulas (`loralib.metrics`), SQuAD
feature windows (`loralib.qa`), the command line (`loralib.benchmark`), reference numbers, tables and plots
(`loralib.references`).

The recipe (defaults of `TrainConfig`, from the article's training script and the LoRA paper):
rank 8 on query and value; biases, layer norms and the task head also train; batch 16 (the effective
batch: per-device batch = batch_size / (processes x gradient_accumulation_steps), so the schedule is the
same on 1 or 8 GPUs); 6 epochs; the learning rate warms up linearly for 2 epochs, then decays linearly to 0;
AdamW with betas (0.9, 0.98), eps 1e-6, weight decay 0.1; max length 128 (GLUE), 384 with stride 128
(SQuAD). The learning rate depends on the LoRA formulation: 5e-4 for "scaled" (A kaiming-uniform, update
times alpha/r with alpha = r, as PEFT and the LoRA paper's RoBERTa-base runs) and 4e-5 for "article" (A ~
N(0, 1), unscaled, as the article's script). One difference from the article's hand-written loop: the
Trainer does not decay biases and layer norms (the article decayed every trained tensor).

Training runs on `transformers.Trainer`, so bf16 on CUDA (fp32 on CPU), gradient accumulation and
multi-process DDP (`torchrun --nproc_per_node N -m loralib.benchmark ...` or `accelerate launch`) need no
code of their own here. Only process 0 writes files.

Results layout: OUTPUT_DIR/<task>/results.json and OUTPUT_DIR/<task>/adapter/ (loralib's adapter format
for the loralib backend, the wrapper's `save_lora` for "article", PEFT's format plus loralib_task.json for
"peft"/"qlora"; `load_trained_model` reads all three). results.json holds: task, profile, backend, smoke
(True only for the smoke profile: a tiny random model on bundled synthetic data, never benchmark numbers),
note, model_id, seed, main_metric, metrics, metrics_by_split, epochs (one record per epoch: epoch, step,
learning_rate (the rate of the epoch's last optimizer step), train_loss (mean over the epoch), metrics
{split: {...}}, eval_loss {split: loss} (GLUE only)), config (every TrainConfig field), trainable_parameters,
total_parameters, train_examples (SQuAD: windows), train_time_s, wall_time_s, peak_memory {device, kind,
bytes} (CUDA: max allocated; CPU: the process's peak RSS), world_size, device, versions
(`loralib.versions()`), adapter {path, format, size_bytes}, finished_at. Non-finite numbers (e.g. the
Pearson correlation of constant predictions) are written as null, so the file is strict JSON. A task whose
results.json exists is skipped on a rerun unless overwrite=True (CLI --overwrite); a finished run with
another profile, backend, seed or model in the same directory is an error rather than a silent skip.

`metrics` holds the final epoch's metrics with the exact key names `loralib.metrics` returns (fractions for
GLUE: accuracy, f1, matthews_correlation, pearson, spearmanr; percentages for SQuAD: exact_match/f1, or
exact/f1/HasAns_exact/... for v2). For a task with one evaluation split it is that flat dict. MNLI has two
(validation_matched and validation_mismatched): then `metrics` is nested by split name,
{"validation_matched": {"accuracy": ...}, "validation_mismatched": {"accuracy": ...}}. `metrics_by_split` is
always nested that way, for code that wants one shape for every task; `final_metric(results)` reads one
number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from loralib.checks import (
    check_alpha,
    check_bool,
    check_dropout,
    check_int,
    check_names,
    check_number,
    check_rank,
    read_json,
)
from loralib.utils import atomic_write

BACKENDS = ("loralib", "article", "peft", "qlora")
FORMULATIONS = ("scaled", "article")
DEFAULT_LR = {"scaled": 5e-4, "article": 4e-5}
TASK_GROUPS = ("glue", "squad", "all")
RESULTS_NAME = "results.json"
ADAPTER_DIR = "adapter"
# Metrics the Trainer adds to every evaluation; they are run statistics, not task metrics.
_TRAINER_EVAL_STATS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


@dataclass
class TrainConfig:
    """Everything one fine-tuning run depends on; the defaults are the article's recipe on roberta-base.

    None means "decided by something else": model_id by the profile, formulation by the backend
    ("article" for the article backend, "scaled" otherwise), learning_rate by the formulation
    (DEFAULT_LR), alpha = r, bf16 = "on GPUs with native bf16, fp16 with gradient scaling on other
    GPUs (a T4), fp32 on CPU" (False: fp32 everywhere), num_threads = torch's setting (CPU
    intra-op threads during the run; the smoke profile uses 1).
    """

    task: str = "sst2"
    backend: str = "loralib"
    model_id: str | None = None
    formulation: str | None = None
    r: int = 8
    alpha: float | None = None
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("query", "value")
    train_biases: bool = True
    train_layer_norms: bool = True
    learning_rate: float | None = None
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_epsilon: float = 1e-6
    batch_size: int = 16
    eval_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    epochs: int = 6
    warmup_epochs: float = 2.0
    seed: int = 0
    max_length: int = 128
    qa_max_length: int = 384
    qa_stride: int = 128
    n_best_size: int = 20
    max_answer_length: int = 30
    null_score_diff_threshold: float = 0.0
    data_dir: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    bf16: bool | None = None
    progress: bool = True
    num_workers: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.target_modules = tuple(check_names(self.target_modules, "target_modules", allow_empty=False))
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}.")
        if self.formulation is None:
            self.formulation = "article" if self.backend == "article" else "scaled"
        if self.formulation not in FORMULATIONS:
            raise ValueError(
                f"unknown formulation {self.formulation!r}; choose 'scaled' (kaiming A, alpha/r, lr 5e-4) "
                "or 'article' (A ~ N(0,1), unscaled, lr 4e-5)."
            )
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LR[self.formulation]
        check_rank(self.r)
        for name in ("batch_size", "eval_batch_size", "gradient_accumulation_steps", "epochs"):
            check_int(getattr(self, name), name, 1)
        check_alpha(self.alpha)
        check_dropout(self.lora_dropout, "lora_dropout")
        for name in (
            "learning_rate",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "warmup_epochs",
        ):
            check_number(getattr(self, name), name)
        check_number(self.learning_rate, "learning_rate", positive=True)
        check_number(self.weight_decay, "weight_decay", minimum=0.0)
        for name in ("train_biases", "train_layer_norms", "progress"):
            check_bool(getattr(self, name), name)
        check_int(self.seed, "seed", None)
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(
                f"warmup_epochs={self.warmup_epochs} must be in [0, epochs={self.epochs}): the learning rate "
                "warms up for warmup_epochs, then decays linearly to 0 over the remaining epochs."
            )
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads <= 0):
            raise ValueError(
                f"num_threads must be a positive integer or None (torch's default), got {self.num_threads!r}."
            )
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None (all rows), got {value!r}.")
        if self.qa_stride >= self.qa_max_length:
            raise ValueError(
                f"qa_stride={self.qa_stride} must be smaller than qa_max_length={self.qa_max_length}: it is "
                "the overlap between consecutive windows of a long context."
            )

    @property
    def warmup_fraction(self) -> float:
        """Share of all optimizer steps spent warming up (2/6 by default)."""
        return self.warmup_epochs / self.epochs

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


@dataclass(frozen=True)
class Profile:
    """A named set of defaults: which model, which data, how much of it, and whether results are smoke."""

    name: str
    description: str
    model_id: str | None  # None: the offline tiny RoBERTa
    smoke: bool
    overrides: dict[str, Any] = field(default_factory=dict)


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        "smoke",
        "tiny random RoBERTa (loralib.tiny) on the bundled synthetic mini datasets, 2 epochs: checks the "
        "pipeline offline in seconds per task. NOT benchmark numbers.",
        model_id=None,
        smoke=True,
        overrides=dict(
            data_dir="bundled",
            epochs=2,
            warmup_epochs=2 / 3,  # the article's 1:2 warm-up:decay shape, in 2 epochs
            max_train_samples=64,
            max_eval_samples=48,
            qa_max_length=192,
            qa_stride=64,
            eval_batch_size=32,
            # The tiny model gains nothing from intra-op threads, and on a busy CPU one thread is
            # several times faster than two fighting over the cores.
            num_threads=1,
        ),
    ),
    "cpu": Profile(
        "cpu",
        "distilroberta-base (82M, hub) on subsets of the real datasets (2000 train / 500 eval rows), "
        "3 epochs (1 warm-up): real learning on a laptop CPU in minutes per task; needs the internet. "
        "Not comparable to the references (smaller model, less data).",
        model_id="distilbert/distilroberta-base",
        smoke=False,
        overrides=dict(epochs=3, warmup_epochs=1.0, max_train_samples=2000, max_eval_samples=500),
    ),
    "gpu": Profile(
        "gpu",
        "the article's setup: FacebookAI/roberta-base, full datasets from the hub, 6 epochs (2 warm-up), "
        "batch 16, rank 8 on query/value; bf16 on CUDA. Hours per large task (QQP, MNLI, SQuAD).",
        model_id="FacebookAI/roberta-base",
        smoke=False,
        overrides={},
    ),
}


# ---------------------------------------------------------------- tasks


def _task_tables() -> tuple[dict, dict]:
    from loralib.data import GLUE_TASKS, SQUAD_TASKS

    return GLUE_TASKS, SQUAD_TASKS


def task_spec(task: str):
    """The `loralib.data.TaskSpec` of `task`; a clear error lists the valid names."""
    glue, squad = _task_tables()
    if task in glue:
        return glue[task]
    if task in squad:
        return squad[task]
    raise ValueError(
        f"unknown task {task!r}. Valid tasks: {', '.join([*glue, *squad])}; "
        f"or the groups {', '.join(TASK_GROUPS)} (glue = the nine GLUE tasks; on the command line squad = squad "
        "and squad_v2, squad_v1 = SQuAD v1.1 alone)."
    )


def is_qa(task: str) -> bool:
    """True for the SQuAD tasks (extractive question answering)."""
    return task in _task_tables()[1]


def resolve_tasks(names: str | Iterable[str]) -> list[str]:
    """Expand task names and groups into hub config names, in order, each once.

    Groups: "glue" (the nine GLUE tasks), "squad" (squad and squad_v2), "all". Because "squad" names the
    group here, SQuAD v1.1 alone is "squad_v1" (its runs are still stored under the hub name "squad").
    """
    glue, squad = _task_tables()
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError(
            f"no task given; choose from {', '.join([*glue, *squad])} or {', '.join(TASK_GROUPS)}."
        )
    out: list[str] = []
    for name in names:
        key = str(name).strip().lower().replace("-", "_")
        if key == "glue":
            expanded = list(glue)
        elif key == "squad":
            expanded = list(squad)
        elif key == "all":
            expanded = [*glue, *squad]
        elif key == "squad_v1":
            expanded = ["squad"]
        else:
            task_spec(key)  # raises, listing the valid names
            expanded = [key]
        out.extend(t for t in expanded if t not in out)
    return out


# ---------------------------------------------------------------- config


def make_config(task: str, profile: str = "smoke", **overrides: Any) -> TrainConfig:
    """TrainConfig for `task` under `profile`, then `overrides` (any TrainConfig field) on top.

    An override given as None is applied as None (data_dir=None means the hub, max_train_samples=None all
    rows), except model_id=None, which keeps the profile's model.
    """
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}.")
    task_spec(task)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown TrainConfig field(s) {unknown}; valid fields: {', '.join(sorted(known))}.")
    prof = PROFILES[profile]
    # Explicit overrides win, None included (data_dir=None: the hub; max_train_samples=None: all rows),
    # except model_id=None, which means "the profile's model".
    values: dict[str, Any] = {**prof.overrides, **overrides}
    values["task"] = task
    if values.get("model_id") is None:
        values["model_id"] = prof.model_id
    return TrainConfig(**values)


def resolve_model_id(cfg: TrainConfig) -> str:
    """cfg.model_id, or the offline tiny RoBERTa's directory when it is None (the smoke profile)."""
    if cfg.model_id:
        return cfg.model_id
    from loralib.tiny import tiny_roberta

    return tiny_roberta()


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def per_device_batch_size(cfg: TrainConfig, world_size: int | None = None) -> int:
    """Per-process micro-batch giving the effective batch `cfg.batch_size` (processes x accumulation)."""
    world = world_size or _world_size()
    denom = world * cfg.gradient_accumulation_steps
    if cfg.batch_size % denom:
        raise ValueError(
            f"batch_size={cfg.batch_size} (the effective batch) is not divisible by processes ({world}) x "
            f"gradient_accumulation_steps ({cfg.gradient_accumulation_steps}); choose values whose product "
            "divides it (e.g. batch 16 = 2 processes x 2 steps x 4 per device)."
        )
    return cfg.batch_size // denom


# ---------------------------------------------------------------- data


def _data_error(task: str, cfg: TrainConfig, exc: Exception) -> RuntimeError:
    where = "the Hugging Face Hub" if cfg.data_dir in (None, "") else repr(cfg.data_dir)
    return RuntimeError(
        f"could not load the {task!r} data from {where}: {type(exc).__name__}: {exc}\n"
        "Offline? Use the bundled mini datasets (data_dir='bundled', CLI --data-dir bundled, or "
        "--profile smoke), or a local copy in the hub's schema (--data-dir PATH)."
    )


def _subset(ds, n: int | None, shuffle_seed: int | None):
    if n is None or n >= len(ds):
        return ds
    if shuffle_seed is not None:
        ds = ds.shuffle(seed=shuffle_seed)
    return ds.select(range(n))


def load_raw_data(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """(train split, {eval split name: split}) for cfg.task, subset by max_train/eval_samples."""
    spec = task_spec(cfg.task)
    from loralib import data

    try:
        if is_qa(cfg.task):
            dsd = data.load_squad(cfg.task, data_dir=cfg.data_dir)
        else:
            dsd = data.load_glue(cfg.task, data_dir=cfg.data_dir)
    except (ValueError, TypeError, KeyError):
        raise
    except Exception as exc:  # hub / network / file errors: name the offline options
        raise _data_error(cfg.task, cfg, exc) from exc
    missing = [s for s in (spec.train_split, *spec.eval_splits) if s not in dsd]
    if missing:
        raise ValueError(
            f"the {cfg.task!r} data has splits {list(dsd)}, missing {missing}; a local data directory must "
            "hold the hub's split names."
        )
    # Train subsets are shuffled (some GLUE train files are ordered); eval subsets are the first rows.
    train = _subset(dsd[spec.train_split], cfg.max_train_samples, cfg.seed)
    evals = {s: _subset(dsd[s], cfg.max_eval_samples, None) for s in spec.eval_splits}
    return train, evals


# ---------------------------------------------------------------- models


def _head_name(task: str) -> str:
    return "qa_outputs" if is_qa(task) else "classifier"


def _label_maps(spec) -> tuple[dict[int, str], dict[str, int]]:
    names = list(getattr(spec, "label_names", None) or [])
    if spec.is_regression or not names:
        return {}, {}
    return dict(enumerate(names)), {n: i for i, n in enumerate(names)}


def _load_error(model_id: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load model {model_id!r}: {type(exc).__name__}: {exc}\n"
        "Offline? Use --profile smoke (the tiny RoBERTa built locally) or --model-id PATH to a local copy."
    )


def build_model(cfg: TrainConfig, model_id: str | None = None) -> torch.nn.Module:
    """The model of `cfg.backend` for `cfg.task`, with LoRA in place and only the recipe's tensors trainable."""
    spec = task_spec(cfg.task)
    model_id = model_id or resolve_model_id(cfg)
    qa = is_qa(cfg.task)
    alpha = cfg.alpha if cfg.alpha is not None else cfg.r
    from loralib.utils import set_seed

    set_seed(cfg.seed)  # the head's and A's random init are part of the run
    if cfg.backend == "loralib":
        from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

        from loralib.injection import inject_lora, mark_only_lora_as_trainable

        try:
            if qa:
                model = AutoModelForQuestionAnswering.from_pretrained(model_id)
            else:
                id2label, label2id = _label_maps(spec)
                kwargs = dict(id2label=id2label, label2id=label2id) if id2label else {}
                model = AutoModelForSequenceClassification.from_pretrained(
                    model_id,
                    num_labels=spec.num_labels,
                    problem_type="regression" if spec.is_regression else "single_label_classification",
                    **kwargs,
                )
        except OSError as exc:
            raise _load_error(model_id, exc) from exc
        init = "kaiming" if cfg.formulation == "scaled" else "article"
        inject_lora(
            model, list(cfg.target_modules), r=cfg.r, alpha=alpha, dropout=cfg.lora_dropout, init=init
        )
        mark_only_lora_as_trainable(
            model,
            bias="all" if cfg.train_biases else "none",
            train_layer_norms=cfg.train_layer_norms,
            modules_to_save=[_head_name(cfg.task)],
        )
        return model
    if cfg.backend == "article":
        from loralib.roberta import LoraWrapperRoberta

        try:
            return LoraWrapperRoberta(
                task_type=("squad_v1" if cfg.task == "squad" else cfg.task) if qa else "glue",
                num_classes=None if qa else spec.num_labels,
                model_id=model_id,
                lora_rank=cfg.r,
                formulation=cfg.formulation,
                lora_alpha=None if cfg.formulation == "article" else alpha,  # the article's form has no scale
                lora_dropout=cfg.lora_dropout,
                train_biases=cfg.train_biases,
                train_layer_norms=cfg.train_layer_norms,
                null_score_diff_threshold=cfg.null_score_diff_threshold,
            )
        except OSError as exc:
            raise _load_error(model_id, exc) from exc
    from loralib.peft_backend import build_peft_model

    # The same trainable set as the loralib backend (targets, biases, norms, head), so backends compare.
    kind = "question_answering" if qa else ("regression" if spec.is_regression else "classification")
    id2label, _ = _label_maps(spec)
    to_save = [_head_name(cfg.task)] + (["LayerNorm"] if cfg.train_layer_norms else [])
    try:
        return build_peft_model(
            model_id,
            task_kind=kind,
            num_labels=None if qa else spec.num_labels,
            quantize=cfg.backend == "qlora",
            r=cfg.r,
            lora_alpha=alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(cfg.target_modules),
            modules_to_save=to_save,
            bias="all" if cfg.train_biases else "none",
            id2label=id2label or None,
        )
    except OSError as exc:
        raise _load_error(model_id, exc) from exc


# ---------------------------------------------------------------- trainer


def _to_float(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


def _make_trainer_class():
    from transformers import Trainer
    from transformers.optimization import get_linear_schedule_with_warmup
    from transformers.trainer_utils import speed_metrics

    class BenchmarkTrainer(Trainer):
        """Trainer with the epoch-based warm-up, per-split evaluation records and SQuAD post-processing."""

        def __init__(self, *args, loralib_cfg: TrainConfig, qa_eval: dict | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self.loralib_cfg = loralib_cfg
            self.qa_eval = qa_eval  # {split: (examples, features)} for SQuAD
            self.eval_records: list[dict[str, Any]] = []

        def create_scheduler(self, num_training_steps: int, optimizer=None):
            # num_training_steps = epochs x updates per epoch, so this is warmup_epochs of updates exactly.
            if self.lr_scheduler is None:
                warmup = round(num_training_steps * self.loralib_cfg.warmup_fraction)
                self.lr_scheduler = get_linear_schedule_with_warmup(
                    optimizer if optimizer is not None else self.optimizer, warmup, num_training_steps
                )
                self._created_lr_scheduler = True
            return self.lr_scheduler

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
            if eval_dataset is not None or not isinstance(self.eval_dataset, dict):
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            merged: dict[str, Any] = {}
            record: dict[str, Any] = {
                "epoch": round(self.state.epoch or 0),
                "step": self.state.global_step,
                "metrics": {},
                "eval_loss": {},
            }
            for split, ds in self.eval_dataset.items():
                prefix = f"{metric_key_prefix}_{split}"
                if self.qa_eval is None:
                    out = super().evaluate(ds, ignore_keys, prefix)
                else:
                    out = self._evaluate_qa(split, ds, ignore_keys, prefix)
                merged.update(out)
                stripped = {
                    k[len(prefix) + 1 :]: _to_float(v) for k, v in out.items() if k.startswith(prefix)
                }
                record["metrics"][split] = {k: v for k, v in stripped.items() if k not in _TRAINER_EVAL_STATS}
                if "loss" in stripped:
                    record["eval_loss"][split] = stripped["loss"]
            self.eval_records.append(record)
            return merged

        def _evaluate_qa(self, split: str, ds, ignore_keys, prefix: str) -> dict[str, Any]:
            from loralib.metrics import squad_metrics
            from loralib.qa import postprocess_qa_predictions

            cfg = self.loralib_cfg
            examples, features = self.qa_eval[split]
            start = time.time()
            output = self.evaluation_loop(
                self.get_eval_dataloader(ds),
                description=f"Evaluation ({split})",
                prediction_loss_only=False,
                ignore_keys=ignore_keys,
                metric_key_prefix=prefix,
            )
            start_logits, end_logits = output.predictions[0], output.predictions[1]
            v2 = cfg.task == "squad_v2"
            preds, null_diffs = postprocess_qa_predictions(
                examples,
                features,
                start_logits,
                end_logits,
                version_2=v2,
                n_best_size=cfg.n_best_size,
                max_answer_length=cfg.max_answer_length,
                null_score_diff_threshold=cfg.null_score_diff_threshold,
            )
            # The null-score differences are the no-answer scores; with the same threshold the metric's
            # "counts as no answer" rule agrees with the predictions, and best_* sweep the threshold.
            raw = (
                squad_metrics(
                    preds,
                    examples,
                    version_2=True,
                    no_answer_probs=null_diffs,
                    no_answer_threshold=cfg.null_score_diff_threshold,
                )
                if v2
                else squad_metrics(preds, examples)
            )
            metrics = {f"{prefix}_{k}": _to_float(v) for k, v in raw.items()}
            metrics.update(speed_metrics(prefix, start, num_samples=len(features)))
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return BenchmarkTrainer


def _glue_compute_metrics(task: str, is_regression: bool):
    from loralib.metrics import glue_metrics

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        logits = np.asarray(logits)
        preds = logits.reshape(-1) if is_regression else logits.argmax(-1)
        labels = np.asarray(pred.label_ids).reshape(-1)
        return {k: _to_float(v) for k, v in glue_metrics(task, preds, labels).items()}

    return compute


def _tokenize(cfg: TrainConfig, tokenizer, train, evals, main_process_first):
    """Model-ready datasets: (train_features, {split: eval_features}, qa_eval or None)."""
    if not is_qa(cfg.task):
        from loralib.data import tokenize_glue

        cols = ["input_ids", "attention_mask", "labels"]
        with main_process_first(desc="tokenize"):
            tr = tokenize_glue(train, tokenizer, cfg.task, max_length=cfg.max_length).select_columns(cols)
            ev = {
                s: tokenize_glue(d, tokenizer, cfg.task, max_length=cfg.max_length).select_columns(cols)
                for s, d in evals.items()
            }
        return tr, ev, None
    from loralib.qa import prepare_eval_features, prepare_train_features

    kw = dict(max_length=cfg.qa_max_length, stride=cfg.qa_stride)
    with main_process_first(desc="tokenize"):
        tr = train.map(
            lambda b: prepare_train_features(b, tokenizer, **kw),
            batched=True,
            remove_columns=train.column_names,
            desc="train windows",
        ).select_columns(["input_ids", "attention_mask", "start_positions", "end_positions"])
        ev, qa_eval = {}, {}
        for s, d in evals.items():
            feats = d.map(
                lambda b: prepare_eval_features(b, tokenizer, **kw),
                batched=True,
                remove_columns=d.column_names,
                desc=f"{s} windows",
            )
            ev[s] = feats.select_columns(["input_ids", "attention_mask"])
            qa_eval[s] = (d, feats)
    return tr, ev, qa_eval


def build_trainer(
    cfg: TrainConfig,
    work_dir: str | os.PathLike,
    callbacks: Sequence[Any] = (),
):
    """(trainer, model, tokenizer, model_id) for `cfg`, with data loaded and tokenised.

    `work_dir` receives the Trainer's scratch files (no checkpoints are saved). Exposed so tests and
    notebooks can look at the optimizer and schedule; `run_task` is the normal entry point.
    """
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    spec = task_spec(cfg.task)
    world = _world_size()
    per_device = per_device_batch_size(cfg, world)
    from loralib.utils import mixed_precision

    cuda = torch.cuda.is_available()
    # Native bf16 only: a T4 reports bf16 "supported" through slow emulation; it gets fp16 + scaling.
    precision = mixed_precision() if cfg.bf16 is None else ("bf16" if cfg.bf16 else "fp32")
    bf16, fp16 = precision == "bf16", precision == "fp16"
    if bf16 and not cuda:
        raise ValueError("bf16=True needs a CUDA GPU here; on CPU leave bf16=None (fp32).")
    args = TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=per_device,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_epsilon=cfg.adam_epsilon,
        lr_scheduler_type="linear",
        eval_strategy="epoch",
        logging_strategy="epoch",
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=bf16,
        fp16=fp16,
        use_cpu=not cuda,
        dataloader_num_workers=cfg.num_workers,
        disable_tqdm=not cfg.progress,
        remove_unused_columns=False,  # datasets carry exactly the model inputs (see _tokenize)
        label_names=["start_positions", "end_positions"] if is_qa(cfg.task) else ["labels"],
        ddp_find_unused_parameters=cfg.backend == "article",
    )
    # Process 0 first: it builds the tiny model / fills the hub caches, the others then read them.
    with args.main_process_first(desc="model and data"):
        model_id = resolve_model_id(cfg)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_id)
        except OSError as exc:
            raise _load_error(model_id, exc) from exc
        train, evals = load_raw_data(cfg)
    train_feats, eval_feats, qa_eval = _tokenize(cfg, tokenizer, train, evals, args.main_process_first)
    model = build_model(cfg, model_id)
    optimizers = (None, None)  # the Trainer's AdamW (no decay on biases and norms) and our schedule
    if cfg.backend == "qlora":
        from loralib.peft_backend import make_optimizer

        adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        optimizers = (
            make_optimizer(model, cfg.learning_rate, weight_decay=cfg.weight_decay, eight_bit=True, **adam),
            None,
        )
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_feats,
        eval_dataset=eval_feats,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=None if qa_eval is not None else _glue_compute_metrics(cfg.task, spec.is_regression),
        callbacks=list(callbacks),
        optimizers=optimizers,
        loralib_cfg=cfg,
        qa_eval=qa_eval,
    )
    return trainer, model, tokenizer, model_id


# ---------------------------------------------------------------- results


def _json_safe(obj: Any) -> Any:
    """NaN / inf (e.g. Pearson of constant predictions) become null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _atomic_write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results.json (give the file or its task directory)."""
    p = Path(path)
    p = p / RESULTS_NAME if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(
            f"no {RESULTS_NAME} at {p}; run `python -m loralib.benchmark --task ...` first."
        )
    return read_json(p, "a results.json written by run_task")


def final_metric(results: dict[str, Any], metric: str | None = None, split: str | None = None) -> float:
    """One number from a results dict: `metric` (default: the task's main metric) on `split` (default: the
    first evaluation split, e.g. validation_matched for MNLI)."""
    by_split = results["metrics_by_split"]
    split = split or next(iter(by_split))
    if split not in by_split:
        raise KeyError(f"split {split!r} not in the results; it has {list(by_split)}.")
    metric = metric or results["main_metric"]
    if metric not in by_split[split]:
        raise KeyError(f"metric {metric!r} not in the results; {split} has {list(by_split[split])}.")
    return by_split[split][metric]


def _peak_memory() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {
            "device": torch.cuda.get_device_name(0),
            "kind": "cuda_max_memory_allocated",
            "bytes": int(torch.cuda.max_memory_allocated()),
        }
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return {
        "device": "cpu",
        "kind": "process_max_rss",
        "bytes": int(rss if sys.platform == "darwin" else rss * 1024),
    }


def _epoch_records(trainer) -> list[dict[str, Any]]:
    train_logs = {round(e["epoch"]): e for e in trainer.state.log_history if "loss" in e and "epoch" in e}
    out = []
    for rec in trainer.eval_records:
        log = train_logs.get(rec["epoch"], {})
        out.append(
            {
                "epoch": rec["epoch"],
                "step": rec["step"],
                "learning_rate": log.get("learning_rate"),
                "train_loss": log.get("loss"),
                "metrics": rec["metrics"],
                "eval_loss": rec["eval_loss"],
            }
        )
    return out


def _save_adapter(cfg: TrainConfig, model, spec, model_id: str, directory: Path) -> dict[str, Any]:
    id2label, _ = _label_maps(spec)
    meta = dict(
        task=cfg.task,
        num_labels=spec.num_labels,
        id2label={str(k): v for k, v in id2label.items()},
        base_model=model_id,
        backend=cfg.backend,
        formulation=cfg.formulation,
    )
    from loralib.adapters import adapter_size_bytes

    if cfg.backend == "loralib":
        from loralib.adapters import save_lora

        save_lora(model, directory, **meta)
        return {"path": ADAPTER_DIR, "format": "loralib", "size_bytes": adapter_size_bytes(directory)}
    if cfg.backend == "article":
        own = model.lora_metadata()  # the wrapper records these itself; metadata may not repeat them
        model.save_lora(directory, **{k: v for k, v in meta.items() if k not in own})
        return {"path": ADAPTER_DIR, "format": "article", "size_bytes": adapter_size_bytes(directory)}
    from loralib.peft_backend import save_peft_model

    save_peft_model(
        model, directory, **{k: v for k, v in meta.items() if k in ("task", "backend", "formulation")}
    )
    size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
    return {"path": ADAPTER_DIR, "format": "peft", "size_bytes": size}


class ResultsExistError(ValueError):
    """The output directory already holds a finished run made with other settings."""


def _check_compatible(existing: dict[str, Any], cfg: TrainConfig, profile: str, path: Path) -> None:
    mine = {"profile": profile, "backend": cfg.backend, "seed": cfg.seed, "model_id": cfg.model_id}
    theirs = {k: existing.get(k) for k in ("profile", "backend", "seed")}
    theirs["model_id"] = existing.get("config", {}).get("model_id")
    if mine != theirs:
        raise ResultsExistError(
            f"{path} holds a finished run with {theirs}, not {mine}; pass overwrite=True (CLI --overwrite) "
            "to replace it, or choose another output directory."
        )


def default_output_dir(profile: str) -> Path:
    """Where runs go without --output-dir: loralib.output_dir("benchmark", profile)."""
    from loralib.utils import output_dir

    return output_dir("benchmark", profile)


def run_task(
    task: str,
    profile: str = "smoke",
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune and evaluate one task; write OUTPUT_DIR/<task>/results.json and the adapter; return the results.

    A task whose results.json already exists is skipped (its stored results are returned, with
    "skipped": True) unless overwrite=True. overrides: any TrainConfig field (learning_rate, epochs,
    backend, model_id, data_dir, max_train_samples, ...).
    """
    t0 = time.perf_counter()
    cfg = make_config(task, profile, **overrides)
    spec = task_spec(task)
    root = Path(output_dir) if output_dir is not None else default_output_dir(profile)
    task_dir = root / task
    results_path = task_dir / RESULTS_NAME
    if results_path.exists() and not overwrite:
        existing = read_results(results_path)
        _check_compatible(existing, cfg, profile, results_path)
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"[skip] {task}: finished run in {results_path} (overwrite=True / --overwrite to rerun)")
        return {**existing, "skipped": True}
    from loralib.utils import count_parameters, versions

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    threads = torch.get_num_threads()
    try:
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        with tempfile.TemporaryDirectory(prefix="trainer-") as scratch:
            trainer, model, _tok, model_id = build_trainer(cfg, scratch, callbacks)
            params = count_parameters(model)
            t_train = time.perf_counter()
            trainer.train()
            train_time = time.perf_counter() - t_train
    finally:
        torch.set_num_threads(threads)
    epochs = _epoch_records(trainer)
    if not epochs:
        raise RuntimeError(f"{task}: training finished without an evaluation; this is a bug in run_task.")
    by_split = epochs[-1]["metrics"]
    metrics = by_split if len(by_split) > 1 else next(iter(by_split.values()))
    results: dict[str, Any] = {
        "task": task,
        "profile": profile,
        "backend": cfg.backend,
        "smoke": PROFILES[profile].smoke,
        "note": PROFILES[profile].description,
        "model_id": model_id if cfg.model_id else "loralib.tiny.tiny_roberta()",
        "seed": cfg.seed,
        "main_metric": spec.main_metric,
        "metrics": metrics,
        "metrics_by_split": by_split,
        "epochs": epochs,
        "config": cfg.to_dict(),
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "train_examples": len(trainer.train_dataset),
        "train_time_s": round(train_time, 3),
        "peak_memory": _peak_memory(),
        "world_size": trainer.args.world_size,
        "device": str(trainer.args.device),
        "precision": "bf16" if trainer.args.bf16 else ("fp16" if trainer.args.fp16 else "fp32"),
        "versions": versions(),
    }
    if trainer.is_world_process_zero():
        task_dir.mkdir(parents=True, exist_ok=True)
        adapter_dir = task_dir / ADAPTER_DIR
        if adapter_dir.exists():  # an overwritten run of another backend must not leave its files behind
            shutil.rmtree(adapter_dir)
        results["adapter"] = _save_adapter(cfg, trainer.model, spec, model_id, adapter_dir)
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
        results["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        _atomic_write_json(results_path, results)
    trainer.accelerator.wait_for_everyone()
    return _json_safe(results)  # the same values the file holds (NaN -> None)


def run_benchmark(
    tasks: str | Iterable[str],
    profile: str = "smoke",
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    **overrides: Any,
) -> dict[str, dict[str, Any]]:
    """`run_task` for each task (names or the groups glue / squad / all), in order; {task: results}."""
    out = {}
    for task in resolve_tasks(tasks):
        out[task] = run_task(task, profile=profile, output_dir=output_dir, overwrite=overwrite, **overrides)
    return out


def load_trained_model(task_dir: str | os.PathLike) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, results) rebuilt from a finished run's directory: base model + saved adapter.

    Works for every backend (loralib: stock model + `load_lora`; article: `LoraWrapperRoberta.from_lora`;
    peft / qlora: `loralib.peft_backend.load_peft_model`); the model is returned in eval mode.
    """
    from transformers import AutoTokenizer

    task_dir = Path(task_dir)
    results = read_results(task_dir)
    cfg = TrainConfig(**{**results["config"], "target_modules": tuple(results["config"]["target_modules"])})
    adapter = task_dir / results["adapter"]["path"]
    model_id = resolve_model_id(cfg)
    fmt = results["adapter"]["format"]
    if fmt == "peft":
        from loralib.peft_backend import load_peft_model

        model = load_peft_model(adapter, device="cpu", base_model_name_or_path=model_id)
    elif fmt == "article":
        from loralib.roberta import LoraWrapperRoberta

        model = LoraWrapperRoberta.from_lora(adapter, model_id=model_id)
    else:
        from loralib.adapters import load_lora

        model = build_model(cfg, model_id)
        load_lora(model, adapter)
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_id), results


def eval_rows(results: dict[str, Any], split: str | None = None):
    """The exact evaluation rows a finished run was scored on (same data source and subset)."""
    cfg = TrainConfig(**{**results["config"], "target_modules": tuple(results["config"]["target_modules"])})
    _, evals = load_raw_data(cfg)
    split = split or next(iter(evals))
    if split not in evals:
        raise KeyError(f"split {split!r} not in {list(evals)}.")
    return evals[split]


def predict_qa(
    model: torch.nn.Module,
    tokenizer,
    examples,
    max_length: int = 384,
    stride: int = 128,
    batch_size: int = 32,
) -> tuple[Any, np.ndarray, np.ndarray]:
    """(windows, start_logits, end_logits) of a QA model on SQuAD rows, ready for
    `loralib.qa.postprocess_qa_predictions` (windows from `loralib.qa.prepare_eval_features`)."""
    from loralib.qa import prepare_eval_features

    feats = examples.map(
        lambda b: prepare_eval_features(b, tokenizer, max_length=max_length, stride=stride),
        batched=True,
        remove_columns=examples.column_names,
    )
    device = next(model.parameters()).device
    starts, ends = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(feats), batch_size):
                rows = feats[i : i + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                    padding="max_length",
                    max_length=max_length,
                    return_tensors="pt",
                )
                out = model(**{k: v.to(device) for k, v in batch.items()})
                starts.append(out.start_logits.float().cpu().numpy())
                ends.append(out.end_logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return feats, np.concatenate(starts), np.concatenate(ends)


def no_answer_sweep(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    thresholds: Iterable[float],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> list[dict[str, Any]]:
    """SQuAD v2 scores as the no-answer threshold varies: one row per threshold with threshold,
    no_answer_rate (share of questions answered "") and the `squad_metrics` v2 keys.

    A question is answered "" when its null score minus its best span score exceeds the threshold:
    a low threshold abstains often (good on unanswerable questions), a high one never abstains.
    """
    from loralib.metrics import squad_metrics
    from loralib.qa import postprocess_qa_predictions

    rows = []
    for t in thresholds:
        preds, diffs = postprocess_qa_predictions(
            examples,
            features,
            start_logits,
            end_logits,
            version_2=True,
            n_best_size=n_best_size,
            max_answer_length=max_answer_length,
            null_score_diff_threshold=float(t),
        )
        metrics = squad_metrics(
            preds, examples, version_2=True, no_answer_probs=diffs, no_answer_threshold=float(t)
        )
        rate = sum(p == "" for p in preds.values()) / len(preds)
        rows.append(
            {"threshold": float(t), "no_answer_rate": rate, **{k: _to_float(v) for k, v in metrics.items()}}
        )
    return rows
