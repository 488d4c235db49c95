"""GLUE and SQuAD metrics, offline and dependency-free (NumPy and the standard library only).

`glue_metrics` returns the same keys and values as `evaluate.load("glue", task)` (which calls
scikit-learn and SciPy): accuracy, binary F1 (mrpc, qqp), Matthews correlation (cola), Pearson and
Spearman correlation (stsb), all as fractions in [-1, 1] / [0, 1]. `squad_metrics` ports the official
SQuAD v1.1 and v2.0 evaluation scripts (answer normalisation, exact match, token F1 with the max over
the gold answers, the no-answer threshold and `find_best_thresh`), with scores in percent (0-100),
as `evaluate.load("squad")` / `evaluate.load("squad_v2")` return them.

Degenerate inputs follow the reference implementations: MCC is 0.0 when predictions or labels are
constant (scikit-learn), F1 is 0.0 when there is no positive label or prediction at all (scikit-learn's
zero_division default), and Pearson/Spearman are NaN for a constant input (SciPy).

Not here: turning logits into answers (`loralib.qa`), data loading (`loralib.data`).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_ACCURACY = ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
_ACC_F1 = ("mrpc", "qqp")
GLUE_METRIC_TASKS = ("cola", "stsb", *_ACC_F1, *_ACCURACY)


# ---------------------------------------------------------------- GLUE


def _as_1d(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(
            f"{name} must be one value per example (shape (n,)), got shape {a.shape}; "
            "for logits pass logits.argmax(-1) (classification) or logits[:, 0] (stsb)."
        )
    return a


def _class_ids(x: np.ndarray, name: str) -> np.ndarray:
    if x.dtype.kind in "iub":
        return x.astype(np.int64)
    if x.dtype.kind == "f" and np.all(np.isfinite(x)) and np.all(x == np.round(x)):
        return x.astype(np.int64)
    raise ValueError(f"{name} must be integer class ids, got dtype {x.dtype}; pass logits.argmax(-1).")


def accuracy(predictions: Any, references: Any) -> float:
    """Fraction of exact matches."""
    p, r = np.asarray(predictions), np.asarray(references)
    return float((p == r).mean())


def confusion_matrix(predictions: Any, references: Any, num_classes: int | None = None) -> np.ndarray:
    """C[true, predicted] counts (rows: references, columns: predictions)."""
    p, r = np.asarray(predictions, dtype=np.int64), np.asarray(references, dtype=np.int64)
    k = int(max(p.max(initial=0), r.max(initial=0)) + 1) if num_classes is None else num_classes
    c = np.zeros((k, k), dtype=np.int64)
    np.add.at(c, (r, p), 1)
    return c


def matthews_corrcoef(predictions: Any, references: Any) -> float:
    """Matthews correlation (multiclass form, as scikit-learn); 0.0 when either side is constant."""
    c = confusion_matrix(predictions, references).astype(np.float64)
    t_sum, p_sum = c.sum(axis=1), c.sum(axis=0)
    n_correct, n = np.trace(c), c.sum()
    cov_ytyp = n_correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    # scikit-learn's convention: undefined (a constant side) counts as "no correlation".
    if cov_ypyp * cov_ytyt == 0:
        return 0.0
    return float(cov_ytyp / np.sqrt(cov_ytyt * cov_ypyp))


def binary_f1(predictions: Any, references: Any, positive: int = 1) -> float:
    """F1 of the positive class, 2TP / (2TP + FP + FN); 0.0 when there are no positives at all."""
    p, r = np.asarray(predictions) == positive, np.asarray(references) == positive
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def pearson(x: Any, y: Any) -> float:
    """Pearson correlation; NaN when either input is constant (as SciPy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xm, ym = x - x.mean(), y - y.mean()
    nx, ny = np.linalg.norm(xm), np.linalg.norm(ym)
    # A constant input has zero spread up to rounding; SciPy tests the same way (against the mean).
    if nx == 0 or ny == 0 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.clip((xm / nx) @ (ym / ny), -1.0, 1.0))


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (SciPy's rankdata(method="average"))."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    inv = np.empty(len(x), dtype=np.int64)
    inv[order] = np.arange(len(x))
    xs = x[order]
    new_value = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.cumsum(new_value)[inv]  # 1-based id of each value's tie group
    bounds = np.r_[np.nonzero(new_value)[0], len(new_value)]
    return 0.5 * (bounds[dense] + bounds[dense - 1] + 1)


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson of the average ranks; NaN for a constant input."""
    return pearson(rankdata(x), rankdata(y))


def glue_metrics(task: str, predictions: Any, references: Any) -> dict[str, float]:
    """The metrics `evaluate.load("glue", task)` computes, with its key names.

    predictions: class ids (stsb: floats), references: labels, both shape (n,).
    cola -> matthews_correlation; sst2, mnli, qnli, rte, wnli -> accuracy; mrpc, qqp -> accuracy, f1
    (positive class 1); stsb -> pearson, spearmanr.
    """
    if task not in GLUE_METRIC_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; valid: {', '.join(GLUE_METRIC_TASKS)}.")
    p, r = _as_1d(predictions, "predictions"), _as_1d(references, "references")
    if len(p) != len(r):
        raise ValueError(f"{len(p)} predictions but {len(r)} references; they must pair up one to one.")
    if len(p) == 0:
        raise ValueError("no predictions: metrics of an empty evaluation set are undefined.")
    if task == "stsb":
        return {"pearson": pearson(p, r), "spearmanr": spearman(p, r)}
    p, r = _class_ids(p, "predictions"), _class_ids(r, "references")
    if task == "cola":
        return {"matthews_correlation": matthews_corrcoef(p, r)}
    if task in _ACC_F1:
        return {"accuracy": accuracy(p, r), "f1": binary_f1(p, r)}
    return {"accuracy": accuracy(p, r)}


# ---------------------------------------------------------------- SQuAD (official scripts)

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower case, drop punctuation, drop the articles a/an/the, collapse whitespace (official)."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def exact_score(prediction: str, gold: str) -> int:
    """1 if the normalised strings are equal."""
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score_v1(prediction: str, gold: str) -> float:
    """Token F1 of SQuAD v1.1's script (0 when nothing overlaps, also for two empty strings)."""
    pred, ref = _tokens(prediction), _tokens(gold)
    num_same = sum((Counter(pred) & Counter(ref)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(ref)
    return 2 * precision * recall / (precision + recall)


def f1_score_v2(prediction: str, gold: str) -> float:
    """Token F1 of SQuAD v2.0's script: an empty side scores 1 only if both are empty."""
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    num_same = sum((Counter(pred) & Counter(ref)).values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(ref)
    return 2 * precision * recall / (precision + recall)


def _gold(row: Mapping[str, Any]) -> tuple[str, list[str]]:
    try:
        qid, answers = row["id"], row["answers"]
    except (KeyError, TypeError):
        raise ValueError(
            f"each reference must be a dataset row with 'id' and 'answers', got {row!r}."
        ) from None
    texts = answers["text"] if isinstance(answers, Mapping) else [a["text"] for a in answers]
    return str(qid), list(texts)


def find_best_thresh(
    preds: Mapping[str, str],
    scores: Mapping[str, float],
    na_probs: Mapping[str, float],
    qid_to_has_ans: Mapping[str, bool],
) -> tuple[float, float]:
    """Official v2.0 sweep: the no-answer threshold that maximises the total score, and that score (%).

    Start with every question answered "no answer" (each unanswerable one scores 1), then lower the
    bar question by question in order of increasing no-answer probability.
    """
    num_no_ans = sum(1 for k in qid_to_has_ans if not qid_to_has_ans[k])
    cur_score = best_score = num_no_ans
    best_thresh = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if qid_to_has_ans[qid]:
            diff = scores[qid]
        else:
            diff = -1 if preds[qid] else 0
        cur_score += diff
        if cur_score > best_score:
            best_score, best_thresh = cur_score, na_probs[qid]
    return 100.0 * best_score / len(scores), best_thresh


def _mean_pct(scores: Mapping[str, float], qids: Sequence[str]) -> float:
    return 100.0 * sum(scores[q] for q in qids) / len(qids)


def squad_metrics(
    predictions: Mapping[str, str],
    references: Sequence[Mapping[str, Any]],
    version_2: bool = False,
    no_answer_probs: Mapping[str, float] | None = None,
    no_answer_threshold: float = 1.0,
) -> dict[str, float]:
    """SQuAD scores (0-100) of `predictions` {id: answer text} against dataset rows with id and answers.

    v1.1: {"exact_match", "f1"}, each the mean over questions of the max over gold answers.
    v2.0: the official script's keys: exact, f1, total, HasAns_* and NoAns_* (present only when the
    references contain such questions, as in the script), best_exact(_thresh), best_f1(_thresh). An
    unanswerable question's only gold answer is "". no_answer_probs {id: p} (default 0 for all): a
    question with p > no_answer_threshold counts as answered "" in exact/f1; best_* sweep the threshold.
    Every reference id needs a prediction (a clear error otherwise; extra predictions are ignored).
    """
    if isinstance(references, Mapping):
        raise ValueError("references must be a list of rows (e.g. a datasets split), not one dict.")
    gold = [_gold(row) for row in references]
    if not gold:
        raise ValueError("no references: SQuAD scores of an empty set are undefined.")
    counts = Counter(qid for qid, _ in gold)
    if len(counts) != len(gold):
        raise ValueError(
            f"duplicate question ids in references: {[q for q, c in counts.items() if c > 1][:3]}."
        )
    missing = [qid for qid, _ in gold if qid not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(gold)} questions have no prediction (e.g. {missing[:3]}); "
            'predict an answer ("" for no answer) for every reference id.'
        )
    if not version_2:
        return _squad_v1(predictions, gold)
    return _squad_v2(predictions, gold, no_answer_probs, no_answer_threshold)


def _squad_v1(predictions: Mapping[str, str], gold: list[tuple[str, list[str]]]) -> dict[str, float]:
    """The official v1.1 script: mean over questions of the best exact match and F1 over gold answers."""
    em = f1 = 0.0
    for qid, texts in gold:
        if not texts:
            raise ValueError(
                f"question {qid!r} has no gold answer; SQuAD v1.1 questions are all answerable "
                "(use version_2=True for v2.0 data)."
            )
        pred = predictions[qid]
        em += max(exact_score(pred, t) for t in texts)
        f1 += max(f1_score_v1(pred, t) for t in texts)
    return {"exact_match": 100.0 * em / len(gold), "f1": 100.0 * f1 / len(gold)}


def _squad_v2(
    predictions: Mapping[str, str],
    gold: list[tuple[str, list[str]]],
    no_answer_probs: Mapping[str, float] | None,
    no_answer_threshold: float,
) -> dict[str, float]:
    """The official v2.0 script: exact / f1 with the no-answer threshold, HasAns / NoAns, best_*."""
    na_probs = {qid: 0.0 for qid in predictions} if no_answer_probs is None else dict(no_answer_probs)
    absent = [qid for qid, _ in gold if qid not in na_probs]
    if absent:
        raise ValueError(f"no_answer_probs lacks {len(absent)} question id(s), e.g. {absent[:3]}.")
    qid_to_has_ans: dict[str, bool] = {}
    exact_raw: dict[str, float] = {}
    f1_raw: dict[str, float] = {}
    for qid, texts in gold:
        qid_to_has_ans[qid] = bool(texts)
        # Gold answers that normalise to nothing do not count; none left means "no answer".
        answers = [t for t in texts if normalize_answer(t)] or [""]
        pred = predictions[qid]
        exact_raw[qid] = max(exact_score(pred, a) for a in answers)
        f1_raw[qid] = max(f1_score_v2(pred, a) for a in answers)

    def thresholded(scores: dict[str, float]) -> dict[str, float]:
        return {
            q: float(not qid_to_has_ans[q]) if na_probs[q] > no_answer_threshold else s
            for q, s in scores.items()
        }

    exact_t, f1_t = thresholded(exact_raw), thresholded(f1_raw)
    qids = list(exact_t)
    out: dict[str, float] = {
        "exact": _mean_pct(exact_t, qids),
        "f1": _mean_pct(f1_t, qids),
        "total": len(qids),
    }
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        subset = [q for q in qids if qid_to_has_ans[q] is wanted]
        if subset:
            out[f"{prefix}_exact"] = _mean_pct(exact_t, subset)
            out[f"{prefix}_f1"] = _mean_pct(f1_t, subset)
            out[f"{prefix}_total"] = len(subset)
    out["best_exact"], out["best_exact_thresh"] = find_best_thresh(
        predictions, exact_raw, na_probs, qid_to_has_ans
    )
    out["best_f1"], out["best_f1_thresh"] = find_best_thresh(predictions, f1_raw, na_probs, qid_to_has_ans)
    return out
