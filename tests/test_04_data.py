"""loralib.data: task tables against the hub's schema, the bundled mini datasets, local files in every
supported format, the offline error, subsetting, and GLUE tokenisation against the stock tokenizer."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

from loralib import data
from loralib.data import (
    ALL_TASKS,
    GLUE_TASKS,
    SQUAD_TASKS,
    DataUnavailableError,
    bundled_data_dir,
    load_glue,
    load_squad,
    load_task,
    tokenize_glue,
)

ROOT = Path(__file__).resolve().parents[1]

# The hub's dataset cards (nyu-mll/glue, rajpurkar/squad[_v2]), written out independently of loralib.
HUB = {
    "cola": (["sentence"], ["unacceptable", "acceptable"], ["validation"]),
    "sst2": (["sentence"], ["negative", "positive"], ["validation"]),
    "mrpc": (["sentence1", "sentence2"], ["not_equivalent", "equivalent"], ["validation"]),
    "stsb": (["sentence1", "sentence2"], None, ["validation"]),
    "qqp": (["question1", "question2"], ["not_duplicate", "duplicate"], ["validation"]),
    "mnli": (
        ["premise", "hypothesis"],
        ["entailment", "neutral", "contradiction"],
        ["validation_matched", "validation_mismatched"],
    ),
    "qnli": (["question", "sentence"], ["entailment", "not_entailment"], ["validation"]),
    "rte": (["sentence1", "sentence2"], ["entailment", "not_entailment"], ["validation"]),
    "wnli": (["sentence1", "sentence2"], ["not_entailment", "entailment"], ["validation"]),
}
MAIN_METRIC = {"cola": "matthews_correlation", "stsb": "pearson", "squad": "f1", "squad_v2": "f1"}


def hub_features(task: str) -> Features:
    if task.startswith("squad"):
        return Features(
            {
                "id": Value("string"),
                "title": Value("string"),
                "context": Value("string"),
                "question": Value("string"),
                "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")}),
            }
        )
    text, names, _ = HUB[task]
    label = Value("float32") if names is None else ClassLabel(names=names)
    return Features({**{k: Value("string") for k in text}, "label": label, "idx": Value("int32")})


# ---------------------------------------------------------------- task tables


@pytest.mark.parametrize("task", list(HUB))
def test_glue_specs_match_the_hub(task):
    spec = GLUE_TASKS[task]
    text, names, evals = HUB[task]
    assert spec.name == task and spec.hub_id == "nyu-mll/glue" and spec.hub_config == task
    assert list(spec.text_keys) == text and list(spec.eval_splits) == evals and spec.train_split == "train"
    assert spec.is_regression == (names is None)
    assert spec.num_labels == (1 if names is None else len(names))
    assert list(spec.label_names) == (names or [])
    assert spec.main_metric == MAIN_METRIC.get(task, "accuracy") and spec.main_metric in spec.metric_names
    assert spec.features() == hub_features(task)


@pytest.mark.parametrize("task, v2", [("squad", False), ("squad_v2", True)])
def test_squad_specs(task, v2):
    spec = SQUAD_TASKS[task]
    assert spec.hub_id == f"rajpurkar/{task}" and spec.hub_config is None and spec.is_qa
    assert spec.version_2 is v2 and spec.eval_splits == ("validation",)
    assert spec.main_metric in spec.metric_names and ("exact" in spec.metric_names) is v2
    assert spec.features() == hub_features(task)


def test_all_tasks_is_glue_then_squad():
    assert list(ALL_TASKS) == [*HUB, "squad", "squad_v2"]


# ---------------------------------------------------------------- bundled data


@pytest.mark.parametrize("task", list(HUB))
def test_bundled_glue_has_the_hub_schema_and_sizes(task):
    dsd = load_glue(task, data_dir="bundled")
    assert list(dsd) == ["train", *HUB[task][2]]
    for split, ds in dsd.items():
        assert ds.features == hub_features(task)
        assert len(ds) == ((400, 100) if task == "sst2" else (48, 24))[split != "train"]
        assert ds["idx"] == list(range(len(ds)))
        labels = ds["label"]
        if task == "stsb":
            assert all(0.0 <= x <= 5.0 for x in labels) and len(set(labels)) > 5
        else:  # every class is present, none dominates
            counts = Counter(labels)
            assert set(counts) == set(range(len(HUB[task][1]))), counts
            assert max(counts.values()) <= 0.6 * len(ds)
        for key in HUB[task][0]:
            assert all(isinstance(s, str) and s.strip() for s in ds[key])
    # No evaluation text repeats a training text.
    text = HUB[task][0]
    train = {tuple(r[k] for k in text) for r in dsd["train"]}
    for split in HUB[task][2]:
        assert not train & {tuple(r[k] for k in text) for r in dsd[split]}


def _bow_accuracy(task: str, data_dir: str = "bundled") -> float:
    """Validation accuracy of a nearest-centroid bag-of-words classifier fitted on the train split."""
    dsd = load_glue(task, data_dir=data_dir)
    key = GLUE_TASKS[task].text_keys[-1]
    vocab = sorted({w for s in dsd["train"][key] for w in s.lower().split()})
    index = {w: i for i, w in enumerate(vocab)}

    def bow(texts):
        x = np.zeros((len(texts), len(vocab)))
        for i, t in enumerate(texts):
            for w in t.lower().split():
                if w in index:
                    x[i, index[w]] += 1
        return x

    xtr, ytr = bow(dsd["train"][key]), np.array(dsd["train"]["label"])
    centroids = np.stack([xtr[ytr == c].mean(0) for c in np.unique(ytr)])
    xva, yva = bow(dsd["validation"][key]), np.array(dsd["validation"]["label"])
    pred = np.argmin(((xva[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
    return float((pred == yva).mean())


@pytest.mark.parametrize("task", ["qnli", "rte"])
def test_bundled_tasks_carry_a_learnable_signal(task):
    # Not a benchmark: it shows a smoke run has something to learn beyond the label prior (~0.5).
    assert _bow_accuracy(task) >= 0.75


def _sst2_rule(sentence: str) -> int:
    """The bundled SST-2's label, read as a reader would: the clause that counts (after "but" / "yet";
    after "although ...", the main clause), then its one sentiment word, flipped by a negation."""
    import re

    words = re.findall(r"[a-z']+", sentence.split(" but ")[-1].split(" yet ")[-1].split(" , ")[-1])
    if "although" in sentence:
        words = re.findall(r"[a-z']+", sentence.split(" , ")[-1])
    positive = {"wonderful", "moving", "charming", "brilliant", "delightful", "warm", "clever", "gripping"}
    negative = {"dull", "tedious", "clumsy", "boring", "lifeless", "awful", "flat", "forgettable"}
    polarity = {1 if w in positive else 0 for w in words if w in positive | negative}
    if not polarity:  # "it 's never dull , not for a minute ." : the word sits before the last comma
        words = re.findall(r"[a-z']+", sentence)
        polarity = {1 if w in positive else 0 for w in words if w in positive | negative}
    assert len(polarity) == 1, sentence
    negated = any(w in {"not", "never", "hardly"} for w in words)
    return polarity.pop() ^ negated


def test_bundled_sst2_needs_the_sentence_not_its_words():
    # Counting words scores near chance; the reading rule above scores every row.
    assert _bow_accuracy("sst2") <= 0.65
    dsd = load_glue("sst2", data_dir="bundled")
    for split in ("train", "validation"):
        rows = dsd[split]
        assert [_sst2_rule(s) for s in rows["sentence"]] == rows["label"], split
        kinds = [
            (
                "but" in s or "yet" in s or "although" in s,
                any(w in s.split() for w in ("not", "never", "hardly")),
            )
            for s in rows["sentence"]
        ]
        for share in (sum(c for c, _ in kinds) / len(rows), sum(n for _, n in kinds) / len(rows)):
            assert 0.2 <= share <= 0.55, (split, share)  # about three rows in ten each


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
def test_bundled_squad_offsets_and_shape(task, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    dsd = load_squad(task, data_dir="bundled")
    assert list(dsd) == ["train", "validation"]
    assert (len(dsd["train"]), len(dsd["validation"])) == (300, 60)
    ids = [r["id"] for ds in dsd.values() for r in ds]
    assert len(set(ids)) == len(ids)
    for split, ds in dsd.items():
        assert ds.features == hub_features(task)
        unanswerable = 0
        for row in ds:
            a = row["answers"]
            for text, start in zip(a["text"], a["answer_start"]):
                assert row["context"][start : start + len(text)] == text, (row["id"], text)
            if not a["text"]:
                unanswerable += 1
            elif split == "train":
                assert len(a["text"]) == 1  # SQuAD train: exactly one gold answer
        if task == "squad":
            assert unanswerable == 0
        else:
            assert 0.25 * len(ds) <= unanswerable <= 0.5 * len(ds)
        # Some contexts need several 384-token windows of the tiny tokenizer.
        lengths = [len(tok(c)["input_ids"]) for c in set(ds["context"])]
        assert sum(n > 384 for n in lengths) >= 2, lengths
    if task == "squad":
        assert any(len(r["answers"]["text"]) > 1 for r in dsd["validation"])


def _generator():
    spec = importlib.util.spec_from_file_location(
        "make_bundled_data", ROOT / "scripts" / "make_bundled_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shipped_files_are_exactly_what_the_generator_writes(tmp_path):
    gen = _generator()
    expected = gen.all_files()
    root = bundled_data_dir()
    shipped = {
        str(p.relative_to(root))
        for sub in ("glue", "squad", "words", "noisy")
        for p in (root / sub).rglob("*")
        if p.is_file()
    }
    assert shipped == set(expected)
    for rel, text in expected.items():
        assert (root / rel).read_text(encoding="utf-8") == text, rel
    # The script writes the same bytes elsewhere too (atomic writes, deterministic).
    sizes = gen.write(tmp_path)
    assert all((tmp_path / rel).read_bytes() == (root / rel).read_bytes() for rel in sizes)
    total = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert total < 1_000_000, total  # small enough to ship in the wheel (the toy tasks are ~750 KB of it)


# ---------------------------------------------------------------- local directories


def _write(path: Path, rows: list[dict], fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.with_suffix(".jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.with_suffix(".json").write_text(json.dumps(rows))
    elif fmt == "csv":
        import csv

        with path.with_suffix(".csv").open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path.with_suffix(".parquet"))


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
@pytest.mark.parametrize("layout", ["root/glue/task", "root/task", "root"])
def test_local_glue_files_load_exactly_like_bundled(tmp_path, fmt, layout):
    bundled = load_glue("mnli", data_dir="bundled")
    folder = {"root/glue/task": tmp_path / "glue" / "mnli", "root/task": tmp_path / "mnli", "root": tmp_path}[
        layout
    ]
    for split, ds in bundled.items():
        rows = ds.to_list()
        if fmt == "csv":  # label names instead of ids, and no idx column: both are accepted
            names = GLUE_TASKS["mnli"].label_names
            rows = [{k: (names[v] if k == "label" else v) for k, v in r.items() if k != "idx"} for r in rows]
        _write(folder / split, rows, fmt)
    local = load_glue("mnli", data_dir=tmp_path)
    assert list(local) == list(bundled)
    for split in bundled:
        assert local[split].features == bundled[split].features
        assert local[split].to_list() == bundled[split].to_list()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_local_squad_files_keep_the_answers_feature(tmp_path, fmt):
    bundled = load_squad("squad_v2", data_dir="bundled")
    for split, ds in bundled.items():
        _write(tmp_path / "squad" / "squad_v2" / split, ds.to_list(), fmt)
    local = load_task("squad_v2", data_dir=str(tmp_path))
    for split in bundled:
        assert local[split].features == hub_features("squad_v2")
        assert local[split].to_list() == bundled[split].to_list()


def test_stsb_local_labels_are_float32(tmp_path):
    rows = [{"sentence1": "a", "sentence2": "b", "label": "3.8", "idx": 0}]
    for split in ("train", "validation"):
        _write(tmp_path / "stsb" / split, rows, "jsonl")
    ds = load_glue("stsb", data_dir=tmp_path)["train"]
    assert ds.features["label"] == Value("float32") and ds[0]["label"] == pytest.approx(3.8)


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"sentence": "x", "idx": 0}], r"lacks column\(s\) \['label'\]"),
        ([{"sentence": "x", "label": 2}], "not a class id in 0..1"),
        ([{"sentence": "x", "label": "great"}], "neither a class id nor one of"),
    ],
)
def test_local_files_with_bad_rows_are_rejected_clearly(tmp_path, rows, match):
    for split in ("train", "validation"):
        _write(tmp_path / "sst2" / split, rows, "jsonl")
    with pytest.raises(ValueError, match=match):
        load_glue("sst2", data_dir=tmp_path)


def test_missing_split_and_missing_directory_are_named(tmp_path):
    _write(tmp_path / "glue" / "mnli" / "train", [{"premise": "a", "hypothesis": "b", "label": 0}], "jsonl")
    with pytest.raises(FileNotFoundError, match="validation_matched"):
        load_glue("mnli", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_glue("mnli", data_dir=tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no cola data"):
        load_glue("cola", data_dir=tmp_path)


# ---------------------------------------------------------------- hub and errors


def test_hub_is_called_with_the_hub_ids(monkeypatch):
    import datasets

    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or DatasetDict())
    load_glue("qnli")
    load_squad("squad_v2")
    load_task("squad")
    assert calls == [("nyu-mll/glue", "qnli"), ("rajpurkar/squad_v2",), ("rajpurkar/squad",)]


def test_unreachable_hub_names_the_offline_options(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'nyu-mll/glue' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataUnavailableError) as info:
        load_glue("rte")
    msg = str(info.value)
    assert "nyu-mll/glue (rte)" in msg and "offline" in msg and "data_dir='bundled'" in msg
    assert "glue/rte/<split>.jsonl" in msg and "OfflineModeIsEnabled" in msg
    assert isinstance(info.value, ConnectionError)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_glue("sst3"), "valid GLUE tasks: cola, sst2"),
        (lambda: load_glue("squad"), "is a SQuAD task"),
        (lambda: load_squad("squad_v3"), "valid SQuAD tasks: squad, squad_v2"),
        (lambda: load_task("glue"), "valid tasks: cola.*squad_v2"),
        (lambda: load_glue("rte", data_dir="bundled", max_samples=0), "max_samples"),
    ],
)
def test_bad_task_names_list_the_valid_ones(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_max_samples_spreads_rows_evenly_and_deterministically():
    full = load_glue("rte", data_dir="bundled")
    small = load_glue("rte", data_dir="bundled", max_samples=5)
    # 48 rows -> indices linspace(0, 47, 5) = 0, 11.75, 23.5, 35.25, 47 -> 0, 12, 24, 35, 47 (round half even)
    assert small["train"]["idx"] == [0, 12, 24, 35, 47]
    assert small["validation"]["idx"] == [0, 6, 12, 17, 23]  # linspace(0, 23, 5) = 0, 5.75, 11.5, 17.25, 23
    assert small["train"].to_list() == [full["train"][i] for i in [0, 12, 24, 35, 47]]
    assert len(load_glue("rte", data_dir="bundled", max_samples=1000)["train"]) == 48


def test_bundled_data_dir_is_inside_the_package():
    import loralib

    assert bundled_data_dir().is_relative_to(Path(loralib.__file__).parent)
    assert (bundled_data_dir() / "glue" / "cola" / "train.jsonl").is_file()


# ---------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("task", ["sst2", "mrpc", "stsb", "mnli"])
def test_tokenize_glue_matches_the_stock_tokenizer(task, tokenizer):
    dsd = load_glue(task, data_dir="bundled")
    out = tokenize_glue(dsd, tokenizer, task, max_length=24)
    keys = GLUE_TASKS[task].text_keys
    for split, ds in out.items():
        assert ds.column_names == ["input_ids", "attention_mask", "labels"]
        raw = dsd[split]
        ref = tokenizer(*[list(raw[k]) for k in keys], truncation=True, max_length=24)
        assert ds["input_ids"] == ref["input_ids"]
        assert all(len(x) <= 24 for x in ds["input_ids"]) and any(len(x) == 24 for x in ds["input_ids"])
        assert all(set(m) == {1} for m in ds["attention_mask"])  # no padding
        expected = Value("float32") if task == "stsb" else Value("int64")
        assert ds.features["labels"] == expected
        np.testing.assert_allclose(ds["labels"], raw["label"], rtol=1e-6)
    # Pairs are encoded as <s> a </s></s> b </s>.
    if len(keys) == 2:
        ids = out["train"][0]["input_ids"]
        assert ids[0] == tokenizer.cls_token_id and ids.count(tokenizer.sep_token_id) == 3


def test_tokenize_glue_takes_a_single_split_and_checks_columns(tokenizer):
    ds = load_glue("cola", data_dir="bundled")["validation"]
    out = tokenize_glue(ds, tokenizer, "cola")
    assert isinstance(out, Dataset) and len(out) == len(ds)
    with pytest.raises(ValueError, match="lacks the mrpc column"):
        tokenize_glue(ds, tokenizer, "mrpc")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_glue(ds, tokenizer, "cola", max_length=0)


def test_module_docstring_states_scope():
    assert "Not here" in data.__doc__


def test_the_word_level_sst2_variant():
    words = load_glue("sst2", data_dir="bundled-words")
    assert (len(words["train"]), len(words["validation"])) == (400, 100)
    assert words["train"].features == load_glue("sst2", data_dir="bundled")["train"].features
    assert _bow_accuracy("sst2", "bundled-words") >= 0.95  # one word decides
    train = set(words["train"]["sentence"])
    assert not train & set(words["validation"]["sentence"])
    with pytest.raises(ValueError, match="data_dir='bundled-words' holds only"):
        load_glue("rte", data_dir="bundled-words")
    from loralib.benchmark.config import make_config
    from loralib.benchmark.run import provenance

    assert provenance(make_config("sst2", "toy", data_dir="bundled-words"), "x")["data_source"] == "bundled"


def test_the_noisy_variant_flips_15_percent_of_the_training_labels_only():
    words, noisy = load_glue("sst2", data_dir="bundled-words"), load_glue("sst2", data_dir="bundled-noisy")
    for split in ("train", "validation"):
        assert noisy[split]["sentence"] == words[split]["sentence"]
    flipped = sum(a != b for a, b in zip(noisy["train"]["label"], words["train"]["label"]))
    assert flipped == 60 == 0.15 * len(words["train"])
    assert noisy["validation"]["label"] == words["validation"]["label"]
