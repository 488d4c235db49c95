"""`loralib.metrics` against Hugging Face `evaluate`, the library a user would reach for: the same keys and
the same values, for every GLUE task and both SQuAD versions.

`evaluate.load(...)` fetches each metric's script from the Hugging Face Hub, so these tests run only
where the hub is reachable (HF_HUB_OFFLINE unset) and are skipped otherwise, saying why. Offline, the
metrics are checked against explicit formulas, numpy and scipy in tests/test_04_metrics.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from loralib.data import GLUE_TASKS
from loralib.metrics import glue_metrics, squad_metrics

pytestmark = pytest.mark.numerical


def _load(*args):
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        pytest.skip(
            "HF_HUB_OFFLINE is set: evaluate.load fetches its metric scripts from the Hugging Face Hub"
        )
    evaluate = pytest.importorskip("evaluate")
    try:
        return evaluate.load(*args)
    except Exception as exc:  # no route to the hub: a network error of whatever kind the stack raises
        pytest.skip(f"evaluate.load{args} could not reach the Hugging Face Hub: {type(exc).__name__}: {exc}")


@pytest.mark.parametrize("task", GLUE_TASKS)
def test_glue_metrics_equal_evaluates(task):
    rng = np.random.default_rng(0)
    n = 200
    if task == "stsb":
        refs = rng.uniform(0, 5, n)
        preds = refs + rng.normal(0, 1, n)
    else:
        classes = 3 if task == "mnli" else 2
        refs = rng.integers(0, classes, n)
        preds = np.where(rng.random(n) < 0.7, refs, rng.integers(0, classes, n))
    theirs = _load("glue", task).compute(predictions=preds.tolist(), references=refs.tolist())
    ours = glue_metrics(task, preds, refs)
    assert set(ours) == set(theirs)
    # evaluate stores stsb's scores as float32 before correlating them; the rest are exact counts.
    tol = 64 * float(np.finfo(np.float32).eps) if task == "stsb" else 1e-12
    for key in theirs:
        assert ours[key] == pytest.approx(float(theirs[key]), abs=tol), key


def _squad_rows(version_2: bool):
    rows, preds, probs = [], {}, {}
    rng = np.random.default_rng(1)
    words = ["the", "red", "fox", "jumps", "over", "a", "lazy", "dog", "in", "Paris"]
    for i in range(60):
        answerable = not version_2 or i % 3
        gold = [" ".join(rng.choice(words, rng.integers(1, 4))) for _ in range(rng.integers(1, 3))]
        rows.append(
            {
                "id": f"q{i}",
                "answers": {
                    "text": gold if answerable else [],
                    "answer_start": [0] * (len(gold) if answerable else 0),
                },
            }
        )
        pick = rng.random()
        preds[f"q{i}"] = gold[0] if pick < 0.4 else ("" if pick < 0.55 else " ".join(rng.choice(words, 2)))
        probs[f"q{i}"] = float(rng.random())
    return rows, preds, probs


@pytest.mark.parametrize("version_2", [False, True])
def test_squad_metrics_equal_evaluates(version_2):
    rows, preds, probs = _squad_rows(version_2)
    metric = _load("squad_v2" if version_2 else "squad")
    predictions = [
        {"id": q, "prediction_text": p, **({"no_answer_probability": probs[q]} if version_2 else {})}
        for q, p in preds.items()
    ]
    references = [{"id": r["id"], "answers": r["answers"]} for r in rows]
    theirs = metric.compute(predictions=predictions, references=references)
    ours = squad_metrics(preds, rows, version_2=version_2, no_answer_probs=probs if version_2 else None)
    assert set(theirs) <= set(ours), set(theirs) - set(ours)
    for key in theirs:
        # a *_thresh is one of the no-answer probabilities, which evaluate stores as float32
        tol = float(np.finfo(np.float32).eps) if key.endswith("_thresh") else 1e-9
        assert ours[key] == pytest.approx(float(theirs[key]), abs=tol), key
