"""GPT-2's `Conv1D` (PEFT's fan_in_fan_out=True): `LoraConv1D` exact against PEFT (outputs, gradients,
merge, unmerge), "all-linear" selecting what PEFT selects, and a tiny GPT-2 (built offline from a config)
trained, merged, saved, reloaded and converted to and from PEFT. Layer comparisons run in float64, so
"exact" is float64 rounding (1e-12)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loralib import (
    LoraEmbedding,
    find_targets,
    from_peft,
    inject_lora,
    load_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    save_lora,
    to_peft,
)
from loralib.injection import unload_lora, unmerge_lora

pytestmark = pytest.mark.numerical
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from loralib.layers.conv1d import LoraConv1D  # noqa: E402

ATOL = 1e-12


def _gpt2(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg).eval()


IDS = torch.tensor([[5, 17, 3, 99, 42, 0], [1, 2, 3, 4, 5, 6]])


def _losses_of_a_short_run(model, steps: int = 5) -> list[float]:
    """Mark only LoRA trainable and train a few AdamW steps on IDS; return the losses."""
    mark_only_lora_as_trainable(model)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_layer_outputs_gradients_merge_and_unmerge_equal_pefts():
    torch.manual_seed(0)
    base = nn.Sequential()
    base.add_module("c_attn", Conv1D(24, 16))
    base = base.double()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["c_attn"], r=4, lora_alpha=8)
    mark_only_lora_as_trainable(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base),
        peft.LoraConfig(target_modules=["c_attn"], r=4, lora_alpha=8, fan_in_fan_out=True),
    )
    layer, t = ours.c_attn, theirs.base_model.model.c_attn
    assert isinstance(layer, LoraConv1D)
    with torch.no_grad():
        layer.lora_B.normal_()
        t.lora_A["default"].weight.copy_(layer.lora_A)
        t.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=ATOL, rtol=0)
    explicit = x @ base.c_attn.weight + base.c_attn.bias + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(y_ours, explicit, atol=ATOL, rtol=0)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, t.lora_A["default"].weight.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(layer.lora_B.grad, t.lora_B["default"].weight.grad, atol=ATOL, rtol=0)
    merge_lora(ours)
    t.merge()
    torch.testing.assert_close(layer.weight, t.base_layer.weight, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x), y_theirs.detach(), atol=ATOL, rtol=0)
    unmerge_lora(ours)
    torch.testing.assert_close(layer.weight, base.c_attn.weight, atol=ATOL, rtol=0)
    plain = unload_lora(ours)
    assert type(plain.c_attn) is Conv1D
    torch.testing.assert_close(plain(x), y_theirs.detach(), atol=ATOL, rtol=0)


def test_all_linear_selects_what_pefts_all_linear_selects():
    model = _gpt2()
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(target_modules="all-linear", r=2))
    peft_names = sorted(
        n.removeprefix("base_model.model.")
        for n, m in theirs.named_modules()
        if hasattr(m, "lora_A") and n.endswith(("c_attn", "c_proj", "c_fc"))
    )
    ours = sorted(find_targets(model, "all-linear"))
    assert ours == peft_names and "lm_head" not in ours and len(ours) == 2 * 4


@pytest.mark.parametrize("targets", [["c_attn"], "all-linear"])
def test_a_tiny_gpt2_trains_merges_saves_reloads_and_converts(targets, tmp_path):
    model = _gpt2()
    names = inject_lora(model, targets, r=4, lora_alpha=8)
    assert all(isinstance(m, LoraConv1D) for _, m in lora_layers(model)) and len(names) in (2, 8)
    losses = _losses_of_a_short_run(model)
    assert losses[-1] < losses[0]  # it learns
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    save_lora(model, tmp_path / "ours")
    to_peft(model, tmp_path / "peft", base_model_name_or_path="tiny-gpt2")
    import json

    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    with torch.no_grad():
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)

    fresh = _gpt2()
    load_lora(fresh, tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=IDS).logits, before, atol=1e-6, rtol=1e-6)
    back = peft.PeftModel.from_pretrained(_gpt2(), str(tmp_path / "peft")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)
    back.save_pretrained(tmp_path / "peft2")
    again = _gpt2()
    from_peft(again, tmp_path / "peft2")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("targets", [["wte"], ["wte", "c_attn"]])
def test_a_tiny_gpt2_embedding_target_trains_merges_saves_and_reloads(targets, tmp_path):
    """The token embedding as a target: trains, saves and reloads; merges exactly once untied (a tied one
    is refused, because the merge would change the lm_head too)."""
    tied = _gpt2()
    inject_lora(tied, targets, r=4, lora_alpha=8)
    with pytest.raises(ValueError, match="shares its storage"):
        merge_lora(tied)
    assert not any(m.merged for _, m in lora_layers(tied))

    def untied():
        torch.manual_seed(0)
        cfg = transformers.GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32, tie_word_embeddings=False
        )
        return transformers.GPT2LMHeadModel(cfg).eval()

    model = untied()
    inject_lora(model, targets, r=4, lora_alpha=8)
    assert isinstance(model.transformer.wte, LoraEmbedding)
    losses = _losses_of_a_short_run(model)
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        before = model(input_ids=IDS).logits
        save_lora(model, tmp_path / "ours")
        fresh = untied()
        load_lora(fresh, tmp_path / "ours")
        torch.testing.assert_close(fresh(input_ids=IDS).logits, before, atol=1e-6, rtol=1e-6)
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, before, atol=1e-5, rtol=1e-5)
