"""loralib.benchmark: the recipe's defaults, the learning-rate schedule, task names, offline errors, references.

The end-to-end runs through the command line (GLUE, STS-B, MNLI, SQuAD v2, DDP) are in
test_04_benchmark_cli.py.
"""

from __future__ import annotations

import math

import pytest

from loralib.benchmark.config import PROFILES, TrainConfig, make_config, per_device_batch_size, resolve_tasks
from loralib.benchmark.run import run_task
from loralib.benchmark.trainer import build_trainer

GLUE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]


def test_defaults_are_the_article_recipe():
    cfg = TrainConfig()
    assert (cfg.r, cfg.target_modules, cfg.batch_size, cfg.epochs, cfg.warmup_epochs) == (
        8,
        ("query", "value"),
        16,
        6,
        2.0,
    )
    assert cfg.train_biases and cfg.train_layer_norms
    assert (cfg.max_length, cfg.qa_max_length, cfg.qa_stride) == (128, 384, 128)
    assert (cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == (0.98, 1e-6, 0.1)
    assert cfg.warmup_fraction == pytest.approx(2 / 6)
    # The learning rate follows the LoRA formulation unless given.
    assert (cfg.formulation, cfg.learning_rate) == ("scaled", 5e-4)
    assert TrainConfig(formulation="article").learning_rate == 4e-5
    assert TrainConfig(backend="article").formulation == "article"
    assert TrainConfig(backend="article", learning_rate=1e-4).learning_rate == 1e-4
    assert PROFILES["gpu"].model_id == "FacebookAI/roberta-base" and PROFILES["gpu"].overrides == {}
    assert [PROFILES[p].kind for p in ("smoke", "toy", "cpu", "colab", "gpu")] == [
        "smoke",
        "toy",
        "real",
        "real",
        "real",
    ]
    assert PROFILES["gpu"].benchmark and not PROFILES["toy"].benchmark


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="tf"), "backend"),
        (dict(formulation="xavier"), "formulation"),
        (dict(epochs=2, warmup_epochs=2), "warmup_epochs"),
        (dict(r=0), "r must be a positive integer"),
        (dict(qa_stride=384), "qa_stride"),
        (dict(max_train_samples=0), "max_train_samples"),
    ],
)
def test_bad_config_is_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_config("sst2", **kwargs)


def test_make_config_layers_profile_and_overrides():
    cfg = make_config("rte", "smoke", learning_rate=1e-3)
    assert cfg.data_dir == "bundled" and cfg.learning_rate == 1e-3 and cfg.task == "rte"
    assert make_config("rte", "smoke", data_dir=None).data_dir is None  # explicit None = the hub
    assert make_config("rte", "gpu").epochs == 6
    with pytest.raises(TypeError, match="learning_rate"):
        make_config("rte", "smoke", lr=1e-3)
    with pytest.raises(ValueError, match="smoke, toy, cpu, colab, gpu"):
        make_config("rte", "laptop")


def test_effective_batch_is_split_over_processes_and_accumulation():
    cfg = TrainConfig(batch_size=16, gradient_accumulation_steps=2)
    assert per_device_batch_size(cfg, world_size=1) == 8
    assert per_device_batch_size(cfg, world_size=2) == 4
    with pytest.raises(ValueError, match="not divisible"):
        per_device_batch_size(cfg, world_size=3)


def test_task_groups_expand_to_hub_names():
    assert resolve_tasks("glue") == GLUE
    assert resolve_tasks(["squad"]) == ["squad", "squad_v2"]
    assert resolve_tasks(["squad_v1"]) == ["squad"]
    assert resolve_tasks("all") == [*GLUE, "squad", "squad_v2"]
    assert resolve_tasks(["rte", "glue", "RTE"]) == ["rte"] + [t for t in GLUE if t != "rte"]


def test_bad_task_name_lists_the_valid_ones():
    with pytest.raises(ValueError) as err:
        run_task("sst3", profile="smoke")
    msg = str(err.value)
    assert "sst3" in msg and all(t in msg for t in [*GLUE, "squad_v2"]) and "glue" in msg


def test_hub_unreachable_names_the_local_option(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from loralib.data import DataUnavailableError

    with pytest.raises(DataUnavailableError) as err:
        run_task("rte", profile="smoke", output_dir=tmp_path, data_dir=None, progress=False)
    msg = str(err.value)
    assert "bundled" in msg and "--data-dir" in msg, msg
    assert not (tmp_path / "rte" / "results.json").exists()


class _LrRecorder:
    """Trainer callback: the learning rate each optimizer step uses (read before the step)."""

    def __init__(self):
        from transformers import TrainerCallback

        rates = self.rates = []

        class CB(TrainerCallback):
            def on_step_begin(self, args, state, control, optimizer=None, **kw):
                rates.append(optimizer.param_groups[0]["lr"])

        self.callback = CB()


@pytest.mark.parametrize("n_train, epochs, warmup_epochs", [(40, 6, 2.0), (32, 3, 1.0)])
def test_schedule_warms_up_for_whole_epochs_then_decays_linearly_to_zero(
    tmp_path, n_train, epochs, warmup_epochs
):
    cfg = make_config(
        "sst2",
        "smoke",
        max_train_samples=n_train,
        max_eval_samples=16,
        epochs=epochs,
        warmup_epochs=warmup_epochs,
        learning_rate=1e-3,
        progress=False,
    )
    rec = _LrRecorder()
    trainer, *_ = build_trainer(cfg, tmp_path, callbacks=[rec.callback])
    trainer.train()
    steps_per_epoch = math.ceil(n_train / cfg.batch_size)  # one process, no accumulation
    total = epochs * steps_per_epoch
    warmup = int(warmup_epochs * steps_per_epoch)

    def expected(step):  # the article's shape: linear 0 -> lr over warmup_epochs, then linear -> 0 at the end
        if step < warmup:
            return 1e-3 * step / warmup
        return 1e-3 * (total - step) / (total - warmup)

    assert len(rec.rates) == total
    assert rec.rates == pytest.approx([expected(s) for s in range(total)], abs=1e-12)
    assert max(rec.rates) == pytest.approx(1e-3) and rec.rates.index(max(rec.rates)) == warmup
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-15)  # decayed to 0 at the end


@pytest.mark.parametrize("backend", ["article", "peft", "qlora"])
def test_every_backend_trains_saves_and_reloads(tmp_path, backend):
    """The other backends run the same pipeline; the reloaded adapter reproduces the recorded accuracy."""
    import numpy as np
    import torch

    from loralib.benchmark.backends import load_trained_model
    from loralib.benchmark.trainer import eval_rows
    from loralib.data import tokenize_glue

    res = run_task(
        "sst2", "smoke", output_dir=tmp_path, backend=backend, epochs=2, warmup_epochs=0.5, progress=False
    )
    # Two epochs: the second trains after an evaluation (where bitsandbytes' CPU repacking used to strike).
    assert [e["epoch"] for e in res["epochs"]] == [1, 2]
    assert res["backend"] == backend and res["adapter"]["format"] == {"article": "article"}.get(
        backend, "peft"
    )
    assert res["config"]["formulation"] == ("article" if backend == "article" else "scaled")
    assert res["config"]["learning_rate"] == (4e-5 if backend == "article" else 5e-4)
    model, tok, stored = load_trained_model(tmp_path / "sst2")
    enc = tokenize_glue(eval_rows(stored), tok, "sst2", max_length=stored["config"]["max_length"])
    with torch.no_grad():
        preds = [
            int(
                model(
                    input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long)
                ).logits.argmax()
            )
            for ids in enc["input_ids"]
        ]
    assert np.mean(np.array(preds) == np.array(enc["labels"])) == pytest.approx(
        res["metrics"]["accuracy"], abs=1e-9
    )


@pytest.mark.parametrize(
    "native, expected, qlora_dtype",
    [(True, "bf16", "bfloat16"), (False, "fp16", "float16")],
    ids=["A100-like", "T4-like"],
)
def test_precision_uses_native_bf16_only(monkeypatch, native, expected, qlora_dtype):
    """A T4 answers is_bf16_supported() == True through emulation; only the native answer counts."""
    import torch

    from loralib import peft_backend, utils

    calls = []

    def is_bf16_supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation  # emulation always "works"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert utils.mixed_precision("cuda") == expected
    assert peft_backend.compute_dtype("cuda") == getattr(torch, qlora_dtype)
    assert calls and not any(calls)  # always asked with including_emulation=False
    assert utils.mixed_precision("cpu") == "fp32" and peft_backend.compute_dtype("cpu") == torch.float32


def test_results_record_the_precision(tmp_path):
    res = run_task("sst2", "smoke", output_dir=tmp_path, epochs=1, warmup_epochs=0.5, progress=False)
    assert res["precision"] == "fp32" and res["device"] == "cpu"


def test_peft_vocabulary_in_the_config_and_old_results_files_still_read():
    cfg = make_config("rte", "smoke", lora_alpha=16, lora_dropout=0.05, r=4)
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (4, 16, 0.05)
    with pytest.raises(TypeError, match="unknown TrainConfig field"):
        make_config("rte", "smoke", alpha=16)  # the former name: gone from the API
    from loralib.benchmark.config import config_from_results

    # a results file from before LoraConfig and the rename: flat LoRA fields, "alpha"
    flat = dict(r=4, alpha=2.0, lora_dropout=0.05, use_rslora=False, target_modules=["query", "value"])
    old = {"config": {**{k: v for k, v in cfg.to_dict().items() if k != "lora"}, **flat}}
    back = config_from_results(old)
    assert (back.r, back.lora_alpha, back.lora_dropout, back.target_modules) == (
        4,
        2.0,
        0.05,
        ("query", "value"),
    )
    # today's files hold PEFT's adapter_config fields under "lora" and read back to the same config
    assert config_from_results({"config": cfg.to_dict()}) == cfg


def test_bundled_data_or_random_weights_are_never_labelled_a_benchmark(tmp_path, tiny_model_dir):
    """The cpu profile is a real profile, but on bundled data with the tiny random model it is a smoke run."""
    res = run_task(
        "rte", "cpu", output_dir=tmp_path, model_id=tiny_model_dir, data_dir="bundled",
        epochs=1, warmup_epochs=0.5, max_train_samples=16, max_eval_samples=8, progress=False,
    )  # fmt: skip
    assert res["run_kind"] == "smoke" and "SMOKE RUN despite the 'cpu' profile" in res["note"]
    assert (res["data_source"], res["pretrained"]) == ("bundled", False)
    from loralib.benchmark.references import format_table, results_table

    assert "SMOKE" in format_table(results_table(tmp_path))


@pytest.mark.parametrize("task", ["sst2", "stsb", "squad_v2"])  # classification, regression, QA
def test_the_gpu_profiles_code_path_runs_on_cpu(tmp_path, tiny_model_dir, task):
    """The gpu profile exactly as it is (batch 16, lr 5e-4, 128 / 384-128 windows, 6-epoch schedule shape),
    with only what a CPU needs changed: a local model directory, bundled data, one short epoch."""
    import torch

    from loralib.benchmark import load_trained_model

    res = run_task(
        task, "gpu", output_dir=tmp_path, model_id=tiny_model_dir, data_dir="bundled",
        epochs=1, warmup_epochs=0.5, max_train_samples=32, max_eval_samples=16, progress=False,
    )  # fmt: skip
    cfg = res["config"]
    assert (cfg["batch_size"], cfg["learning_rate"], cfg["lora"]["r"]) == (16, 5e-4, 8)
    assert (cfg["max_length"], cfg["qa_max_length"], cfg["qa_stride"]) == (128, 384, 128)
    assert (res["run_kind"], res["benchmark"], res["profile"], res["data_source"]) == (
        "smoke",
        False,
        "gpu",
        "bundled",
    )
    model, _, _ = load_trained_model(tmp_path / task, device="cpu")
    assert next(model.parameters()).device == torch.device("cpu") and not model.training


class _Disconnect(Exception):
    """A Colab disconnect, simulated: raised right after the first epoch's checkpoint is written."""


class _DisconnectAfterFirstSave:
    def __new__(cls):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                raise _Disconnect(f"disconnected at step {state.global_step}")

        return Callback()


@pytest.mark.parametrize("backend", ["loralib", "peft"])
def test_a_run_interrupted_after_epoch_1_resumes_to_the_same_result(tmp_path, backend):
    import torch

    from loralib.adapters import read_adapter
    from loralib.benchmark.run import CHECKPOINTS_DIR

    kw = dict(backend=backend, epochs=3, warmup_epochs=1.0, progress=False)
    full = run_task("sst2", "smoke", output_dir=tmp_path / "full", **kw)
    with pytest.raises(_Disconnect):
        run_task("sst2", "smoke", output_dir=tmp_path / "cut", callbacks=[_DisconnectAfterFirstSave()], **kw)
    ckpts = list((tmp_path / "cut" / "sst2" / CHECKPOINTS_DIR).glob("checkpoint-*"))
    assert len(ckpts) == 1 and not (tmp_path / "cut" / "sst2" / "results.json").exists()
    from transformers import TrainerCallback

    class CountSteps(TrainerCallback):
        steps: list[int] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    counter = CountSteps()
    resumed = run_task("sst2", "smoke", output_dir=tmp_path / "cut", resume=True, callbacks=[counter], **kw)
    per_epoch = full["epochs"][0]["step"]
    assert counter.steps[0] == per_epoch + 1 and len(counter.steps) == 2 * per_epoch  # epoch 1 not redone
    assert [e["epoch"] for e in resumed["epochs"]] == [1, 2, 3]
    assert resumed["metrics"] == full["metrics"]
    assert [e["metrics"] for e in resumed["epochs"]] == [e["metrics"] for e in full["epochs"]]
    assert [e["train_loss"] for e in resumed["epochs"][1:]] == pytest.approx(
        [e["train_loss"] for e in full["epochs"][1:]], rel=1e-6
    )
    if backend == "loralib":
        a, b = (
            read_adapter(tmp_path / "full" / "sst2" / "adapter")[1],
            read_adapter(tmp_path / "cut" / "sst2" / "adapter")[1],
        )
    else:
        from safetensors.torch import load_file

        a, b = (
            load_file(str(tmp_path / d / "sst2" / "adapter" / "adapter_model.safetensors"))
            for d in ("full", "cut")
        )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not (tmp_path / "cut" / "sst2" / CHECKPOINTS_DIR).exists()  # a finished run keeps only the adapter


def test_unwrap_autocast_takes_the_trainers_mixed_precision_forward_off():
    from types import MethodType

    import torch
    from accelerate.utils import convert_outputs_to_fp32

    from loralib.benchmark.trainer import unwrap_autocast

    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64)
    x = torch.randn(8, 64)
    exact = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
    # What Accelerator(mixed_precision="bf16").prepare_model does to a model's forward (accelerate 1.x);
    # built by hand because an Accelerator's precision is fixed once per process.
    layer._original_forward = layer.forward
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    layer.forward = MethodType(autocast(layer.forward.__func__), layer)
    layer.forward = MethodType(convert_outputs_to_fp32(layer.forward.__func__), layer)
    with torch.no_grad():
        under_autocast = (layer(x).double() - exact).abs().max()
        assert under_autocast > 1e-3  # bf16 rounding: what a comparison would measure instead of the model
        plain = unwrap_autocast(layer)
        assert plain is layer and (plain(x).double() - exact).abs().max() < 1e-5
        assert unwrap_autocast(plain) is plain  # nothing to take off: unchanged


def test_notebook_04s_training_cell_continues_after_a_disconnect(tmp_path):
    """run_benchmark(..., resume=True), run again after a disconnect in the second task: the finished task
    is read back, the interrupted one continues from its checkpoint instead of starting over."""
    from transformers import TrainerCallback

    from loralib.benchmark.run import run_benchmark

    class DisconnectInSst2(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if "sst2" in str(args.output_dir):
                raise _Disconnect(f"disconnected at step {state.global_step}")

    kw = dict(profile="smoke", output_dir=tmp_path, epochs=2, warmup_epochs=0.5, progress=False, resume=True)
    with pytest.raises(_Disconnect):
        run_benchmark(["rte", "sst2"], callbacks=[DisconnectInSst2()], **kw)
    assert (tmp_path / "rte" / "results.json").exists() and not (tmp_path / "sst2" / "results.json").exists()
    again = run_benchmark(["rte", "sst2"], **kw)
    assert again["rte"]["skipped"] is True and not again["sst2"].get("skipped")
    assert [r["epoch"] for r in again["sst2"]["resumed"]] == [1]  # continued from epoch 1's checkpoint
    assert [e["epoch"] for e in again["sst2"]["epochs"]] == [1, 2]


def test_within_epoch_evaluation_steps():
    from loralib.benchmark.trainer import _within_epoch_steps

    assert _within_epoch_steps(8, 2, 1) == set()
    assert _within_epoch_steps(8, 2, 2) == {2, 6}
    assert _within_epoch_steps(8, 2, 3) == {1, 3, 5, 7}  # 4/3 and 8/3 of a 4-step epoch, rounded
    assert _within_epoch_steps(75, 3, 4) == {6, 12, 19, 31, 37, 44, 56, 62, 69}
    assert _within_epoch_steps(6, 3, 4) == {
        1,
        3,
        5,
    }  # 2-step epochs: 0.5 -> 0 and 1.5 -> 2 dropped (banker's rounding)


def test_evaluations_within_epochs_and_before_training(tmp_path):
    # 64 rows, batch 16: 4 steps an epoch; evaluations at 0, 1/3 and 2/3 of each epoch, and each end.
    kw = dict(epochs=2, warmup_epochs=0.5, progress=False, evals_per_epoch=3, eval_on_start=True)
    res = run_task("sst2", "smoke", output_dir=tmp_path, **kw)
    steps = [e["step"] for e in res["evaluations"]]
    assert steps == [0, 1, 3, 4, 5, 7, 8]
    assert [e["epoch"] for e in res["evaluations"]] == pytest.approx([s / 4 for s in steps])
    assert [e["epoch"] for e in res["epochs"]] == [1, 2] and [e["step"] for e in res["epochs"]] == [4, 8]
    ends = {e["step"]: e for e in res["evaluations"]}
    for e in res["epochs"]:  # an epoch record is the evaluation at that epoch's end
        assert e["metrics"] == ends[e["step"]]["metrics"] and e["eval_loss"] == ends[e["step"]]["eval_loss"]
    assert res["metrics"] == res["evaluations"][-1]["metrics"]["validation"]
    # Without the extra points the run records its epoch ends only, in both lists.
    plain = run_task(
        "sst2", "smoke", output_dir=tmp_path / "plain", epochs=2, warmup_epochs=0.5, progress=False
    )
    assert [e["step"] for e in plain["evaluations"]] == [4, 8] == [e["step"] for e in plain["epochs"]]
    with pytest.raises(ValueError, match="evals_per_epoch"):
        make_config("sst2", "smoke", evals_per_epoch=0)
    with pytest.raises((TypeError, ValueError), match="eval_on_start"):
        make_config("sst2", "smoke", eval_on_start="yes")
