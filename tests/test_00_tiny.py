"""The offline tiny RoBERTa: deterministic builds, offline loading, and roberta-base's token conventions.

Not here: anything LoRA does with the model (test_03_injection.py and later).
"""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    RobertaModel,
)

from loralib.tiny import DEFAULT_ARCH, tiny_roberta

TEXT = "The movie was wonderful, and the actors were brilliant."


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: loading must be fully offline."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def second_build(tmp_path_factory):
    return tiny_roberta(tmp_path_factory.mktemp("tiny") / "again")


def test_two_builds_are_identical(tiny_model_dir, second_build):
    from pathlib import Path

    a, b = Path(tiny_model_dir), Path(second_build)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_another_seed_gives_other_weights(tiny_model_dir, tmp_path):
    other = tiny_roberta(tmp_path / "seed1", seed=1)
    wa, wb = load_file(f"{tiny_model_dir}/model.safetensors"), load_file(f"{other}/model.safetensors")
    assert wa.keys() == wb.keys()
    assert not torch.equal(
        wa["encoder.layer.0.attention.self.query.weight"], wb["encoder.layer.0.attention.self.query.weight"]
    )


def test_building_does_not_touch_the_global_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_roberta(tmp_path / "t")
    assert torch.equal(torch.rand(3), expected)


def test_existing_directory_is_reused(tiny_model_dir):
    from pathlib import Path

    stamp = (Path(tiny_model_dir) / "model.safetensors").stat().st_mtime_ns
    assert tiny_roberta(tiny_model_dir) == tiny_model_dir
    assert (Path(tiny_model_dir) / "model.safetensors").stat().st_mtime_ns == stamp


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="explicit path"):
        tiny_roberta(seed=3)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny_roberta(tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine", "a foreign directory must not be deleted"
    assert [p.name for p in tmp_path.iterdir()] == ["busy"], "no temporary build left behind"


def test_loads_offline_with_the_documented_architecture(tiny_model_dir, no_network):
    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    assert cfg.model_type == "roberta"
    for key, value in DEFAULT_ARCH.items():
        assert getattr(cfg, key) == value, key
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (
        64,
        2,
        4,
        1000,
    )
    assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (1, 0, 2)
    model = RobertaModel.from_pretrained(tiny_model_dir).eval()
    assert (
        model.embeddings.position_embeddings.padding_idx == 1 == model.embeddings.word_embeddings.padding_idx
    )
    # Every stored tensor is loaded (nothing silently re-initialised).
    stored = load_file(f"{tiny_model_dir}/model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in stored.items())
    torch.manual_seed(0)
    clf = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = clf(**tok([TEXT, "Short."], padding=True, return_tensors="pt"))
    assert out.logits.shape == (2, 2) and torch.isfinite(out.logits).all()


def test_tokenizer_follows_roberta_conventions(tiny_model_dir, no_network):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tok.is_fast and len(tok) == 1000
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert tok.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    single = tok(TEXT)["input_ids"]
    assert single[0] == 0 and single[-1] == 2 and 1 not in single
    assert tok.decode(single, skip_special_tokens=True) == TEXT
    # Sentence pairs as roberta-base: <s> A </s></s> B </s>.
    pair = tok("first part", "second part")["input_ids"]
    a = tok("first part", add_special_tokens=False)["input_ids"]
    b = tok("second part", add_special_tokens=False)["input_ids"]
    assert pair == [0, *a, 2, 2, *b, 2]
    padded = tok([TEXT, "Hi."], padding=True)
    assert padded["input_ids"][1][-1] == 1 and padded["attention_mask"][1][-1] == 0
    assert "token_type_ids" not in padded


@pytest.mark.parametrize(
    "text", [TEXT, "Low-rank adaptation freezes the weights.", "Questions that cannot be answered, 42 times."]
)
def test_tokenizer_offsets_map_back_to_the_text(tiny_model_dir, text):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = tok(text, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    assert len(offsets) == len(enc["input_ids"])
    assert offsets[0] == (0, 0) and offsets[-1] == (0, 0)  # <s> and </s> cover no text
    spans = offsets[1:-1]
    assert all(0 <= s < e <= len(text) for s, e in spans)
    assert all(e1 <= s2 for (_, e1), (s2, _) in zip(spans, spans[1:])), "offsets are ordered and disjoint"
    # Byte-level BPE trims the leading space into the token, so the spans tile the text minus spaces.
    assert "".join(text[s:e] for s, e in spans) == text.replace(" ", "")
