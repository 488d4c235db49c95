"""PEFT's own LoRA test table (the LoraConfig rows of peft/tests/test_custom_models.py), with PEFT as the
reference.

For each row PEFT builds its model (init_lora_weights=False, so B is not zero and every factor matters) and
saves the adapter; `from_peft` loads it into a fresh base as loralib layers, and `to_peft` writes ours back
for `PeftModel.from_pretrained`. In float64 both ways must give PEFT's outputs and LoRA gradients, the same
trainable tensors, and the same merged outputs; `inject_lora` with the same `LoraConfig` must adapt the same
modules with the same ranks and scalings. DoRA rows (`use_dora`) are held to the same checks, the magnitude
among the gradients. Rows loralib does not support (nn.MultiheadAttention, nn.Parameter targets, trainable
tokens, KaSA, MiCA, VeLoRA) must be refused with the feature named and the model unchanged. The models are PEFT's, copied from its test file.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import loralib  # noqa: E402
from loralib import LoraConfig, from_peft, inject_lora, lora_layers, merge_lora, to_peft, unmerge_lora  # noqa: E402

# ---------------------------------------------------------------- PEFT's models (test_custom_models.py)

pytestmark = pytest.mark.numerical


class MLP(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.lin0 = nn.Linear(10, 20, bias=bias)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.lin1 = nn.Linear(20, 2, bias=bias)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin1(self.drop(self.relu(self.lin0(X.to(self.lin0.weight.dtype))))))


class ModelEmbConv1D(nn.Module):
    def __init__(self, emb_size=100):
        super().__init__()
        self.emb = nn.Embedding(emb_size, 5)
        self.conv1d = Conv1D(1, 5)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(self.emb(X))))))


class ModelConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1d = nn.Conv1d(1, 1, 2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(9, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.to(self.lin0.weight.dtype).reshape(-1, 1, 10)
        return self.sm(self.lin0(self.flat(self.relu(self.conv1d(X)))))


class ModelConv2D(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.conv2d = nn.Conv2d(5, 10, 3, bias=bias)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.to(self.lin0.weight.dtype).reshape(-1, 5, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


class ModelConv2DGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(90, 288)
        self.conv2d = nn.Conv2d(16, 16, 3, groups=8)  # groups 8: r=8 divisible by groups
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin1 = nn.Linear(16, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = self.lin0(X.to(self.lin0.weight.dtype).flatten()).reshape(2, 16, 3, 3)
        return self.sm(self.lin1(self.flat(self.relu(self.conv2d(X)))))


class ModelConv2DGroups2(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv2d = nn.Conv2d(16, 32, 3, padding=1, groups=2)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(12800, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = torch.arange(9 * 16 * 20 * 20).view([9, 16, 20, 20]).to(self.lin0.weight.dtype) / 1e4
        return self.sm(self.lin0(self.flat(self.relu(self.conv2d(X)))))


class ModelConv3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3d = nn.Conv3d(5, 10, 3)
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.to(self.lin0.weight.dtype)
        if X.dim() == 2:
            X = torch.stack([X] * 3, dim=-1)
        X = X.reshape(-1, 5, 3, 3, 3)
        return self.sm(self.lin0(self.flat(self.relu(self.conv3d(X)))))


class ModelMha(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(10, 2)
        self.lin0 = nn.Linear(10, 2)
        self.sm = nn.LogSoftmax(dim=-1)

    def forward(self, X):
        X = X.to(self.lin0.weight.dtype)
        X, _ = self.mha(X, X, X)
        return self.sm(self.lin0(X))


MODELS = {
    "MLP": MLP,
    "EmbConv1D": ModelEmbConv1D,
    "Conv1d": ModelConv1D,
    "Conv2d": ModelConv2D,
    "Conv2dGroups": ModelConv2DGroups,
    "Conv2dGroups2": ModelConv2DGroups2,
    "Conv3d": ModelConv3D,
    "MHA": ModelMha,
}

# PEFT's LoraConfig rows that loralib reproduces (name, model, config).
SUPPORTED = [
    ("Vanilla MLP 1 LoRA", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 LoRA", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 LoRA", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 LoRA", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 LoRA", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 LoRA", "MLP", {"target_modules": ["lin0"], "lora_alpha": 4, "lora_dropout": 0.1}),
    ("Embedding + transformers Conv1D 1 LoRA", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D 2 LoRA", "EmbConv1D", {"target_modules": ["emb"]}),
    ("Embedding + transformers Conv1D 3 LoRA", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d LoRA", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 LoRA", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 LoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d Groups LoRA", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d Groups2 LoRA", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv3d 1 LoRA", "Conv3d", {"target_modules": ["conv3d"]}),
    ("Conv3d 2 LoRA", "Conv3d", {"target_modules": ["conv3d", "lin0"]}),
    (
        "Vanilla MLP 1 LoRA with lora_b bias",
        "MLP",
        {"target_modules": ["lin0", "lin1"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv2d 1 LoRA with lora_b bias",
        "Conv2d",
        {"target_modules": ["conv2d"], "lora_bias": True, "lora_alpha": 32},
    ),
    (
        "Conv3d 1 LoRA with lora_b bias",
        "Conv3d",
        {"target_modules": ["conv3d"], "lora_bias": True, "lora_alpha": 32},
    ),
    # DoRA: the table's rows, then the other layer types on the same models
    ("Vanilla MLP 7 LoRA with DoRA", "MLP", {"target_modules": ["lin0"], "use_dora": True}),
    ("Vanilla MLP 8 LoRA with DoRA", "MLP", {"target_modules": ["lin0", "lin1"], "use_dora": True}),
    ("Vanilla MLP 9 LoRA with DoRA", "MLP", {"target_modules": "lin1", "use_dora": True, "lora_alpha": 32}),
    ("Embedding + transformers Conv1D 1 DoRA", "EmbConv1D", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Embedding + transformers Conv1D 2 DoRA", "EmbConv1D", {"target_modules": ["emb"], "use_dora": True}),
    (
        "Embedding + transformers Conv1D 3 DoRA",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d"], "use_dora": True},
    ),
    ("Conv2d 1 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d"], "use_dora": True}),
    ("Conv2d 2 LoRA with DoRA", "Conv2d", {"target_modules": ["conv2d", "lin0"], "use_dora": True}),
    ("Conv1d DoRA", "Conv1d", {"target_modules": ["conv1d"], "use_dora": True}),
    ("Conv3d 1 DoRA", "Conv3d", {"target_modules": ["conv3d"], "use_dora": True}),
    (
        "MLP DoRA rsLoRA + rank/alpha patterns",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_dora": True,
            "use_rslora": True,
            "rank_pattern": {"lin1": 2},
            "alpha_pattern": {"lin0": 3},
            "lora_dropout": 0.1,
        },
    ),
    # beyond the table: the other LoraConfig fields, on the same models
    (
        "MLP rsLoRA + rank/alpha patterns",
        "MLP",
        {
            "target_modules": ["lin0", "lin1"],
            "use_rslora": True,
            "rank_pattern": {"lin1": 2},
            "alpha_pattern": {"lin0": 3},
        },
    ),
    ("MLP bias all", "MLP", {"target_modules": ["lin0"], "bias": "all"}),
    ("MLP bias lora_only", "MLP", {"target_modules": ["lin0", "lin1"], "bias": "lora_only"}),
    ("MLP exclude_modules", "MLP", {"target_modules": "lin.*", "exclude_modules": ["lin1"]}),
    (
        "EmbConv1D gaussian",
        "EmbConv1D",
        {"target_modules": ["emb", "conv1d", "lin0"], "r": 4, "lora_alpha": 16},
    ),
]
# PEFT's rows that loralib refuses, and the words its error must contain.
REFUSED = [
    ("Embedding + transformers Conv1D 1 LoRA trainable_tokens", "EmbConv1D", {"target_modules": ["conv1d"], "trainable_token_indices": {"emb": [0, 10]}}, "trainable tokens"),
    ("MHA 1 LoRA", "MHA", {"target_modules": ["mha"]}, "MultiheadAttention"),
    ("MHA 2 LoRA", "MHA", {"target_modules": ["mha", "lin0"]}, "MultiheadAttention"),
]  # fmt: skip

X = torch.arange(90).view(9, 10)


def _base(model_id: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[model_id]().double().eval()


def _inputs(model_id: str) -> torch.Tensor:
    return X if model_id == "EmbConv1D" else X.double() / 10


def _peft_model(model_id, kwargs):
    torch.manual_seed(1)
    return peft.get_peft_model(_base(model_id), peft.LoraConfig(init_lora_weights=False, **kwargs)).eval()


def _ours(peft_name: str) -> str:
    """A PEFT parameter name in loralib's: base_model.model.lin0.lora_A.default.weight -> lin0.lora_A."""
    name = peft_name.removeprefix("base_model.model.")
    for part in (".default", ".modules_to_save", ".base_layer"):
        name = name.replace(part, "")
    name = name.replace("lora_embedding_", "lora_")
    return (
        name.replace("lora_A.weight", "lora_A")
        .replace("lora_B.weight", "lora_B")
        .replace("lora_B.bias", "lora_B_bias")
        .replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
    )


def _grads(model: nn.Module, rename=lambda n: n) -> dict[str, torch.Tensor]:
    return {rename(n): p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name, model_id, kwargs", SUPPORTED, ids=[r[0] for r in SUPPORTED])
def test_peft_rows_convert_exactly_both_ways(name, model_id, kwargs, tmp_path):
    x = _inputs(model_id)
    theirs = _peft_model(model_id, kwargs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _base(model_id)
    from_peft(ours, tmp_path / "peft")
    ours.eval()
    want = theirs(x)
    torch.testing.assert_close(ours(x), want, rtol=1e-12, atol=1e-12)

    # the same tensors train, with the same gradients
    theirs.zero_grad()
    theirs(x).sum().backward()
    ours(x).sum().backward()
    g_theirs, g_ours = _grads(theirs, _ours), _grads(ours)
    assert sorted(g_ours) == sorted(g_theirs)
    for key in g_theirs:  # a convolution's DoRA magnitude is (1, out, 1, ...) in PEFT, (out,) here
        want_g = g_theirs[key].reshape(g_ours[key].shape) if "magnitude" in key else g_theirs[key]
        torch.testing.assert_close(g_ours[key], want_g, rtol=1e-10, atol=1e-12, msg=key)

    # ours back to PEFT
    to_peft(ours, tmp_path / "back", base_model_name_or_path="peft-table")
    again = peft.PeftModel.from_pretrained(_base(model_id), tmp_path / "back").eval()
    torch.testing.assert_close(again(x), want, rtol=1e-12, atol=1e-12)

    # merge and unmerge against PEFT's merge (a grouped conv cannot hold the merged update: refused, unchanged)
    if any(getattr(m, "groups", 1) > 1 for _, m in lora_layers(ours)):
        with pytest.raises(ValueError, match="groups"):
            merge_lora(ours)
        assert not any(m.merged for _, m in lora_layers(ours))
    else:
        merged_theirs = copy.deepcopy(theirs).merge_and_unload()
        merge_lora(ours)
        torch.testing.assert_close(ours(x), merged_theirs(x), rtol=1e-10, atol=1e-12)
        unmerge_lora(ours)
        torch.testing.assert_close(ours(x), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name, model_id, kwargs", SUPPORTED, ids=[r[0] for r in SUPPORTED])
def test_inject_lora_with_the_same_config_adapts_what_peft_adapts(
    name, model_id, kwargs, assert_same_layers_as_peft
):
    theirs = _peft_model(model_id, kwargs)
    ours = _base(model_id)
    inject_lora(ours, LoraConfig(**kwargs))
    assert_same_layers_as_peft(ours, theirs)
    loralib.mark_only_lora_as_trainable(ours, config=LoraConfig(**kwargs))
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {_ours(n) for n, p in theirs.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name, model_id, kwargs, words", REFUSED, ids=[r[0] for r in REFUSED])
def test_unsupported_rows_are_refused_with_the_model_unchanged(name, model_id, kwargs, words, tmp_path):
    theirs = _peft_model(model_id, kwargs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = _base(model_id)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    modules_before = [type(m) for m in ours.modules()]
    with pytest.raises((ValueError, TypeError), match=words):
        from_peft(ours, tmp_path / "peft")
    with pytest.raises((ValueError, TypeError), match=words):
        inject_lora(ours, **kwargs)
    assert [type(m) for m in ours.modules()] == modules_before
    after = ours.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
