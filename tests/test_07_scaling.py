"""rsLoRA (`use_rslora`) through the layer, injection, adapters and the benchmark config; LoRA+ parameter
groups (`loralib.optim`) with plain torch optimizers, PEFT models and the Trainer. References: the explicit
formula, an SGD step written out by hand, PEFT's own layers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import loralib
from loralib import optim as lora_optim
from loralib.adapters import load_lora, save_lora
from loralib.injection import inject_lora, lora_layers, mark_only_lora_as_trainable
from loralib.layers import LoraLinear, lora_scaling
from loralib.numerics import assert_within_rounding, float64_reference

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)


def _layer(r, alpha, rslora, seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(12, 10, r=r, lora_alpha=alpha, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


@pytest.mark.parametrize("r, alpha", [(1, 8), (4, 8), (16, 16), (64, 8)])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_follow_the_formula(r, alpha, rslora):
    layer = _layer(r, alpha, rslora)
    s = alpha / math.sqrt(r) if rslora else alpha / r
    assert layer.scaling == pytest.approx(s, rel=1e-15)
    x = torch.randn(5, 12, requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape)
    y.backward(dy)
    ref = float64_reference(
        lambda x, W, b, A, B: x @ W.T + b + s * (x @ A.T @ B.T),
        {"x": x, "W": layer.weight, "b": layer.bias, "A": layer.lora_A, "B": layer.lora_B},
        grad_output=dy,
        wrt=("x", "A", "B"),
    )
    n = 12 + 10 + r + 5  # in + out + r + rows: longer than any chain of sums in y or a gradient
    assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name="y")
    for k, ours in (("x", x.grad), ("A", layer.lora_A.grad), ("B", layer.lora_B.grad)):
        assert_within_rounding(ours, ref.grads[k], ref.grad_magnitudes[k], torch.float32, n, name=f"d{k}")


def test_the_two_rules_agree_at_rank_one_and_differ_by_sqrt_r_above():
    assert lora_scaling(8, 1, True) == lora_scaling(8, 1, False) == 8
    assert lora_scaling(8, 64, True) / lora_scaling(8, 64, False) == pytest.approx(8.0)
    x = torch.randn(3, 12)
    torch.testing.assert_close(_layer(1, 8, True)(x), _layer(1, 8, False)(x), atol=0, rtol=0)


def test_merge_uses_the_rslora_scaling():
    layer = _layer(16, 8, True)
    x = torch.randn(4, 12)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    assert "use_rslora=True" in repr(layer)


def test_bad_use_rslora_is_named():
    with pytest.raises((TypeError, ValueError), match="use_rslora"):
        LoraLinear(4, 4, r=2, use_rslora="yes")
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises((TypeError, ValueError), match="use_rslora"):
        inject_lora(model, ["0"], r=2, use_rslora=1)
    assert type(model[0]) is nn.Linear  # untouched


def _tiny(tiny_model_dir, seed=0):
    from transformers import AutoModelForSequenceClassification

    loralib.set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)


def _batch():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(5, 900, (2, 9), generator=g)}


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(**_batch()).logits


def test_save_and_load_keep_the_rule(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    inject_lora(model, ["query", "value"], r=16, lora_alpha=8, use_rslora=True)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(std=0.1)
    save_lora(model, tmp_path / "rs")
    cfg = json.loads((tmp_path / "rs" / "lora_config.json").read_text())
    assert cfg["format_version"] == 3 and all(v["use_rslora"] for v in cfg["per_layer"].values())
    fresh = _tiny(tiny_model_dir, seed=1)
    load_lora(fresh, tmp_path / "rs")
    assert all(layer.use_rslora for _, layer in lora_layers(fresh))
    torch.testing.assert_close(_logits(fresh), _logits(model), atol=0, rtol=0)
    # A model injected with the other rule would compute a differently scaled update: refused.
    other = _tiny(tiny_model_dir, seed=1)
    inject_lora(other, ["query", "value"], r=16, lora_alpha=8)
    with pytest.raises(ValueError, match="use_rslora"):
        load_lora(other, tmp_path / "rs")
    assert not any(layer.use_rslora for _, layer in lora_layers(other))


def test_plain_adapters_keep_the_older_format(tiny_model_dir, tmp_path):
    model = _tiny(tiny_model_dir)
    inject_lora(model, ["query"], r=4)
    save_lora(model, tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "lora_config.json").read_text())
    assert cfg["format_version"] == 2 and not any("use_rslora" in v for v in cfg["per_layer"].values())


@pytest.mark.parametrize("backend", ["loralib", "peft"])
def test_train_config_reaches_the_layers(tiny_model_dir, backend):
    from loralib.benchmark.backends import build_model
    from loralib.benchmark.config import make_config

    cfg = make_config("sst2", "smoke", backend=backend, use_rslora=True, r=16, lora_alpha=8)
    model = build_model(cfg, tiny_model_dir)
    if backend == "loralib":
        layers = [layer for _, layer in lora_layers(model)]
        assert layers and all(layer.use_rslora and layer.scaling == 2.0 for layer in layers)
    else:
        scalings = [
            m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "scaling")
        ]
        assert scalings and all(s == pytest.approx(2.0) for s in scalings)  # PEFT's own 8 / sqrt(16)


def test_article_backend_refuses_the_new_options():
    from loralib.benchmark.config import make_config

    with pytest.raises(ValueError, match="article backend"):
        make_config("sst2", backend="article", use_rslora=True)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        make_config("sst2", loraplus_lr_ratio=0)


# ---------------------------------------------------------------- LoRA+


def _lora_model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    inject_lora(model, ["0", "2"], r=2)
    mark_only_lora_as_trainable(model, bias="all", train_layer_norms=True)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_()
    return model


def test_groups_cover_every_trained_tensor_once_with_the_ratio():
    model = _lora_model()
    groups = lora_optim.param_groups(model, lr=1e-3, loraplus_lr_ratio=16, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad) and len(
        set(ids)
    ) == len(ids)
    by_name = {g["name"]: g for g in groups}
    assert by_name["lora_B"]["lr"] == pytest.approx(16e-3) and by_name["lora_A"]["lr"] == 1e-3
    assert by_name["other/no_decay"]["weight_decay"] == 0.0 and by_name["lora_A"]["weight_decay"] == 0.1
    plain = lora_optim.param_groups(model, lr=1e-3, loraplus_lr_ratio=None)
    assert {g["lr"] for g in plain} == {1e-3}


def test_an_sgd_step_moves_b_ratio_times_faster():
    model = _lora_model()
    opt = lora_optim.make_optimizer(model, lr=0.01, loraplus_lr_ratio=16, optimizer_cls=torch.optim.SGD)
    x = torch.randn(4, 6)
    model(x).square().sum().backward()
    layer = model[0]
    a0, b0 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    ga, gb = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    opt.step()
    torch.testing.assert_close(layer.lora_A.detach(), a0 - 0.01 * ga)
    torch.testing.assert_close(layer.lora_B.detach(), b0 - 0.16 * gb)


def test_groups_find_peft_names(tiny_model_dir):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_tiny(tiny_model_dir), peft.LoraConfig(r=4, target_modules=["query"]))
    groups = {g["name"]: g for g in lora_optim.param_groups(model, 1e-3, 8)}
    n_b = sum(p.numel() for n, p in model.named_parameters() if "lora_B" in n)
    assert sum(p.numel() for p in groups["lora_B"]["params"]) == n_b and groups["lora_B"]["lr"] == 8e-3


def test_loraplus_needs_lora():
    with pytest.raises(ValueError, match="no trainable lora_B"):
        lora_optim.param_groups(nn.Linear(3, 3), 1e-3, 16)
    with pytest.raises(ValueError, match="loraplus_lr_ratio"):
        lora_optim.param_groups(_lora_model(), 1e-3, -1)


def test_the_trainer_keeps_the_ratio_through_its_schedule(tiny_model_dir, tmp_path):
    from loralib.benchmark.config import make_config
    from loralib.benchmark.trainer import build_trainer

    cfg = make_config(
        "sst2",
        "smoke",
        model_id=tiny_model_dir,
        loraplus_lr_ratio=16,
        epochs=1,
        warmup_epochs=0.5,
        max_train_samples=32,
        progress=False,
    )
    trainer, model, _, _ = build_trainer(cfg, tmp_path)
    seen = []

    class Record(__import__("transformers").TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append({g["name"]: g["lr"] for g in trainer.optimizer.param_groups})

    trainer.add_callback(Record())
    trainer.train()
    assert len(seen) == 2 and seen[0]["lora_A"] != seen[1]["lora_A"]  # the schedule moved the rates
    for lrs in seen:
        assert lrs["lora_B"] == pytest.approx(16 * lrs["lora_A"]) and lrs["lora_A"] <= cfg.learning_rate


class _Block(nn.Module):
    """Norms the Trainer recognises by type (ln_f: an nn.LayerNorm whose name says nothing) and by name
    (an RMSNorm called `norm`, a `final_norm`), beside LoRA layers."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.ln_f = nn.LayerNorm(8)
        self.norm = nn.RMSNorm(8)
        self.final_norm = nn.RMSNorm(8)
        self.head = nn.Linear(8, 2)
        self.tied = self.head  # one module under two names: its tensors once


def test_weight_decay_follows_the_trainers_own_rule_and_each_tensor_is_in_one_group():
    from transformers import Trainer

    model = _Block()
    inject_lora(model, ["proj"], r=2)
    model.requires_grad_(True)
    trainer_decay = set(Trainer.get_decay_parameter_names(None, model))
    assert "ln_f.weight" not in trainer_decay and "norm.weight" not in trainer_decay  # the reference itself
    for ratio in (16.0, None):
        groups = lora_optim.param_groups(model, 1e-3, ratio, weight_decay=0.1)
        seen = [id(p) for g in groups for p in g["params"]]
        assert sorted(seen) == sorted({id(p) for p in model.parameters() if p.requires_grad})  # each once
        names = {id(p): n for n, p in model.named_parameters()}
        decayed = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
        assert decayed == trainer_decay & set(names.values())
        lora_optim.make_optimizer(model, 1e-3, ratio, weight_decay=0.1)  # torch accepts the groups


def test_peft_embedding_factors_are_a_and_b():
    assert lora_optim._kind("emb.lora_embedding_B.default") == "lora_B"
    assert lora_optim._kind("emb.lora_embedding_A.default") == "lora_A"
