"""`python -m loralib.benchmark` end to end on the smoke profile (tiny random RoBERTa, bundled data, offline).

One CLI run covers a GLUE classification task (sst2), regression (stsb), two evaluation splits (mnli) and
SQuAD v2; the tests then check the results files, reload the saved adapters and recompute the final
metrics independently (numpy / scipy), check skip-if-finished and --overwrite, bad arguments, and a
2-process DDP run (torchrun, gloo on CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from loralib.benchmark.backends import load_trained_model
from loralib.benchmark.cli import main
from loralib.benchmark.results import RESULTS_NAME

TASKS = ["sst2", "stsb", "mnli", "squad_v2"]
RESULT_KEYS = {
    "task",
    "profile",
    "backend",
    "run_kind",
    "benchmark",
    "model_id",
    "seed",
    "main_metric",
    "metrics",
    "metrics_by_split",
    "epochs",
    "evaluations",
    "data_fingerprint",
    "config",
    "trainable_parameters",
    "total_parameters",
    "train_time_s",
    "wall_time_s",
    "peak_memory",
    "world_size",
    "versions",
    "adapter",
    "finished_at",
}
# Valid range of every metric the smoke runs report.
RANGES = {
    "accuracy": (0, 1),
    "f1": (0, 100),  # SQuAD percentages; GLUE's f1 is checked per task below
    "pearson": (-1, 1),
    "spearmanr": (-1, 1),
    "exact": (0, 100),
}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    args = ["--profile", "smoke", "--output-dir", str(out), "--no-progress"]
    for t in TASKS:
        args += ["--task", t]
    start = time.perf_counter()
    assert main(args) == 0
    return out, time.perf_counter() - start


def _results(out: Path, task: str) -> dict:
    return json.loads((out / task / RESULTS_NAME).read_text())


@pytest.mark.parametrize("task", TASKS)
def test_results_file_has_the_documented_keys_and_valid_metrics(bench, task):
    out, _ = bench
    res = _results(out, task)
    assert RESULT_KEYS <= set(res), RESULT_KEYS - set(res)
    assert (
        res["task"] == task
        and res["profile"] == "smoke"
        and res["run_kind"] == "smoke"
        and res["benchmark"] is False
    )
    assert res["world_size"] == 1 and res["versions"]["torch"] == torch.__version__
    assert 0 < res["trainable_parameters"] < res["total_parameters"]
    assert res["peak_memory"]["bytes"] > 0 and res["train_time_s"] > 0  # times are recorded, never judged
    assert res["wall_time_s"] - res["train_time_s"] >= 0  # the wall time includes the training
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]  # the smoke profile: 2 epochs, one eval each
    steps = [e["step"] for e in res["epochs"]]
    assert steps == [steps[0] * k for k in (1, 2)]
    assert all(np.isfinite(e["train_loss"]) for e in res["epochs"])
    assert res["metrics_by_split"] == res["epochs"][-1]["metrics"]  # final = last epoch, as the article
    for split, metrics in res["metrics_by_split"].items():
        assert res["main_metric"] in metrics
        for name, value in metrics.items():
            if name in RANGES:
                lo, hi = (0, 1) if (name == "f1" and task != "squad_v2") else RANGES[name]
                assert lo <= value <= hi, (task, split, name, value)


def test_metric_keys_and_splits_per_task(bench):
    out, _ = bench
    assert set(_results(out, "sst2")["metrics"]) == {"accuracy"}
    assert set(_results(out, "stsb")["metrics"]) == {"pearson", "spearmanr"}
    mnli = _results(out, "mnli")
    # MNLI: both splits, nested by split name (documented in loralib.benchmark.results).
    assert set(mnli["metrics"]) == {"validation_matched", "validation_mismatched"}
    assert all("accuracy" in m for m in mnli["metrics"].values())
    v2 = _results(out, "squad_v2")["metrics"]
    assert {"exact", "f1", "HasAns_exact", "NoAns_exact", "best_exact", "best_f1"} <= set(v2)


def _glue_eval_arrays(model, tokenizer, task: str, results: dict):
    """Predictions and labels of the saved model on the run's evaluation rows, by a plain forward pass."""
    from loralib.benchmark.trainer import eval_rows
    from loralib.data import tokenize_glue

    split = next(iter(results["metrics_by_split"]))
    rows = eval_rows(results, split)  # the exact subset the run was scored on
    enc = tokenize_glue(rows, tokenizer, task, max_length=results["config"]["max_length"])
    preds = []
    with torch.no_grad():
        for i in range(len(enc)):  # one row at a time: no padding at all
            ids = torch.tensor([enc[i]["input_ids"]])
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
            preds.append(logits.item() if logits.numel() == 1 else int(logits.argmax()))
    return np.array(preds), np.array(enc["labels"])


def test_saved_adapter_reloads_and_reproduces_the_final_metrics(bench):
    out, _ = bench
    model, tok, res = load_trained_model(out / "sst2")
    assert (out / "sst2" / "adapter" / "adapter.safetensors").exists()
    preds, labels = _glue_eval_arrays(model, tok, "sst2", res)
    assert (preds == labels).mean() == pytest.approx(res["metrics"]["accuracy"], abs=1e-9)
    model, tok, res = load_trained_model(out / "stsb")
    preds, labels = _glue_eval_arrays(model, tok, "stsb", res)
    assert pearsonr(preds, labels)[0] == pytest.approx(res["metrics"]["pearson"], abs=1e-4)


def test_saved_adapter_holds_only_trained_tensors_and_task_metadata(bench):
    from loralib.adapters import read_adapter

    out, _ = bench
    cfg, tensors = read_adapter(out / "mnli" / "adapter")
    res = _results(out, "mnli")
    assert cfg["task"] == "mnli" and cfg["num_labels"] == 3 and len(cfg["id2label"]) == 3
    assert cfg["r"] == 8 and cfg["init"] == "kaiming"
    assert sum(t.numel() for t in tensors.values()) == res["trainable_parameters"]
    assert any(k.startswith("classifier.") for k in tensors)


def test_rerun_skips_finished_tasks_and_overwrite_reruns(bench, capsys, monkeypatch):
    import loralib.benchmark.run as run_module

    out, _ = bench
    path = out / "sst2" / RESULTS_NAME
    before = path.read_text()
    mtime = path.stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a finished task was trained again")

    with monkeypatch.context() as m:
        m.setattr(run_module, "build_trainer", no_training)
        assert main(["--task", "sst2", "--task", "stsb", "--output-dir", str(out), "--no-progress"]) == 0
    assert path.stat().st_mtime_ns == mtime and path.read_text() == before
    assert capsys.readouterr().out.count("[skip]") == 2
    assert main(["--task", "sst2", "--output-dir", str(out), "--overwrite", "--no-progress"]) == 0
    assert path.stat().st_mtime_ns != mtime
    after = json.loads(path.read_text())
    # Same seed, same data: the rerun reproduces the metrics.
    assert after["metrics"] == json.loads(before)["metrics"]


def test_rerun_with_another_backend_into_the_same_dir_is_refused(bench, capsys):
    out, _ = bench
    assert main(["--task", "sst2", "--output-dir", str(out), "--backend", "peft", "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_bad_task_on_the_command_line_lists_valid_tasks(capsys):
    with pytest.raises(SystemExit) as err:
        main(["--task", "sst3"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "sst3" in msg and "cola" in msg and "squad_v2" in msg


def test_summary_table_is_printed_with_the_smoke_label(bench, capsys):
    out, _ = bench
    main(["--task", "mnli", "--output-dir", str(out), "--no-progress"])
    text = capsys.readouterr().out
    assert "SMOKE RUN" in text and "| mnli | validation_mismatched | accuracy |" in text
    assert "| 0.854 |" not in text and "| 0.859 |" not in text  # the article's m / mm: not beside a smoke run


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path, tiny_model_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "loralib.benchmark",
        "--task",
        "sst2",
        "--profile",
        "smoke",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "sst2" / RESULTS_NAME).read_text())
    assert res["world_size"] == 2 and res["config"]["batch_size"] == 16
    # The effective batch stays 16 (8 per process), so an epoch has as many optimizer steps as on one process.
    n = res["train_examples"]
    assert [e["step"] for e in res["epochs"]] == [k * -(-n // 16) for k in (1, 2)]
    assert 0 <= res["metrics"]["accuracy"] <= 1 and all(np.isfinite(e["train_loss"]) for e in res["epochs"])
    assert (tmp_path / "sst2" / "adapter" / "adapter.safetensors").exists()
    assert proc.stdout.count("| sst2 | validation | accuracy |") == 1  # only rank 0 prints the summary


def test_final_metric_reads_one_number(bench):
    from loralib.benchmark.results import final_metric

    out, _ = bench
    mnli = _results(out, "mnli")
    assert final_metric(mnli) == mnli["metrics"]["validation_matched"]["accuracy"]
    assert (
        final_metric(mnli, split="validation_mismatched")
        == mnli["metrics"]["validation_mismatched"]["accuracy"]
    )
    stsb = _results(out, "stsb")
    assert (
        final_metric(stsb) == stsb["metrics"]["pearson"]
        and final_metric(stsb, "spearmanr") == stsb["metrics"]["spearmanr"]
    )
    with pytest.raises(KeyError, match="accuracy"):
        final_metric(stsb, "accuracy")


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--epochs", "0"], "--epochs"),
        (["--epochs", "two"], "--epochs"),
        (["--lora-r", "0"], "--lora-r"),
        (["--lora-r", "2.5"], "--lora-r"),
        (["--learning-rate", "-1e-4"], "--learning-rate"),
        (["--learning-rate", "nan"], "--learning-rate"),
        (["--batch-size", "0"], "--batch-size"),
        (["--max-train-samples", "0"], "--max-train-samples"),
        (["--max-eval-samples", "-3"], "--max-eval-samples"),
        (["--warmup-epochs", "-1"], "--warmup-epochs"),
        (["--epochs", "2", "--warmup-epochs", "3"], "warmup_epochs"),
        (["--data-dir", "/no/such/dir"], "--data-dir"),
        (["--output-dir", "FILE"], "is a file"),
        (["--output-dir", "FILE/sub"], "not writable"),
        (["--batch-size", "6", "--gradient-accumulation-steps", "4"], "not divisible"),
        (["--model-id", "./no/such/model"], "--model-id"),
    ],
    ids=str,
)
def test_bad_arguments_exit_2_with_one_line_before_anything_loads(
    tmp_path, capsys, monkeypatch, extra, named
):
    from loralib.benchmark import backends, run, trainer

    (tmp_path / "FILE").write_text("not a directory")
    extra = [str(tmp_path / a) if a.startswith("FILE") else a for a in extra]

    def no_training(*a, **k):  # the check must come before any model or dataset is touched
        raise AssertionError("run_task was called")

    monkeypatch.setattr(run, "run_task", no_training)
    monkeypatch.setattr(backends, "build_model", no_training)
    monkeypatch.setattr(trainer, "build_model", no_training)
    args = ["--task", "sst2", "--output-dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as err:
        main(args)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert named in msg and "Traceback" not in msg
    assert len(msg.strip().splitlines()) == 1, msg
    assert (tmp_path / "FILE").read_text() == "not a directory"


def test_cli_takes_peft_names_for_rank_alpha_and_dropout(tmp_path, monkeypatch):
    from loralib.benchmark import run

    seen = {}

    def record(task, **kwargs):
        seen.update(kwargs)
        return {"skipped": True}

    monkeypatch.setattr(run, "run_task", record)
    monkeypatch.setattr("loralib.benchmark.references.results_table", lambda out: [])
    out = tmp_path / "o"
    assert (
        main(
            [
                "--task",
                "rte",
                "--output-dir",
                str(out),
                "--lora-r",
                "4",
                "--lora-alpha",
                "16",
                "--lora-dropout",
                "0.05",
            ]
        )
        == 0
    )
    lora = seen["lora"]  # one LoraConfig, built and checked once by the CLI
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, lora.target_modules) == (
        4,
        16.0,
        0.05,
        ("query", "value"),
    )
    assert main(["--task", "rte", "--output-dir", str(out), "--lora-r", "2"]) == 0 and seen["lora"].r == 2
    assert seen["resume"] is False
    assert main(["--task", "rte", "--output-dir", str(out), "--resume"]) == 0 and seen["resume"] is True
    seen.clear()
    assert main(["--task", "rte", "--output-dir", str(out)]) == 0
    assert "lora" not in seen and "loraplus_lr_ratio" not in seen  # the recipe's defaults stay
    args = ["--task", "rte", "--output-dir", str(out), "--use-rslora", "--loraplus-lr-ratio", "16"]
    assert main(args) == 0 and seen["lora"].use_rslora is True and seen["loraplus_lr_ratio"] == 16.0
    seen.clear()
    args = [
        "--task",
        "sst2",
        "--output-dir",
        str(out),
        "--evals-per-epoch",
        "4",
        "--eval-on-start",
        "--data-dir",
        "bundled-noisy",
    ]
    assert main(args) == 0 and (seen["evals_per_epoch"], seen["eval_on_start"], seen["data_dir"]) == (
        4,
        True,
        "bundled-noisy",
    )
    seen.clear()
    assert main(["--task", "sst2", "--output-dir", str(out)]) == 0
    assert (
        "evals_per_epoch" not in seen and "eval_on_start" not in seen
    )  # the profile's (or the recipe's) stay


def test_a_model_id_written_as_a_missing_path_is_refused_before_anything_loads(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--task", "rte", "--model-id", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path)])
    assert info.value.code == 2
    assert "--model-id" in capsys.readouterr().err and not (tmp_path / "rte").exists()
