"""loralib.qa: SQuAD sliding windows and answer post-processing, on the bundled data with the tiny
RoBERTa tokenizer. References: the answer text itself (offsets must cut it out exactly), Hugging Face's
run_qa.py labelling loop re-written here, and hand-built logits whose intended answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from loralib.data import load_squad
from loralib.metrics import squad_metrics
from loralib.qa import (
    CLS_INDEX,
    answer_token_span,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
)

WINDOWS = [(384, 128), (64, 16)]  # the defaults, and small windows that cut every context many times


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def squad():
    return {t: load_squad(t, data_dir="bundled") for t in ("squad", "squad_v2")}


def _batch(ds) -> dict[str, list]:
    return {k: list(ds[k]) for k in ds.column_names}


def _context_range(seq_ids: list) -> tuple[int, int]:
    ctx = [k for k, s in enumerate(seq_ids) if s == 1]
    return ctx[0], ctx[-1]


def _sequence_ids(tokenizer, question, context, max_length, stride):
    enc = tokenizer(
        [question.lstrip()],
        [context],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    return enc, [enc.sequence_ids(i) for i in range(len(enc["input_ids"]))]


# ---------------------------------------------------------------- windows


@pytest.mark.parametrize("max_length, stride", WINDOWS)
def test_windows_cover_the_context_with_stride_overlap(tokenizer, squad, max_length, stride):
    ds = squad["squad_v2"]["validation"]
    feats = prepare_eval_features(_batch(ds), tokenizer, max_length=max_length, stride=stride)
    by_example: dict[str, list[int]] = {}
    for f, qid in enumerate(feats["example_id"]):
        by_example.setdefault(qid, []).append(f)
    multi = 0
    for row in ds:
        windows = by_example[row["id"]]
        spans = [[tuple(o) for o in feats["offset_mapping"][f] if o is not None] for f in windows]
        assert all(len(feats["input_ids"][f]) <= max_length for f in windows)
        # Consecutive windows share exactly `stride` context tokens.
        for a, b in zip(spans, spans[1:]):
            assert a[-stride:] == b[:stride]
        # Together they cover every non-space character of the context.
        covered = np.zeros(len(row["context"]), bool)
        for span in spans:
            for s, e in span:
                covered[s:e] = True
        assert all(covered[i] or row["context"][i].isspace() for i in range(len(row["context"])))
        multi += len(windows) > 1
    assert multi >= 2  # the long contexts did need several windows


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
@pytest.mark.parametrize("max_length, stride", WINDOWS)
def test_train_labels_cut_out_exactly_the_gold_answer(tokenizer, squad, task, max_length, stride):
    ds = squad[task]["train"]
    batch = _batch(ds)
    feats = prepare_train_features(batch, tokenizer, max_length=max_length, stride=stride)
    assert set(feats) >= {"input_ids", "attention_mask", "start_positions", "end_positions"}
    assert "offset_mapping" not in feats and "overflow_to_sample_mapping" not in feats
    # Rebuild which example each window came from, independently, and check every window.
    f = 0
    inside_count = 0
    for row in ds:
        enc, seq_ids = _sequence_ids(tokenizer, row["question"], row["context"], max_length, stride)
        answers = row["answers"]
        has_answer_somewhere = False
        for w in range(len(seq_ids)):
            assert feats["input_ids"][f] == enc["input_ids"][w]
            s, e = feats["start_positions"][f], feats["end_positions"][f]
            offsets = enc["offset_mapping"][w]
            first, last = _context_range(seq_ids[w])
            if not answers["text"]:
                assert (s, e) == (CLS_INDEX, CLS_INDEX)
            else:
                a0, a1 = answers["answer_start"][0], answers["answer_start"][0] + len(answers["text"][0])
                inside = offsets[first][0] <= a0 and offsets[last][1] >= a1
                if inside:
                    assert first <= s <= e <= last
                    assert row["context"][offsets[s][0] : offsets[e][1]] == answers["text"][0]
                    has_answer_somewhere = True
                    inside_count += 1
                else:  # the answer is cut by, or outside, this window: "no answer here"
                    assert (s, e) == (CLS_INDEX, CLS_INDEX)
            f += 1
        if answers["text"]:
            assert has_answer_somewhere, row["id"]  # the stride overlap keeps every answer whole somewhere
    assert f == len(feats["input_ids"]) and inside_count > 0


def _hf_reference_labels(tokenizer, examples, max_length, stride):
    """Hugging Face's run_qa.py prepare_train_features loop, re-written as the reference."""
    enc = tokenizer(
        [q.lstrip() for q in examples["question"]],
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding="max_length",
    )
    starts, ends = [], []
    for i, offsets in enumerate(enc["offset_mapping"]):
        input_ids = enc["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id)
        sequence_ids = enc.sequence_ids(i)
        answers = examples["answers"][enc["overflow_to_sample_mapping"][i]]
        if len(answers["answer_start"]) == 0:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        token_start_index = 0
        while sequence_ids[token_start_index] != 1:
            token_start_index += 1
        token_end_index = len(input_ids) - 1
        while sequence_ids[token_end_index] != 1:
            token_end_index -= 1
        if not (offsets[token_start_index][0] <= start_char and offsets[token_end_index][1] >= end_char):
            starts.append(cls_index)
            ends.append(cls_index)
        else:
            while token_start_index < len(offsets) and offsets[token_start_index][0] <= start_char:
                token_start_index += 1
            starts.append(token_start_index - 1)
            while offsets[token_end_index][1] >= end_char:
                token_end_index -= 1
            ends.append(token_end_index + 1)
    return starts, ends


@pytest.mark.parametrize("max_length, stride", WINDOWS)
def test_train_labels_match_hugging_face_run_qa(tokenizer, squad, max_length, stride):
    batch = _batch(squad["squad_v2"]["train"])
    ours = prepare_train_features(batch, tokenizer, max_length=max_length, stride=stride)
    starts, ends = _hf_reference_labels(tokenizer, batch, max_length, stride)
    assert ours["start_positions"] == starts and ours["end_positions"] == ends


def test_answer_token_span_at_the_window_edges():
    # Hand-made window: <s> q </s></s> c0 c1 c2 </s>, context tokens at chars [0,3) [4,9) [10,15).
    offsets = [(0, 0), (0, 2), (0, 0), (0, 0), (0, 3), (4, 9), (10, 15), (0, 0)]
    seq = [None, 0, None, None, 1, 1, 1, None]
    assert answer_token_span(offsets, seq, 10, 15) == (6, 6)  # last context token (run_qa's loop overshoots)
    assert answer_token_span(offsets, seq, 0, 3) == (4, 4)
    assert answer_token_span(offsets, seq, 4, 15) == (5, 6)
    assert answer_token_span(offsets, seq, 5, 8) == (5, 5)  # inside one token: that token
    assert answer_token_span(offsets, seq, 12, 20) == (0, 0)  # runs past the window
    assert answer_token_span(offsets, seq, 10, 15)[0] != 7  # never the closing </s>


def test_eval_features_link_back_and_hide_non_context_offsets(tokenizer, squad):
    ds = squad["squad"]["validation"]
    batch = _batch(ds)
    train_like = prepare_train_features(batch, tokenizer)
    feats = prepare_eval_features(batch, tokenizer)
    assert feats["input_ids"] == train_like["input_ids"]
    assert set(feats["example_id"]) == set(batch["id"])
    for f, offsets in enumerate(feats["offset_mapping"]):
        assert offsets[0] is None and offsets[-1] is None  # <s> and the closing </s>
        nones = [o is None for o in offsets]
        # None exactly on the question and special tokens: a prefix <s> q </s></s> and the final </s>.
        k = nones.index(False)
        assert all(nones[:k]) and not any(nones[k:-1]) and nones[-1]
        assert len(offsets) == len(feats["input_ids"][f])


def test_features_map_over_a_dataset(tokenizer, squad):
    ds = squad["squad_v2"]["validation"]
    feats = ds.map(
        lambda b: prepare_eval_features(b, tokenizer, max_length=64, stride=16),
        batched=True,
        remove_columns=ds.column_names,
    )
    assert {"input_ids", "attention_mask", "example_id", "offset_mapping"} <= set(feats.column_names)
    assert len(feats) > len(ds)


@pytest.mark.parametrize(
    "max_length, stride, match",
    [
        (384, 384, "stride < max_length"),
        (8, 2, "max_length >= 16"),
        (24, 20, "longest question"),
        (40, 20, "longest question"),
    ],
)
def test_bad_window_sizes_are_explained(tokenizer, squad, max_length, stride, match):
    batch = _batch(squad["squad"]["train"].select(range(2)))
    with pytest.raises(ValueError, match=match):
        prepare_train_features(batch, tokenizer, max_length=max_length, stride=stride)


# ---------------------------------------------------------------- post-processing


def _toy(tokenizer, context: str, question: str = "Which one?", max_length=64, stride=16):
    examples = {"id": ["x"], "question": [question], "context": [context]}
    feats = prepare_eval_features(examples, tokenizer, max_length=max_length, stride=stride)
    n, width = len(feats["input_ids"]), max(len(x) for x in feats["input_ids"])
    return examples, feats, np.zeros((n, width)), np.zeros((n, width))


def _token_of(feats, f: int, char: int, end: bool = False) -> int:
    """The context token of window f that starts (or ends) at character `char` (not a zero-width "Ġ")."""
    for t, o in enumerate(feats["offset_mapping"][f]):
        if o is not None and o[0] < o[1] and (o[1] if end else o[0]) == char:
            return t
    raise AssertionError(f"no token {'ending' if end else 'starting'} at {char} in window {f}")


LONG = " ".join(f"Sentence {i} talks about item{i} only." for i in range(12))


def _windows_with(feats, *chars) -> list[int]:
    """Windows whose context has a token starting at each of `chars`."""
    return [
        f
        for f, offs in enumerate(feats["offset_mapping"])
        if all(any(o is not None and o[0] == c for o in offs) for c in chars)
    ]


def test_best_span_wins_across_windows(tokenizer):
    examples, feats, start, end = _toy(tokenizer, LONG)
    assert len(feats["input_ids"]) >= 3
    target = LONG.index("item10")
    only_end = LONG.index(" only.", target) + 5  # "only" ends here
    f_t = _windows_with(feats, target, only_end - 4)[-1]
    assert f_t > 0
    # A weaker span in the first window, the intended one ("item10 only") in a later one.
    decoy = LONG.index("item1 ")
    start[0, _token_of(feats, 0, decoy)] = 5.0
    end[0, _token_of(feats, 0, decoy + 5, end=True)] = 5.0
    start[f_t, _token_of(feats, f_t, target)] = 8.0
    end[f_t, _token_of(feats, f_t, only_end, end=True)] = 8.0
    preds, diffs = postprocess_qa_predictions(examples, feats, start, end)
    assert preds == {"x": "item10 only"}
    assert diffs["x"] == pytest.approx(0.0 - 16.0)  # null (all <s> logits 0) minus the best span


def test_v2_answers_nothing_when_the_null_score_wins(tokenizer):
    examples, feats, start, end = _toy(tokenizer, LONG)
    s = _token_of(feats, 0, LONG.index("item0"))
    e = _token_of(feats, 0, LONG.index("item0") + 5, end=True)
    start[0, s], end[0, e] = 3.0, 3.0  # best span "item0": score 6
    start[:, CLS_INDEX], end[:, CLS_INDEX] = 4.0, 4.0  # every window's null score is 8
    start[1, CLS_INDEX] = 3.5  # the null score is the minimum over windows: 7.5
    preds, diffs = postprocess_qa_predictions(examples, feats, start, end, version_2=True)
    assert preds == {"x": ""} and diffs["x"] == pytest.approx(7.5 - 6.0)
    # A threshold above the difference lets the span through; v1 never answers "".
    preds, _ = postprocess_qa_predictions(
        examples, feats, start, end, version_2=True, null_score_diff_threshold=2.0
    )
    assert preds == {"x": "item0"}
    assert postprocess_qa_predictions(examples, feats, start, end)[0] == {"x": "item0"}


def test_invalid_spans_are_skipped(tokenizer):
    examples, feats, start, end = _toy(tokenizer, LONG)
    offsets = feats["offset_mapping"][0]
    q_token = 1  # a question token: highest logits, but never part of an answer
    assert offsets[q_token] is None
    start[0, q_token] = end[0, q_token] = 100.0
    a = _token_of(feats, 0, LONG.index("Sentence 1 "))  # "S" of the second sentence (tiny BPE: S|ent|ence| 1)
    b = _token_of(feats, 0, LONG.index("item1 ") + 5, end=True)  # a later token
    c = a - 1  # a token before it
    assert b > a + 3 and offsets[c] is not None
    # Candidates (start + end): (b, c) = 18 but ends before it starts; (a, a+3) = 14 but is 4 tokens
    # long; (a, a+1) = 11 is the best valid span; every other valid pair scores at most 9.
    start[0, b], end[0, c] = 9.0, 9.0
    start[0, a], end[0, a + 3], end[0, a + 1] = 6.0, 8.0, 5.0
    preds, _ = postprocess_qa_predictions(examples, feats, start, end, max_answer_length=2)
    assert preds["x"] == LONG[offsets[a][0] : offsets[a + 1][1]] == "Sent"
    # Allowing 4 tokens lets the longer span win.
    preds, _ = postprocess_qa_predictions(examples, feats, start, end, max_answer_length=4)
    assert preds["x"] == LONG[offsets[a][0] : offsets[a + 3][1]] == "Sentence 1"


def test_padded_logits_beyond_a_window_are_ignored(tokenizer):
    examples, feats, start, end = _toy(tokenizer, LONG)
    s = _token_of(feats, 0, LONG.index("item2"))
    start[0, s] = end[0, _token_of(feats, 0, LONG.index("item2") + 5, end=True)] = 2.0
    pad = np.full((start.shape[0], 10), -100.0)
    pad[:, 5] = 1e6  # garbage where no token exists (the Trainer pads with -100; anything must be ignored)
    preds, _ = postprocess_qa_predictions(examples, feats, np.hstack([start, pad]), np.hstack([end, pad]))
    assert preds == {"x": "item2"}


def test_postprocess_rejects_mismatched_inputs(tokenizer):
    examples, feats, start, end = _toy(tokenizer, LONG)
    with pytest.raises(ValueError, match="rows of logits"):
        postprocess_qa_predictions(examples, feats, start[:1], end[:1])
    with pytest.raises(ValueError, match="not among the examples"):
        postprocess_qa_predictions({"id": ["y"], "context": [LONG]}, feats, start, end)


# ---------------------------------------------------------------- end to end


def _gold_logits(ds, feats):
    """Logits that put all the mass on each window's gold span (or on <s> where there is none)."""
    rows = {r["id"]: r for r in ds}
    width = max(len(x) for x in feats["input_ids"])
    start = np.full((len(feats["input_ids"]), width), -100.0)  # -100: the Trainer's padding value
    end = start.copy()
    for f, qid in enumerate(feats["example_id"]):
        n = len(feats["input_ids"][f])
        start[f, :n] = end[f, :n] = 0.0
        offsets = feats["offset_mapping"][f]
        a = rows[qid]["answers"]
        span = (CLS_INDEX, CLS_INDEX)
        if a["text"]:
            seq = [None if o is None else 1 for o in offsets]
            full = [(0, 0) if o is None else tuple(o) for o in offsets]
            span = answer_token_span(
                full, seq, a["answer_start"][0], a["answer_start"][0] + len(a["text"][0])
            )
        start[f, span[0]] = end[f, span[1]] = 10.0
    return start, end


@pytest.mark.parametrize("task", ["squad", "squad_v2"])
@pytest.mark.parametrize("max_length, stride", WINDOWS)
def test_gold_logits_round_trip_to_a_perfect_score(tokenizer, squad, task, max_length, stride):
    ds = squad[task]["validation"]
    feats = prepare_eval_features(_batch(ds), tokenizer, max_length=max_length, stride=stride)
    start, end = _gold_logits(ds, feats)
    v2 = task == "squad_v2"
    preds, diffs = postprocess_qa_predictions(ds, feats, start, end, version_2=v2)
    assert set(preds) == set(ds["id"])
    out = squad_metrics(preds, ds, version_2=v2, no_answer_probs=diffs if v2 else None)
    if v2:
        assert out["exact"] == out["f1"] == out["best_exact"] == out["best_f1"] == 100.0
        assert out["HasAns_total"] > 0 and out["NoAns_total"] > 0
        # Unanswerable questions: the null wins by a margin; answered ones: the span does.
        for row in ds:
            assert (diffs[row["id"]] > 0) == (not row["answers"]["text"])
    else:
        assert out == {"exact_match": 100.0, "f1": 100.0}


def test_predict_qa_scores_under_the_recorded_precision(tmp_path):
    """bf16 re-scoring on CPU (autocast) stays close to fp32; a bad precision is named."""
    import torch

    from loralib.benchmark import eval_rows, load_trained_model, run_task
    from loralib.qa import predict_qa

    run_task(
        "squad", "smoke", output_dir=tmp_path, epochs=1, warmup_epochs=0.5, max_eval_samples=8, progress=False
    )
    model, tok, res = load_trained_model(tmp_path / "squad", device="cpu")
    rows = eval_rows(res)
    _, s32, e32 = predict_qa(model, tok, rows, max_length=192, stride=64)
    _, s16, e16 = predict_qa(model, tok, rows, max_length=192, stride=64, precision="bf16")
    assert s16.shape == s32.shape and abs(s16 - s32).max() < 0.1 * abs(s32).max() + 0.1
    with pytest.raises(ValueError, match="precision must be"):
        predict_qa(model, tok, rows, precision="int8")
    assert not torch.is_autocast_enabled("cpu")  # no autocast left enabled


def _synthetic_questions(rng, n_questions=200, words=8):
    """Questions with one hand-made window each: <s> then one token per context word."""
    contexts = [" ".join(f"w{q}_{k}" for k in range(words)) for q in range(n_questions)]
    offsets = []
    for ctx in contexts:
        spans, pos = [None], 0
        for w in ctx.split(" "):
            spans.append((pos, pos + len(w)))
            pos += len(w) + 1
        offsets.append(spans)
    examples = {"id": [f"q{q}" for q in range(n_questions)], "context": contexts}
    features = {"example_id": examples["id"], "offset_mapping": offsets}
    # Coarse logits make near ties (and near-threshold null differences) common.
    start = np.round(rng.normal(size=(n_questions, words + 1)), 1)
    end = np.round(rng.normal(size=(n_questions, words + 1)), 1)
    return examples, features, start, end


@pytest.mark.parametrize("version_2", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_only_fragile_questions_change_answer_when_logits_move_by_delta(seed, version_2):
    from loralib.qa import fragile_questions

    rng = np.random.default_rng(seed)
    examples, feats, start, end = _synthetic_questions(rng)
    delta = 0.05
    fragile = set(fragile_questions(examples, feats, start, end, delta, version_2=version_2))
    before, _ = postprocess_qa_predictions(examples, feats, start, end, version_2=version_2)
    changed_anywhere = set()
    for _ in range(20):
        moved_s = start + rng.uniform(-delta, delta, start.shape)
        moved_e = end + rng.uniform(-delta, delta, end.shape)
        after, _ = postprocess_qa_predictions(examples, feats, moved_s, moved_e, version_2=version_2)
        changed = {q for q in before if before[q] != after[q]}
        assert changed <= fragile, sorted(changed - fragile)
        changed_anywhere |= changed
    assert changed_anywhere, "the test must move some answers, or it checks nothing"
    assert 0 < len(fragile) < len(before)


def test_no_logit_change_leaves_only_exact_ties_fragile():
    from loralib.qa import fragile_questions

    examples, feats, start, end = _synthetic_questions(np.random.default_rng(0))
    noise = np.random.default_rng(1).normal(scale=1e-3, size=(2, *start.shape))
    start, end = start + noise[0], end + noise[1]  # no exact ties left
    assert fragile_questions(examples, feats, start, end, 0.0, version_2=True) == []
    with pytest.raises(ValueError, match="delta must be a finite number >= 0"):
        fragile_questions(examples, feats, start, end, -1.0)
