"""Command line for the GLUE / SQuAD benchmarks: `python -m loralib.benchmark --task TASK --profile PROFILE`.

Covers: argument parsing and validation (every argument is checked before anything is loaded; a bad
one exits with status 2 and one line), expanding task groups, running each task through `loralib.benchmark.run.run_task`
(finished tasks are skipped unless --overwrite) and printing a summary table beside the published
references. Not here: the training itself (`loralib.benchmark.run`), reference numbers
(`loralib.benchmark.references`).

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
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (no usage block, no traceback), exit status 2."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _number(kind: type, minimum: float | None = None, positive: bool = False):
    """An argparse type: `kind` (int or float), finite, > 0 when positive, >= minimum when given."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if positive and value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text!r}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _check_output_dir(out: Path) -> None:
    """Refuse an output directory that is a file or cannot be written, before any training starts."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir {out} is a file; give a directory (it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise ValueError(
            f"--output-dir {out} is not writable ({e.strerror or e}); choose another directory"
        ) from e


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `python -m loralib.benchmark`; every value is checked as it is parsed."""
    from loralib.benchmark.config import BACKENDS, FORMULATIONS, PROFILES

    ap = _Parser(
        prog="python -m loralib.benchmark",
        description="Fine-tune RoBERTa with LoRA on GLUE / SQuAD tasks and compare with published numbers.",
        epilog="Profiles: "
        + " | ".join(f"{p.name}: {p.description}" for p in PROFILES.values())
        + " Tasks: cola sst2 mrpc stsb qqp mnli qnli rte wnli squad_v1 squad_v2, or glue, squad (both), colab "
        "(cola sst2 mrpc stsb rte squad_v1), all.",
    )
    ap.add_argument("--task", action="append", required=True, help="task or group; repeat for several")
    ap.add_argument(
        "--profile", default="smoke", choices=list(PROFILES), help="model/data preset (default smoke)"
    )
    ap.add_argument("--output-dir", default=None, help="results root (default outputs/benchmark/<profile>)")
    ap.add_argument("--overwrite", action="store_true", help="rerun tasks that already have results.json")
    ap.add_argument(
        "--resume", action="store_true", help="continue interrupted tasks from their last epoch checkpoint"
    )
    ap.add_argument("--backend", choices=BACKENDS, default=None, help="LoRA implementation (default loralib)")
    ap.add_argument("--formulation", choices=FORMULATIONS, default=None, help="LoRA init/scaling")
    ap.add_argument("--seed", type=_number(int, minimum=0), default=None)
    ap.add_argument("--model-id", default=None, help="hub id or local directory of the base model")
    ap.add_argument("--data-dir", default=None, help="'bundled' (offline mini data) or a local dataset dir")
    ap.add_argument("--learning-rate", type=_number(float, positive=True), default=None)
    ap.add_argument("--epochs", type=_number(int, minimum=1), default=None)
    ap.add_argument("--warmup-epochs", type=_number(float, minimum=0), default=None)
    ap.add_argument(
        "--batch-size", type=_number(int, minimum=1), default=None, help="effective batch (all processes)"
    )
    ap.add_argument("--gradient-accumulation-steps", type=_number(int, minimum=1), default=None)
    ap.add_argument(
        "--evals-per-epoch", type=_number(int, minimum=1), default=None, help="validation runs per epoch (1)"
    )
    ap.add_argument(
        "--eval-on-start",
        action="store_const",
        const=True,
        default=None,
        help="also evaluate before training",
    )
    # The LoRA values are only parsed here: LoraConfig checks them, once, when main() builds it.
    ap.add_argument("--lora-r", dest="r", type=_number(int), default=None, help="LoRA rank r")
    ap.add_argument(
        "--lora-alpha", type=_number(float), default=None, help="LoRA scaling numerator (recipe: = r)"
    )
    ap.add_argument("--lora-dropout", type=_number(float), default=None, help="LoRA dropout in [0, 1)")
    ap.add_argument(
        "--use-rslora", action="store_const", const=True, default=None, help="scale by lora_alpha / sqrt(r)"
    )
    ap.add_argument(
        "--loraplus-lr-ratio",
        type=_number(float, positive=True),
        default=None,
        help="LoRA+: B's learning rate over A's (e.g. 16)",
    )
    ap.add_argument("--max-train-samples", type=_number(int, minimum=1), default=None)
    ap.add_argument("--max-eval-samples", type=_number(int, minimum=1), default=None)
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


LORA_ARGS = ("r", "lora_alpha", "lora_dropout", "use_rslora")  # LoraConfig fields
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
    "evals_per_epoch",
    "eval_on_start",
    "loraplus_lr_ratio",
    "max_train_samples",
    "max_eval_samples",
)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 bad arguments or a conflicting finished run)."""
    from loralib.benchmark import run
    from loralib.benchmark.config import RECIPE_LORA, make_config, per_device_batch_size, resolve_tasks
    from loralib.benchmark.identity import CheckpointError
    from loralib.benchmark.references import format_table, results_table
    from loralib.benchmark.results import ResultsExistError, default_output_dir
    from loralib.checks import missing_model_dir
    from loralib.data import is_bundled
    from loralib.logs import quiet_loading

    ap = build_parser()
    args = ap.parse_args(argv)
    quiet_loading()  # expected load reports and bitsandbytes' optional-kernel notice stay hidden
    overrides = {k: getattr(args, k) for k in OVERRIDE_ARGS if getattr(args, k) is not None}
    if args.no_progress:
        overrides["progress"] = False
    # Every argument is checked before any model or dataset is loaded: a bad value costs no training.
    try:
        lora_args = {k: getattr(args, k) for k in LORA_ARGS if getattr(args, k) is not None}
        lora = RECIPE_LORA  # the run's one LoraConfig: the recipe's with the flags given, checked once here
        if lora_args:
            try:
                lora = dataclasses.replace(RECIPE_LORA, **lora_args)
            except (TypeError, ValueError) as e:  # the message starts with the field's name: show the flag's
                key = next(
                    (k for k in sorted(lora_args, key=len, reverse=True) if str(e).startswith(k)), None
                )
                flag = {"r": "--lora-r"}.get(key, f"--{key.replace('_', '-')}" if key else "--lora-*")
                raise ValueError(f"{flag}: {e}") from None
        if lora is not RECIPE_LORA:
            overrides["lora"] = lora
        tasks = resolve_tasks(args.task)
        for task in tasks:  # cross-field rules: warm-up < epochs, batch divisible by processes x steps
            per_device_batch_size(make_config(task, args.profile, **overrides))
        if missing_model_dir(args.model_id):
            raise ValueError(
                f"--model-id {args.model_id!r} is not a directory; give a local model dir or a hub id"
            )
        if args.data_dir is not None and not is_bundled(args.data_dir) and not Path(args.data_dir).is_dir():
            raise ValueError(
                f"--data-dir {args.data_dir!r} is not a directory; give 'bundled' or a local dataset dir"
            )
        out = Path(args.output_dir) if args.output_dir else default_output_dir(args.profile)
        _check_output_dir(out)
    except (ValueError, TypeError) as e:
        ap.error(str(e).splitlines()[0])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    timings = []
    for task in tasks:
        if rank0:
            print(f"\n=== {task} ({args.profile} profile) -> {out / task}", flush=True)
        t0 = time.perf_counter()
        try:
            res = run.run_task(
                task,
                profile=args.profile,
                output_dir=out,
                overwrite=args.overwrite,
                resume=args.resume,
                **overrides,
            )
        except (ResultsExistError, CheckpointError) as e:
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
