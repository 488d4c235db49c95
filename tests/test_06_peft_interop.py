"""loralib <-> PEFT: layer parity, `to_peft` and `from_peft` on the tiny RoBERTa, checked against PEFT itself."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.layer import Linear as PeftLoraLinear  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from loralib.fast_path import dropout_mask  # noqa: E402
from loralib.injection import inject_lora, lora_layers, mark_only_lora_as_trainable  # noqa: E402
from loralib.layers import LoraLinear  # noqa: E402
from loralib.numerics import assert_within_rounding, float64_reference  # noqa: E402
from loralib.peft_interop import from_peft, read_peft_adapter, to_peft  # noqa: E402
from loralib.utils import count_parameters, set_seed  # noqa: E402

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

# Whole models are compared in float64 (`_out` runs a float64 copy): two formulations of the same math then
# agree to ~1e-13 on every CPU, while a real difference (a wrong alpha, a missing layer) is O(1e-2).
ATOL = 1e-9


class _FixedMask(nn.Module):
    """Inverted dropout with a given mask (0 or 1 / (1 - p) per element)."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


# ---------------------------------------------------------------- one layer


@pytest.mark.parametrize(
    "r, alpha, bias, dropout",
    [(1, 1, True, 0.0), (4, 8, True, 0.0), (8, 16, False, 0.0), (16, 4, True, 0.0), (4, 8, True, 0.3)],
)
def test_layer_parity_outputs_and_gradients(r, alpha, bias, dropout):
    torch.manual_seed(0)
    base = nn.Linear(24, 40, bias=bias)
    ours = LoraLinear.from_linear(base, r=r, lora_alpha=alpha, lora_dropout=dropout)
    theirs = PeftLoraLinear(
        nn.Linear(24, 40, bias=bias),
        "default",
        config=LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout),
        r=r,
        lora_alpha=alpha,
    )
    theirs.base_layer.requires_grad_(False)  # get_peft_model freezes the base; a bare layer does not
    with torch.no_grad():
        theirs.base_layer.weight.copy_(base.weight)
        if bias:
            theirs.base_layer.bias.copy_(base.bias)
        ours.lora_B.normal_()  # B = 0 would make the LoRA path invisible
        theirs.lora_A["default"].weight.copy_(ours.lora_A)
        theirs.lora_B["default"].weight.copy_(ours.lora_B)
    assert theirs.scaling["default"] == ours.scaling == alpha / r
    ours.train(), theirs.train()
    x1 = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    if dropout:  # PEFT gets the mask our layer draws (loralib's CPU generator, not torch's dropout)
        torch.manual_seed(1)
        keep = dropout_mask(x1.shape, dropout).float() / (1 - dropout)
        theirs.lora_dropout["default"] = _FixedMask(keep)
    else:
        keep = torch.ones(x1.shape)
    torch.manual_seed(1)
    y1 = ours(x1)
    y2 = theirs(x2)
    assert (y1 - base(x1)).abs().max() > 0.1  # the low-rank path really contributes
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    # Both layers against the formula in float64, within fp32's rounding bound (loralib.numerics).
    s = ours.scaling
    ref = float64_reference(
        lambda x, W, b, A, B, keep: x @ W.T + (0 if b is None else b) + s * ((x * keep) @ A.T) @ B.T,
        {"x": x1, "W": base.weight, "b": base.bias, "A": ours.lora_A, "B": ours.lora_B, "keep": keep},
        grad_output=g,
        wrt=("x", "A", "B"),
    )
    n = 24 + 40 + r + 15 + 4
    for side, y, dx, da, db in (
        ("ours", y1, x1.grad, ours.lora_A.grad, ours.lora_B.grad),
        ("peft", y2, x2.grad, theirs.lora_A["default"].weight.grad, theirs.lora_B["default"].weight.grad),
    ):
        assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name=f"{side} y")
        for k, got in (("x", dx), ("A", da), ("B", db)):
            assert_within_rounding(
                got, ref.grads[k], ref.grad_magnitudes[k], torch.float32, n, name=f"{side} d{k}"
            )
    assert ours.weight.grad is None and theirs.base_layer.weight.grad is None


# ---------------------------------------------------------------- whole models


def _batch(vocab: int = 1000):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _out(model, batch):
    """The model's logits in float64, from a float64 copy (the model itself is left as it is)."""
    model = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        out = model(**batch)
    return (
        out.logits
        if hasattr(out, "logits") and out.logits is not None
        else torch.stack([out.start_logits, out.end_logits])
    )


def _perturb_trainables(model, scale=0.1):
    """Make every trained tensor differ from the checkpoint, as training would."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def _seq_cls(d, num_labels=3, seed=0):
    set_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(d, num_labels=num_labels)


OURS_RECIPES = {
    "qv_head": dict(targets=["query", "value"], r=8, lora_alpha=8, bias="none", ln=False),
    "article_all": dict(
        targets=["query", "key", "value", "intermediate.dense", "output.dense"],
        r=4,
        lora_alpha=8,
        bias="all",
        ln=True,
    ),
    "lora_only_bias": dict(targets=["query", "value"], r=2, lora_alpha=3.5, bias="lora_only", ln=True),
    "regex": dict(targets=r".*layer\.1\..*(query|dense)", r=4, lora_alpha=4, bias="none", ln=False),
    "rslora": dict(targets=["query", "value"], r=16, lora_alpha=8, bias="none", ln=False, use_rslora=True),
}


@pytest.mark.parametrize("recipe", list(OURS_RECIPES))
def test_to_peft_reproduces_our_model_in_peft(tiny_model_dir, tmp_path, recipe):
    spec = OURS_RECIPES[recipe]
    model = _seq_cls(tiny_model_dir)
    rslora = spec.get("use_rslora", False)
    inject_lora(
        model,
        spec["targets"],
        r=spec["r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.1,
        use_rslora=rslora,
    )
    mark_only_lora_as_trainable(
        model, bias=spec["bias"], train_layer_norms=spec["ln"], modules_to_save=["classifier"]
    )
    _perturb_trainables(model)
    batch = _batch()
    ours = _out(model, batch)
    to_peft(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is rslora and cfg["lora_alpha"] == spec["lora_alpha"]
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "SEQ_CLS" and cfg["bias"] == spec["bias"]
    assert cfg["base_model_name_or_path"] == tiny_model_dir

    base = _seq_cls(tiny_model_dir, seed=99)  # another random head: the file must carry ours
    stock = _out(base, batch)
    assert (ours - stock).abs().max() > 1e-2
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "a"))
    torch.testing.assert_close(_out(peft_model, batch), ours, atol=ATOL, rtol=ATOL)
    # PEFT, loading the file for training, trains exactly what we trained.
    trainable = PeftModel.from_pretrained(_seq_cls(tiny_model_dir), str(tmp_path / "a"), is_trainable=True)
    assert (
        sum(p.numel() for p in trainable.parameters() if p.requires_grad) == count_parameters(model).trainable
    )


def test_to_peft_writes_peft_key_names_and_short_targets(tiny_model_dir, tmp_path):
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query", "key", "value", "intermediate.dense", "output.dense"], r=4, lora_alpha=8)
    mark_only_lora_as_trainable(model, train_layer_norms=True, modules_to_save=["classifier"])
    to_peft(model, tmp_path)
    cfg, tensors = read_peft_adapter(tmp_path)
    assert sorted(cfg["target_modules"]) == sorted(
        ["query", "key", "value", "intermediate.dense", "output.dense"]
    )
    assert sorted(cfg["modules_to_save"]) == ["LayerNorm", "classifier"]
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["rank_pattern"] == {} and not cfg["use_rslora"]
    q = "roberta.encoder.layer.0.attention.self.query"
    assert tuple(tensors[f"{q}.lora_A.weight"].shape) == (4, 64)
    assert tuple(tensors[f"{q}.lora_B.weight"].shape) == (64, 4)
    assert "classifier.out_proj.weight" in tensors and "roberta.embeddings.LayerNorm.weight" in tensors
    # Exactly PEFT's own key set for the same recipe.
    ref = get_peft_model(
        _seq_cls(tiny_model_dir),
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=cfg["target_modules"],
            modules_to_save=["LayerNorm"],
            task_type="SEQ_CLS",
        ),
    )
    ref.save_pretrained(str(tmp_path / "ref"))
    _, ref_tensors = read_peft_adapter(tmp_path / "ref")
    assert set(tensors) == set(ref_tensors)


def test_to_peft_per_layer_ranks_become_patterns(tiny_model_dir, tmp_path):
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query"], r=4, lora_alpha=8)
    inject_lora(model, ["value"], r=8, lora_alpha=8)
    inject_lora(model, ["roberta.encoder.layer.1.attention.output.dense"], r=2, lora_alpha=1)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    _perturb_trainables(model)
    batch = _batch()
    to_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] in (4, 8) and cfg["rank_pattern"]
    peft_model = PeftModel.from_pretrained(_seq_cls(tiny_model_dir, seed=5), str(tmp_path))
    for name, layer in lora_layers(model):
        theirs = peft_model.base_model.model.get_submodule(name)
        assert theirs.r["default"] == layer.r and theirs.scaling["default"] == pytest.approx(layer.scaling)
    torch.testing.assert_close(_out(peft_model, batch), _out(model, batch), atol=ATOL, rtol=ATOL)


def test_to_peft_question_answering(tiny_model_dir, tmp_path):
    set_seed(0)
    model = AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir)
    inject_lora(model, ["query", "value"], r=4, lora_alpha=8)
    mark_only_lora_as_trainable(model, modules_to_save=["qa_outputs"])
    _perturb_trainables(model)
    to_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"
    set_seed(7)
    peft_model = PeftModel.from_pretrained(
        AutoModelForQuestionAnswering.from_pretrained(tiny_model_dir), str(tmp_path)
    )
    torch.testing.assert_close(_out(peft_model, _batch()), _out(model, _batch()), atol=ATOL, rtol=ATOL)


PEFT_RECIPES = {
    "article": dict(
        r=8,
        lora_alpha=8,
        target_modules=["query", "key", "value", "intermediate.dense", "output.dense"],
        modules_to_save=["LayerNorm", "classifier", "qa_outputs"],
        lora_dropout=0.1,
        bias="none",
    ),
    "bias_all": dict(
        r=4, lora_alpha=16, target_modules=["query", "value"], bias="all", modules_to_save=["LayerNorm"]
    ),
    "lora_only": dict(r=4, lora_alpha=16, target_modules=["query", "value"], bias="lora_only"),
    "patterns": dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "dense"],
        rank_pattern={"value": 2, "output.dense": 6},
        alpha_pattern={"layer.1.attention.self.query": 3},
    ),
    "rslora_regex": dict(r=4, lora_alpha=8, target_modules=r".*\.(key|value)", use_rslora=True),
    "rslora_patterns": dict(
        r=16, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 4}, use_rslora=True
    ),
    "layers_to_transform": dict(
        r=4, lora_alpha=8, target_modules=["query"], layers_to_transform=[1], layers_pattern="layer"
    ),
}


@pytest.mark.parametrize("recipe", list(PEFT_RECIPES))
def test_from_peft_reproduces_a_peft_adapter(tiny_model_dir, tmp_path, recipe):
    peft_model = get_peft_model(
        _seq_cls(tiny_model_dir), LoraConfig(task_type="SEQ_CLS", **PEFT_RECIPES[recipe])
    )
    _perturb_trainables(peft_model)
    n_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    batch = _batch()
    theirs = _out(peft_model, batch)
    peft_model.save_pretrained(str(tmp_path))
    model = _seq_cls(tiny_model_dir, seed=42)
    assert (_out(model, batch) - theirs).abs().max() > 1e-2
    from_peft(model, tmp_path)
    assert all(isinstance(m, LoraLinear) for _, m in lora_layers(model))
    rslora = PEFT_RECIPES[recipe].get("use_rslora", False)
    assert all(m.use_rslora is rslora for _, m in lora_layers(model))  # the rule, not a converted alpha
    peft_names = {n for n, m in peft_model.base_model.model.named_modules() if isinstance(m, PeftLoraLinear)}
    assert {n for n, _ in lora_layers(model)} == peft_names
    torch.testing.assert_close(_out(model, batch), theirs, atol=ATOL, rtol=ATOL)
    assert count_parameters(model).trainable == n_trainable


def test_round_trip_ours_peft_ours(tiny_model_dir, tmp_path):
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query", "value", "output.dense"], r=4, lora_alpha=8)
    mark_only_lora_as_trainable(model, bias="all", train_layer_norms=True, modules_to_save=["classifier"])
    _perturb_trainables(model)
    to_peft(model, tmp_path)
    back = _seq_cls(tiny_model_dir, seed=3)
    from_peft(back, tmp_path)
    torch.testing.assert_close(_out(back, _batch()), _out(model, _batch()), atol=0, rtol=0)
    assert {n for n, p in back.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }


# ---------------------------------------------------------------- clear errors


@pytest.fixture
def peft_dir(tiny_model_dir, tmp_path):
    m = get_peft_model(
        _seq_cls(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    )
    m.save_pretrained(str(tmp_path / "peft"))
    return tmp_path / "peft"


def test_from_peft_rank_mismatch(tiny_model_dir, peft_dir):
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query", "value"], r=4)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"rank mismatch.*model r=4, adapter r=8"):
        from_peft(model, peft_dir)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # untouched


def test_from_peft_target_mismatch(tiny_model_dir, peft_dir):
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query", "key"], r=8)
    with pytest.raises(
        ValueError, match=r"targets differ.*only in the model.*key.*only in the adapter.*value"
    ):
        from_peft(model, peft_dir)


def test_from_peft_other_base_or_head(tiny_model_dir, peft_dir):
    other = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=1000,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            num_labels=3,
        )
    )
    with pytest.raises(ValueError, match=r"does not fit this model.*another base"):
        from_peft(other, peft_dir)
    assert not list(lora_layers(other))  # nothing injected on failure
    with pytest.raises(
        ValueError, match=r"classifier.out_proj.weight: adapter \(3, 64\) vs model \(2, 64\).*num_labels"
    ):
        from_peft(_seq_cls(tiny_model_dir, num_labels=2), peft_dir)


def test_from_peft_rejects_unsupported_and_non_adapters(tiny_model_dir, tmp_path, peft_dir):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    (peft_dir / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True but the file lacks its lora_magnitude_vector"):
        from_peft(_seq_cls(tiny_model_dir), peft_dir)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        from_peft(_seq_cls(tiny_model_dir), tmp_path / "nothing")


def test_to_peft_errors(tiny_model_dir, tmp_path):
    model = _seq_cls(tiny_model_dir)
    with pytest.raises(ValueError, match="no LoRA layers"):
        to_peft(model, tmp_path)
    inject_lora(model, ["query"], r=2)
    model.config._name_or_path = ""
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        to_peft(model, tmp_path)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    model.roberta.encoder.layer[0].attention.self.query.bias.requires_grad_(True)  # one LoRA bias only
    with pytest.raises(ValueError, match="bias"):
        to_peft(model, tmp_path, base_model_name_or_path=tiny_model_dir)


def test_from_peft_on_a_merged_model_fails_without_touching_it(tiny_model_dir, peft_dir):
    """The adapter's alpha (8) differs from the model's (4): a load that wrote it before failing would make
    a later unmerge subtract the wrong update from the frozen weight."""
    from loralib.injection import merge_lora, unmerge_lora

    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query", "value"], r=8, lora_alpha=4)
    _perturb_trainables(model)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_lora(model)
    before = {n: (m.lora_alpha, m.scaling, m.merged) for n, m in lora_layers(model)}
    with pytest.raises(ValueError, match="merged; call unmerge_lora"):
        from_peft(model, peft_dir)
    assert {n: (m.lora_alpha, m.scaling, m.merged) for n, m in lora_layers(model)} == before
    unmerge_lora(model)
    for n, p in model.named_parameters():  # W0 back up to float rounding, A/B/head untouched
        torch.testing.assert_close(p.detach(), original[n], atol=1e-6, rtol=0)


def test_from_peft_failing_late_rolls_everything_back(tiny_model_dir, peft_dir, monkeypatch):
    """A fault after all checks (here: while copying tensors) still leaves the model as it was."""
    import loralib.peft_interop as interop

    model = _seq_cls(tiny_model_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    classes = {n: type(m) for n, m in model.named_modules()}
    calls = {"n": 0}
    original_inject = interop.inject_lora

    def inject_then_fail(*args, **kwargs):
        calls["n"] += 1
        out = original_inject(*args, **kwargs)
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return out

    monkeypatch.setattr(interop, "inject_lora", inject_then_fail)
    with pytest.raises(RuntimeError, match="device lost"):
        from_peft(model, peft_dir)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_from_peft_refuses_a_nan_alpha(tiny_model_dir, peft_dir):
    cfg = json.loads((peft_dir / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float("nan")
    (peft_dir / "adapter_config.json").write_text(json.dumps(cfg))
    model = _seq_cls(tiny_model_dir)
    with pytest.raises(ValueError, match="finite"):
        from_peft(model, peft_dir)
    assert not list(lora_layers(model))


def test_to_peft_mixed_scaling_rules_become_alpha_patterns(tiny_model_dir, tmp_path):
    """PEFT has one use_rslora per adapter: a layer with the other rule gets the alpha giving its scaling."""
    model = _seq_cls(tiny_model_dir)
    inject_lora(model, ["query"], r=16, lora_alpha=8, use_rslora=True)
    inject_lora(model, ["value", "key"], r=16, lora_alpha=8)
    _perturb_trainables(model)
    batch = _batch()
    to_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == 8
    assert set(cfg["alpha_pattern"].values()) == {8 / 4 * 16}  # rsLoRA's 8 / sqrt(16) = 2 = 32 / 16
    peft_model = PeftModel.from_pretrained(_seq_cls(tiny_model_dir, seed=5), str(tmp_path))
    torch.testing.assert_close(_out(peft_model, batch), _out(model, batch), atol=ATOL, rtol=ATOL)
