"""inject_lora / mark_only_lora_as_trainable / merge / unload on the tiny RoBERTa, against stock transformers.

References are independent of loralib: the stock model's outputs and state-dict keys, PEFT's own
target-matching function, and parameter-name sets computed here from `named_parameters()`.
Not here: the layer's math (test_01_layers.py), adapters on disk (test_03_adapters.py), the toy
task (test_03_toy.py).
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn
from transformers import (
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoTokenizer,
)

from loralib.adapters import load_lora, save_lora
from loralib.injection import (
    find_targets,
    inject_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from loralib.layers import LoraLinear

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

TEXTS = ["The movie was wonderful.", "The hotel room was dirty and the staff were rude, sadly."]


@pytest.fixture(scope="module")
def stock(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()


@pytest.fixture(scope="module")
def batch(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return dict(tok(TEXTS, padding=True, return_tensors="pt"))


@pytest.fixture
def model(stock):
    return copy.deepcopy(stock)


def randomize_B(model: nn.Module, seed: int = 0) -> None:
    """A trained-looking adapter: B != 0 so the update actually changes outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if type(m) is nn.Linear]


def peft_matches(model, target_modules) -> list[str]:
    cfg = SimpleNamespace(
        target_modules=target_modules,
        exclude_modules=None,
        modules_to_save=None,
        target_parameters=None,
        layers_to_transform=None,
        layers_pattern=None,
    )
    return [n for n, _ in model.named_modules() if n and check_target_module_exists(cfg, n)]


@pytest.mark.parametrize("target_modules", [["query", "value"], "all-linear", ["dense"]], ids=str)
@pytest.mark.parametrize("init", [True, "gaussian", "article"])
def test_zero_B_gives_the_stock_outputs_exactly(stock, model, batch, target_modules, init):
    names = inject_lora(model, target_modules, r=4, lora_alpha=8, init_lora_weights=init)
    assert names and [n for n, _ in lora_layers(model)] == names
    assert torch.equal(logits(model, batch), logits(stock, batch))
    randomize_B(model)
    assert not torch.allclose(logits(model, batch), logits(stock, batch)), "a nonzero B must change outputs"


@pytest.mark.parametrize(
    "target_modules",
    [
        ["query", "value"],
        ["roberta.encoder.layer.0.attention.self.query"],
        ["self.key"],
        ["attention.output.dense"],
        ["dense"],
        ["out_proj", "intermediate.dense"],
        r".*\.layer\.1\..*\.(query|key)",
        r"roberta\.encoder\.layer\.\d\.attention\.self\.value",
        r".*dense",
    ],
    ids=str,
)
def test_name_matching_agrees_with_peft(model, target_modules):
    expected = peft_matches(model, target_modules)
    assert expected, "the table should only hold targets that match something"
    assert find_targets(model, target_modules) == expected
    assert inject_lora(model, target_modules, r=2) == expected
    assert sorted(n for n, _ in lora_layers(model)) == sorted(expected)
    for name in expected:
        assert isinstance(model.get_submodule(name), LoraLinear)


def test_suffix_matching_needs_whole_dotted_parts(model):
    # 'uery' is a substring but not a dotted suffix; a bare string is a regex that must match a full name.
    assert peft_matches(model, ["uery"]) == find_targets(model, ["uery"]) == []
    assert peft_matches(model, "query") == find_targets(model, "query") == []
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(model, "query")


@pytest.mark.parametrize(
    "auto_cls, heads",
    [
        (AutoModelForSequenceClassification, ("classifier.",)),
        (AutoModelForQuestionAnswering, ("qa_outputs",)),
        (AutoModelForMaskedLM, ("lm_head.",)),
    ],
    ids=["seq-cls", "qa", "mlm"],
)
def test_all_linear_excludes_task_heads(tiny_model_dir, auto_cls, heads):
    torch.manual_seed(0)
    m = auto_cls.from_pretrained(tiny_model_dir)
    all_linear = linear_names(m)
    expected = [n for n in all_linear if not n.startswith(heads)]
    assert len(expected) == 12 and len(all_linear) > len(expected)  # 2 layers x 6 encoder Linears
    assert inject_lora(m, "all-linear", r=2) == expected
    assert all(type(m.get_submodule(n)) is nn.Linear for n in all_linear if n.startswith(heads))


def test_matching_nothing_lists_the_linear_layers(model):
    with pytest.raises(ValueError, match="matched no module") as e:
        inject_lora(model, ["querry"])
    for name in linear_names(model):
        assert name in str(e.value)
    assert not list(lora_layers(model))


@pytest.mark.parametrize(
    "target_modules, error, match",
    [
        (["attention"], TypeError, "is a RobertaAttention, not a type LoRA adapts here"),
        (["query", "LayerNorm"], TypeError, "is a LayerNorm, not a type LoRA adapts here"),
        ([], ValueError, "non-empty"),
        ([""], ValueError, "non-empty"),
        ("(query", ValueError, "not a valid regular expression"),
    ],
    ids=str,
)
def test_bad_targets_raise_and_leave_the_model_untouched(model, target_modules, error, match):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=re.escape(match) if error is TypeError else match):
        inject_lora(model, target_modules, r=2)
    assert not list(lora_layers(model)), "a failed inject must not leave half the model adapted"
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_injecting_twice_raises_type_error(model):
    inject_lora(model, ["query"], r=2)
    with pytest.raises(TypeError, match="already has LoRA"):
        inject_lora(model, ["query"], r=2)
    # "all-linear" skips the layers that are already adapted instead of nesting LoRA.
    more = inject_lora(model, "all-linear", r=2)
    assert not any(n.endswith("query") for n in more) and len(more) == 10


@pytest.mark.parametrize(
    "kwargs",
    [dict(r=0), dict(lora_alpha=0), dict(lora_dropout=1.0), dict(init_lora_weights="xavier")],
    ids=str,
)
def test_bad_lora_args_raise_before_touching_the_model(model, kwargs):
    with pytest.raises(ValueError):
        inject_lora(model, ["query"], **kwargs)
    assert not list(lora_layers(model))


TARGETS = ["query", "value"]


def expected_trainable(model, bias, norms, emb, to_save) -> set[str]:
    """The trainable set from parameter names alone (no loralib logic)."""
    names = [n for n, _ in model.named_parameters()]
    out = {n for n in names if n.endswith((".lora_A", ".lora_B"))}
    if bias == "all":
        out |= {n for n in names if n.endswith(".bias")}
    if bias == "lora_only":
        out |= {n for n in names if n.endswith(".bias") and n.rsplit(".", 2)[-2] in TARGETS}
    if norms:
        out |= {n for n in names if ".LayerNorm." in n}
    if emb:
        out |= {n for n in names if n.endswith("_embeddings.weight")}
    for prefix in to_save:
        out |= {n for n in names if n.startswith(prefix + ".")}
    return out


TRAINABLE_CASES = [
    ("none", False, False, ()),
    ("all", False, False, ()),
    ("lora_only", False, False, ()),
    ("none", True, False, ()),
    ("none", False, True, ()),
    ("none", False, False, ("classifier",)),
    ("lora_only", True, False, ("classifier",)),
    ("all", True, True, ("classifier",)),
]


@pytest.mark.parametrize("bias, norms, emb, to_save", TRAINABLE_CASES, ids=str)
def test_trainable_sets(model, batch, bias, norms, emb, to_save):
    inject_lora(model, TARGETS, r=4, lora_alpha=8)
    mark_only_lora_as_trainable(
        model, bias=bias, train_layer_norms=norms, train_embeddings=emb, modules_to_save=to_save
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = expected_trainable(model, bias, norms, emb, to_save)
    assert trainable == expected
    n_lora = 2 * 2 * 4 * (64 + 64)  # 2 layers x (query, value) x r (in + out)
    assert sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n and p.requires_grad) == n_lora

    # Only those parameters get gradients, and only they move after an optimizer step.
    randomize_B(model)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    out = model(**batch, labels=torch.tensor([1, 0]))
    out.loss.backward()
    for n, p in model.named_parameters():
        if n in expected:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bias="some"), "bias must be 'none', 'all' or 'lora_only'"),
        (dict(modules_to_save=["classifer"]), "modules_to_save entry 'classifer' matches no module"),
    ],
)
def test_mark_trainable_errors(model, kwargs, match):
    inject_lora(model, TARGETS, r=2)
    with pytest.raises(ValueError, match=match):
        mark_only_lora_as_trainable(model, **kwargs)


def test_mark_trainable_needs_lora(model):
    with pytest.raises(ValueError, match="no LoRA layers; call inject_lora"):
        mark_only_lora_as_trainable(model)


@pytest.mark.parametrize("target_modules", [TARGETS, "all-linear"], ids=str)
def test_merged_equals_unmerged(model, batch, target_modules):
    inject_lora(model, target_modules, r=4, lora_alpha=8)
    randomize_B(model)
    weights = {n: layer.weight.detach().clone() for n, layer in lora_layers(model)}
    y = logits(model, batch)
    merge_lora(model)
    merge_lora(model)  # idempotent
    assert all(layer.merged for _, layer in lora_layers(model))
    for n, layer in lora_layers(model):
        torch.testing.assert_close(
            layer.weight, weights[n] + layer.scaling * layer.lora_B @ layer.lora_A, rtol=1e-6, atol=1e-6
        )
    torch.testing.assert_close(logits(model, batch), y, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    for n, layer in lora_layers(model):
        assert not layer.merged
        torch.testing.assert_close(layer.weight, weights[n], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model, batch), y, rtol=1e-5, atol=1e-5)


def test_unload_gives_a_stock_model(stock, model, batch, tmp_path, tiny_model_dir):
    inject_lora(model, "all-linear", r=4, lora_alpha=8)
    randomize_B(model)
    y_unmerged = logits(model, batch)
    merge_lora(model)
    y_merged = logits(model, batch)
    unload_lora(model)
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert list(model.state_dict()) == list(stock.state_dict())
    assert linear_names(model) == linear_names(stock)
    assert torch.equal(logits(model, batch), y_merged)
    torch.testing.assert_close(y_merged, y_unmerged, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y_merged, logits(stock, batch))
    # The unloaded model is a plain transformers checkpoint again.
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded, batch), y_merged)


def test_injecting_all_linear_twice_says_the_model_already_has_lora():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    inject_lora(model, "all-linear", r=2)
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match="already has LoRA on every linear layer 'all-linear' selects"):
        inject_lora(model, "all-linear", r=2)
    with pytest.raises(TypeError, match="already has LoRA on '0'"):
        inject_lora(model, ["0"], r=2)
    assert [type(m) for m in model] == before


def _nested():
    torch.manual_seed(0)
    # "0" is a full name here and also the last part of "2.0": a suffix match would adapt both
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Sequential(nn.Linear(4, 4)), nn.Linear(4, 2))


@pytest.mark.parametrize("fmt", ["loralib", "peft"])
def test_an_adapter_saved_from_a_pattern_reloads_into_exactly_its_layers(tmp_path, fmt):
    from loralib.peft_interop import from_peft, to_peft

    model = _nested()
    assert inject_lora(model, r"0", r=2) == ["0"]  # a regex: the whole name must match
    for _, layer in lora_layers(model):
        nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 4)
    want = model(x)
    fresh = _nested()
    if fmt == "loralib":
        save_lora(model, tmp_path / "a")
        load_lora(fresh, tmp_path / "a")
    else:
        to_peft(model, tmp_path / "a", base_model_name_or_path="nested")
        from_peft(fresh, tmp_path / "a")
    assert [n for n, _ in lora_layers(fresh)] == ["0"]
    torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)


def test_exact_names_that_the_model_lacks_are_named():
    model = _nested()
    with pytest.raises(ValueError, match=r"lacks: \['9'\]"):
        inject_lora(model, ["0", "9"], r=2, exact=True)
    assert not any(True for _ in lora_layers(model))


def test_multihead_attention_is_refused_by_name_and_skipped_by_all_linear():
    """nn.MultiheadAttention's forward reads out_proj.weight directly: LoRA there would silently never run."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.Linear(8, 8))
    x = torch.randn(3, 1, 8)
    with pytest.raises(TypeError, match="inside an nn.MultiheadAttention.*not supported"):
        inject_lora(model, ["0.out_proj"], r=2)
    with pytest.raises(TypeError, match="MultiheadAttention, not a type LoRA adapts here"):
        inject_lora(model, ["0"], r=2)
    assert not list(lora_layers(model))
    assert inject_lora(model, "all-linear", r=2) == ["1"]  # the MHA's out_proj is left alone
    # The reason, shown: a LoRA update on out_proj would not change the MHA's output.
    mha = nn.MultiheadAttention(8, 2)
    before = mha(x, x, x)[0]
    mha.out_proj.weight.data.add_(1.0)
    assert not torch.allclose(mha(x, x, x)[0], before)  # the weight is read...
    mha.out_proj.forward = lambda inp: inp * 0  # ...but the module's forward is never called
    after = mha(x, x, x)[0]
    assert after.abs().sum() > 0
