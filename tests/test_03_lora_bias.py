"""`lora_bias=True` (PEFT's: a trainable bias on B's output, scaled with the update) on every layer type
PEFT allows it on, Linear, GPT-2's Conv1D and Conv2d: exact against PEFT (outputs, gradients of A, B and
the bias, merge, unmerge), through from_peft / to_peft and save / load. Refused on embeddings, as PEFT
does; on a base without a bias it trains but cannot merge. Float64 copies: exact to 1e-10."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loralib import (
    from_peft,
    inject_lora,
    load_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    save_lora,
    to_peft,
)
from loralib.injection import unmerge_lora

pytestmark = pytest.mark.numerical
peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

ATOL = 1e-10


def _base(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)).double(), torch.randn(4, 8)
    if kind == "conv1d_gpt2":
        return nn.Sequential(Conv1D(6, 8), nn.Tanh(), nn.Linear(6, 2)).double(), torch.randn(4, 3, 8)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 2, 1)).double(), torch.randn(
        2, 3, 5, 5
    )


@pytest.fixture(params=["linear", "conv1d_gpt2", "conv2d"])
def pair(request):
    base, x = _base(request.param)
    ours = copy.deepcopy(base)
    inject_lora(ours, ["0"], r=2, lora_alpha=4, lora_bias=True)
    mark_only_lora_as_trainable(ours)
    cfg = peft.LoraConfig(
        target_modules=["0"], r=2, lora_alpha=4, lora_bias=True, fan_in_fan_out=request.param == "conv1d_gpt2"
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    layer, t = ours[0], theirs.base_model.model[0]
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_B_bias.normal_()
        t.lora_A["default"].weight.copy_(layer.lora_A)
        t.lora_B["default"].weight.copy_(layer.lora_B)
        t.lora_B["default"].bias.copy_(layer.lora_B_bias)
    return base, ours, theirs, x.double()


def test_outputs_gradients_merge_and_unmerge_equal_pefts(pair):
    base, ours, theirs, x = pair
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=ATOL, rtol=0)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    layer, t = ours[0], theirs.base_model.model[0]
    for mine, pefts in (
        (layer.lora_A.grad, t.lora_A["default"].weight.grad),
        (layer.lora_B.grad, t.lora_B["default"].weight.grad),
        (layer.lora_B_bias.grad, t.lora_B["default"].bias.grad),
    ):
        torch.testing.assert_close(mine, pefts, atol=ATOL, rtol=0)
    merge_lora(ours)
    t.merge()
    torch.testing.assert_close(layer.bias, t.base_layer.bias, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours(x), y_theirs.detach(), atol=ATOL, rtol=0)
    unmerge_lora(ours)
    torch.testing.assert_close(layer.bias, base[0].bias, atol=ATOL, rtol=0)


def test_converts_both_ways_and_reloads(pair, tmp_path):
    base, ours, theirs, x = pair
    theirs.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    from_peft(loaded, tmp_path / "peft")
    assert loaded[0].lora_B_bias is not None and loaded[0].lora_B_bias.requires_grad
    torch.testing.assert_close(loaded(x), theirs(x), atol=ATOL, rtol=0)
    to_peft(ours, tmp_path / "ours", base_model_name_or_path="net")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(back(x), ours(x), atol=ATOL, rtol=0)
    save_lora(ours, tmp_path / "mine")
    again = copy.deepcopy(base)
    load_lora(again, tmp_path / "mine")
    torch.testing.assert_close(again(x), ours(x), atol=ATOL, rtol=0)


def test_a_fresh_lora_bias_is_zero_so_the_layer_changes_nothing():
    base, x = _base("linear")
    ours = copy.deepcopy(base.double())
    inject_lora(ours, ["0"], r=2, lora_bias=True)
    assert torch.count_nonzero(ours[0].lora_B_bias) == 0
    torch.testing.assert_close(ours(x.double()), base(x.double()), atol=0, rtol=0)


def test_embeddings_refuse_it_and_a_base_without_bias_cannot_merge():
    with pytest.raises(ValueError, match="lora_bias=True is not supported for embeddings"):
        inject_lora(nn.Sequential(nn.Embedding(10, 4)), ["0"], r=2, lora_bias=True)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2))
    inject_lora(model, ["0", "1"], r=2, lora_bias=True)
    with torch.no_grad():
        model[0].lora_B_bias.fill_(0.5)
    model(torch.randn(2, 4)).sum().backward()  # it trains
    assert model[0].lora_B_bias.grad is not None
    with pytest.raises(
        ValueError, match="0: it has lora_bias=True but its base layer has no bias.*nothing was merged"
    ):
        merge_lora(model)
    assert not any(layer.merged for _, layer in lora_layers(model))


def test_a_conv_without_base_bias_still_gives_its_update_only_the_merge_is_refused():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False))
    inject_lora(net, ["0"], r=2, lora_bias=True)
    layer = net[0]
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = torch.einsum("oj,ji...->oi...", layer.lora_B.flatten(1), layer.lora_A) * layer.scaling
    torch.testing.assert_close(layer.delta_weight(), expected, atol=0, rtol=0)  # computable: no bias needed
    with pytest.raises(ValueError, match="no bias to merge it into"):
        merge_lora(net)


def test_loraplus_gives_lora_bias_bs_learning_rate():
    """lora_B_bias is part of B's output: LoRA+ puts it in B's group (PEFT's LoRA+ does the same for
    lora_B.bias), with no weight decay (a bias)."""
    from loralib.optim import param_groups

    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_lora(model, ["0", "2"], r=2, lora_bias=True)
    mark_only_lora_as_trainable(model)
    groups = param_groups(model, 1e-3, loraplus_lr_ratio=16.0, weight_decay=0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for _, layer in lora_layers(model):
        assert by_param[id(layer.lora_B_bias)]["lr"] == pytest.approx(16e-3)
        assert by_param[id(layer.lora_B_bias)]["weight_decay"] == 0.0
        assert by_param[id(layer.lora_A)]["lr"] == pytest.approx(1e-3)
