"""`LoraConfig` against PEFT's: the same field names and defaults, the same module selection (target_modules,
exclude_modules, modules_to_save, layers_to_transform / layers_pattern), the same per-layer ranks and
alphas (rank_pattern / alpha_pattern), PEFT's adapter_config.json both ways, validation once and by name,
and the PEFT features loralib refuses."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from loralib import LoraConfig, from_peft, inject_lora, lora_layers
from loralib.config import LoraSettings, config_from

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_the_fields_and_defaults_are_pefts():
    ours, theirs = LoraConfig(), peft.LoraConfig()
    for f in dataclasses.fields(LoraConfig):
        assert hasattr(theirs, f.name), f.name
        want = getattr(theirs, f.name)
        assert getattr(ours, f.name) == want or (
            want in (None, {}) and getattr(ours, f.name) in (None, {})
        ), f.name
    assert (ours.r, ours.lora_alpha, ours.lora_dropout) == (
        8,
        8,
        0.0,
    )  # scaling 1 at r=8, 0.5 at r=16 (as PEFT)
    assert LoraConfig(r=16).settings_for("x").scaling == 0.5
    assert LoraConfig(r=16, lora_alpha=None).settings_for("x").scaling == 1.0  # None: lora_alpha = r


CONFIGS = [
    dict(target_modules=["query", "value"]),
    dict(target_modules=["query"], r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True, lora_bias=True),
    dict(target_modules=r".*\.(query|key)", rank_pattern={"key": 2}, alpha_pattern={"query": 3.5}),
    dict(
        target_modules=["dense"], exclude_modules=["output.dense"], modules_to_save=["classifier"], bias="all"
    ),
    dict(target_modules=["query", "value"], layers_to_transform=[1], init_lora_weights="gaussian"),
    dict(target_modules=["query"], layers_to_transform=0, layers_pattern="layer", init_lora_weights=False),
    dict(target_modules=["query", "dense"], exclude_modules=r".*attention.*dense", bias="lora_only"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_pefts_json_round_trips_both_ways(kwargs, tmp_path):
    ours = LoraConfig(**kwargs)
    theirs = peft.LoraConfig(**ours.to_dict())  # PEFT reads what we write
    assert LoraConfig.from_dict(theirs.to_dict()) == ours  # and we read what PEFT writes
    theirs.save_pretrained(tmp_path)
    assert LoraConfig.from_dict(json.loads((tmp_path / "adapter_config.json").read_text())) == ours
    assert json.loads(json.dumps(ours.to_dict())) == ours.to_dict()


def test_lora_alpha_none_is_written_as_pefts_numbers():
    d = LoraConfig(r=4, lora_alpha=None, rank_pattern={"key": 2}).to_dict()
    assert (d["lora_alpha"], d["alpha_pattern"]) == (4, {"key": 2})


@pytest.fixture(scope="module")
def roberta(tiny_model_dir):
    return transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)


@pytest.mark.parametrize("kwargs", CONFIGS, ids=str)
def test_the_same_modules_ranks_and_scalings_as_peft(roberta, kwargs, assert_same_layers_as_peft):
    import copy

    theirs = peft.get_peft_model(copy.deepcopy(roberta), peft.LoraConfig(**LoraConfig(**kwargs).to_dict()))
    ours = copy.deepcopy(roberta)
    inject_lora(ours, LoraConfig(**kwargs))
    assert_same_layers_as_peft(ours, theirs)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(r=0), ValueError, "r must be a positive integer"),
        (dict(lora_alpha=-1), ValueError, "lora_alpha"),
        (dict(lora_dropout=1.0), ValueError, "lora_dropout"),
        (dict(bias="some"), ValueError, "bias"),
        (dict(target_modules=["q", ""]), ValueError, "target_modules must be non-empty module names"),
        (dict(target_modules="("), ValueError, "not a valid regular expression"),
        (dict(modules_to_save="classifier"), TypeError, "modules_to_save must be a list"),
        (dict(rank_pattern={"q": 0}), ValueError, r"rank_pattern\['q'\]"),
        (dict(alpha_pattern={"q": None}), ValueError, r"alpha_pattern\['q'\]"),
        (dict(target_modules="q.*", layers_to_transform=[0]), ValueError, "regex target_modules"),
        (dict(target_modules=["q"], layers_pattern="layer"), ValueError, "layers_pattern only applies"),
        (dict(target_modules=["q"], layers_to_transform=[-1]), ValueError, "layers_to_transform"),
        (dict(init_lora_weights="pissa"), ValueError, "pissa.*not supported"),
        (dict(init_lora_weights="olora"), ValueError, "olora.*not supported"),
        (dict(init_lora_weights="mica"), ValueError, "mica.*is not one of"),
        (dict(use_rslora="yes"), ValueError, "use_rslora"),
    ],
    ids=str,
)
def test_bad_values_are_refused_where_the_config_is_made(kwargs, error, words):
    with pytest.raises(error, match=words):
        LoraConfig(**kwargs)
    with pytest.raises(error, match=words):  # the keyword form of inject_lora builds the same config
        config_from(None, **kwargs)


def test_a_config_is_frozen_and_replace_validates():
    cfg = LoraConfig(target_modules=["q"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.r = 4
    with pytest.raises(ValueError, match="r must be"):
        dataclasses.replace(cfg, r=0)
    assert config_from(cfg, r=4).r == 4 and config_from(["q"], r=4) == dataclasses.replace(cfg, r=4)


@pytest.mark.parametrize(
    "entry, words",
    [
        ({"use_qalora": True}, "QA-LoRA"),
        ({"trainable_token_indices": {"emb": [0]}}, "trainable tokens"),
        ({"target_parameters": ["lin0.weight"]}, "target_parameters"),
        ({"init_lora_weights": "pissa_niter_4"}, "not supported"),
        ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}}, "LoftQ|loftq"),
        ({"a_future_peft_option": 3}, "does not know"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
    ids=str,
)
def test_pefts_features_loralib_lacks_are_refused_by_name(entry, words):
    d = {**peft.LoraConfig(target_modules=["query"]).to_dict(), **entry}
    with pytest.raises(ValueError, match=words):
        LoraConfig.from_dict(d)


def test_from_peft_refuses_an_init_that_changed_the_base_and_leaves_the_model(roberta, tmp_path):
    import copy

    theirs = peft.get_peft_model(
        copy.deepcopy(roberta), peft.LoraConfig(target_modules=["query"], init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "init_lora_weights": "pissa"}))
    model = copy.deepcopy(roberta)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="pissa.*not supported"):
        from_peft(model, tmp_path)
    assert not list(lora_layers(model)) and all(
        torch.equal(v, before[k]) for k, v in model.state_dict().items()
    )


def test_settings_are_validated_once_and_per_layer_patterns_resolve():
    cfg = LoraConfig(
        target_modules=["q", "k"], r=4, lora_alpha=None, rank_pattern={"k": 2}, alpha_pattern={"v": 5}
    )
    assert cfg.settings_for("a.q") == LoraSettings(r=4, lora_alpha=4)
    assert cfg.settings_for("a.k") == LoraSettings(r=2, lora_alpha=2)  # alpha None: the layer's own r
    assert cfg.settings_for("a.v").lora_alpha == 5
    with pytest.raises(ValueError, match="use_qalora=True: QA-LoRA"):
        config_from(["q"], use_qalora=True)  # inject_lora(model, ["q"], use_qalora=True) names the feature
    assert config_from(["q"], use_dora=True).settings_for("a.q").use_dora  # DoRA is a layer setting


def test_the_adapter_file_stores_the_config_that_rebuilds_it(roberta, tmp_path):
    import copy

    from loralib import save_lora
    from loralib.adapters import read_adapter

    model = copy.deepcopy(roberta)
    inject_lora(model, ["query"], r=4, lora_alpha=16)
    inject_lora(model, ["value"], r=2, lora_alpha=3, use_rslora=True)
    save_lora(model, tmp_path / "a")
    cfg, _ = read_adapter(tmp_path / "a")
    stored = LoraConfig.from_dict(cfg["lora_config"])
    fresh = copy.deepcopy(roberta)
    inject_lora(fresh, stored)
    want = {n: (m.r, m.scaling) for n, m in lora_layers(model)}
    assert {n: (m.r, pytest.approx(m.scaling)) for n, m in lora_layers(fresh)} == want


def test_injecting_a_config_validates_nothing_again(roberta, monkeypatch):
    """r is checked once, where the config is made: building every layer from it checks nothing again."""
    import copy

    import loralib.config
    import loralib.layers.base

    cfg = LoraConfig(target_modules="all-linear", rank_pattern={"query": 4}, lora_alpha=None)
    calls = []
    for module in (loralib.config, loralib.layers.base):
        real = module.check_rank
        monkeypatch.setattr(
            module, "check_rank", lambda *a, _real=real, **k: calls.append(a) or _real(*a, **k)
        )
    model = copy.deepcopy(roberta)
    names = inject_lora(model, cfg)
    assert len(names) > 4 and calls == []
    assert {m.r for n, m in lora_layers(model) if n.endswith("query")} == {4}
    LoraConfig(r=3)
    assert calls  # the check itself is the patched one


def test_pefts_own_config_object_is_accepted(roberta, assert_same_layers_as_peft):
    import copy

    theirs_cfg = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["query", "value"], rank_pattern={"value": 2}
    )
    theirs = peft.get_peft_model(copy.deepcopy(roberta), copy.deepcopy(theirs_cfg))
    ours = copy.deepcopy(roberta)
    inject_lora(ours, theirs_cfg)
    assert_same_layers_as_peft(ours, theirs)
    dora = copy.deepcopy(roberta)
    inject_lora(dora, peft.LoraConfig(target_modules=["query"], use_dora=True))
    assert all(layer.use_dora for _, layer in lora_layers(dora))


def test_a_layer_level_name_given_to_inject_lora_points_at_the_config_field(roberta):
    import copy

    model = copy.deepcopy(roberta)
    with pytest.raises(TypeError, match="init_lora_weights"):
        inject_lora(model, ["query"], init="gaussian")
    assert not list(lora_layers(model))
