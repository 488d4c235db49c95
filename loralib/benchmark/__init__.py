"""The GLUE / SQuAD benchmark of RoBERTa with LoRA on the Hugging Face `Trainer` (notebooks 04 and 05).

    config      TrainConfig (the article's recipe), profiles, backends, task names
    backends    build / save / reload the model of each backend (loralib, article, peft, qlora)
    trainer     the run's data, tokenisation, the Trainer and its per-epoch evaluation
    results     the results file: layout, atomic write, reading it back
    run         run_task / run_benchmark
    references  the article's and the LoRA paper's numbers, tables and plots beside a run
    baselines   the majority class, answering nothing, the untrained model
    estimates   steps, time and memory of a task on a T4 / an A100 / the device you have
    cli         `python -m loralib.benchmark --task TASK --profile PROFILE`
    serve       scoring a task through any model (one model serving every task's adapter), memory of that

The names below are the ones a notebook or script needs; everything else is reached by module.
"""

from loralib.benchmark.backends import load_trained_model
from loralib.benchmark.config import (
    BACKENDS,
    PROFILES,
    TrainConfig,
    is_qa,
    make_config,
    resolve_model_id,
    resolve_tasks,
    task_spec,
)
from loralib.benchmark.results import final_metric, read_results
from loralib.benchmark.run import run_benchmark, run_task
from loralib.benchmark.trainer import build_trainer, eval_rows

__all__ = [
    "BACKENDS",
    "PROFILES",
    "TrainConfig",
    "build_trainer",
    "eval_rows",
    "final_metric",
    "is_qa",
    "load_trained_model",
    "make_config",
    "read_results",
    "resolve_model_id",
    "resolve_tasks",
    "run_benchmark",
    "run_task",
    "task_spec",
]
