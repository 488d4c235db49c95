"""`LoraConv1d/2d/3d` exact against PEFT's conv LoRA (outputs, gradients, merge, unmerge), groups
included, and through `from_peft` / `to_peft`. Float64 copies: "exact" is float64 rounding (1e-10 for
the convolutions' longer reductions)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loralib import from_peft, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora, to_peft
from loralib.injection import unload_lora, unmerge_lora
from loralib.layers import LoraConv1d, LoraConv2d, LoraConv3d

pytestmark = pytest.mark.numerical
peft = pytest.importorskip("peft")
ATOL = 1e-10

CASES = {
    "conv1d": (lambda g: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=g), (2, 4, 9), LoraConv1d),
    "conv2d": (lambda g: nn.Conv2d(4, 6, 3, padding=1, groups=g), (2, 4, 7, 7), LoraConv2d),
    "conv3d": (lambda g: nn.Conv3d(4, 6, (1, 3, 3), groups=g), (2, 4, 3, 5, 5), LoraConv3d),
}


class Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.conv(x).flatten(2).mean(-1))


def _pair(kind, groups=1, r=4):
    make, shape, cls = CASES[kind]
    torch.manual_seed(0)
    base = Net(make(groups)).double()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["conv"], r=r, lora_alpha=8)
    mark_only_lora_as_trainable(ours)
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(target_modules=["conv"], r=r, lora_alpha=8)
    )
    layer, t = ours.conv, theirs.base_model.model.conv
    assert isinstance(layer, cls)
    with torch.no_grad():
        layer.lora_B.normal_()
        t.lora_A["default"].weight.copy_(layer.lora_A)
        t.lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, theirs, torch.randn(shape, dtype=torch.float64)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("kind", sorted(CASES))
def test_outputs_and_gradients_equal_pefts(kind, groups):
    _, ours, theirs, x = _pair(kind, groups)
    y_ours, y_theirs = ours(x), theirs(x)
    torch.testing.assert_close(y_ours, y_theirs, atol=ATOL, rtol=0)
    y_ours.square().sum().backward()
    y_theirs.square().sum().backward()
    t = theirs.base_model.model.conv
    torch.testing.assert_close(ours.conv.lora_A.grad, t.lora_A["default"].weight.grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.conv.lora_B.grad, t.lora_B["default"].weight.grad, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", sorted(CASES))
def test_merge_and_unmerge_equal_pefts(kind):
    base, ours, theirs, x = _pair(kind)
    before = ours(x).detach()
    merge_lora(ours)
    theirs.base_model.model.conv.merge()
    torch.testing.assert_close(
        ours.conv.weight, theirs.base_model.model.conv.base_layer.weight, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(ours(x), before, atol=ATOL, rtol=0)
    unmerge_lora(ours)
    torch.testing.assert_close(ours.conv.weight, base.conv.weight, atol=ATOL, rtol=0)
    plain = unload_lora(ours)
    assert type(plain.conv) is type(base.conv)
    torch.testing.assert_close(plain(x), before, atol=ATOL, rtol=0)


def test_a_grouped_conv_refuses_to_merge_with_nothing_merged():
    _, ours, _, x = _pair("conv2d", groups=2)
    inject_lora(ours, ["head"], r=2)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(ValueError, match="groups=2 cannot hold the merged update.*nothing was merged"):
        merge_lora(ours)
    assert not any(layer.merged for _, layer in lora_layers(ours))
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("kind", sorted(CASES))
def test_peft_adapters_convert_both_ways(kind, tmp_path):
    base, ours, theirs, x = _pair(kind)
    theirs.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    from_peft(loaded, tmp_path / "peft")
    torch.testing.assert_close(loaded(x), theirs(x), atol=ATOL, rtol=0)
    to_peft(ours, tmp_path / "ours", base_model_name_or_path="net")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(back(x), ours(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "conv, match",
    [
        (nn.Conv2d(4, 6, 3, dilation=2), "dilation=\\(2, 2\\) is not supported"),
        (nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect' is not supported"),
        (nn.Conv2d(4, 6, 3, groups=2), "r=3 is not divisible by the Conv2d's groups=2"),
    ],
)
def test_what_pefts_conv_layer_does_not_carry_is_refused_with_the_model_unchanged(conv, match):
    net = Net(conv)
    with pytest.raises(ValueError, match=match):
        inject_lora(net, ["conv"], r=3)
    assert type(net.conv) is type(conv) and not list(lora_layers(net))
