"""The results file of a benchmark run: its layout, writing it atomically, reading it back.

Results layout: OUTPUT_DIR/<task>/results.json and OUTPUT_DIR/<task>/adapter/ (loralib's adapter format
for the loralib backend, the wrapper's `save_lora` for "article", PEFT's format plus loralib_task.json for
"peft"/"qlora"; `load_trained_model` reads all three). results.json holds: task, profile, backend, run_kind
("smoke": the tiny random model; "toy": a pretrained model on bundled synthetic data; "real"), benchmark
(True only for a real run: the others are never benchmark numbers, whatever their profile), note, data_source (hub / bundled / local), pretrained and weights
(a pretrained checkpoint, or random loralib.tiny), model_id, seed, main_metric, metrics, metrics_by_split, epochs (one record per epoch: epoch, step,
learning_rate (the rate of the epoch's last optimizer step), train_loss (mean over the epoch), metrics
{split: {...}}, eval_loss {split: loss} (GLUE only)), evaluations (every evaluation in step order, the
epoch ends included: epoch (fractional within an epoch, 0 before training), step, metrics, eval_loss; more
points with `evals_per_epoch` / `eval_on_start`), data_fingerprint (a hash of the bundled or local rows the run
read, `loralib.data.data_fingerprint`; null for the hub), config (every TrainConfig field), trainable_parameters,
total_parameters, train_examples (SQuAD: windows), train_time_s, wall_time_s, peak_memory {device, kind,
bytes} (CUDA: max allocated; CPU: the process's peak RSS), world_size, device, precision (bf16 / fp16 /
fp32), versions (`loralib.utils.versions()`), adapter {path, format, size_bytes}, finished_at. Non-finite numbers (e.g. the
Pearson correlation of constant predictions) are written as null, so the file is strict JSON. A task whose
results.json exists is skipped on a rerun unless overwrite=True (CLI --overwrite); a finished run made with
any other setting that changes the numbers (`loralib.benchmark.identity`) is an error rather than a silent
skip. A resumed run records each resume under "resumed": [{"checkpoint", "epoch", "changed": {setting:
[checkpoint's, new]}}].

`metrics` holds the final epoch's metrics with the exact key names `loralib.metrics` returns (fractions for
GLUE: accuracy, f1, matthews_correlation, pearson, spearmanr; percentages for SQuAD: exact_match/f1, or
exact/f1/HasAns_exact/... for v2). For a task with one evaluation split it is that flat dict. MNLI has two
(validation_matched and validation_mismatched): then `metrics` is nested by split name,
{"validation_matched": {"accuracy": ...}, "validation_mismatched": {"accuracy": ...}}. `metrics_by_split` is
always nested that way, for code that wants one shape for every task; `final_metric(results)` reads one
number.

Covers: `read_results`, `final_metric`, the per-epoch and per-evaluation records, peak memory and `ResultsExistError`. Not
here: whether a rerun into the same directory has the same settings (`loralib.benchmark.identity`); producing the numbers
(`loralib.benchmark.run`), tables and plots beside the references (`loralib.benchmark.references`).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loralib.checks import (
    read_json,
)
from loralib.files import atomic_write

RESULTS_NAME = "results.json"
# Metrics the Trainer adds to every evaluation; they are run statistics, not task metrics.
TRAINER_EVAL_STATS = ("loss", "runtime", "samples_per_second", "steps_per_second", "model_preparation_time")


ADAPTER_DIR = "adapter"


def json_safe(obj: Any) -> Any:
    """NaN / inf (e.g. Pearson of constant predictions) become null: results.json stays strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def write_results_json(path: Path, obj: Any) -> None:
    """Write `obj` as strict JSON (NaN and inf as null) to `path`, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    """Load a results.json (give the file or its task directory)."""
    p = Path(path)
    p = p / RESULTS_NAME if p.is_dir() else p
    if not p.exists():
        raise FileNotFoundError(
            f"no {RESULTS_NAME} at {p}; run `python -m loralib.benchmark --task ...` first."
        )
    results = read_json(p, "a results.json written by run_task")
    if "run_kind" not in results and "smoke" in results:  # written before run_kind: smoke meant not real
        smoke = results.pop("smoke")
        results["run_kind"] = ("toy" if results.get("pretrained") else "smoke") if smoke else "real"
        results["benchmark"] = not smoke
    return results


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


def peak_memory_record() -> dict[str, Any]:
    """The run's peak memory: CUDA max allocated, or the CPU process's peak RSS."""
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


def _split_records(log_history: list[dict[str, Any]], splits: Sequence[str]) -> dict[int, dict[str, Any]]:
    """Evaluation records rebuilt from the Trainer's log (it survives in checkpoints; the in-memory
    records of a resumed run start at the resume point): {step: {"epoch", "step", "metrics", "eval_loss"}}."""
    out: dict[int, dict[str, Any]] = {}
    for entry in log_history:
        if "epoch" not in entry:
            continue
        for split in splits:
            prefix = f"eval_{split}_"
            stripped = {k[len(prefix) :]: v for k, v in entry.items() if k.startswith(prefix)}
            if not stripped:
                continue
            rec = out.setdefault(
                entry.get("step"),
                {
                    "epoch": round(entry["epoch"], 6),
                    "step": entry.get("step"),
                    "metrics": {},
                    "eval_loss": {},
                },
            )
            rec["metrics"].setdefault(split, {}).update(
                {k: v for k, v in stripped.items() if k not in TRAINER_EVAL_STATS}
            )
            if "loss" in stripped:
                rec["eval_loss"][split] = stripped["loss"]
    return out


def evaluation_records(trainer, splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every evaluation of the run in step order: epoch (fractional within an epoch, 0 before training),
    step, metrics {split: {...}}, eval_loss {split: loss}. More than the epoch ends with
    `TrainConfig.evals_per_epoch` > 1 or `eval_on_start`."""
    records = _split_records(trainer.state.log_history, splits)
    records.update({rec["step"]: rec for rec in trainer.eval_records})
    return [records[step] for step in sorted(records)]


def epoch_records(trainer, splits: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One record per evaluated epoch end: step, learning rate, train loss, metrics and eval loss.

    The trainer's in-memory records come first; epochs before a resume point are rebuilt from its log.
    """
    train_logs = {round(e["epoch"]): e for e in trainer.state.log_history if "loss" in e and "epoch" in e}
    out = []
    for rec in evaluation_records(trainer, splits):
        epoch = round(rec["epoch"])
        if epoch < 1 or abs(rec["epoch"] - epoch) > 1e-6:  # before training, or within an epoch
            continue
        log = train_logs.get(epoch, {})
        out.append(
            {
                "epoch": epoch,
                "step": rec["step"],
                "learning_rate": log.get("learning_rate"),
                "train_loss": log.get("loss"),
                "metrics": rec["metrics"],
                "eval_loss": rec["eval_loss"],
            }
        )
    return out


class ResultsExistError(ValueError):
    """The output directory already holds a run (finished, or a checkpoint) made with other settings."""


def default_output_dir(profile: str) -> Path:
    """Where runs go without --output-dir: loralib.output_dir("benchmark", profile)."""
    from loralib.utils import output_dir

    return output_dir("benchmark", profile)
