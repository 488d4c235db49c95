"""The Hugging Face `Trainer` of a benchmark run: the run's data, tokenisation and its evaluations (each
epoch's end; with `evals_per_epoch` / `eval_on_start` also within epochs and before the first step).

Covers: `load_raw_data` (the task's splits, subset by max_train/eval_samples) and `eval_rows` (the exact
rows a finished run was scored on), tokenisation for GLUE and SQuAD, the Trainer subclass (epoch-based
warm-up and decay; GLUE metrics via `loralib.metrics.glue_metrics`, SQuAD via `loralib.qa`
post-processing and `loralib.metrics.squad_metrics`), the callback that asks for evaluations within
epochs, `build_trainer`, and `unwrap_autocast` (a trained
model without the Trainer's mixed-precision forward, for comparisons after training). Precision: bf16 on GPUs with
native bf16, fp16 with gradient scaling on other GPUs, fp32 on CPU; gradient accumulation and DDP are the
Trainer's. Not here: the models (`loralib.benchmark.backends`), the results file (`loralib.benchmark.results`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from loralib.benchmark.backends import build_model, load_error
from loralib.benchmark.config import (
    TrainConfig,
    config_from_results,
    is_qa,
    per_device_batch_size,
    process_count,
    resolve_model_id,
    task_spec,
)
from loralib.benchmark.results import TRAINER_EVAL_STATS


def load_raw_data(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """(train split, {eval split name: split}) for cfg.task, subset by max_train/eval_samples."""
    spec = task_spec(cfg.task)
    from loralib import data

    # Offline, the hub raises loralib.data.DataUnavailableError, which names the local options.
    if is_qa(cfg.task):
        dsd = data.load_squad(cfg.task, data_dir=cfg.data_dir)
    else:
        dsd = data.load_glue(cfg.task, data_dir=cfg.data_dir)
    missing = [s for s in (spec.train_split, *spec.eval_splits) if s not in dsd]
    if missing:
        raise ValueError(
            f"the {cfg.task!r} data has splits {list(dsd)}, missing {missing}; a local data directory must "
            "hold the hub's split names."
        )
    # Train subsets are a seeded sample; eval subsets are spread evenly over the split (data.subset_rows).
    train = data.subset_rows(dsd[spec.train_split], cfg.max_train_samples, cfg.seed)
    evals = {s: data.subset_rows(dsd[s], cfg.max_eval_samples) for s in spec.eval_splits}
    return train, evals


def eval_rows(results: dict[str, Any], split: str | None = None):
    """The exact evaluation rows a finished run was scored on (same data source and subset)."""
    cfg = config_from_results(results)
    _, evals = load_raw_data(cfg)
    split = split or next(iter(evals))
    if split not in evals:
        raise KeyError(f"split {split!r} not in {list(evals)}.")
    return evals[split]


def _to_float(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    return v


def squad_scores(cfg: TrainConfig, examples, features, start_logits, end_logits) -> dict[str, Any]:
    """SQuAD metrics of one evaluation: windows' logits -> answers (`loralib.qa`) -> `squad_metrics`."""
    from loralib.metrics import squad_metrics
    from loralib.qa import postprocess_qa_predictions

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
    return raw


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
                "epoch": round(self.state.epoch or 0, 6),  # fractional between epoch ends (evals_per_epoch)
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
                record["metrics"][split] = {k: v for k, v in stripped.items() if k not in TRAINER_EVAL_STATS}
                if "loss" in stripped:
                    record["eval_loss"][split] = stripped["loss"]
            self.eval_records.append(record)
            return merged

        def _evaluate_qa(self, split: str, ds, ignore_keys, prefix: str) -> dict[str, Any]:
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
            raw = squad_scores(cfg, examples, features, output.predictions[0], output.predictions[1])
            metrics = {f"{prefix}_{k}": _to_float(v) for k, v in raw.items()}
            metrics.update(speed_metrics(prefix, start, num_samples=len(features)))
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    return BenchmarkTrainer


def _within_epoch_steps(steps: int, epochs: int, evals_per_epoch: int) -> set[int]:
    """The optimizer steps, out of `steps` in `epochs` equal epochs, after which an evaluation falls
    within an epoch: every 1/evals_per_epoch of one, rounded to a step (the epoch ends are not included:
    the epoch strategy evaluates there)."""
    per_epoch = steps // epochs
    return {
        e * per_epoch + round(j * per_epoch / evals_per_epoch)
        for e in range(epochs)
        for j in range(1, evals_per_epoch)
        if 0 < round(j * per_epoch / evals_per_epoch) < per_epoch
    }


def _eval_within_epochs(evals_per_epoch: int, epochs: int) -> Any:
    """A TrainerCallback asking for an evaluation at every 1/evals_per_epoch of an epoch."""
    from transformers import TrainerCallback

    class EvalWithinEpochs(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.steps = _within_epoch_steps(state.max_steps, epochs, evals_per_epoch)

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step in self.steps:
                control.should_evaluate = True

    return EvalWithinEpochs()


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
    from loralib.logs import no_progress_bars

    with main_process_first(desc="tokenize"), no_progress_bars():  # seconds of windowing: no bars
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
    checkpoints: bool = False,
):
    """(trainer, model, tokenizer, model_id) for `cfg`, with data loaded and tokenised.

    `work_dir` receives the Trainer's files; with checkpoints=True a checkpoint at the end of every epoch
    (model, optimizer, schedule and RNG states; `run_task` adds `loralib.benchmark.identity`'s callback,
    which writes each one's manifest and keeps only the latest complete one), which `trainer.train(
    resume_from_checkpoint=...)` continues from. Exposed so tests and notebooks can look at the optimizer
    and schedule; `run_task` is the normal entry point.
    """
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    spec = task_spec(cfg.task)
    world = process_count()
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
        eval_on_start=cfg.eval_on_start,
        logging_strategy="epoch",
        save_strategy="epoch" if checkpoints else "no",
        # No rotation by the Trainer: it deletes the previous checkpoint before on_save, so a save cut short
        # could leave none complete. loralib.benchmark.identity's callback rotates after the manifest.
        save_total_limit=None,
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
            raise load_error(model_id, exc) from exc
        train, evals = load_raw_data(cfg)
    train_feats, eval_feats, qa_eval = _tokenize(cfg, tokenizer, train, evals, args.main_process_first)
    model = build_model(cfg, model_id)
    optimizers = (None, None)  # the Trainer's AdamW (no decay on biases and norms) and our schedule
    if cfg.backend == "qlora" or cfg.loraplus_lr_ratio is not None:
        from loralib.peft_backend import make_optimizer

        # QLoRA: 8-bit AdamW; LoRA+: B's larger rate as a parameter group (the scheduler keeps the ratio).
        adam = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)
        opt = make_optimizer(
            model,
            cfg.learning_rate,
            weight_decay=cfg.weight_decay,
            eight_bit=cfg.backend == "qlora",
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            **adam,
        )
        optimizers = (opt, None)
    trainer_cls = _make_trainer_class()
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train_feats,
        eval_dataset=eval_feats,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=None if qa_eval is not None else _glue_compute_metrics(cfg.task, spec.is_regression),
        callbacks=[
            *callbacks,
            *([_eval_within_epochs(cfg.evals_per_epoch, cfg.epochs)] if cfg.evals_per_epoch > 1 else []),
        ],
        optimizers=optimizers,
        loralib_cfg=cfg,
        qa_eval=qa_eval,
    )
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        # Without bars the Trainer prints every log dict instead; results.json keeps them all anyway.
        trainer.remove_callback(PrinterCallback)
    return trainer, model, tokenizer, model_id


def unwrap_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (the same object) with the mixed-precision wrapper a bf16 / fp16 Trainer put on its forward
    taken off, so that it computes as it would after a reload: comparing a trained model with its
    reloaded copy while one of them still runs under autocast measures the autocast, not the reload.
    A model with no such wrapper (fp32, CPU) is returned unchanged."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model, keep_fp32_wrapper=False)
