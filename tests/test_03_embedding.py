"""`LoraEmbedding` exact against PEFT's `lora.Embedding` (outputs, gradients, merge, unmerge), both ways
through `from_peft` / `to_peft`, and through loralib's own lifecycle (inject by name, train, merge,
save and reload, unload). Models are float64 copies, so "exact" means agreement to float64 rounding
(1e-12), whatever the CPU's kernels."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from loralib import inject_lora, load_lora, lora_layers, mark_only_lora_as_trainable, merge_lora, save_lora
from loralib.injection import unload_lora, unmerge_lora
from loralib.layers import LoraEmbedding, lora_class_for
from loralib.peft_interop import from_peft, to_peft

pytestmark = pytest.mark.numerical
peft = pytest.importorskip("peft")
ATOL = 1e-12


class TinyLM(nn.Module):
    def __init__(self, vocab=40, dim=12, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.proj = nn.Linear(dim, 5)

    def forward(self, input_ids):
        return self.proj(self.emb(input_ids))


def _models(r=4, lora_alpha=8, use_rslora=False, seed=0):
    torch.manual_seed(seed)
    base = TinyLM().double()
    ours = copy.deepcopy(base)
    inject_lora(ours, ["emb"], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    mark_only_lora_as_trainable(ours)  # as get_peft_model: only the adapter trains
    cfg = peft.LoraConfig(target_modules=["emb"], r=r, lora_alpha=lora_alpha, use_rslora=use_rslora)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    layer = ours.emb
    with torch.no_grad():  # a non-zero update on both sides: PEFT's A starts at zero, as ours
        layer.lora_A.normal_()
        t = theirs.base_model.model.emb
        t.lora_embedding_A["default"].copy_(layer.lora_A)
        t.lora_embedding_B["default"].copy_(layer.lora_B)
    return base, ours, theirs


IDS = torch.tensor([[0, 3, 7, 7, 39], [5, 0, 1, 2, 3]])


def test_a_fresh_layer_is_peft_initialised_and_changes_nothing():
    torch.manual_seed(0)
    emb = nn.Embedding(30, 8, padding_idx=0)
    layer = LoraEmbedding.from_embedding(emb, r=4)
    assert lora_class_for(emb) is LoraEmbedding
    assert torch.count_nonzero(layer.lora_A) == 0 and layer.lora_B.std() > 0.5  # A zero, B ~ N(0, 1)
    assert torch.equal(layer(IDS.clamp(max=29)), emb(IDS.clamp(max=29)))
    assert layer.weight is not emb.weight and layer.weight.data_ptr() == emb.weight.data_ptr()  # reused


@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_and_gradients_equal_pefts(use_rslora):
    _, ours, theirs = _models(use_rslora=use_rslora)
    y_ours, y_theirs = ours(IDS), theirs(input_ids=IDS)
    torch.testing.assert_close(y_ours, y_theirs, atol=ATOL, rtol=0)
    (y_ours.square().sum()).backward()
    (y_theirs.square().sum()).backward()
    t = theirs.base_model.model.emb
    torch.testing.assert_close(ours.emb.lora_A.grad, t.lora_embedding_A["default"].grad, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.emb.lora_B.grad, t.lora_embedding_B["default"].grad, atol=ATOL, rtol=0)
    # and against the explicit formula: E[x] + (A^T[x] B^T) * scaling
    layer = ours.emb
    explicit = layer.weight[IDS] + layer.lora_A.T[IDS] @ layer.lora_B.T * layer.scaling
    torch.testing.assert_close(layer(IDS), explicit, atol=ATOL, rtol=0)


def test_merge_and_unmerge_equal_pefts():
    base, ours, theirs = _models()
    before = ours(IDS)
    merge_lora(ours)
    theirs.base_model.model.emb.merge()
    torch.testing.assert_close(
        ours.emb.weight, theirs.base_model.model.emb.base_layer.weight, atol=ATOL, rtol=0
    )
    torch.testing.assert_close(ours(IDS), before, atol=ATOL, rtol=0)
    unmerge_lora(ours)
    torch.testing.assert_close(ours.emb.weight, base.emb.weight, atol=ATOL, rtol=0)
    plain = unload_lora(ours)
    assert type(plain.emb) is nn.Embedding and plain.emb.padding_idx == 0
    torch.testing.assert_close(plain(IDS), before, atol=ATOL, rtol=0)


def test_peft_adapters_convert_both_ways(tmp_path):
    base, ours, theirs = _models()
    theirs.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    from_peft(loaded, tmp_path / "peft")
    assert isinstance(loaded.emb, LoraEmbedding)
    torch.testing.assert_close(loaded(IDS), theirs(input_ids=IDS), atol=ATOL, rtol=0)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {"emb.lora_A", "emb.lora_B"}

    to_peft(ours, tmp_path / "ours", base_model_name_or_path="tiny")
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    torch.testing.assert_close(back(input_ids=IDS), ours(IDS), atol=ATOL, rtol=0)
    from safetensors.torch import load_file

    mine = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    pefts = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert (
        set(mine)
        == set(pefts)
        == {
            "base_model.model.emb.lora_embedding_A",
            "base_model.model.emb.lora_embedding_B",
        }
    )


def test_an_embedding_adapter_for_a_linear_is_refused_with_the_model_unchanged(tmp_path):
    base, _, theirs = _models()
    theirs.save_pretrained(tmp_path / "peft")
    other = copy.deepcopy(base)
    other.emb = nn.Linear(40, 12).double()  # same name, another type
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="emb is a Linear, and the adapter.s tensors are for an Embedding"):
        from_peft(other, tmp_path / "peft")
    assert not list(lora_layers(other))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in before.items())


def test_word_embeddings_of_roberta_train_merge_save_and_reload(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    names = inject_lora(model, ["word_embeddings", "query"], r=4, lora_alpha=8)
    assert names == ["roberta.embeddings.word_embeddings", *[n for n in names if n.endswith("query")]]
    mark_only_lora_as_trainable(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 100, (4, 12))
    labels = torch.tensor([0, 1, 0, 1])
    for _ in range(3):
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    emb = model.roberta.embeddings.word_embeddings
    assert isinstance(emb, LoraEmbedding) and torch.count_nonzero(emb.lora_A) > 0  # it trained
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        save_lora(model, tmp_path / "a")
        merge_lora(model)
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    fresh = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    with torch.no_grad():
        fresh.classifier.load_state_dict(model.classifier.state_dict())  # the head was not trained or saved
    load_lora(fresh, tmp_path / "a")
    assert isinstance(fresh.roberta.embeddings.word_embeddings, LoraEmbedding)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, before, atol=1e-6, rtol=1e-6)


def test_embedding_specific_arguments_are_checked():
    with pytest.raises(ValueError, match="init='article'.*no embedding form"):
        LoraEmbedding(10, 4, r=2, init="article")
    with pytest.raises(TypeError, match="positional"):
        LoraEmbedding(10, 4, 0, 2)

    class Scaled(nn.Embedding):  # its own forward: LoRA's would bypass it
        def forward(self, x):
            return super().forward(x) * 2.0

    model = nn.Sequential(Scaled(10, 4))
    with pytest.raises(TypeError, match="not a type LoRA adapts here"):
        inject_lora(model, ["0"], r=2)
