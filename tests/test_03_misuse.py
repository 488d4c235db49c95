"""Misuse, faults and bad input on the adapter lifecycle: each case ends in a correct result or a clear
error, and a failed call leaves the model and the files as they were.

References are independent of the code under test: explicit W + s B A arithmetic, a deep copy of the
model taken before the call, the bytes on disk, and the stock `nn.Linear`.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, RobertaConfig, RobertaForMaskedLM

import loralib.adapters as adapters
import loralib.files as files
from loralib.adapters import load_lora, read_adapter, save_lora
from loralib.checks import ArgumentTypeError
from loralib.injection import (
    inject_lora,
    lora_layers,
    mark_only_lora_as_trainable,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from loralib.layers import LoraLinear

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)


def _state(model: nn.Module) -> dict:
    """Everything a failed call must not change: tensors, flags, LoRA scalars, module classes."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "lora": {n: (m.lora_alpha, m.scaling, m.merged) for n, m in lora_layers(model)},
        "classes": {n: type(m).__name__ for n, m in model.named_modules()},
    }


def _assert_same(a: dict, b: dict) -> None:
    assert a["classes"] == b["classes"] and a["grad"] == b["grad"] and a["lora"] == b["lora"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k


@pytest.fixture
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()


def _ids():
    return {
        "input_ids": torch.tensor([[0, 11, 25, 7, 2], [0, 40, 9, 2, 1]]),
        "attention_mask": torch.ones(2, 5),
    }


def _randomize_b(model, std=0.05):
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, std)


# ---------------------------------------------------------------- bad arguments, where they enter


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lora_dropout=None), TypeError, "dropout must be a number, got None"),
        (dict(lora_dropout="0.1"), TypeError, "dropout must be a number, got '0.1' \\(str\\)"),
        (dict(lora_alpha=float("nan")), ValueError, "alpha must be a finite number"),
        (dict(lora_alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (dict(lora_alpha="8"), TypeError, "alpha must be a number"),
        (dict(r="8"), TypeError, "r must be a positive integer, got '8'"),
        (dict(r=8.0), TypeError, "r must be a positive integer, got 8.0"),
        (dict(init=None), ValueError, "unknown LoRA init None"),
        (dict(autocast_adapter_dtype="yes"), TypeError, "autocast_adapter_dtype must be True or False"),
    ],
    ids=str,
)
def test_bad_layer_arguments_name_the_argument(kwargs, error, match):
    for make in (
        lambda: LoraLinear(8, 4, **kwargs),
        lambda: LoraLinear.from_linear(nn.Linear(8, 4), **kwargs),
    ):
        with pytest.raises(error, match=match):
            make()


def test_type_errors_are_also_value_errors_for_older_callers():
    with pytest.raises(ValueError):
        LoraLinear(8, 4, lora_dropout="0.1")
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize(
    "target_modules, match",
    [
        (None, "no target_modules: name the modules to adapt"),
        (3, "target_modules must be a list of module names or a regex, got 3"),
        (["query", None], "target_modules must be non-empty module names"),
    ],
    ids=str,
)
def test_bad_target_modules_are_refused_before_the_model_changes(model, target_modules, match):
    before = _state(model)
    with pytest.raises((TypeError, ValueError), match=match):
        inject_lora(model, target_modules, r=2)
    _assert_same(before, _state(model))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lora_alpha=float("nan")), "alpha must be a finite number"),
        (dict(lora_dropout=None), "dropout must be a number"),
        (dict(r=0), "r must be a positive integer"),
    ],
    ids=str,
)
def test_bad_lora_hyperparameters_leave_the_model_untouched(model, kwargs, match):
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        inject_lora(model, ["query"], **kwargs)
    _assert_same(before, _state(model))


def test_a_regex_never_reaches_inside_an_adapted_layer(model):
    inject_lora(model, ["query"], r=2, lora_dropout=0.1)
    with pytest.raises(TypeError, match="already has LoRA"):
        inject_lora(model, r".*\.query", r=2)
    assert all(
        not n.endswith("lora_dropout") for n in __import__("loralib").find_targets(model, r".*query.*")
    )


def test_a_gpt2_conv1d_given_to_loralinear_names_its_own_lora_class():
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(TypeError, match="got Conv1D; its LoRA class is LoraConv1D"):
        LoraLinear.from_linear(Conv1D(12, 4), r=2)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            dict(modules_to_save="classifier"),
            TypeError,
            "got the string 'classifier'; write \\['classifier'\\]",
        ),
        (dict(modules_to_save=None), TypeError, "modules_to_save must be a list"),
        (dict(bias=None), ValueError, "bias must be 'none', 'all' or 'lora_only', got None"),
        (dict(train_layer_norms="yes"), TypeError, "train_layer_norms must be True or False"),
        (dict(modules_to_save=["classifier", "nope"]), ValueError, "'nope' matches no module"),
    ],
    ids=str,
)
def test_mark_trainable_checks_everything_before_changing_a_flag(model, kwargs, error, match):
    inject_lora(model, ["query"], r=2)
    before = _state(model)
    with pytest.raises(error, match=match):
        mark_only_lora_as_trainable(model, **kwargs)
    _assert_same(before, _state(model))


# ---------------------------------------------------------------- merged state


def test_training_after_merge_is_an_error_not_a_silent_head_only_run(model):
    inject_lora(model, ["query", "value"], r=4)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    _randomize_b(model)
    merge_lora(model).train()
    out = model(**_ids()).logits  # a forward in train mode is fine (e.g. to compare outputs)
    with pytest.raises(RuntimeError, match="merged.*unmerge_lora"):
        out.sum().backward()
    with torch.no_grad():  # inference needs no unmerge
        model(**_ids())
    unmerge_lora(model)
    model(**_ids()).logits.sum().backward()
    assert all(layer.lora_A.grad is not None for _, layer in lora_layers(model))


def test_merged_state_dict_into_an_unmerged_model_applies_the_update_once(model):
    inject_lora(model, ["query", "value"], r=4)
    _randomize_b(model)
    fresh = copy.deepcopy(model)  # same LoRA layers, unmerged
    with torch.no_grad():
        for _, layer in lora_layers(fresh):
            layer.lora_B.zero_()
    expected = model(**_ids()).logits
    merge_lora(model)
    fresh.load_state_dict(model.state_dict())
    assert all(layer.merged for _, layer in lora_layers(fresh))
    torch.testing.assert_close(fresh(**_ids()).logits, expected, atol=1e-5, rtol=0)
    # Reference: the stock model with W + s B A written in by hand.
    layer = fresh.roberta.encoder.layer[0].attention.self.query
    unmerge_lora(fresh)
    w0 = layer.weight.detach().clone()
    torch.testing.assert_close(
        w0 + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach(),
        model.roberta.encoder.layer[0].attention.self.query.weight.detach(),
        atol=1e-6,
        rtol=0,
    )
    # And an unmerged state dict into a merged model leaves it unmerged, with the update counted once.
    merge_lora(model)
    model.load_state_dict(fresh.state_dict())
    assert not any(layer.merged for _, layer in lora_layers(model))
    torch.testing.assert_close(model(**_ids()).logits, expected, atol=1e-5, rtol=0)


def test_new_a_and_b_into_a_merged_layer_are_remerged():
    torch.manual_seed(0)
    layer = LoraLinear(6, 5, r=2)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    layer.merge()
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    layer.load_state_dict({"lora_A": a, "lora_B": b}, strict=False)
    assert layer.merged
    torch.testing.assert_close(layer.weight.detach(), w0 + layer.scaling * b @ a, atol=1e-6, rtol=0)


def test_lora_inside_modules_to_save_is_reloaded_once_after_merge(model, tmp_path, tiny_model_dir):
    """targets ["dense"] also hit classifier.dense, which modules_to_save trains in full."""
    inject_lora(model, ["dense"], r=4)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    _randomize_b(model)
    assert "classifier.dense" in dict(lora_layers(model))
    expected = model(**_ids()).logits
    merge_lora(model)
    save_lora(model, tmp_path / "a")
    torch.manual_seed(1)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    load_lora(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(**_ids()).logits, expected, atol=1e-5, rtol=0)


def test_merging_a_weight_tied_to_the_embedding_is_refused(tiny_model_dir):
    cfg = RobertaConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    torch.manual_seed(0)
    mlm = RobertaForMaskedLM(cfg).eval()
    emb = mlm.roberta.embeddings.word_embeddings.weight
    assert mlm.lm_head.decoder.weight is emb  # tied
    inject_lora(mlm, ["lm_head.decoder"], r=2)
    _randomize_b(mlm)
    before = emb.detach().clone()
    for call in (merge_lora, unload_lora):
        with pytest.raises(ValueError, match="tied weights.*word_embeddings"):
            call(mlm)
        assert torch.equal(mlm.roberta.embeddings.word_embeddings.weight, before)
        assert not mlm.lm_head.decoder.merged


# ---------------------------------------------------------------- reloads and files


def test_after_load_lora_only_the_adapter_trains_and_a_resave_is_small(model, tmp_path, tiny_model_dir):
    inject_lora(model, ["query", "value"], r=4)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    save_lora(model, tmp_path / "a")
    torch.manual_seed(1)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    load_lora(fresh, tmp_path / "a")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == set(read_adapter(tmp_path / "a")[1])
    save_lora(fresh, tmp_path / "b")
    assert set(read_adapter(tmp_path / "b")[1]) == trainable
    assert adapters.adapter_size_bytes(tmp_path / "b") == adapters.adapter_size_bytes(tmp_path / "a")
    keep = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    flags = {n: p.requires_grad for n, p in keep.named_parameters()}
    load_lora(keep, tmp_path / "a", trainable=False)
    adapted = tuple(f"{n}." for n, _ in lora_layers(keep))  # injection itself freezes the adapted base
    assert {
        n: p.requires_grad for n, p in keep.named_parameters() if n in flags and not n.startswith(adapted)
    } == {n: f for n, f in flags.items() if not n.startswith(adapted)}


def test_load_lora_takes_the_directory_or_either_file(model, tmp_path, tiny_model_dir):
    inject_lora(model, ["query"], r=2)
    _randomize_b(model)
    save_lora(model, tmp_path / "a")
    expected = model(**_ids()).logits
    for target in ("a", "a/adapter.safetensors", "a/lora_config.json"):
        torch.manual_seed(0)
        m = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
        load_lora(m, tmp_path / target)
        torch.testing.assert_close(m(**_ids()).logits, expected, atol=0, rtol=0)


def test_load_lora_on_a_peft_adapter_says_from_peft(model, tmp_path):
    from loralib.peft_interop import to_peft

    inject_lora(model, ["query"], r=2)
    to_peft(model, tmp_path / "p", base_model_name_or_path="tiny")
    before = _state(model)
    for target in ("p", "p/adapter_config.json", "p/adapter_model.safetensors"):
        with pytest.raises(ValueError, match="PEFT adapter.*from_peft"):
            load_lora(model, tmp_path / target)
    _assert_same(before, _state(model))


def _rewrite_config(directory, **changes):
    """Edit an adapter's config in both places it lives (the JSON and the weights' metadata)."""
    from safetensors.torch import save_file

    cfg, tensors = read_adapter(directory)
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    text = json.dumps(cfg)
    save_file(tensors, str(directory / "adapter.safetensors"), metadata={"loralib_config": text})
    (directory / "lora_config.json").write_text(text)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(format_version=adapters.FORMAT_VERSION + 1), "newer loralib.*upgrade"),
        (dict(format_version="1"), "'format_version' must be an integer"),
        (dict(target_modules=KeyError), "lacks 'target_modules'"),
        (dict(target_modules="query"), "'target_modules' must be a list"),
        (dict(r="2", per_layer={}), "'r' must be an integer or null"),
        (dict(r=None, per_layer={}), "layer .*query.* has no valid 'r'"),
        (dict(lora_alpha=[2]), "'lora_alpha' must be an integer or a number or null"),
        (dict(per_layer=KeyError), "lacks 'per_layer'"),
        (dict(lora_dropout="0.1"), "'lora_dropout' must be"),
    ],
    ids=str,
)
def test_a_damaged_config_names_the_key_and_the_type(model, tmp_path, tiny_model_dir, changes, match):
    inject_lora(model, ["query"], r=2)
    save_lora(model, tmp_path / "a")
    _rewrite_config(tmp_path / "a", **changes)
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    before = _state(fresh)
    with pytest.raises(ValueError, match=match):
        load_lora(fresh, tmp_path / "a")
    _assert_same(before, _state(fresh))


@pytest.mark.parametrize("key", adapters.RESERVED_KEYS)
def test_reserved_metadata_keys_are_refused_at_save_time(model, tmp_path, key):
    inject_lora(model, ["query"], r=2)
    with pytest.raises(ValueError, match=f"metadata keys \\['{key}'\\] are reserved"):
        save_lora(model, tmp_path / "a", **{key: 1})
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- atomic saves


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fault", ["weights", "config", "swap"])
def test_a_crash_during_save_leaves_the_previous_adapter_complete(model, tmp_path, monkeypatch, fault):
    inject_lora(model, ["query"], r=2)
    save_lora(model, tmp_path / "a", task="old")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    old = _tree(tmp_path / "a")
    _randomize_b(model)

    def boom(*a, **k):
        raise OSError("disk full")

    if fault == "weights":
        monkeypatch.setattr(adapters, "save_file", boom)
    elif fault == "config":
        monkeypatch.setattr(adapters.Path, "write_text", boom)
    else:
        monkeypatch.setattr(files, "_swap_into_place", boom)
    with pytest.raises(OSError, match="disk full"):
        save_lora(model, tmp_path / "a", task="new")
    assert _tree(tmp_path / "a") == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no staging directory left behind
    monkeypatch.undo()
    save_lora(model, tmp_path / "a", task="new")
    assert read_adapter(tmp_path / "a")[0]["task"] == "new"
    assert (tmp_path / "a" / "notes.txt").read_text() == "mine"  # files of others are kept


def test_the_fallback_swap_without_renameat2_is_complete_too(model, tmp_path, monkeypatch):
    monkeypatch.setattr(files, "_renameat2", lambda: None)
    inject_lora(model, ["query"], r=2)
    save_lora(model, tmp_path / "a", task="old")
    save_lora(model, tmp_path / "a", task="new")
    assert read_adapter(tmp_path / "a")[0]["task"] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_save_into_a_file_path_is_refused(model, tmp_path):
    inject_lora(model, ["query"], r=2)
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        save_lora(model, tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_saved_files_are_world_readable(model, tmp_path):
    inject_lora(model, ["query"], r=2)
    save_lora(model, tmp_path / "a")
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "a").iterdir()} == {"0o644"}
    assert oct((tmp_path / "a").stat().st_mode & 0o777) == "0o755"


# ---------------------------------------------------------------- half precision


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_adapters_on_a_half_precision_base_are_fp32_and_train(dtype):
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(dtype)
    layer = LoraLinear.from_linear(base, r=4, lora_alpha=8)
    assert layer.weight.dtype == dtype and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    nn.init.normal_(layer.lora_B, std=0.1)
    x = torch.randn(8, 32).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    # Reference: the explicit formula in fp32 from the same (rounded) operands.
    ref = x.float() @ base.weight.float().t() + base.bias.float()
    ref = (
        ref
        + layer.scaling
        * (x.float() @ layer.lora_A.to(dtype).float().t())
        @ layer.lora_B.to(dtype).float().t()
    )
    torch.testing.assert_close(y.float(), ref, atol=0.05, rtol=0.02)
    y.float().square().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_B.grad).all()
    # A step far below bf16/fp16 resolution near 1 still moves fp32 B.
    b0 = layer.lora_B.detach().clone()
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-5)
    opt.step()
    assert not torch.equal(layer.lora_B, b0)
    kept = LoraLinear.from_linear(nn.Linear(32, 16).to(dtype), r=4, autocast_adapter_dtype=False)
    assert kept.lora_A.dtype == dtype


def test_fp16_training_with_a_grad_scaler_works_on_fp32_adapters():
    """The Trainer's fp16=True path: fp16 compute, scaled loss, unscale of the fp32 gradients."""
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(16, 4).half(), r=2)
    opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, target = torch.randn(32, 16).half(), torch.randn(32, 4)
    losses = []
    for _ in range(20):
        loss = (layer(x).float() - target).square().mean()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # "Attempting to unscale FP16 gradients" with fp16 adapter weights
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    assert torch.isfinite(layer.lora_A).all() and torch.isfinite(layer.lora_B).all()


def test_merge_on_a_half_precision_base_adds_the_fp32_update_rounded_once():
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(8, 6).to(torch.bfloat16), r=2)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    layer.merge()
    expected = w0 + (layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()).to(torch.bfloat16)
    assert torch.equal(layer.weight.detach(), expected)


def test_the_articles_attention_on_a_bf16_base_keeps_fp32_adapters(tiny_model_dir):
    from transformers import RobertaModel

    from loralib.article.attention import lora_attention_layers, replace_self_attention

    torch.manual_seed(0)
    base = RobertaModel.from_pretrained(tiny_model_dir).to(torch.bfloat16)
    replace_self_attention(base, r=4)
    layers = list(lora_attention_layers(base))
    assert layers and all(m.lora_query_matrix_A.dtype == torch.float32 for _, m in layers)
    assert all(m.query.weight.dtype == torch.bfloat16 for _, m in layers)
    out = base(input_ids=torch.tensor([[0, 11, 25, 2]])).last_hidden_state
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(m.lora_query_matrix_A.grad.dtype == torch.float32 for _, m in layers)


@pytest.mark.parametrize("call", ["inject", "mark", "merge", "save", "load", "to_peft", "from_peft"])
def test_a_path_where_the_model_belongs_is_named(call, tmp_path):
    from loralib.peft_interop import from_peft, to_peft

    calls = {
        "inject": lambda: inject_lora("roberta-base", ["query"]),
        "mark": lambda: mark_only_lora_as_trainable("roberta-base"),
        "merge": lambda: merge_lora("roberta-base"),
        "save": lambda: save_lora("roberta-base", tmp_path / "a"),
        "load": lambda: load_lora("roberta-base", tmp_path / "a"),
        "to_peft": lambda: to_peft("roberta-base", tmp_path / "p"),
        "from_peft": lambda: from_peft("roberta-base", tmp_path / "p"),
    }
    with pytest.raises(TypeError, match="model must be a torch nn.Module.*got 'roberta-base' \\(str\\)"):
        calls[call]()


def test_a_damaged_peft_config_is_named(model, tmp_path):
    from loralib.peft_interop import from_peft, to_peft

    inject_lora(model, ["query"], r=2)
    to_peft(model, tmp_path / "p", base_model_name_or_path="tiny")
    (tmp_path / "p" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        from_peft(model, tmp_path / "p")


def test_saving_through_a_symlink_updates_its_target(model, tmp_path):
    inject_lora(model, ["query"], r=2)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    save_lora(model, tmp_path / "link", task="t")
    assert (tmp_path / "link").is_symlink() and read_adapter(tmp_path / "real")[0]["task"] == "t"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_gradient_checkpointing_recomputes_the_same_dropout_mask():
    """torch.utils.checkpoint restores torch's RNG state for the recomputation; the mask is seeded from
    it, so gradients equal those of the same call without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    layer = LoraLinear(16, 8, r=2, lora_dropout=0.3).train()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(12, 16, requires_grad=True)
    torch.manual_seed(5)
    layer(x).square().sum().backward()
    plain = layer.lora_A.grad.clone(), x.grad.clone()
    layer.zero_grad(set_to_none=True)
    x.grad = None
    torch.manual_seed(5)
    checkpoint(layer, x, use_reentrant=False).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, plain[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(x.grad, plain[1], atol=1e-6, rtol=0)


def test_parameters_that_are_views_of_one_buffer_are_not_taken_for_tied():
    flat = torch.randn(2 * 6 * 4)
    net = nn.Sequential(nn.Linear(4, 6, bias=False), nn.Linear(4, 6, bias=False))
    net[0].weight = nn.Parameter(flat[:24].view(6, 4))
    net[1].weight = nn.Parameter(flat[24:].view(6, 4))
    inject_lora(net, ["0"], r=2)
    _randomize_b(net)
    merge_lora(net)  # no false "tied weights" error
    assert net[0].merged


# ---------------------------------------------------------------- PEFT's vocabulary, and the former names


def test_the_former_names_are_gone(model):
    """The package is unreleased: alpha= / dropout= are no longer accepted anywhere (PEFT's names only)."""
    with pytest.raises(TypeError, match="alpha"):
        LoraLinear(8, 4, r=2, alpha=4)
    with pytest.raises(TypeError, match="dropout"):
        LoraLinear.from_linear(nn.Linear(8, 4), r=2, dropout=0.1)
    with pytest.raises(TypeError, match="alpha"):
        inject_lora(model, ["query"], r=2, alpha=4)
    assert not list(lora_layers(model)) and not hasattr(LoraLinear(8, 4, r=2), "alpha")
    from loralib.benchmark.config import make_config

    with pytest.raises(TypeError, match="unknown TrainConfig field.*alpha"):
        make_config("rte", "smoke", alpha=16)


def test_a_rank_passed_positionally_is_an_error_not_a_bias(model):
    """Microsoft's NLU code calls Linear(768, 768, 16): here that must not build a rank-8 layer with bias=16."""
    with pytest.raises(TypeError, match="positional"):
        LoraLinear(768, 768, 16)
    with pytest.raises(TypeError, match="positional"):
        LoraLinear.from_linear(nn.Linear(8, 4), 2)
    with pytest.raises(TypeError, match="positional"):
        inject_lora(model, ["query"], 2)
    assert not list(lora_layers(model))


def test_an_adapter_saved_in_format_version_1_still_loads(model, tmp_path, tiny_model_dir):
    """Version 1 wrote alpha / dropout; version 2 writes PEFT's lora_alpha / lora_dropout."""
    from safetensors.torch import save_file

    inject_lora(model, ["query"], r=2, lora_alpha=6, lora_dropout=0.1)
    _randomize_b(model)
    save_lora(model, tmp_path / "a")
    cfg, tensors = read_adapter(tmp_path / "a")
    assert cfg["format_version"] == 2 and cfg["lora_alpha"] == 6.0 and cfg["lora_dropout"] == 0.1
    v1 = {
        ("alpha" if k == "lora_alpha" else "dropout" if k == "lora_dropout" else k): v for k, v in cfg.items()
    }
    v1["format_version"] = 1
    v1["per_layer"] = {n: {"r": s["r"], "alpha": s["lora_alpha"]} for n, s in cfg["per_layer"].items()}
    save_file(
        tensors, str(tmp_path / "a" / "adapter.safetensors"), metadata={"loralib_config": json.dumps(v1)}
    )
    (tmp_path / "a" / "lora_config.json").write_text(json.dumps(v1))
    torch.manual_seed(0)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2).eval()
    back = load_lora(fresh, tmp_path / "a")
    assert back["lora_alpha"] == 6.0 and {m.lora_alpha for _, m in lora_layers(fresh)} == {6.0}
    torch.testing.assert_close(fresh(**_ids()).logits, model(**_ids()).logits, atol=0, rtol=0)


def test_metadata_that_is_not_json_is_refused_not_stringified(model, tmp_path):
    inject_lora(model, ["query"], r=2)
    with pytest.raises(TypeError, match="metadata 'note' is not JSON.*Tensor"):
        save_lora(model, tmp_path / "a", note=torch.tensor(1.0))
    assert not (tmp_path / "a").exists()
    save_lora(model, tmp_path / "b", data=tmp_path)  # a path is written as its string
    assert read_adapter(tmp_path / "b")[0]["data"] == str(tmp_path)


@pytest.mark.parametrize("call", ["unmerge", "unload", "find_targets"])
def test_the_other_model_entry_points_name_a_wrong_model_too(call):
    from loralib.injection import find_targets

    calls = {
        "unmerge": lambda: unmerge_lora("m"),
        "unload": lambda: unload_lora("m"),
        "find_targets": lambda: find_targets("m", ["query"]),
    }
    with pytest.raises(TypeError, match="model must be a torch nn.Module"):
        calls[call]()


def test_carrying_a_foreign_file_over_leaves_its_permissions_alone(model, tmp_path):
    import os

    inject_lora(model, ["query"], r=2)
    save_lora(model, tmp_path / "a")
    mine = tmp_path / "a" / "private.txt"
    mine.write_text("mine")
    os.chmod(mine, 0o600)
    save_lora(model, tmp_path / "a")
    assert oct(mine.stat().st_mode & 0o777) == "0o600" and mine.read_text() == "mine"


# ---------------------------------------------------------------- every method of a merged layer


def _merged_layer(seed=0):
    torch.manual_seed(seed)
    layer = LoraLinear(12, 10, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.detach().clone()
    layer.merge()
    return layer, w0


def _plain(layer, w0, x):
    """The unmerged formula in float64: W0 x + b + s (x A^T) B^T."""
    a, b = layer.lora_A.double(), layer.lora_B.double()
    return x.double() @ w0.double().T + layer.bias.double() + layer.scaling * (x.double() @ a.T) @ b.T


def test_resetting_a_merged_layers_adapter_takes_the_old_update_out():
    layer, w0 = _merged_layer()
    layer.reset_lora_parameters()
    assert layer.merged and torch.count_nonzero(layer.lora_B) == 0
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)  # not W0 + the old update
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-6, rtol=0)


def test_reset_parameters_on_a_merged_layer_leaves_an_unmerged_fresh_layer():
    layer, _ = _merged_layer()
    layer.reset_parameters()
    assert not layer.merged and torch.count_nonzero(layer.lora_B) == 0
    fresh = layer.weight.detach().clone()
    layer.unmerge()
    assert torch.equal(layer.weight, fresh)  # nothing subtracted from the new weight


@pytest.mark.parametrize("change", [{"lora_alpha": 3.0}, {"use_rslora": True}])
def test_changing_the_scaling_of_a_merged_layer_re_merges_it(change):
    layer, w0 = _merged_layer()
    x = torch.randn(5, 12)
    for k, v in change.items():
        setattr(layer, k, v)
    assert layer.merged
    torch.testing.assert_close(layer(x).double(), _plain(layer, w0, x), atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, atol=1e-5, rtol=0)


def test_the_rank_of_a_layer_cannot_be_changed_in_place():
    layer, _ = _merged_layer()
    with pytest.raises(AttributeError, match="r is fixed by the shapes"):
        layer.r = 8
    with pytest.raises(ValueError, match="lora_alpha"):
        layer.lora_alpha = float("nan")
    assert layer.r == 4 and layer.lora_alpha == 8.0


def test_changing_lora_dropout_after_construction_reaches_every_path():
    layer = LoraLinear(8, 6, r=2)
    assert isinstance(layer.lora_dropout, nn.Identity)
    layer.lora_dropout_p = 0.3
    assert isinstance(layer.lora_dropout, nn.Dropout) and layer.lora_dropout.p == 0.3  # CUDA / compile use it
    layer.lora_dropout_p = 0
    assert isinstance(layer.lora_dropout, nn.Identity)
    with pytest.raises(ValueError, match="lora_dropout"):
        layer.lora_dropout_p = 1.5
    assert layer.lora_dropout_p == 0.0
