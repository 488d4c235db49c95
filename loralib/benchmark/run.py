"""Run the benchmark: fine-tune and evaluate one task (`run_task`) or several (`run_benchmark`).

A task whose results.json exists is skipped unless overwrite=True (and refused if it was made with other
settings); only process 0 writes files. Not here: what makes two runs the same run
(`loralib.benchmark.identity`),
the configuration (`loralib.benchmark.config`), the Trainer (`loralib.benchmark.trainer`), the command
line (`loralib.benchmark.cli`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from loralib.benchmark.backends import save_adapter
from loralib.benchmark.config import PROFILES, make_config, resolve_tasks, task_spec
from loralib.benchmark.identity import (
    check_resume,
    check_reuse,
    manifest_callback,
    read_manifest,
    run_identity,
    usable_checkpoint,
)
from loralib.benchmark.results import (
    ADAPTER_DIR,
    RESULTS_NAME,
    default_output_dir,
    epoch_records,
    evaluation_records,
    json_safe,
    peak_memory_record,
    read_results,
    write_results_json,
)
from loralib.benchmark.trainer import build_trainer
from loralib.checks import check_bool
from loralib.logs import no_progress_bars

CHECKPOINTS_DIR = "checkpoints"


def provenance(cfg, model_id: str) -> dict[str, Any]:
    """Where a run's numbers come from: the data (hub / bundled / local) and whether the weights are a
    pretrained checkpoint or the tiny random model. A run on random weights is a smoke run, one on bundled
    data a toy run, whatever its profile (`run_kind_of`)."""
    from loralib.data import is_bundled
    from loralib.tiny import default_cache_dir

    data = "hub" if cfg.data_dir in (None, "") else ("bundled" if is_bundled(cfg.data_dir) else "local")
    # Compared with where tiny_roberta() writes, without building it for a run that uses another model.
    local = Path(str(model_id)).expanduser()
    tiny = cfg.model_id is None or (local.is_dir() and local.resolve() == default_cache_dir().resolve())
    return {
        "data_source": data,
        "pretrained": not tiny,
        "weights": "random (loralib.tiny.tiny_roberta)" if tiny else "pretrained checkpoint",
    }


def run_kind_of(profile_kind: str, source: dict[str, Any]) -> str:
    """ "smoke" for random weights, "toy" for a pretrained model on synthetic data (or a toy profile),
    "real" otherwise: what a run's numbers are, whatever its profile promised."""
    if not source["pretrained"]:
        return "smoke"
    if profile_kind != "real" or source["data_source"] == "bundled":
        return "toy"
    return "real"


def run_task(
    task: str,
    profile: str = "smoke",
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    callbacks: Sequence[Any] = (),
    resume: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune and evaluate one task; write OUTPUT_DIR/<task>/results.json and the adapter; return the results.

    A task whose results.json already exists is skipped (its stored results are returned, with
    "skipped": True) unless overwrite=True. Every epoch ends with a checkpoint in
    OUTPUT_DIR/<task>/checkpoints/ (model, optimizer, schedule, RNG; the latest complete one only), removed
    when the run finishes. resume=True (CLI --resume) continues an interrupted run from its newest
    complete checkpoint, with the same result as an uninterrupted run, and refuses one made with other
    settings (`loralib.benchmark.identity`: only more epochs may change); without it a leftover
    checkpoint is discarded. A finished run in the folder made with other settings is refused too.
    overrides: any TrainConfig field (learning_rate, epochs, backend, model_id, data_dir, ...).
    """
    check_bool(resume, "resume")
    t0 = time.perf_counter()
    cfg = make_config(task, profile, **overrides)
    # progress=False (CLI --no-progress): no bars at all, the data's and the checkpoints' included.
    with contextlib.nullcontext() if cfg.progress else no_progress_bars():
        return _run_task(task, profile, cfg, output_dir, overwrite, callbacks, resume, t0)


def _run_task(task, profile, cfg, output_dir, overwrite, callbacks, resume, t0) -> dict[str, Any]:
    spec = task_spec(task)
    root = Path(output_dir) if output_dir is not None else default_output_dir(profile)
    task_dir = root / task
    results_path = task_dir / RESULTS_NAME
    if results_path.exists() and not overwrite:
        existing = read_results(results_path)
        check_reuse(existing, cfg, profile, results_path)  # every setting that changes the numbers
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
        ckpt_dir = task_dir / CHECKPOINTS_DIR
        rank0 = int(os.environ.get("RANK", "0")) == 0
        identity = run_identity(cfg, profile)
        last, resumed = None, []
        if resume:
            # The newest complete checkpoint (a cut-short or damaged one is skipped, saying so), made
            # with the same settings: anything else is refused before a model is built.
            last = usable_checkpoint(ckpt_dir, say=print if rank0 else lambda *_: None)
            if last is not None:
                manifest = read_manifest(last)
                changed = check_resume(manifest, cfg, profile, last)
                resumed = [*manifest.get("resumed", []), {
                    "checkpoint": last.name,
                    "epoch": manifest.get("epoch"),
                    "changed": {k: list(v) for k, v in changed.items()},
                }]  # fmt: skip
                for k, (was, now) in changed.items():
                    if rank0:
                        print(f"[resume] {task}: {k} {was} -> {now}; the schedule is re-planned from here")
        elif ckpt_dir.exists() and rank0:
            shutil.rmtree(ckpt_dir)  # a fresh run must not pick up another run's state
        trainer, model, _tok, model_id = build_trainer(
            cfg, ckpt_dir, [manifest_callback(identity, resumed), *callbacks], checkpoints=True
        )
        params = count_parameters(model)
        t_train = time.perf_counter()
        if last is not None and rank0:
            print(f"[resume] {task}: continuing from {last}")
        trainer.train(resume_from_checkpoint=str(last) if last is not None else None)
        train_time = time.perf_counter() - t_train
    finally:
        torch.set_num_threads(threads)
    epochs = epoch_records(trainer, spec.eval_splits)
    if not epochs:
        raise RuntimeError(f"{task}: training finished without an evaluation; this is a bug in run_task.")
    by_split = epochs[-1]["metrics"]
    metrics = by_split if len(by_split) > 1 else next(iter(by_split.values()))
    source = provenance(cfg, model_id)
    run_kind = run_kind_of(PROFILES[profile].kind, source)
    note = PROFILES[profile].description
    if run_kind != PROFILES[profile].kind:
        note = (
            f"{run_kind.upper()} RUN despite the {profile!r} profile: "
            + ("bundled synthetic data" if source["data_source"] == "bundled" else "")
            + (" and " if source["data_source"] == "bundled" and not source["pretrained"] else "")
            + ("a randomly initialised model" if not source["pretrained"] else "")
            + ". NOT benchmark numbers."
        )
    results: dict[str, Any] = {
        "task": task,
        "profile": profile,
        "backend": cfg.backend,
        "run_kind": run_kind,
        "benchmark": run_kind == "real",
        "note": note,
        **source,
        "model_id": model_id if cfg.model_id else "loralib.tiny.tiny_roberta()",
        "seed": cfg.seed,
        "main_metric": spec.main_metric,
        "metrics": metrics,
        "metrics_by_split": by_split,
        "epochs": epochs,
        "evaluations": evaluation_records(trainer, spec.eval_splits),
        "config": cfg.to_dict(),
        "data_fingerprint": identity.get("data_fingerprint"),  # bundled or local rows; None: the hub
        "resumed": resumed,
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "train_examples": len(trainer.train_dataset),
        "train_time_s": round(train_time, 3),
        "peak_memory": peak_memory_record(),
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
        results["adapter"] = save_adapter(cfg, trainer.model, spec, model_id, adapter_dir)
        results["wall_time_s"] = round(time.perf_counter() - t0, 3)
        results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
        write_results_json(results_path, results)
        shutil.rmtree(task_dir / CHECKPOINTS_DIR, ignore_errors=True)  # finished: the adapter is what stays
    trainer.accelerator.wait_for_everyone()
    return json_safe(results)  # the same values the file holds (NaN -> None)


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
