"""loralib.metrics: GLUE metrics against hand-worked tables, SciPy and an independent confusion-matrix
implementation; SQuAD v1.1 / v2.0 scores against hand-worked cases of the official scripts' rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from loralib.metrics import (
    find_best_thresh,
    glue_metrics,
    normalize_answer,
    rankdata,
    squad_metrics,
)

# ---------------------------------------------------------------- GLUE: hand-worked

# preds / refs below: TP = 2 (rows 0, 4), FP = 1 (row 1), TN = 2 (rows 2, 3), FN = 1 (row 5).
P6, R6 = [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1]


@pytest.mark.parametrize(
    "task, preds, refs, expected",
    [
        # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3
        ("cola", P6, R6, {"matthews_correlation": 1 / 3}),
        ("cola", [0, 1, 0, 1], [0, 1, 0, 1], {"matthews_correlation": 1.0}),
        ("cola", [1, 0, 1, 0], [0, 1, 0, 1], {"matthews_correlation": -1.0}),
        # A constant prediction makes a denominator factor 0: scikit-learn (and evaluate) report 0.0.
        ("cola", [1, 1, 1, 1], [0, 1, 0, 1], {"matthews_correlation": 0.0}),
        ("cola", [0, 1, 1, 0], [1, 1, 1, 1], {"matthews_correlation": 0.0}),
        # accuracy 4/6; F1 = 2TP / (2TP + FP + FN) = 4 / 6
        ("mrpc", P6, R6, {"accuracy": 4 / 6, "f1": 4 / 6}),
        ("qqp", P6, R6, {"accuracy": 4 / 6, "f1": 4 / 6}),
        # No positive label and no positive prediction: F1 is 0/0, reported 0.0 (scikit-learn's default).
        ("qqp", [0, 0, 0], [0, 0, 0], {"accuracy": 1.0, "f1": 0.0}),
        ("sst2", P6, R6, {"accuracy": 4 / 6}),
        ("mnli", [0, 1, 2, 2], [0, 1, 1, 2], {"accuracy": 3 / 4}),
        ("wnli", [0], [1], {"accuracy": 0.0}),
        # x = 1,2,3 and y = 1,3,2: centred (-1,0,1) . (-1,1,0) = 1, norms sqrt(2) -> r = 1/2;
        # the values are their own ranks, so Spearman is also 1/2.
        ("stsb", [1.0, 2.0, 3.0], [1.0, 3.0, 2.0], {"pearson": 0.5, "spearmanr": 0.5}),
        # y = 2x: both correlations exactly 1.
        ("stsb", [0.5, 1.0, 4.0, 4.5], [1.0, 2.0, 8.0, 9.0], {"pearson": 1.0, "spearmanr": 1.0}),
        # Monotone but not linear: Spearman 1, Pearson below 1.
        ("stsb", [1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0], {"spearmanr": 1.0}),
    ],
)
def test_glue_metrics_hand_worked(task, preds, refs, expected):
    out = glue_metrics(task, preds, refs)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), (task, key)


@pytest.mark.parametrize(
    "task, keys",
    [
        ("cola", {"matthews_correlation"}),
        ("sst2", {"accuracy"}),
        ("mrpc", {"accuracy", "f1"}),
        ("stsb", {"pearson", "spearmanr"}),
        ("qqp", {"accuracy", "f1"}),
        ("mnli", {"accuracy"}),
        ("qnli", {"accuracy"}),
        ("rte", {"accuracy"}),
        ("wnli", {"accuracy"}),
    ],
)
def test_glue_metric_keys_are_evaluates(task, keys):
    preds = [0.5, 1.5, 2.5] if task == "stsb" else [0, 1, 1]
    out = glue_metrics(task, preds, [0.0, 2.0, 2.5] if task == "stsb" else [0, 1, 0])
    assert set(out) == keys
    assert all(isinstance(v, float) for v in out.values())


def test_monotone_stsb_pearson_is_below_one():
    # x = 1,2,3,10: mean 4, centred -3,-2,-1,6; y = 1,2,3,4: mean 2.5, centred -1.5,-.5,.5,1.5.
    # sum xy = 4.5+1-0.5+9 = 14; |x|^2 = 9+4+1+36 = 50; |y|^2 = 5 -> r = 14 / sqrt(250)
    out = glue_metrics("stsb", [1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0])
    assert out["pearson"] == pytest.approx(14 / math.sqrt(250), abs=1e-12)


def test_constant_stsb_predictions_give_nan_like_scipy():
    with pytest.warns(stats.ConstantInputWarning):
        ref = stats.pearsonr([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])[0]
    out = glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert math.isnan(ref) and math.isnan(out["pearson"]) and math.isnan(out["spearmanr"])


# ---------------------------------------------------------------- GLUE: independent references


def _mcc_binary(p, r):
    """MCC from the 2x2 confusion matrix, the textbook formula."""
    tp = np.sum((p == 1) & (r == 1))
    tn = np.sum((p == 0) & (r == 0))
    fp = np.sum((p == 1) & (r == 0))
    fn = np.sum((p == 0) & (r == 1))
    denom = math.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))
    return 0.0 if denom == 0 else float(tp * tn - fp * fn) / denom


def _mcc_onehot(p, r, k):
    """Multiclass MCC as the correlation of one-hot indicator matrices (Gorodkin 2004)."""
    x, y = np.eye(k)[r], np.eye(k)[p]
    x, y = x - x.mean(0), y - y.mean(0)
    denom = math.sqrt((x * x).sum() * (y * y).sum())
    return 0.0 if denom == 0 else float((x * y).sum() / denom)


def _f1_binary(p, r):
    tp = np.sum((p == 1) & (r == 1))
    precision = tp / max(np.sum(p == 1), 1)
    recall = tp / max(np.sum(r == 1), 1)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_confusion_matrix_formulas(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 200))
    r = rng.integers(0, 2, n)
    p = np.where(rng.random(n) < 0.7, r, 1 - r)  # mostly right, so MCC and F1 are far from 0
    assert glue_metrics("cola", p, r)["matthews_correlation"] == pytest.approx(_mcc_binary(p, r), abs=1e-12)
    out = glue_metrics("mrpc", p, r)
    assert out["f1"] == pytest.approx(_f1_binary(p, r), abs=1e-12)
    assert out["accuracy"] == pytest.approx(np.mean(p == r), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_mcc_matches_one_hot_correlation(seed):
    from loralib.metrics import matthews_corrcoef

    rng = np.random.default_rng(seed)
    r = rng.integers(0, 3, 60)
    p = np.where(rng.random(60) < 0.6, r, rng.integers(0, 3, 60))
    assert matthews_corrcoef(p, r) == pytest.approx(_mcc_onehot(p, r, 3), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_stsb_correlations_match_scipy(seed, ties):
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 5, 50)
    x = y + rng.normal(0, 1.5, 50)
    if ties:  # rounded scores, as the gold STS-B labels: many ties exercise the average ranks
        x, y = np.round(x), np.round(y * 2) / 2
    out = glue_metrics("stsb", x, y)
    assert out["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10)
    assert out["spearmanr"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10)


def test_rankdata_averages_ties_like_scipy():
    x = np.array([3.0, 1.0, 2.0, 2.0, 3.0, 3.0])
    # sorted: 1 -> rank 1; the two 2s share ranks 2,3 -> 2.5; the three 3s share 4,5,6 -> 5
    np.testing.assert_array_equal(rankdata(x), [5.0, 1.0, 2.5, 2.5, 5.0, 5.0])
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x))


@pytest.mark.parametrize(
    "task, preds, refs, match",
    [
        ("cola", [[0.1, 0.9], [0.8, 0.2]], [1, 0], "argmax"),  # logits instead of class ids
        ("sst2", [0.4, 1.0], [0, 1], "integer class ids"),
        ("sst2", [0, 1, 1], [0, 1], "pair up"),
        ("sst2", [], [], "empty"),
        ("sst3", [0], [0], "unknown GLUE task"),
    ],
)
def test_glue_metrics_reject_bad_input(task, preds, refs, match):
    with pytest.raises(ValueError, match=match):
        glue_metrics(task, preds, refs)


def test_glue_metrics_accept_column_vectors_and_integral_floats():
    # Trainer hands labels as (n, 1) arrays or float dtype: same numbers either way.
    assert glue_metrics("sst2", np.array([[1], [0]]), np.array([1.0, 1.0])) == {"accuracy": 0.5}


# ---------------------------------------------------------------- SQuAD


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a  b an  c ", "b c"),  # articles are whole words; whitespace collapses
        ("Theater", "theater"),  # "the" inside a word stays
        ("A. Lincoln", "lincoln"),  # punctuation goes first, so "a." becomes the article "a"
        ("an-apple", "anapple"),  # hyphen removed, joining the words (the official order)
        ("1,742", "1742"),
        ("", ""),
    ],
)
def test_normalize_answer_follows_the_official_order(raw, normalised):
    assert normalize_answer(raw) == normalised


def _row(qid, *answers):
    return {"id": qid, "answers": {"text": list(answers), "answer_start": [0] * len(answers)}}


def test_squad_v1_hand_worked():
    refs = [
        _row("q1", "the Eiffel Tower", "Eiffel Tower in Paris"),
        _row("q2", "1742"),
        _row("q3", "Mira Brisk"),
    ]
    preds = {
        # q1 EM 1 ("eiffel tower" == "eiffel tower"), F1 1
        "q1": "Eiffel Tower",
        # q2 EM 1 after normalisation ("in" is not an article: "in 1742" would not match), F1 1
        "q2": "1742.",
        # q3 "tower of paris" vs gold "mira brisk": no overlap -> EM 0, F1 0
        "q3": "tower of Paris",
    }
    out = squad_metrics(preds, refs)
    assert set(out) == {"exact_match", "f1"}
    assert out["exact_match"] == pytest.approx(200 / 3)
    assert out["f1"] == pytest.approx(200 / 3)


def test_squad_v1_f1_is_the_max_over_gold_answers():
    refs = [_row("q", "the Eiffel Tower", "Eiffel Tower in Paris")]
    # pred tokens: tower, of, paris.
    # gold 1 "eiffel tower": 1 common -> P 1/3, R 1/2, F1 = (2 * 1/6) / (5/6) = 0.4
    # gold 2 "eiffel tower in paris": 2 common -> P 2/3, R 2/4, F1 = (2 * 1/3) / (7/6) = 4/7
    out = squad_metrics({"q": "tower of Paris"}, refs)
    assert out == {"exact_match": 0.0, "f1": pytest.approx(100 * 4 / 7)}


def _v2_case():
    refs = [_row("q1", "1742"), _row("q2", "Mira Brisk"), _row("q3"), _row("q4")]
    preds = {"q1": "1742", "q2": "Brisk", "q3": "", "q4": "the harbour"}
    return refs, preds


def test_squad_v2_hand_worked():
    refs, preds = _v2_case()
    # exact: q1 1, q2 0, q3 1 ("" vs no answer), q4 0 -> 2/4
    # f1:    q1 1, q2 "brisk" vs "mira brisk": P 1, R 1/2 -> 2/3, q3 1, q4 0 -> (8/3)/4
    na = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.8}
    out = squad_metrics(preds, refs, version_2=True, no_answer_probs=na)
    assert list(out) == [
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
    ]
    assert out["exact"] == pytest.approx(50.0) and out["f1"] == pytest.approx(100 * (8 / 3) / 4)
    assert out["total"] == 4 and out["HasAns_total"] == 2 and out["NoAns_total"] == 2
    assert out["HasAns_exact"] == pytest.approx(50.0) and out["HasAns_f1"] == pytest.approx(100 * (5 / 3) / 2)
    assert out["NoAns_exact"] == pytest.approx(50.0) and out["NoAns_f1"] == pytest.approx(50.0)
    # find_best_thresh, exact: start with all "no answer" = 2 (q3, q4 right). Sweep by na prob:
    #   q1 (0.1) +1 -> 3 (best, thresh 0.1); q2 (0.6) +0 -> 3; q4 (0.8) -1 -> 2; q3 (0.9) +0 -> 2.
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == 0.1
    # f1: q1 +1 -> 3 (0.1); q2 +2/3 -> 11/3 (best, thresh 0.6); q4 -1; q3 0.
    assert out["best_f1"] == pytest.approx(100 * (11 / 3) / 4) and out["best_f1_thresh"] == 0.6


def test_squad_v2_no_answer_threshold_blanks_confident_no_answers():
    refs, preds = _v2_case()
    na = {"q1": 0.1, "q2": 0.6, "q3": 0.9, "q4": 0.8}
    # threshold 0.5: q2, q3, q4 count as "no answer": q2 (answerable) 0, q3 1, q4 1; q1 stays 1.
    out = squad_metrics(preds, refs, version_2=True, no_answer_probs=na, no_answer_threshold=0.5)
    assert out["exact"] == pytest.approx(75.0) and out["f1"] == pytest.approx(75.0)
    assert out["NoAns_exact"] == pytest.approx(100.0) and out["HasAns_f1"] == pytest.approx(50.0)
    # The best_* sweep uses the raw scores, so it does not depend on the threshold.
    assert out["best_f1"] == pytest.approx(100 * (11 / 3) / 4)


def test_squad_v2_default_probabilities_sweep_in_reference_order():
    # evaluate's default: every no-answer probability 0. All tie, so the official sweep visits the
    # questions in prediction order: q1 +1 -> 3 is the best (thresh 0.0) before q4's -1.
    refs, preds = _v2_case()
    out = squad_metrics(preds, refs, version_2=True)
    assert out["best_exact"] == pytest.approx(75.0) and out["best_exact_thresh"] == 0.0
    assert out["exact"] == pytest.approx(50.0)


def test_squad_v2_gold_that_normalises_to_nothing_means_no_answer():
    # Official v2 rule: gold answers that normalise to "" are dropped; none left -> the gold is "".
    refs = [_row("q", "The")]
    assert squad_metrics({"q": ""}, refs, version_2=True)["exact"] == 100.0
    assert squad_metrics({"q": "the"}, refs, version_2=True)["exact"] == 100.0  # normalises to ""
    assert squad_metrics({"q": "cat"}, refs, version_2=True)["f1"] == 0.0


def test_squad_v2_omits_empty_groups_like_the_official_script():
    out = squad_metrics({"q": "x"}, [_row("q", "x")], version_2=True)
    assert "HasAns_exact" in out and "NoAns_exact" not in out and out["exact"] == 100.0


def test_find_best_thresh_counts_from_all_no_answer():
    # Two unanswerable questions answered "" score 1 each before any threshold is crossed.
    best, thresh = find_best_thresh(
        {"a": "", "b": ""}, {"a": 1, "b": 1}, {"a": 0.3, "b": 0.7}, {"a": False, "b": False}
    )
    assert (best, thresh) == (100.0, 0.0)


@pytest.mark.parametrize(
    "preds, refs, kw, match",
    [
        ({}, [_row("q", "x")], {}, "no prediction"),
        ({"q": "x"}, [_row("q")], {}, "version_2=True"),
        ({"q": "x"}, [_row("q", "x"), _row("q", "y")], {}, "duplicate"),
        ({"q": "x"}, [], {}, "empty"),
        ({"q": "x"}, [{"answers": {"text": ["x"]}}], {}, "'id' and 'answers'"),
        ({"q": "x"}, [_row("q", "x")], {"version_2": True, "no_answer_probs": {}}, "no_answer_probs lacks"),
    ],
)
def test_squad_metrics_reject_bad_input(preds, refs, kw, match):
    with pytest.raises(ValueError, match=match):
        squad_metrics(preds, refs, **kw)


def test_squad_metrics_accept_a_datasets_split():
    from datasets import Dataset

    ds = Dataset.from_list([_row("q1", "red brick"), _row("q2", "oak")])
    out = squad_metrics({"q1": "Red brick.", "q2": "an oak"}, ds)
    assert out == {"exact_match": 100.0, "f1": 100.0}
