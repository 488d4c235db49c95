"""CUDA-only checks (`pytest -m gpu`, run by scripts/gpu_check.sh): LoraLinear under bf16 / fp16 autocast,
LoRA dropout on CUDA, torch.compile (that it really compiled), QLoRA (that a merge keeps the adapter),
Trainer steps of a roberta-base-sized model in bf16 and fp16, the project's precision decision against
the GPU's compute capability, and the notebook pipeline (train, reload, re-score) under both precisions.

Skipped where there is no CUDA device. Written to run where only torch, transformers and peft are installed
and nothing can be downloaded: parts that need bitsandbytes skip with a message.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loralib.injection import inject_lora, lora_layers, mark_only_lora_as_trainable
from loralib.layers import LoraLinear
from loralib.utils import native_bf16

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (scripts/gpu_check.sh)"),
]
DEV = "cuda"


def _layer(d_in=256, d_out=192, r=8, lora_dropout=0.0):
    torch.manual_seed(0)
    layer = LoraLinear(d_in, d_out, r=r, lora_alpha=16, lora_dropout=lora_dropout).to(DEV)
    nn.init.normal_(layer.lora_B, std=0.05)
    return layer


def _formula(x, layer, keep=None):
    xl = x if keep is None else x * keep
    return x @ layer.weight.t() + layer.bias + layer.scaling * (xl @ layer.lora_A.t()) @ layer.lora_B.t()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_outputs_and_gradients_follow_the_formula(dtype):
    if dtype is torch.bfloat16 and not native_bf16(DEV):
        pytest.skip("this GPU has no native bf16")
    layer = _layer().train()
    x = torch.randn(4, 64, 256, device=DEV, requires_grad=True)
    with torch.autocast(DEV, dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    y.float().square().sum().backward()
    got = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone(), x.grad.clone())
    assert layer.lora_A.grad.dtype == torch.float32  # fp32 master copies
    layer.zero_grad(set_to_none=True)
    x2 = x.detach().clone().requires_grad_(True)
    ref = _formula(x2, layer)  # fp32 reference
    ref.square().sum().backward()
    tol = dict(atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(y.float(), ref, **tol)
    for g, r in zip(got, (layer.lora_A.grad, layer.lora_B.grad, x2.grad)):
        assert torch.isfinite(g).all()
        assert (g - r).norm() <= 0.05 * r.norm() + 1e-3


def test_dropout_on_cuda_uses_torchs_mask_forward_and_backward():
    p = 0.2
    layer = _layer(lora_dropout=p).train()
    x = torch.randn(32, 256, device=DEV, requires_grad=True)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    keep = torch.nn.functional.dropout(torch.ones_like(x), p=p, training=True)  # the same draw
    x2 = x.detach().clone().requires_grad_(True)
    ref = _formula(x2, layer, keep)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    y.square().sum().backward()
    ga = layer.lora_A.grad.clone()
    layer.zero_grad(set_to_none=True)
    ref.square().sum().backward()
    torch.testing.assert_close(ga, layer.lora_A.grad, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-3, rtol=1e-3)


def test_compiled_layer_matches_eager_on_cuda():
    torch._dynamo.reset()
    layer = _layer(768, 768).eval()
    x = torch.randn(4, 64, 768, device=DEV)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye = layer(xe)
    ye.square().sum().backward()
    ga = layer.lora_A.grad.clone()
    layer.zero_grad(set_to_none=True)
    from torch._dynamo.utils import counters

    counters.clear()
    yc = torch.compile(layer, fullgraph=True)(xc)  # fullgraph: a graph break is an error, not eager code
    yc.square().sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1, "torch.compile fell back to eager: nothing was compiled"
    torch.testing.assert_close(yc, ye, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(layer.lora_A.grad, ga, atol=1e-2, rtol=1e-3)


def test_qlora_trains_and_merges_on_cuda(tiny_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed on this machine")
    from loralib import peft_backend, qlora

    torch.manual_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=True, device=DEV)
    assert peft_backend.is_quantized(model)
    opt = peft_backend.make_optimizer(model, 1e-2)
    batch = {"input_ids": torch.tensor([[0, 11, 25, 7, 2], [0, 40, 9, 31, 2]], device=DEV)}
    labels = torch.tensor([0, 1], device=DEV)
    model.train()
    for _ in range(5):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    peft_backend.save_peft_model(model, tmp_path)
    merged = qlora.merge_adapter(tmp_path, onto="dequantized", device=DEV)
    with model.disable_adapter():  # the same 4-bit model without LoRA: what a merge that drops it gives
        dropped = qlora.model_outputs(model, batch)
    effect = float((qlora.model_outputs(model, batch) - dropped).abs().max())
    assert effect > 1e-3, "the adapter must have learned something for this test to tell"
    assert qlora.output_difference(model, merged, batch)["max_abs"] < 0.1 * effect


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_trainer_steps_of_a_roberta_base_sized_model(precision, tmp_path):
    """A random model of roberta-base's width and depth (a small vocabulary: nothing is downloaded)."""
    if precision == "bf16" and not native_bf16(DEV):
        pytest.skip("this GPU has no native bf16")
    from transformers import RobertaConfig, RobertaForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = RobertaForSequenceClassification(RobertaConfig(vocab_size=1000, num_labels=2))
    inject_lora(model, ["query", "value"], r=8, lora_alpha=8, lora_dropout=0.1)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, 1000, (128,), generator=g), "labels": torch.tensor(i % 2)}
        for i in range(64)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=8, logging_steps=1,
        learning_rate=5e-4, report_to="none", save_strategy="no", bf16=precision == "bf16",
        fp16=precision == "fp16", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 8 and all(torch.isfinite(torch.tensor(losses)))
    layers = dict(lora_layers(model))
    assert all(m.lora_A.dtype == torch.float32 for m in layers.values())
    assert any(m.lora_B.abs().sum() > 0 for m in layers.values())


def _pipeline_precision(precision, monkeypatch):
    """Make the pipeline choose `precision` on this GPU: fp16 is what a T4 (no native bf16) gets."""
    if precision == "bf16" and not native_bf16(DEV):
        pytest.skip("this GPU has no native bf16")
    if precision == "fp16" and native_bf16(DEV):
        import loralib.utils

        monkeypatch.setattr(loralib.utils, "mixed_precision", lambda device=None: "fp16")


def test_the_projects_precision_decision_follows_the_hardware(tmp_path):
    from loralib.benchmark.config import make_config
    from loralib.benchmark.trainer import build_trainer
    from loralib.utils import mixed_precision

    # The reference is the hardware itself: bf16 units arrived with compute capability 8 (Ampere).
    native = torch.cuda.get_device_capability(0)[0] >= 8
    assert native_bf16(DEV) is native
    assert mixed_precision(DEV) == ("bf16" if native else "fp16")
    trainer, *_ = build_trainer(
        make_config("rte", "smoke", max_train_samples=16, max_eval_samples=8), tmp_path
    )
    assert (trainer.args.bf16, trainer.args.fp16) == (native, not native)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_notebook_pipeline_trains_reloads_and_rescores(precision, tmp_path, monkeypatch):
    """Notebook 05 on this GPU: train SQuAD v2 under `precision`, reload the adapter, re-score the
    validation windows, and agree with the Trainer's own evaluation within the questions that the
    two passes' logit difference could flip (`loralib.qa.fragile_questions`)."""
    _pipeline_precision(precision, monkeypatch)
    import numpy as np

    from loralib.benchmark import eval_rows, load_trained_model, run_task
    from loralib.qa import fragile_questions, no_answer_sweep, predict_qa

    out = run_task("squad_v2", "smoke", output_dir=tmp_path, epochs=1, warmup_epochs=0.5, progress=False)
    assert out["precision"] == precision and out["device"].startswith("cuda")
    model, tok, res = load_trained_model(tmp_path / "squad_v2", device=DEV)
    assert next(model.parameters()).is_cuda
    rows, c = eval_rows(res), res["config"]
    feats, s, e = predict_qa(model, tok, rows, c["qa_max_length"], c["qa_stride"], precision=precision)
    _, s32, e32 = predict_qa(model, tok, rows, c["qa_max_length"], c["qa_stride"])
    delta = 2 * float(max(np.abs(s - s32).max(), np.abs(e - e32).max()))
    assert 0 < delta < 0.5  # autocast rounds (delta > 0: it was on), and not wildly
    (at_zero,) = no_answer_sweep(rows, feats, s, e, [0.0])
    tol = 100 * len(fragile_questions(rows, feats, s, e, delta, version_2=True)) / at_zero["total"] + 1e-6
    for key in ("exact", "f1"):
        assert abs(at_zero[key] - res["metrics"][key]) <= tol, (key, at_zero[key], res["metrics"][key], tol)


def test_a_merge_keeps_the_adapter_on_cuda():
    """Merged == unmerged to rounding, while dropping the adapter moves the outputs far more."""
    from loralib.injection import merge_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 64)).to(DEV)
    x = torch.randn(32, 256, device=DEV)
    with torch.no_grad():
        base = model(x)
    inject_lora(model, ["0", "2"], r=8, lora_alpha=16)
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B, std=0.05)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        merged = merge_lora(model)(x)
    effect = (unmerged - base).abs().max()
    assert effect > 1e-2
    assert (merged - unmerged).abs().max() <= 1e-3 * effect  # a merge that drops BA would be off by `effect`
