"""The bundled toy sentiment task and its teaching loop: data, batches, training, accuracy, learnability.

References: the templates file read here directly, the tokenizer called directly, a bag-of-words
model whose answer is known, and the accuracy counted by hand. Not here: LoRA internals
(test_01_layers.py, test_03_injection.py).
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from loralib.injection import inject_lora, mark_only_lora_as_trainable
from loralib.toy import (
    evaluate_accuracy,
    generate_toy_sentiment,
    load_toy_sentiment,
    toy_batches,
    toy_dir,
    train_steps,
)

SPEC = json.loads((toy_dir() / "templates.json").read_text())
WORDS = {1: set(SPEC["positive"]), 0: set(SPEC["negative"])}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and on a busy 2-core machine OpenMP threads that
    wait for each other can make a 1 s run take a minute."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sentiment_words(text: str) -> list[tuple[str, int]]:
    tokens = text.lower().replace(".", " ").replace(",", " ").split()
    return [(t, label) for t in tokens for label, words in WORDS.items() if t in words]


def test_shipped_files_are_the_generated_ones():
    generated = generate_toy_sentiment()
    for split in ("train", "validation"):
        assert load_toy_sentiment(split) == generated[split]


@pytest.mark.parametrize("split, size", [("train", 200), ("validation", 64)])
def test_split_sizes_balance_and_labels(split, size):
    rows = load_toy_sentiment(split)
    assert len(rows) == size and sum(r["label"] for r in rows) == size // 2
    for r in rows:
        assert set(r) == {"text", "label"} and r["label"] in (0, 1)
        words = sentiment_words(r["text"])
        assert len(words) == 1 and words[0][1] == r["label"], r["text"]
        assert r["text"][0].isupper() and r["text"].endswith(".")


def test_splits_do_not_overlap_and_cover_every_word():
    train = {r["text"] for r in load_toy_sentiment("train")}
    val = {r["text"] for r in load_toy_sentiment("validation")}
    assert len(train) == 200 and len(val) == 64 and not train & val
    seen = {w for t in train for w, _ in sentiment_words(t)}
    assert seen == WORDS[0] | WORDS[1], "validation must not need a word the training split never shows"


def test_unknown_split():
    with pytest.raises(ValueError, match="unknown toy split 'test'"):
        load_toy_sentiment("test")
    with pytest.raises(ValueError, match="unknown toy split"):
        toy_batches(None, "dev")


@pytest.mark.parametrize(
    "split, batch_size", [("train", 16), ("validation", 16), ("train", 7), ("validation", 64)]
)
def test_batches_match_the_tokenizer(tok, split, batch_size):
    rows = load_toy_sentiment(split)
    batches = toy_batches(tok, split, batch_size=batch_size)
    assert len(batches) == math.ceil(len(rows) / batch_size)
    texts, labels = [], []
    for b in batches:
        assert set(b) == {"input_ids", "attention_mask", "labels"}
        assert b["input_ids"].dtype == b["attention_mask"].dtype == b["labels"].dtype == torch.long
        assert (
            b["input_ids"].shape == b["attention_mask"].shape
            and b["input_ids"].shape[0] == b["labels"].shape[0]
        )
        for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"]):
            text = tok.decode(ids[mask.bool()], skip_special_tokens=True)
            assert ids[mask.bool()].tolist() == tok(text)["input_ids"]
            assert (ids[~mask.bool()] == tok.pad_token_id).all()
            texts.append(text)
            labels.append(int(label))
        assert b["attention_mask"][:, -1].any(), "each batch is padded to its own longest sentence"
    assert sorted(zip(texts, labels)) == sorted((r["text"], r["label"]) for r in rows)
    if split == "validation":
        assert texts == [r["text"] for r in rows], "validation keeps the file order"


def test_shuffle_is_seeded(tok):
    def order(seed):
        return [tok.decode(x) for b in toy_batches(tok, "train", seed=seed) for x in b["input_ids"]]

    assert order(0) == order(0)
    assert order(0) != order(1)


def test_truncation(tok):
    batches = toy_batches(tok, "train", max_length=6)
    assert max(b["input_ids"].shape[1] for b in batches) == 6
    assert all(b["input_ids"][i, -1] == tok.eos_token_id for b in batches for i in range(len(b["labels"])))


class BagOfWords(nn.Module):
    """A model with a known answer: the label is one word, so a linear bag of words can be perfect."""

    def __init__(self, vocab: int = 1000, as_dict: bool = True):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab, 2, mode="sum")
        nn.init.zeros_(self.emb.weight)
        self.as_dict = as_dict

    def forward(self, input_ids, attention_mask, labels=None):
        logits = self.emb(input_ids, per_sample_weights=attention_mask.float())
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        if self.as_dict:
            return {"loss": loss, "logits": logits}
        return type("Out", (), {"loss": loss, "logits": logits})()


@pytest.mark.parametrize("optimizer, lr", [("adamw", 0.05), ("sgd", 0.5)])
@pytest.mark.parametrize("as_dict", [True, False], ids=["dict-output", "object-output"])
def test_train_steps_fits_a_bag_of_words(tok, optimizer, lr, as_dict, one_thread):
    torch.manual_seed(0)
    model = BagOfWords(as_dict=as_dict).eval()
    train, val = toy_batches(tok, "train"), toy_batches(tok, "validation")
    assert evaluate_accuracy(model, val) == 0.5  # zero weights: ties go to class 0, half the labels
    losses = train_steps(model, train, epochs=5, lr=lr, optimizer=optimizer, progress=False)
    assert len(losses) == 5 * len(train) and losses[0] == pytest.approx(math.log(2))
    assert sum(losses[-len(train) :]) < 0.2 * sum(losses[: len(train)])
    assert evaluate_accuracy(model, val) == 1.0
    assert not model.training, "train_steps restores the mode it found"


def test_evaluate_accuracy_counts_like_by_hand(tok):
    torch.manual_seed(3)
    model = BagOfWords()
    nn.init.normal_(model.emb.weight)
    model.train()
    batches = toy_batches(tok, "validation", batch_size=10)
    correct = total = 0
    for b in batches:
        logits = model.emb(b["input_ids"], per_sample_weights=b["attention_mask"].float())
        correct += int((logits.argmax(-1) == b["labels"]).sum())
        total += len(b["labels"])
    assert evaluate_accuracy(model, batches) == correct / total
    assert model.training


def test_train_steps_errors(tok):
    batches = toy_batches(tok, "validation")
    frozen = BagOfWords().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        train_steps(frozen, batches, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        train_steps(BagOfWords(), batches, optimizer="lion", progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        train_steps(BagOfWords(), [], progress=False)
    with pytest.raises(ValueError, match="epochs must be at least 1"):
        train_steps(BagOfWords(), batches, epochs=0, progress=False)
    no_labels = [{k: v for k, v in b.items() if k != "labels"} for b in batches]
    with pytest.raises(ValueError, match="returned no loss"):
        train_steps(BagOfWords(), no_labels, progress=False)
    with pytest.raises(ValueError, match="batches is empty"):
        evaluate_accuracy(BagOfWords(), [])


def test_lora_learns_the_toy_task_on_the_tiny_roberta(tiny_model_dir, tok, one_thread):
    """The notebooks' claim: a few seconds of LoRA training beat chance clearly on held-out sentences."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    inject_lora(model, ["query", "value"], r=8, lora_alpha=16)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    train, val = toy_batches(tok, "train"), toy_batches(tok, "validation")
    before = evaluate_accuracy(model, val)
    start = time.perf_counter()
    losses = train_steps(model, train, progress=False)  # the defaults the notebooks use
    seconds = time.perf_counter() - start
    after = evaluate_accuracy(model, val)
    n = len(train)
    print(
        f"toy accuracy {before:.3f} -> {after:.3f}, loss {sum(losses[:n]) / n:.3f} -> "
        f"{sum(losses[-n:]) / n:.3f}, {len(losses)} steps in {seconds:.1f} s"
    )
    assert after >= 0.75 and after >= before + 0.2
    assert sum(losses[-n:]) < 0.5 * sum(losses[:n])
