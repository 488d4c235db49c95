"""The benchmark datasets: task tables, loading (hub, bundled or local files) and GLUE tokenisation.

Covers the nine GLUE tasks (hub dataset `nyu-mll/glue`) and SQuAD v1.1 / v2.0 (`rajpurkar/squad`,
`rajpurkar/squad_v2`): `TaskSpec` tables with the hub's column names, label names and splits;
`load_glue` / `load_squad` / `load_task`, which return a `datasets.DatasetDict` with the hub's exact
`Features` whether the rows come from the hub, from the mini datasets bundled with loralib
(`data_dir="bundled"`; `"bundled-words"`: an easier SST-2 where one sentiment word decides;
`"bundled-noisy"`: that with 15% of its training labels flipped) or from a local directory;
`is_bundled`; `data_fingerprint` (a hash of a task's bundled or local files, part of a benchmark run's identity); and
`tokenize_glue`.

The bundled datasets are small synthetic stand-ins written by `scripts/make_bundled_data.py` (not
samples of the real data): they exist so that the pipeline runs offline. Numbers measured on them
say nothing about a model's quality.

Not here: metric formulas (`loralib.metrics`), SQuAD's sliding windows and answer post-processing
(`loralib.qa`), training (`loralib.benchmark`).
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

# Formats a local data directory may use, in the order they are looked for.
DATA_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs to know about one benchmark task.

    name: hub config name ("cola", ..., "squad", "squad_v2").
    text_keys: the input text columns, in the order they are fed to the tokenizer.
    num_labels: classifier outputs (1 for the regression task stsb; 2 start/end logits for SQuAD).
    label_names: the hub's ClassLabel names in id order (empty for stsb and SQuAD).
    main_metric: the key of `loralib.metrics` output that the task is usually reported by.
    metric_names: every key `loralib.metrics` returns for the task.
    """

    name: str
    text_keys: tuple[str, ...]
    num_labels: int
    is_regression: bool
    label_names: tuple[str, ...]
    main_metric: str
    metric_names: tuple[str, ...]
    hub_id: str
    hub_config: str | None
    train_split: str = "train"
    eval_splits: tuple[str, ...] = ("validation",)
    is_qa: bool = False
    version_2: bool = False
    # Bundled-data folder name: "glue" or "squad".
    family: str = field(default="glue")

    @property
    def splits(self) -> tuple[str, ...]:
        """Train split then the evaluation splits."""
        return (self.train_split, *self.eval_splits)

    def features(self):
        """The hub's `datasets.Features` for this task (column order as on the hub)."""
        from datasets import ClassLabel, Features, Sequence, Value

        if self.is_qa:
            return Features(
                {
                    "id": Value("string"),
                    "title": Value("string"),
                    "context": Value("string"),
                    "question": Value("string"),
                    "answers": Sequence({"text": Value("string"), "answer_start": Value("int32")}),
                }
            )
        cols: dict[str, Any] = {k: Value("string") for k in self.text_keys}
        cols["label"] = Value("float32") if self.is_regression else ClassLabel(names=list(self.label_names))
        cols["idx"] = Value("int32")
        return Features(cols)


def _glue(name, text_keys, label_names, main_metric, metric_names, eval_splits=("validation",)) -> TaskSpec:
    regression = not label_names
    return TaskSpec(
        name=name,
        text_keys=tuple(text_keys),
        num_labels=1 if regression else len(label_names),
        is_regression=regression,
        label_names=tuple(label_names),
        main_metric=main_metric,
        metric_names=tuple(metric_names),
        hub_id="nyu-mll/glue",
        hub_config=name,
        eval_splits=tuple(eval_splits),
    )


_PAIR = ("sentence1", "sentence2")
GLUE_TASKS: dict[str, TaskSpec] = {
    "cola": _glue(
        "cola",
        ("sentence",),
        ("unacceptable", "acceptable"),
        "matthews_correlation",
        ("matthews_correlation",),
    ),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive"), "accuracy", ("accuracy",)),
    "mrpc": _glue("mrpc", _PAIR, ("not_equivalent", "equivalent"), "accuracy", ("accuracy", "f1")),
    "stsb": _glue("stsb", _PAIR, (), "pearson", ("pearson", "spearmanr")),
    "qqp": _glue(
        "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), "accuracy", ("accuracy", "f1")
    ),
    "mnli": _glue(
        "mnli",
        ("premise", "hypothesis"),
        ("entailment", "neutral", "contradiction"),
        "accuracy",
        ("accuracy",),
        eval_splits=("validation_matched", "validation_mismatched"),
    ),
    "qnli": _glue(
        "qnli", ("question", "sentence"), ("entailment", "not_entailment"), "accuracy", ("accuracy",)
    ),
    "rte": _glue("rte", _PAIR, ("entailment", "not_entailment"), "accuracy", ("accuracy",)),
    # WNLI's label order is the reverse of RTE's on the hub.
    "wnli": _glue("wnli", _PAIR, ("not_entailment", "entailment"), "accuracy", ("accuracy",)),
}

_SQUAD_V2_KEYS = (
    "exact",
    "f1",
    "total",
    "HasAns_exact",
    "HasAns_f1",
    "HasAns_total",
    "NoAns_exact",
    "NoAns_f1",
    "NoAns_total",
    "best_exact",
    "best_exact_thresh",
    "best_f1",
    "best_f1_thresh",
)
SQUAD_TASKS: dict[str, TaskSpec] = {
    name: TaskSpec(
        name=name,
        text_keys=("question", "context"),
        num_labels=2,
        is_regression=False,
        label_names=(),
        main_metric="f1",
        metric_names=_SQUAD_V2_KEYS if v2 else ("exact_match", "f1"),
        hub_id=f"rajpurkar/{name}",
        hub_config=None,
        is_qa=True,
        version_2=v2,
        family="squad",
    )
    for name, v2 in (("squad", False), ("squad_v2", True))
}

ALL_TASKS: dict[str, TaskSpec] = {**GLUE_TASKS, **SQUAD_TASKS}


class DataUnavailableError(ConnectionError):
    """The hub could not be reached (offline, no network, missing cache); the message names the local options."""


def get_task(task: str) -> TaskSpec:
    """The `TaskSpec` of `task`; an unknown name raises ValueError listing the valid ones."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(ALL_TASKS)}.")
    return ALL_TASKS[task]


def _spec_of(task: str, table: dict[str, TaskSpec], kind: str) -> TaskSpec:
    if task not in table:
        hint = ""
        if task in ALL_TASKS:
            hint = f" ({task!r} is a {'SQuAD' if kind == 'GLUE' else 'GLUE'} task: use load_task)"
        raise ValueError(f"unknown {kind} task {task!r}{hint}; valid {kind} tasks: {', '.join(table)}.")
    return table[task]


# Easier variants of a bundled task. "bundled-words": SST-2 where every sentiment word has the label's
# polarity (one word decides), for notebook 08's many 32-step runs; "bundled-noisy": the same with 15% of
# the training labels flipped, so a tuned run's validation loss has a floor (notebook 07). "bundled"'s
# SST-2 needs negation and contrast, for a learning curve that rises over epochs (notebook 04).
BUNDLED_VARIANTS = {"bundled-words": ("sst2",), "bundled-noisy": ("sst2",)}


def is_bundled(data_dir: str | os.PathLike | None) -> bool:
    """Whether `data_dir` names data shipped with loralib ("bundled" or one of `BUNDLED_VARIANTS`)."""
    return data_dir is not None and (str(data_dir) == "bundled" or str(data_dir) in BUNDLED_VARIANTS)


def bundled_data_dir() -> Path:
    """Root of the mini datasets shipped with loralib (`glue/<task>/<split>.jsonl`, `squad/...`)."""
    return Path(str(resources.files("loralib") / "resources"))


# ---------------------------------------------------------------- local files


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of one JSONL / JSON / CSV / Parquet file as plain dicts."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or suffix == ".json":
        text = path.read_text(encoding="utf-8")
        stripped = text.lstrip()
        if suffix == ".json" and stripped.startswith("["):
            return json.loads(text)
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{n} is not valid JSON ({exc}); expected one JSON object per line."
                    ) from None
        return rows
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise ValueError(f"unsupported data file {path}; use one of {', '.join(DATA_EXTENSIONS)}.")


def _encode_label(value: Any, spec: TaskSpec, where: str) -> Any:
    if spec.is_regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: stsb label {value!r} is not a number (expected a float in 0..5)."
            ) from None
    if isinstance(value, str):
        s = value.strip()
        if s in spec.label_names:
            return spec.label_names.index(s)
        try:
            value = int(float(s))
        except ValueError:
            raise ValueError(
                f"{where}: label {value!r} is neither a class id nor one of {list(spec.label_names)}."
            ) from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, (int, np.integer)) or not -1 <= int(value) < spec.num_labels:
        raise ValueError(
            f"{where}: label {value!r} is not a class id in 0..{spec.num_labels - 1} "
            f"({', '.join(spec.label_names)}) or -1 (unlabelled test rows)."
        )
    return int(value)


def _encode_answers(value: Any, where: str) -> dict[str, list]:
    if isinstance(value, str):  # CSV cells hold the answers dict as JSON
        value = json.loads(value)
    if not isinstance(value, dict) or not {"text", "answer_start"} <= set(value):
        raise ValueError(f"{where}: answers must be {{'text': [...], 'answer_start': [...]}}, got {value!r}.")
    texts, starts = list(value["text"]), [int(s) for s in value["answer_start"]]
    if len(texts) != len(starts):
        raise ValueError(f"{where}: answers has {len(texts)} texts but {len(starts)} answer_start values.")
    return {"text": [str(t) for t in texts], "answer_start": starts}


def _rows_to_dataset(rows: list[dict[str, Any]], spec: TaskSpec, path: Path):
    """One split as a `datasets.Dataset` with the hub's Features; extra columns are dropped."""
    from datasets import Dataset

    features = spec.features()
    required = [c for c in features if c != "idx"]  # idx is optional locally: it is the row number
    columns: dict[str, list] = {c: [] for c in features}
    for i, row in enumerate(rows):
        where = f"{path} row {i}"
        missing = [c for c in required if c not in row]
        if missing:
            raise ValueError(
                f"{where} lacks column(s) {missing}; the {spec.name} schema is {list(features)}."
            )
        for c in features:
            if c == "idx":
                columns[c].append(int(row.get("idx", i)))
            elif c == "label":
                columns[c].append(_encode_label(row[c], spec, where))
            elif c == "answers":
                columns[c].append(_encode_answers(row[c], where))
            else:
                columns[c].append("" if row[c] is None else str(row[c]))
    return Dataset.from_dict(columns, features=features)


def _find_split_files(root: Path, spec: TaskSpec) -> tuple[Path, dict[str, Path]]:
    """The folder holding `<split>.<ext>` files for `spec` under `root`, and those files by split."""
    candidates = [root / spec.family / spec.name, root / spec.name, root]
    for folder in candidates:
        if not folder.is_dir():
            continue
        found: dict[str, Path] = {}
        for split in spec.splits:
            for ext in DATA_EXTENSIONS:
                if (folder / f"{split}{ext}").is_file():
                    found[split] = folder / f"{split}{ext}"
                    break
        if found:
            return folder, found
    raise FileNotFoundError(
        f"no {spec.name} data under {root}: expected files named {' / '.join(spec.splits)} "
        f"with extension {' / '.join(DATA_EXTENSIONS)} in one of {[str(c) for c in candidates]}."
    )


def _load_local(spec: TaskSpec, root: Path):
    from datasets import DatasetDict

    if not root.is_dir():
        raise FileNotFoundError(
            f"data_dir {str(root)!r} is not a directory; pass None (the hub), 'bundled', or a directory laid "
            f"out as <dir>/{spec.family}/{spec.name}/<split>.jsonl."
        )
    folder, files = _find_split_files(root, spec)
    missing = [s for s in spec.splits if s not in files]
    if missing:
        raise FileNotFoundError(
            f"{folder} has {sorted(files)} but lacks the {spec.name} split(s) {missing} "
            f"(files {missing[0]}.jsonl/.csv/.parquet)."
        )
    return DatasetDict({s: _rows_to_dataset(_read_rows(p), spec, p) for s, p in files.items()})


def _load_hub(spec: TaskSpec):
    import datasets

    try:
        if spec.hub_config is None:
            return datasets.load_dataset(spec.hub_id)
        return datasets.load_dataset(spec.hub_id, spec.hub_config)
    except Exception as exc:  # the hub's errors vary by version; all mean "not available here"
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "HF_DATASETS_OFFLINE", ""
        ) not in ("", "0")
        what = f"{spec.hub_id}" + (f" ({spec.hub_config})" if spec.hub_config else "")
        raise DataUnavailableError(
            f"could not load {what} from the Hugging Face Hub"
            + (" (offline mode: HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else "")
            + f": {type(exc).__name__}: {exc}\n"
            "Without the hub, pass data_dir='bundled' (CLI --data-dir bundled: the tiny synthetic datasets shipped "
            f"with loralib; for smoke tests only) or data_dir=<directory> (CLI --data-dir PATH) holding {spec.family}/{spec.name}/<split>.jsonl "
            f"(or .csv/.parquet) for the splits {list(spec.splits)} in the hub's schema."
        ) from exc


def subset_rows(ds, n: int | None, shuffle_seed: int | None = None):
    """At most `n` rows of `ds` (all of them when n is None or the split is smaller).

    With a shuffle_seed: a seeded random sample (training subsets; some GLUE train files are ordered).
    Without: n rows spread evenly over the split, in order (deterministic; a sorted file keeps every label).
    """
    if n is None or n >= len(ds):
        return ds
    if shuffle_seed is not None:
        return ds.shuffle(seed=shuffle_seed).select(range(n))
    return ds.select(np.linspace(0, len(ds) - 1, n).round().astype(int).tolist())


def _local_root(spec: TaskSpec, data_dir: str | os.PathLike) -> Path:
    """The folder a bundled name ("bundled", a variant) or a local `data_dir` stands for."""
    if str(data_dir) == "bundled":
        return bundled_data_dir()
    if str(data_dir) in BUNDLED_VARIANTS:
        if spec.name not in BUNDLED_VARIANTS[str(data_dir)]:
            raise ValueError(
                f"data_dir={str(data_dir)!r} holds only {BUNDLED_VARIANTS[str(data_dir)]}; for {spec.name} "
                "use data_dir='bundled'."
            )
        return bundled_data_dir() / str(data_dir).removeprefix("bundled-")
    return Path(data_dir).expanduser()


def data_fingerprint(task: str, data_dir: str | os.PathLike | None) -> str | None:
    """A short sha256 of the bytes of `task`'s split files under a bundled or local `data_dir`, so that a
    finished run is not reused once its rows have changed (None for the hub, whose revisions are its own)."""
    import hashlib

    if data_dir is None or data_dir == "":
        return None
    spec = get_task(task)
    _folder, files = _find_split_files(_local_root(spec, data_dir), spec)
    digest = hashlib.sha256()
    for split in sorted(files):
        digest.update(f"{split}\0".encode())
        digest.update(files[split].read_bytes())
    return digest.hexdigest()[:16]


def _load(spec: TaskSpec, data_dir: str | os.PathLike | None, max_samples: int | None):
    if max_samples is not None and (not isinstance(max_samples, (int, np.integer)) or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}.")
    if data_dir is None or data_dir == "":
        dsd = _load_hub(spec)
    else:
        dsd = _load_local(spec, _local_root(spec, data_dir))
    if max_samples is not None:
        from datasets import DatasetDict

        dsd = DatasetDict({s: subset_rows(d, int(max_samples)) for s, d in dsd.items()})
    return dsd


def load_glue(task: str, data_dir: str | os.PathLike | None = None, max_samples: int | None = None):
    """A GLUE task as a `DatasetDict` with the hub's splits, columns and Features.

    data_dir: None = the hub (`nyu-mll/glue`, config `task`); "bundled" = loralib's mini datasets;
    any other path = local files `<dir>/glue/<task>/<split>.jsonl|.json|.csv|.parquet` (or
    `<dir>/<task>/...`, or the split files directly in `<dir>`), cast to the hub's Features
    (labels may be ids or label names). max_samples: keep at most that many rows per split,
    spread evenly over it (deterministic).
    """
    return _load(_spec_of(task, GLUE_TASKS, "GLUE"), data_dir, max_samples)


def load_squad(
    task: str = "squad", data_dir: str | os.PathLike | None = None, max_samples: int | None = None
):
    """SQuAD v1.1 ("squad") or v2.0 ("squad_v2") as a `DatasetDict` (train, validation) with the hub's Features.

    data_dir as in `load_glue`, with `<dir>/squad/<task>/<split>.jsonl`; rows hold id, title, context,
    question and answers {"text": [...], "answer_start": [...]} (empty lists: unanswerable, v2).
    """
    return _load(_spec_of(task, SQUAD_TASKS, "SQuAD"), data_dir, max_samples)


def load_task(task: str, data_dir: str | os.PathLike | None = None, max_samples: int | None = None):
    """`load_glue` or `load_squad`, whichever `task` belongs to."""
    spec = get_task(task)
    return _load(spec, data_dir, max_samples)


# ---------------------------------------------------------------- tokenisation


def tokenize_glue(dataset, tokenizer, task: str, max_length: int = 128):
    """Tokenise a GLUE `Dataset` or `DatasetDict` for a sequence classifier.

    Single sentences or pairs (in `TaskSpec.text_keys` order), truncated to `max_length` tokens
    (longest sequence first), not padded: batch with `transformers.DataCollatorWithPadding`. Returns
    input_ids, attention_mask and labels (int64 class ids, float32 for stsb); raw columns are dropped.
    """
    from datasets import Value

    spec = _spec_of(task, GLUE_TASKS, "GLUE")
    if not isinstance(max_length, (int, np.integer)) or max_length < 8:
        raise ValueError(f"max_length must be an int >= 8, got {max_length!r}.")
    some = next(iter(dataset.values())) if hasattr(dataset, "values") else dataset
    missing = [c for c in (*spec.text_keys, "label") if c not in some.column_names]
    if missing:
        raise ValueError(
            f"the dataset lacks the {task} column(s) {missing} (has {some.column_names}); load it with "
            f"loralib.data.load_glue({task!r}, ...)."
        )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(*[batch[k] for k in spec.text_keys], truncation=True, max_length=int(max_length))
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": batch["label"],
        }

    from loralib.logs import no_progress_bars

    # Seconds of tokenising: datasets' bars for it (and for the cast) are noise in a notebook or a log.
    with no_progress_bars():
        out = dataset.map(encode, batched=True, remove_columns=some.column_names, desc=f"tokenize {task}")
        return out.cast_column("labels", Value("float32" if spec.is_regression else "int64"))
