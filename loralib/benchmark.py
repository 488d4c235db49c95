"""Command line for the GLUE / SQuAD benchmarks: `python -m loralib.benchmark --task TASK --profile PROFILE`.

Covers: argument parsing, expanding task groups, running each task through `loralib.training.run_task`
(finished tasks are skipped unless --overwrite) and printing a summary table beside the published
references. Not here: the training itself (`loralib.training`), reference numbers (`loralib.references`).

Examples:
    python -m loralib.benchmark --task sst2 --profile smoke --output-dir /tmp/bench      # offline, seconds
    python -m loralib.benchmark --task glue --profile gpu --output-dir results/          # the article's setup
    python -m loralib.benchmark --task squad --profile gpu --output-dir results/         # squad + squad_v2
    torchrun --nproc_per_node 4 -m loralib.benchmark --task mnli --profile gpu --output-dir results/

Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli squad_v1 squad_v2, or the groups glue, squad (both SQuAD
versions) and all. SQuAD v1.1 is stored under its hub name "squad".
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from loralib.training import BACKENDS, FORMULATIONS, PROFILES

    ap = argparse.ArgumentParser(
        prog="python -m loralib.benchmark",
        description="Fine-tune RoBERTa with LoRA on GLUE / SQuAD tasks and compare with published numbers.",
        epilog="Profiles: "
        + " | ".join(f"{p.name}: {p.description}" for p in PROFILES.values())
        + " Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli squad_v1 squad_v2, or glue, squad (both), all.",
    )
    ap.add_argument("--task", action="append", required=True, help="task or group; repeat for several")
    ap.add_argument(
        "--profile", default="smoke", choices=list(PROFILES), help="model/data preset (default smoke)"
    )
    ap.add_argument("--output-dir", default=None, help="results root (default outputs/benchmark/<profile>)")
    ap.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results.json")
    ap.add_argument("--backend", choices=BACKENDS, default=None, help="LoRA implementation (default loralib)")
    ap.add_argument("--formulation", choices=FORMULATIONS, default=None, help="LoRA init/scaling")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--model-id", default=None, help="hub id or local directory of the base model")
    ap.add_argument("--data-dir", default=None, help="'bundled' (offline mini data) or a local dataset dir")
    ap.add_argument("--learning-rate", type=float, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--warmup-epochs", type=float, default=None)
    ap.add_argument("--batch-size", type=int, default=None, help="effective batch (all processes)")
    ap.add_argument("--gradient-accumulation-steps", type=int, default=None)
    ap.add_argument("--rank", dest="r", type=int, default=None, help="LoRA rank r")
    ap.add_argument("--max-train-samples", type=int, default=None)
    ap.add_argument("--max-eval-samples", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


OVERRIDE_ARGS = (
    "backend",
    "formulation",
    "seed",
    "model_id",
    "data_dir",
    "learning_rate",
    "epochs",
    "warmup_epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "r",
    "max_train_samples",
    "max_eval_samples",
)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad arguments or a conflicting finished run)."""
    from loralib.references import format_table, results_table
    from loralib.training import ResultsExistError, default_output_dir, resolve_tasks, run_task

    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        tasks = resolve_tasks(args.task)
    except ValueError as e:
        ap.error(str(e))
    overrides = {k: getattr(args, k) for k in OVERRIDE_ARGS if getattr(args, k) is not None}
    if args.no_progress:
        overrides["progress"] = False
    out = Path(args.output_dir) if args.output_dir else default_output_dir(args.profile)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    timings = []
    for task in tasks:
        if rank0:
            print(f"\n=== {task} ({args.profile} profile) -> {out / task}", flush=True)
        t0 = time.perf_counter()
        try:
            res = run_task(task, profile=args.profile, output_dir=out, overwrite=args.overwrite, **overrides)
        except ResultsExistError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        timings.append((task, "skipped" if res.get("skipped") else "ran", time.perf_counter() - t0))
    if rank0:
        print("\n" + format_table([r for r in results_table(out) if r["task"] in tasks]))
        print("\ntask        status    seconds")
        for task, status, secs in timings:
            print(f"{task:<11} {status:<8} {secs:8.1f}")
        print(f"\nresults: {out}/<task>/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
