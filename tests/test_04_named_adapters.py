"""Named adapters (`loralib.named`, `loralib.layers.slots`): several adapters on one frozen model, a head
each, switched per call and per row, combined, saved and loaded, against PEFT and explicit math.

PEFT is the reference for what several adapters compute (`add_adapter` / `set_adapter`), for mixed batches
(`model(x, adapter_names=[...])`), for `add_weighted_adapter(combination_type="cat")` and for its directory
layout of several adapters (`save_pretrained`: "default" at the root, the others in sub-directories). Every
comparison is in float64, so agreement is to rounding (1e-12), not to a loose tolerance.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import loralib
from loralib import LoraConfig, named

peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

pytestmark = pytest.mark.numerical
TOL = dict(rtol=0, atol=1e-12)


class MLP(nn.Module):
    def __init__(self, labels: int = 2):
        super().__init__()
        self.lin0 = nn.Linear(10, 20)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(20, 20)
        self.classifier = nn.Linear(20, labels)

    def forward(self, x):
        return self.classifier(self.relu(self.lin1(self.relu(self.lin0(x)))))


class Mixed(nn.Module):
    """An embedding, GPT-2's Conv1D, a Conv2d and a Linear: every layer type in one forward."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.conv1d = Conv1D(8, 8)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.lin = nn.Linear(3 * 4 * 8, 5)

    def forward(self, ids):
        h = torch.relu(self.conv1d(self.emb(ids)))  # (n, 4, 8)
        h = torch.relu(self.conv(h.unsqueeze(1)))  # (n, 3, 4, 8)
        return self.lin(h.flatten(1))


def _mlp(seed=0):
    torch.manual_seed(seed)
    return MLP().double().eval()


CFG_A = dict(
    target_modules=["lin0", "lin1"],
    r=4,
    lora_alpha=8,
    init_lora_weights=False,
    modules_to_save=["classifier"],
)
CFG_B = dict(
    target_modules=["lin1"], r=2, lora_alpha=5, init_lora_weights=False, modules_to_save=["classifier"]
)


def _peft_pair(tmp_path, heads=True):
    """A PEFT model with adapters "default" and "b" (each with its own head), saved PEFT's way; its base."""
    base = _mlp()
    cut = {} if heads else {"modules_to_save": None}
    torch.manual_seed(1)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**{**CFG_A, **cut}))
    torch.manual_seed(2)
    pm.add_adapter("b", peft.LoraConfig(**{**CFG_B, **cut}))
    if heads:
        with torch.no_grad():  # each adapter's own head differs from the base's
            pm.base_model.model.classifier.modules_to_save["default"].weight.add_(-0.2)
            pm.base_model.model.classifier.modules_to_save["b"].weight.add_(0.3)
    pm.eval()
    pm.save_pretrained(tmp_path / "peft", selected_adapters=["default", "b"])
    return base, pm


def _peft_out(pm, name, x):
    pm.set_adapter(name)
    with torch.no_grad():
        return pm(x)


def test_peft_layout_loads_by_name_and_computes_what_peft_computes(tmp_path):
    base, pm = _peft_pair(tmp_path)
    assert (tmp_path / "peft" / "adapter_model.safetensors").exists() and (tmp_path / "peft" / "b").is_dir()
    ours = copy.deepcopy(base)
    loralib.from_peft(ours, tmp_path / "peft", adapter_name="default")
    loralib.from_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    assert loralib.adapter_names(ours) == ["default", "b"] and loralib.active_adapter(ours) == "default"
    x = torch.randn(7, 10, dtype=torch.double)
    for name in ("default", "b", "default"):
        loralib.set_adapter(ours, name)
        torch.testing.assert_close(ours(x), _peft_out(pm, name, x), **TOL)
    # b adapts lin1 only: in lin0 it is the frozen layer, exactly
    loralib.set_adapter(ours, "b")
    torch.testing.assert_close(ours.lin0(x), base.lin0(x), rtol=0, atol=0)


def test_mixed_batch_matches_peft_and_each_group_alone(tmp_path):
    base, pm = _peft_pair(tmp_path)
    ours = copy.deepcopy(base)
    loralib.from_peft(ours, tmp_path / "peft", adapter_name="default")
    loralib.from_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    x = torch.randn(8, 10, dtype=torch.double)
    rows = ["b", "default", "__base__", "b", "default", "default", "__base__", "b"]
    with loralib.adapter_batch(ours, rows):
        mixed = ours(x)
    with torch.no_grad():
        theirs = pm(x, adapter_names=rows)
    torch.testing.assert_close(mixed, theirs, **TOL)
    for name in ("default", "b"):  # each group alone, through set_adapter
        idx = [i for i, n in enumerate(rows) if n == name]
        loralib.set_adapter(ours, name)
        torch.testing.assert_close(mixed[idx], ours(x[idx]), **TOL)
    base_idx = [i for i, n in enumerate(rows) if n == "__base__"]
    torch.testing.assert_close(mixed[base_idx], base(x[base_idx]), **TOL)
    assert loralib.active_adapter(ours) == "b"  # a mixed batch does not change the active adapter


def test_to_peft_all_writes_what_peft_loads(tmp_path):
    base, pm = _peft_pair(tmp_path)
    ours = copy.deepcopy(base)
    loralib.from_peft(ours, tmp_path / "peft", adapter_name="default")
    loralib.from_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    loralib.to_peft_all(ours, tmp_path / "back", base_model_name_or_path="mlp")
    again = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "back")
    again.load_adapter(tmp_path / "back" / "b", adapter_name="b")
    again.eval()
    x = torch.randn(5, 10, dtype=torch.double)
    for name in ("default", "b"):
        torch.testing.assert_close(_peft_out(again, name, x), _peft_out(pm, name, x), **TOL)


def test_add_adapter_then_train_only_the_active_one():
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    loralib.add_adapter(model, "b", LoraConfig(**CFG_B))
    loralib.set_adapter(model, "b")
    loralib.mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "lin1.lora_adapters.b.lora_A",
        "lin1.lora_adapters.b.lora_B",
        "classifier.heads.b.weight",
        "classifier.heads.b.bias",
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    model(torch.randn(4, 10, dtype=torch.double)).square().sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # the default adapter, its head and the base are untouched


@pytest.mark.parametrize("use_dora", [False, True])
def test_mixed_batch_every_layer_type_equals_groups_alone_with_gradients(use_dora):
    torch.manual_seed(0)
    model = Mixed().double()
    targets = ["emb", "conv1d", "conv", "lin"]
    loralib.inject_lora(model, targets, r=2, init_lora_weights=False, use_dora=use_dora)
    loralib.add_adapter(
        model,
        "b",
        LoraConfig(target_modules=["conv1d", "lin"], r=3, init_lora_weights=False, use_dora=use_dora),
    )
    ids = torch.randint(0, 50, (6, 4))
    rows = ["default", "b", "__base__", "b", "default", "b"]
    with loralib.adapter_batch(model, rows):
        mixed = model(ids)
    mixed.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    total = 0
    for name in ("default", "b", "__base__"):
        idx = [i for i, n in enumerate(rows) if n == name]
        if name == "__base__":
            with torch.no_grad():
                ref = copy.deepcopy(model)
                for _, layer in loralib.lora_layers(ref):
                    layer.set_adapter("__none__")
            torch.testing.assert_close(mixed[idx], ref(ids[idx]), **TOL)
            continue
        loralib.set_adapter(model, name)
        alone = model(ids[idx])
        torch.testing.assert_close(mixed[idx], alone, **TOL)
        total = total + alone.square().sum()
    total.backward()
    params = dict(model.named_parameters())  # (get_parameter would read the active adapter's lora_A)
    for n, g in grads.items():
        torch.testing.assert_close(g, params[n].grad, rtol=0, atol=1e-10)
    assert any("lora_adapters.b" in n for n in grads) and any(n.endswith("lin.lora_A") for n in grads)


def test_merged_model_switches_adapters_and_unmerges_exactly():
    model = _mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    loralib.add_adapter(model, "b", LoraConfig(**CFG_B))
    x = torch.randn(5, 10, dtype=torch.double)
    expected = {}
    for name in ("default", "b"):
        loralib.set_adapter(model, name)
        expected[name] = model(x)
    loralib.merge_lora(model)
    for name in ("default", "b", "default"):
        loralib.set_adapter(model, name)
        assert all(layer.merged for _, layer in loralib.lora_layers(model))
        torch.testing.assert_close(model(x), expected[name], **TOL)
    loralib.unmerge_lora(model)
    for n in ("lin0.weight", "lin1.weight"):
        torch.testing.assert_close(model.get_parameter(n), w0[n], **TOL)
    with pytest.raises(ValueError, match="merged"):
        loralib.merge_lora(model)
        with loralib.adapter_batch(model, ["b"] * 5):
            model(x)


def test_weighted_adapter_is_the_weighted_sum_and_matches_peft_cat(tmp_path):
    base, pm = _peft_pair(tmp_path, heads=False)  # PEFT combines no adapters that both save a head
    ours = copy.deepcopy(base)
    loralib.from_peft(ours, tmp_path / "peft", adapter_name="default")
    loralib.from_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    weights = [0.5, -2.0]
    deltas = {}
    for name in ("default", "b"):
        loralib.set_adapter(ours, name)
        deltas[name] = {n: layer.delta_weight() for n, layer in loralib.lora_layers(ours)}
    loralib.add_weighted_adapter(ours, ["default", "b"], weights, "mix")
    loralib.set_adapter(ours, "mix")
    for n, layer in loralib.lora_layers(ours):  # explicit math: sum_i w_i s_i B_i A_i
        want = sum(w * deltas[a][n] for a, w in zip(("default", "b"), weights) if n in deltas[a])
        torch.testing.assert_close(layer.delta_weight(), want, **TOL)
    pm.add_weighted_adapter(["default", "b"], weights, "mix", combination_type="cat")
    x = torch.randn(4, 10, dtype=torch.double)
    pm.set_adapter("mix")
    with torch.no_grad():
        lin = pm.base_model.model
        theirs = lin.lin1(torch.relu(lin.lin0(x)))
    torch.testing.assert_close(ours.lin1(torch.relu(ours.lin0(x))), theirs, **TOL)
    w = ours.lin1.weight.detach().clone()
    loralib.merge_lora(ours)
    loralib.unmerge_lora(ours)
    torch.testing.assert_close(ours.lin1.weight, w, **TOL)


def test_heads_of_different_sizes_save_load_and_serve_from_one_model(tmp_path):
    torch.manual_seed(0)
    tasks = {"two": 2, "three": 3, "one": 1}
    files, outputs = {}, {}
    x = torch.randn(4, 10, dtype=torch.double)
    backbone = MLP().double().eval()
    for i, (task, labels) in enumerate(tasks.items()):
        m = copy.deepcopy(backbone)
        m.classifier = nn.Linear(20, labels).double()
        loralib.inject_lora(m, ["lin0", "lin1"], r=2 + i, init_lora_weights=False)
        loralib.mark_only_lora_as_trainable(m, bias="all", modules_to_save=["classifier"])
        with torch.no_grad():
            m.lin0.bias.add_(0.1 * (i + 1))  # a trained bias: carried per adapter
        loralib.save_lora(m, tmp_path / task)
        files[task], outputs[task] = tmp_path / task, m(x)
    server = copy.deepcopy(backbone)
    for task in tasks:
        loralib.load_lora(server, files[task], adapter_name=task, trainable=False)
    assert loralib.adapter_names(server) == list(tasks) and loralib.active_adapter(server) == "two"
    for task, labels in tasks.items():
        loralib.set_adapter(server, task)
        out = server(x)
        assert out.shape == (4, labels)
        torch.testing.assert_close(out, outputs[task], **TOL)
    loralib.save_adapters(server, tmp_path / "all")
    index = json.loads((tmp_path / "all" / "adapters.json").read_text())
    assert index["adapters"] == list(tasks)
    again = copy.deepcopy(backbone)
    loralib.load_adapters(again, tmp_path / "all")
    for task in tasks:
        loralib.set_adapter(again, task)
        torch.testing.assert_close(again(x), outputs[task], **TOL)
    # biases are carried per adapter: one forward cannot vary them by row
    with pytest.raises(ValueError, match="biases or norms"):
        with loralib.adapter_batch(again, ["two", "three", "two", "one"]):
            again(x)


def test_a_failed_named_load_leaves_the_model_as_it_was(tmp_path):
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    other = _mlp()
    loralib.inject_lora(other, ["lin1"], r=3, init_lora_weights=False)
    loralib.save_lora(other, tmp_path / "ok")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    bad = copy.deepcopy(other)
    bad.lin1 = loralib.LoraLinear(20, 7, r=3).double()  # another out size: the file no longer fits
    loralib.save_lora(bad, tmp_path / "bad")
    with pytest.raises(ValueError):
        loralib.load_lora(model, tmp_path / "bad", adapter_name="x")
    assert repr(model) == structure and loralib.adapter_names(model) == ["default"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    loralib.load_lora(model, tmp_path / "ok", adapter_name="x")
    assert loralib.adapter_names(model) == ["default", "x"]


def test_delete_adapter_and_the_errors_that_name_the_argument():
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    loralib.add_adapter(
        model, "b", LoraConfig(target_modules=["lin1", "classifier"], r=2, modules_to_save=None)
    )
    assert isinstance(model.classifier, loralib.LoraLinear)
    with pytest.raises(ValueError, match="already has an adapter"):
        loralib.add_adapter(model, "b", LoraConfig(target_modules=["lin1"]))
    with pytest.raises(ValueError, match="adapter_name"):
        loralib.add_adapter(model, "a.b", LoraConfig(target_modules=["lin1"]))
    with pytest.raises(ValueError, match="no adapter 'c'"):
        loralib.set_adapter(model, "c")
    with pytest.raises(ValueError, match="is active"):
        loralib.delete_adapter(model, "default")
    with pytest.raises(ValueError, match="adapter_names has 2 entries"):
        with loralib.adapter_batch(model, ["b", "default"]):
            model(torch.randn(3, 10, dtype=torch.double))
    with pytest.raises(ValueError, match="does not hold"):
        with loralib.adapter_batch(model, ["zz"]):
            pass
    loralib.delete_adapter(model, "b")
    assert type(model.classifier) is nn.Linear  # its only adapter was b: back to the plain module
    assert loralib.adapter_names(model) == ["default"] and len(model.lin1.adapter_names()) == 1
    # deleting the first adapter promotes the next, keeping its values
    loralib.add_adapter(model, "c", LoraConfig(target_modules=["lin0", "lin1"], r=3, init_lora_weights=False))
    loralib.set_adapter(model, "c")
    x = torch.randn(2, 10, dtype=torch.double)
    y = model(x)
    loralib.delete_adapter(model, "default")
    assert loralib.adapter_names(model) == ["c"] and "lin1.lora_A" in model.state_dict()
    torch.testing.assert_close(model(x), y, rtol=0, atol=0)


def test_single_adapter_model_keeps_its_state_dict_names():
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    keys = set(model.state_dict())
    assert {"lin0.lora_A", "lin0.lora_B", "lin1.lora_A", "lin1.lora_B"} <= keys
    assert not any("lora_adapters" in k or "heads" in k for k in keys)
    assert set(named.active_parameters(model)) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("kind", ["dora", "lora_bias"])
def test_merged_switching_of_dora_and_lora_bias_adapters_is_exact(kind):
    model = _mlp()
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    extra = {"use_dora": True} if kind == "dora" else {"lora_bias": True}
    loralib.inject_lora(
        model, LoraConfig(target_modules=["lin0", "lin1"], r=3, init_lora_weights=False, **extra)
    )
    loralib.add_adapter(
        model, "b", LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False, **extra)
    )
    with torch.no_grad():  # a trained magnitude / bias, not the initial one
        for _, layer in loralib.lora_layers(model):
            for name in layer.adapter_names():
                with layer.using_adapter(name):
                    t = layer.lora_magnitude_vector if kind == "dora" else layer.lora_B_bias
                    t.add_(torch.rand_like(t))
    x = torch.randn(5, 10, dtype=torch.double)
    expected = {}
    for name in ("default", "b"):
        loralib.set_adapter(model, name)
        expected[name] = model(x)
    with loralib.adapter_batch(model, ["b", "default", "b", "__base__", "default"]):
        mixed = model(x)
    torch.testing.assert_close(mixed[[1, 4]], expected["default"][[1, 4]], **TOL)
    torch.testing.assert_close(mixed[[0, 2]], expected["b"][[0, 2]], **TOL)
    loralib.merge_lora(model)
    for name in ("default", "b", "default"):
        loralib.set_adapter(model, name)
        torch.testing.assert_close(model(x), expected[name], **TOL)
    loralib.unmerge_lora(model)
    for n in ("lin0.weight", "lin1.weight", "lin0.bias", "lin1.bias"):
        torch.testing.assert_close(dict(model.named_parameters())[n], w0[n], **TOL)


def test_add_adapter_that_fails_leaves_the_model_as_it_was():
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    structure, state = repr(model), {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="relu"):  # lin0 gets "b" first, then ReLU cannot be adapted
        loralib.add_adapter(model, "b", LoraConfig(target_modules=["lin0", "relu", "classifier"], r=2))
    assert repr(model) == structure and loralib.adapter_names(model) == ["default"]
    assert set(model.state_dict()) == set(state)
    with pytest.raises(ValueError, match="bias='none'"):  # a shared bias cannot belong to one adapter
        loralib.add_adapter(model, "c", LoraConfig(target_modules=["lin1"], bias="all"))


def test_microsoft_layers_hold_one_adapter():
    layer = loralib.Linear(8, 8, r=2)
    with pytest.raises(ValueError, match="one adapter only"):
        layer.add_adapter("b", loralib.config.LoraSettings(r=2))


def test_named_adapter_compiles():
    model = _mlp().float()
    loralib.inject_lora(model, LoraConfig(target_modules=["lin0", "lin1"], r=4, init_lora_weights=False))
    loralib.add_adapter(model, "b", LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    loralib.set_adapter(model, "b")
    x = torch.randn(3, 10)
    eager = model(x)
    compiled = torch.compile(
        model, backend="eager"
    )  # the trace, not the code generator, is what reads the routing
    torch.testing.assert_close(compiled(x), eager)


def test_mixed_batch_measurement_runs_on_a_tiny_model():
    from loralib.measure.mixed import measure_mixed_batch
    from loralib.measure.steps import roberta_config

    cfg = roberta_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    out = measure_mixed_batch(cfg, adapters=3, batch_size=6, seq_len=8, r=2, repeats=1, warmup=0)
    assert set(out["ratio"]) == {"mixed", "separate", "single"} and out["ratio"]["separate"] == 1.0
    assert all(v > 0 for v in out["median_s"].values())


def test_disable_adapters_is_the_frozen_model_as_peft_says(tmp_path):
    base, pm = _peft_pair(tmp_path)
    ours = copy.deepcopy(base)
    loralib.from_peft(ours, tmp_path / "peft", adapter_name="default")
    loralib.from_peft(ours, tmp_path / "peft" / "b", adapter_name="b")
    loralib.set_adapter(ours, "b")
    loralib.merge_lora(ours)
    x = torch.randn(4, 10, dtype=torch.double)
    with_b = ours(x)
    pm.set_adapter("b")
    with loralib.disable_adapters(ours), pm.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(ours(x), pm(x), **TOL)
        torch.testing.assert_close(ours(x), base(x), **TOL)
    torch.testing.assert_close(ours(x), with_b, **TOL)
    assert loralib.active_adapter(ours) == "b" and all(layer.merged for _, layer in loralib.lora_layers(ours))


def test_unload_keeps_the_active_adapter_merged_and_drops_the_rest():
    model = _mlp()
    loralib.inject_lora(model, LoraConfig(**CFG_A))
    loralib.add_adapter(model, "b", LoraConfig(**CFG_B))
    loralib.set_adapter(model, "b")
    x = torch.randn(3, 10, dtype=torch.double)
    want = model(x)
    loralib.unload_lora(model)
    assert all(type(m) in (nn.Linear, nn.ReLU, MLP) for m in model.modules())  # lin0 (no "b") is plain too
    torch.testing.assert_close(model(x), want, **TOL)


def test_deleting_the_first_adapter_registers_what_the_next_one_has():
    model = _mlp()
    loralib.inject_lora(model, ["lin1"], r=2)
    loralib.add_adapter(model, "b", LoraConfig(target_modules=["lin1"], r=3, lora_bias=True, use_dora=False))
    loralib.set_adapter(model, "b")
    loralib.delete_adapter(model, "default")
    keys = set(model.state_dict())
    assert {"lin1.lora_A", "lin1.lora_B", "lin1.lora_B_bias"} <= keys and not any(
        "lora_adapters" in k for k in keys
    )
    assert model.lin1.r == 3 and model.lin1.adapter_names() == ["b"]


def test_loading_a_state_dict_into_a_merged_further_adapter_remerges():
    model = _mlp()
    loralib.inject_lora(model, ["lin1"], r=2, init_lora_weights=False)
    loralib.add_adapter(model, "b", LoraConfig(target_modules=["lin1"], r=2, init_lora_weights=False))
    loralib.set_adapter(model, "b")
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.lin1.lora_adapters.b.lora_B.mul_(3.0)
    x = torch.randn(3, 10, dtype=torch.double)
    want = other(x)
    loralib.merge_lora(model)
    model.load_state_dict({k: v for k, v in other.state_dict().items() if "lora_adapters" in k}, strict=False)
    torch.testing.assert_close(model(x), want, **TOL)
