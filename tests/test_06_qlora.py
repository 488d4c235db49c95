"""The PEFT + bitsandbytes QLoRA path on the tiny RoBERTa, on CPU (fp32 compute): build, train under the
HF Trainer, save, reload without extra arguments, merge."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")
from peft import AutoPeftModelForSequenceClassification  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from loralib import peft_backend, qlora  # noqa: E402
from loralib.measure import qlora_memory, steps  # noqa: E402
from loralib.utils import set_seed  # noqa: E402

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

ATTENTION = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """Make bitsandbytes believe this CPU has AVX512-BF16, so its in-place bf16 repacking of
    `Linear4bit` weights in eval mode (the cause of the Zen 4 / Sapphire Rapids failures) is tried here
    whatever the CPU: layers built while this is active start with `support_avx512bf16_for_cpu=True`."""
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


def _linear4bit_flags(model):
    return {
        n: m.support_avx512bf16_for_cpu for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)
    }


def _batch(d):
    tok = AutoTokenizer.from_pretrained(d)
    return dict(
        tok(
            ["the cat sat on the mat", "a dog ran", "it was a good day today"],
            return_tensors="pt",
            padding=True,
        )
    )


def _expected_trainable(model_dir, task_kind, num_labels, r):
    """Count by hand: r*(in+out) per adapted linear, plus every LayerNorm and the head in full."""
    set_seed(0)
    stock = peft_backend.load_base_model(model_dir, task_kind, num_labels, quantize=False)
    n = 0
    for name, m in stock.named_modules():
        if isinstance(m, nn.Linear) and any(name.endswith(t) for t in peft_backend.ARTICLE_TARGETS):
            n += r * (m.in_features + m.out_features)
        if name.endswith("LayerNorm") or name in ("classifier", "qa_outputs"):
            n += sum(p.numel() for p in m.parameters())
    return n


@pytest.mark.parametrize(
    "task_kind, num_labels, head",
    [
        ("classification", 3, "classifier"),
        ("regression", None, "classifier"),
        ("question_answering", None, "qa_outputs"),
    ],
)
def test_build_qlora_quantizes_the_encoder_not_the_head(tiny_model_dir, task_kind, num_labels, head):
    set_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, task_kind, num_labels, quantize=True, r=4)
    layers = peft_backend.quantized_linears(model)
    for i in range(2):
        for part in ATTENTION + ("intermediate.dense", "output.dense"):
            info = layers[f"base_model.model.roberta.encoder.layer.{i}.{part}"]
            assert info["class"] == "Linear4bit" and info["storage_dtype"] == torch.uint8
            assert info["quant_type"] == "nf4" and info["compute_dtype"] == torch.float32  # CPU: fp32 compute
    heads = {k: v for k, v in layers.items() if f".{head}" in k}
    assert heads and all(
        v["class"] == "Linear" and v["storage_dtype"] == torch.float32 for v in heads.values()
    )
    assert peft_backend.is_quantized(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == _expected_trainable(tiny_model_dir, task_kind, num_labels, r=4)
    assert not any(p.requires_grad for p in model.parameters() if type(p).__name__ == "Params4bit")


def test_make_optimizer_picks_8bit_adamw_for_quantized(tiny_model_dir):
    set_seed(0)
    q = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=True, r=64)
    opt = peft_backend.make_optimizer(q, 1e-3, weight_decay=0.1)
    assert isinstance(opt, bnb.optim.AdamW8bit)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in q.named_parameters():
        if p.requires_grad and (name.endswith("bias") or "LayerNorm" in name):
            assert id(p) not in decayed
    big = q.base_model.model.roberta.encoder.layer[0].intermediate.dense.lora_B["default"].weight  # 128x64
    q(**{"input_ids": torch.tensor([[0, 10, 20, 2]]), "labels": torch.tensor([1])}).loss.backward()
    opt.step()
    assert opt.state[big]["state1"].dtype == torch.uint8  # 8-bit moments for tensors >= 4096 elements
    set_seed(0)
    f = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=False)
    assert type(peft_backend.make_optimizer(f, 1e-3)) is torch.optim.AdamW
    assert isinstance(peft_backend.make_optimizer(f, 1e-3, eight_bit=True), bnb.optim.AdamW8bit)


def test_qlora_trains_under_the_hf_trainer_on_cpu(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["good good day", "bad bad night", "the cat sat", "a good film", "a bad film", "the mat"] * 4
    labels = [2, 0, 1, 2, 0, 1] * 4
    ds = Dataset.from_dict(dict(tok(texts)) | {"labels": labels})
    set_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, "classification", 3, quantize=True, id2label=LABELS)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, num_train_epochs=6, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=ds,
        eval_dataset=ds,
        data_collator=DataCollatorWithPadding(tok),
        optimizers=(peft_backend.make_optimizer(model, 2e-2), None),
    )
    before = trainer.evaluate()["eval_loss"]  # eval mode: no dropout noise, so the drop is the learning
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert trainer.state.global_step == 18 and after < 0.9 * before, (before, after)
    for n, p in model.named_parameters():
        if n in frozen:  # the 4-bit codes and everything else frozen stay bit-identical
            assert torch.equal(p, frozen[n]), n
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "task_kind, num_labels, quantize",
    [
        ("classification", 3, True),
        ("regression", None, True),
        ("question_answering", None, True),
        ("classification", 3, False),
    ],
)
def test_save_and_reload_needs_no_arguments(tiny_model_dir, tmp_path, task_kind, num_labels, quantize):
    set_seed(0)
    model = peft_backend.build_peft_model(
        tiny_model_dir, task_kind, num_labels, quantize=quantize, id2label=LABELS if num_labels == 3 else None
    )
    with torch.no_grad():  # as if trained: B and the head away from their initial values
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    peft_backend.save_peft_model(model, tmp_path, task="demo")
    set_seed(123)  # a different head init on reload: the head must come from the file
    back = peft_backend.load_peft_model(tmp_path)
    batch = _batch(tiny_model_dir)
    assert torch.equal(qlora.model_outputs(back, batch), qlora.model_outputs(model, batch))
    assert peft_backend.is_quantized(back) == quantize
    meta = peft_backend.read_task_metadata(tmp_path)
    assert meta["task_kind"] == task_kind and meta["task"] == "demo"
    if num_labels == 3:
        assert back.config.id2label == LABELS and back.config.num_labels == 3


def test_autopeft_reload_loses_num_labels(tiny_model_dir, tmp_path):
    """The pitfall: PEFT's files do not record the head size, so a stock reload builds 2 labels."""
    set_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, "classification", 3, quantize=False)
    peft_backend.save_peft_model(model, tmp_path)
    with pytest.raises(RuntimeError, match=r"size mismatch.*out_proj"):
        AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path))
    model.save_pretrained(str(tmp_path / "plain"))  # PEFT's files only: our loader says what is missing
    with pytest.raises(FileNotFoundError, match="num_labels"):
        peft_backend.load_peft_model(tmp_path / "plain")


def test_merge_onto_4bit_full_and_dequantized(tiny_model_dir, tmp_path):
    set_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, "classification", 3, quantize=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft_backend.save_peft_model(model, tmp_path)
    batch = _batch(tiny_model_dir)
    diffs = {}
    for onto in qlora.MERGE_BASES:
        merged = qlora.merge_adapter(tmp_path, onto=onto)
        assert not hasattr(merged, "peft_config")
        diffs[onto] = qlora.output_difference(model, merged, batch)["max_abs"]
        if onto == "dequantized":
            # Independent check: its weights are exactly bnb's nf4 round trip of the checkpoint, plus B A * s.
            stock = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
            w = stock.roberta.encoder.layer[0].attention.self.query.weight.data
            wq = bnb.functional.dequantize_4bit(
                *bnb.functional.quantize_4bit(
                    w.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4"
                )
            )
            lora = model.base_model.model.roberta.encoder.layer[0].attention.self.query
            delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight * lora.scaling["default"]
            got = merged.roberta.encoder.layer[0].attention.self.query.weight
            torch.testing.assert_close(got, wq + delta, atol=1e-6, rtol=0)
    assert diffs["dequantized"] < 1e-5
    assert diffs["4bit"] > 10 * diffs["dequantized"] and diffs["full"] > 10 * diffs["dequantized"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(task_kind="ner", num_labels=3), "unknown task_kind"),
        (dict(task_kind="classification", num_labels=1), "num_labels >= 2"),
        (dict(task_kind="regression", num_labels=3), "one output"),
        (dict(task_kind="question_answering", num_labels=5), "num_labels=2"),
        (dict(task_kind="classification", num_labels=3, id2label={0: "a", 1: "b"}), "keys 0..2"),
    ],
)
def test_bad_task_arguments(tiny_model_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        peft_backend.build_peft_model(tiny_model_dir, quantize=False, **kwargs)


@pytest.mark.parametrize("scale, kept_range", [(1e-4, (-0.5, 0.3)), (0.5, (0.9, 1.1))])
def test_merge_rounding_predicts_what_merge_and_unload_keeps(tiny_model_dir, scale, kept_range):
    set_seed(0)
    model = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=True)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, scale)
    report = qlora.merge_rounding(model)
    assert report["layers"] == 12 and kept_range[0] < report["kept"] < kept_range[1]
    # Reference: measure the same quantity on what PEFT's merge_and_unload actually stores.
    before, deltas = {}, {}
    for name, m in model.base_model.model.named_modules():
        if hasattr(m, "lora_A") and hasattr(m, "base_layer"):
            w = m.base_layer.weight
            before[name] = bnb.functional.dequantize_4bit(w.data, w.quant_state).clone()
            deltas[name] = m.get_delta_weight("default").detach().clone()
    merged = model.merge_and_unload()
    kept = []
    for name, w_old in before.items():
        w = merged.get_submodule(name).weight
        q = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        d = deltas[name]
        kept.append(float(((q - w_old) * d).sum() / (d * d).sum()))
    kept.sort()
    assert report["kept"] == pytest.approx((kept[5] + kept[6]) / 2, abs=1e-4)


def test_dequantized_base_is_the_4bit_model_in_fp32(tiny_model_dir):
    set_seed(0)
    q = peft_backend.load_base_model(tiny_model_dir, "classification", 2, quantize=True)
    set_seed(0)
    d = peft_backend.load_base_model(tiny_model_dir, "classification", 2, quantize=True, dequantize=True)
    assert not peft_backend.is_quantized(d) and peft_backend.is_quantized(q)
    assert all(
        v["class"] == "Linear" and v["storage_dtype"] == torch.float32
        for v in peft_backend.quantized_linears(d).values()
    )
    batch = _batch(tiny_model_dir)
    assert qlora.output_difference(q, d, batch)["max_abs"] < 1e-5
    with pytest.raises(ValueError, match="needs quantize=True"):
        peft_backend.load_base_model(tiny_model_dir, "classification", 2, dequantize=True)


def test_quantized_parameter_accounting(tiny_model_dir):
    set_seed(0)
    q = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=True)
    set_seed(0)
    f = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=False)
    # Reference: the same model in full precision, counted by PEFT itself.
    assert qlora.logical_parameter_count(q) == f.get_nb_trainable_parameters()[1]
    assert qlora.logical_parameter_count(q) > sum(
        p.numel() for p in q.parameters()
    )  # packed storage counts half
    n4 = sum(
        m.in_features * m.out_features for m in q.modules() if type(m).__name__ == "Linear4bit"
    )  # 4-bit weights
    blocks = n4 // 64
    # At least one 8-bit absmax per block of 64 (double quantisation), little more than that.
    assert blocks <= qlora.quant_state_bytes(q) <= blocks * 1.1 + 2048 * 12


def test_compare_training_memory_on_a_small_config():
    config = steps.roberta_config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000
    )
    res = qlora_memory.compare_training_memory(config, batch_size=2, seq_len=16, device="cpu")
    c = res["cases"]
    assert list(c) == list(qlora_memory.MEMORY_CASES)
    assert c["full_ft"].trainable_params == c["full_ft"].total_params
    assert c["loralib"].trainable_params == c["peft"].trainable_params == c["qlora"].trainable_params
    assert c["qlora"].total_params == c["peft"].total_params  # weights, not packed storage elements
    assert c["qlora"].state_bytes < c["peft"].state_bytes < c["full_ft"].state_bytes
    assert all(s.peak_bytes == s.state_bytes + s.peak_extra_bytes for s in c.values())
    assert "QLoRA" in qlora_memory.memory_table(res)


def test_every_quantised_model_the_project_builds_keeps_one_cpu_path(
    avx512_bf16_cpu, tiny_model_dir, tmp_path
):
    """The mechanism: each Linear4bit built or reloaded through loralib has the bf16 repacking switched
    off (bitsandbytes' default on an AVX512-BF16 CPU, simulated here, would be True)."""
    set_seed(0)
    raw = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2, quantization_config=peft_backend.bnb_config(), device_map={"": "cpu"}
    )
    assert set(_linear4bit_flags(raw).values()) == {True}  # what the fix has to undo
    set_seed(0)
    built = peft_backend.build_peft_model(tiny_model_dir, "classification", 2, quantize=True)
    base = peft_backend.load_base_model(tiny_model_dir, "classification", 2, quantize=True)
    peft_backend.save_peft_model(built, tmp_path)
    reloaded = peft_backend.load_peft_model(tmp_path)
    trainable = peft_backend.load_peft_model(tmp_path, is_trainable=True)
    merged = qlora.merge_adapter(tmp_path, onto="4bit")
    for model in (built, base, reloaded, trainable, merged):
        flags = _linear4bit_flags(model)
        assert len(flags) == 12 and set(flags.values()) == {False}, flags


def test_a_repacked_model_is_refused_with_the_way_out(avx512_bf16_cpu, tiny_model_dir):
    set_seed(0)
    raw = AutoModelForSequenceClassification.from_pretrained(
        tiny_model_dir, num_labels=2, quantization_config=peft_backend.bnb_config(), device_map={"": "cpu"}
    ).eval()
    with torch.no_grad():
        raw(**_batch(tiny_model_dir))  # bitsandbytes repacks every Linear4bit here
    with pytest.raises(RuntimeError, match="repacked.*build or reload the model with loralib.peft_backend"):
        peft_backend.pin_cpu_4bit_path(raw)


def test_qlora_eval_train_eval_merge_on_an_avx512_bf16_cpu(avx512_bf16_cpu, tiny_model_dir, tmp_path):
    """The Trainer's order of calls: evaluate (eval, no grad), train, evaluate, then merge. Without the fix
    this fails at the first training step after an evaluation on such CPUs."""
    set_seed(0)
    model = peft_backend.build_peft_model(
        tiny_model_dir, "classification", 2, quantize=True, lora_dropout=0.0
    )
    batch = _batch(tiny_model_dir)
    labels = torch.tensor([1, 0, 1])
    opt = peft_backend.make_optimizer(model, 1e-2)
    ce = torch.nn.functional.cross_entropy
    before = qlora.model_outputs(model, batch)  # eval + no_grad: where the repacking happened
    model.train()
    for _ in range(10):
        model(**batch, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    after = qlora.model_outputs(model, batch)
    assert float(ce(after, labels)) < 0.9 * float(ce(before, labels))
    assert set(_linear4bit_flags(model).values()) == {False}
    # Evaluation stayed on the nf4 path computing in fp32: it equals the merge onto the dequantised
    # fp32 base (plain nn.Linear, no bitsandbytes kernels); the bf16 layout would differ by ~1e-2.
    peft_backend.save_peft_model(model, tmp_path)
    merged = qlora.merge_adapter(tmp_path, onto="dequantized")
    assert qlora.output_difference(model, merged, batch)["max_abs"] < 1e-5
