"""Extractive question answering on SQuAD: sliding windows in, answer text out.

A context longer than the model's window is split into overlapping windows ("features"), each
`<s> question </s></s> context piece </s>`, consecutive pieces sharing `stride` tokens, so that no
answer is lost to truncation (the article truncated contexts instead). This follows Hugging Face's
`run_qa.py` example:

- `prepare_train_features`: windows plus the answer's start/end token in each window; a window that
  does not contain the whole answer, and every window of an unanswerable (v2) question, points at
  the `<s>` token (index 0), the "no answer" position.
- `prepare_eval_features`: windows plus `example_id` and `offset_mapping` (character spans of context
  tokens, None elsewhere) to map logits back to text.
- `postprocess_qa_predictions`: the best span over all windows of each question (n-best start x end
  logits, valid spans only) and, for v2, the "no answer" decision against the smallest null score.
- `fragile_questions`: the questions whose answer a logit change of at most delta could flip (how far
  two evaluations of one model under fp16/bf16 may differ).
- `squad_null_decision`: the same decision for one window of tokens, batched in torch (the article
  wrapper's inference).
- `predict_qa` (a model's logits on SQuAD rows) and `no_answer_sweep` (v2 scores as the no-answer
  threshold varies), for analysing a finished run.

Not here: the scores (`loralib.metrics.squad_metrics`), data loading (`loralib.data.load_squad`),
training (`loralib.benchmark`).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

CLS_INDEX = 0  # <s>: the "no answer" position of RoBERTa-style QA heads


def _check_window(tokenizer, max_length: int, stride: int) -> None:
    if getattr(tokenizer, "padding_side", "right") != "right":
        raise ValueError(
            "these windows put the question first and need a tokenizer with padding_side='right'."
        )
    if not (isinstance(max_length, (int, np.integer)) and isinstance(stride, (int, np.integer))):
        raise ValueError(f"max_length and stride must be ints, got {max_length!r}, {stride!r}.")
    if max_length < 16 or not 0 <= stride < max_length:
        raise ValueError(
            f"need max_length >= 16 and 0 <= stride < max_length (stride is the overlap between windows), "
            f"got max_length={max_length}, stride={stride}; e.g. 384 and 128."
        )


def _windows(examples: Mapping[str, Sequence], tokenizer, max_length: int, stride: int):
    _check_window(tokenizer, max_length, stride)
    missing = [c for c in ("question", "context") if c not in examples]
    if missing:
        raise ValueError(
            f"examples lack column(s) {missing}; pass a batch of SQuAD rows (datasets.map batched=True)."
        )
    # Some SQuAD questions start with many spaces: they would only waste window room.
    questions = [q.lstrip() for q in examples["question"]]
    # Check the room left for context up front: a stride that does not fit makes the Rust tokenizer
    # panic (an exception pytest and Dataset.map cannot catch cleanly).
    q_lengths = [len(ids) for ids in tokenizer(questions, add_special_tokens=False)["input_ids"]]
    room = int(max_length) - tokenizer.num_special_tokens_to_add(pair=True) - max(q_lengths, default=0)
    if room <= stride:
        raise ValueError(
            f"windows of {max_length} tokens leave {room} tokens of context next to the longest question "
            f"({max(q_lengths)} tokens), not more than the stride {stride}; raise max_length or lower stride "
            "(the longest question + special tokens + stride must be < max_length)."
        )
    return tokenizer(
        questions,
        list(examples["context"]),
        truncation="only_second",
        max_length=int(max_length),
        stride=int(stride),
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )


def _context_span(sequence_ids: Sequence[int | None]) -> tuple[int, int]:
    """First and last token index of the context (sequence id 1) in one window."""
    ctx = [i for i, s in enumerate(sequence_ids) if s == 1]
    return ctx[0], ctx[-1]


def answer_token_span(
    offsets: Sequence[Sequence[int]],
    sequence_ids: Sequence[int | None],
    start_char: int,
    end_char: int,
) -> tuple[int, int]:
    """(start, end) token indices of characters [start_char, end_char) in one window; (0, 0) if not inside.

    start is the last context token starting at or before start_char, end the first context token
    ending at or after end_char. The answer must lie wholly in the window's context.
    """
    first, last = _context_span(sequence_ids)
    if offsets[first][0] > start_char or offsets[last][1] < end_char:
        return CLS_INDEX, CLS_INDEX
    start = first
    while start + 1 <= last and offsets[start + 1][0] <= start_char:
        start += 1
    end = last
    while end - 1 >= start and offsets[end - 1][1] >= end_char:
        end -= 1
    return start, end


def prepare_train_features(
    examples: Mapping[str, Sequence], tokenizer, max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """Training windows of a batch of SQuAD rows (for `Dataset.map(batched=True)`, removing the raw columns).

    Returns the tokenizer's columns (input_ids, attention_mask, ...) plus start_positions and
    end_positions, one row per window. The first gold answer is the target (SQuAD train has one).
    """
    enc = _windows(examples, tokenizer, max_length, stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offset_mapping = enc.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offset_mapping):
        answers = examples["answers"][sample_map[i]]
        if len(answers["answer_start"]) == 0:
            starts.append(CLS_INDEX)
            ends.append(CLS_INDEX)
            continue
        start_char = int(answers["answer_start"][0])
        end_char = start_char + len(answers["text"][0])
        s, e = answer_token_span(offsets, enc.sequence_ids(i), start_char, end_char)
        starts.append(s)
        ends.append(e)
    out = {k: list(v) for k, v in enc.items()}
    out["start_positions"] = starts
    out["end_positions"] = ends
    return out


def prepare_eval_features(
    examples: Mapping[str, Sequence], tokenizer, max_length: int = 384, stride: int = 128
) -> dict[str, list]:
    """Evaluation windows of a batch of SQuAD rows (for `Dataset.map(batched=True)`).

    Returns the tokenizer's columns plus example_id (the row's id) and offset_mapping, where tokens
    outside the context (question, special tokens) are None so they can never be part of an answer.
    """
    if "id" not in examples:
        raise ValueError("examples lack the 'id' column that links windows back to questions.")
    enc = _windows(examples, tokenizer, max_length, stride)
    sample_map = enc.pop("overflow_to_sample_mapping")
    offset_mapping = enc.pop("offset_mapping")
    out = {k: list(v) for k, v in enc.items()}
    out["example_id"] = [examples["id"][j] for j in sample_map]
    out["offset_mapping"] = [
        [list(o) if s == 1 else None for o, s in zip(offsets, enc.sequence_ids(i))]
        for i, offsets in enumerate(offset_mapping)
    ]
    return out


def _column(rows: Any, name: str) -> list:
    if isinstance(rows, Mapping) or hasattr(rows, "column_names"):
        return list(rows[name])
    return [r[name] for r in rows]


def postprocess_qa_predictions(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    version_2: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> tuple[dict[str, str], dict[str, float]]:
    """Answer texts {id: text} and null-score differences {id: float} from per-window logits.

    examples: the SQuAD rows (id, context); features: their `prepare_eval_features` windows
    (example_id, offset_mapping); start/end_logits: (n_windows, seq_len), extra columns (padding)
    are ignored. For each question, the n_best_size best start and end tokens of every window form
    candidate spans (context tokens only, end >= start, at most max_answer_length tokens); the best
    score start + end wins, its text cut from the context by character offsets. The null score is the
    smallest start[0] + end[0] over the question's windows; the difference null - best span (larger:
    more likely unanswerable) is returned for every question and, with version_2, a question whose
    difference exceeds null_score_diff_threshold is answered "". A question with no valid span at all
    gets "" and difference +inf. The differences can be passed to `squad_metrics` as no_answer_probs
    (they are logit differences, not probabilities: best_*_thresh are then in logit units).
    """
    predictions: dict[str, str] = {}
    null_diffs: dict[str, float] = {}
    for qid, context, null_score, candidates in _scored_questions(
        examples, features, start_logits, end_logits, n_best_size, max_answer_length
    ):
        best = next(((sc, a, b) for sc, a, b in candidates[:n_best_size] if context[a:b]), None)
        if best is None:
            predictions[qid], null_diffs[qid] = "", float("inf")
            continue
        diff = null_score - best[0]
        null_diffs[qid] = diff
        answer = context[best[1] : best[2]]
        predictions[qid] = "" if version_2 and diff > null_score_diff_threshold else answer
    return predictions, null_diffs


def _scored_questions(examples, features, start_logits, end_logits, n_best_size, max_answer_length):
    """(question id, context, null score, candidate spans best first as (score, start_char, end_char))
    for every question, the rules of `postprocess_qa_predictions`."""
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    example_ids = [str(x) for x in _column(examples, "id")]
    contexts = _column(examples, "context")
    feature_ids = [str(x) for x in _column(features, "example_id")]
    offset_mappings = _column(features, "offset_mapping")
    if start_logits.shape != end_logits.shape or start_logits.ndim != 2:
        raise ValueError(
            f"start/end logits must both have shape (n_windows, seq_len), got {start_logits.shape} "
            f"and {end_logits.shape}."
        )
    if len(start_logits) != len(feature_ids):
        raise ValueError(
            f"{len(start_logits)} rows of logits for {len(feature_ids)} windows; pass the logits of exactly "
            "the features given, in the same order."
        )
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(
            f"n_best_size and max_answer_length must be >= 1, got {n_best_size}, {max_answer_length}."
        )
    index_of = {qid: i for i, qid in enumerate(example_ids)}
    windows_of: dict[int, list[int]] = defaultdict(list)
    for f, qid in enumerate(feature_ids):
        if qid not in index_of:
            raise ValueError(f"window {f} belongs to question {qid!r}, which is not among the examples.")
        windows_of[index_of[qid]].append(f)

    for e, qid in enumerate(example_ids):
        null_score = None
        candidates: list[tuple[float, int, int]] = []  # (score, start_char, end_char)
        for f in windows_of[e]:
            s_log, e_log, offsets = start_logits[f], end_logits[f], offset_mappings[f]
            feature_null = float(s_log[CLS_INDEX] + e_log[CLS_INDEX])
            if null_score is None or feature_null < null_score:
                null_score = feature_null
            n = min(len(offsets), s_log.shape[0])
            best_starts = np.argsort(s_log[:n])[::-1][:n_best_size]
            best_ends = np.argsort(e_log[:n])[::-1][:n_best_size]
            for si in best_starts:
                if offsets[si] is None:
                    continue
                for ei in best_ends:
                    if offsets[ei] is None or ei < si or ei - si + 1 > max_answer_length:
                        continue
                    candidates.append((float(s_log[si] + e_log[ei]), offsets[si][0], offsets[ei][1]))
        if null_score is None:
            raise ValueError(f"question {qid!r} has no window among the features.")
        candidates.sort(key=lambda c: c[0], reverse=True)
        yield qid, contexts[e], null_score, candidates


def fragile_questions(
    examples: Any,
    features: Any,
    start_logits: Any,
    end_logits: Any,
    delta: float,
    version_2: bool = False,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> list[str]:
    """Ids of the questions whose answer could change if every logit moved by at most `delta`.

    A span's score and the null score each add two logits, so each moves by at most 2 delta: the answer
    text can change only where the best span leads the best span with another text by at most 4 delta,
    and (v2) the "no answer" decision only where the null difference lies within 4 delta of the
    threshold. Every other question keeps its answer. So two evaluations whose logits differ by at most
    `delta` (e.g. the same model under fp16 autocast, batched differently) differ in at most
    len(result) answers: `exact` by at most 100 * len(result) / total. (A span just outside the n-best
    lists is not considered, as in `postprocess_qa_predictions`.)
    """
    if not np.isfinite(delta) or delta < 0:
        raise ValueError(f"delta must be a finite number >= 0, got {delta!r}.")
    fragile = []
    for qid, context, null_score, candidates in _scored_questions(
        examples, features, start_logits, end_logits, n_best_size, max_answer_length
    ):
        texts = [(sc, context[a:b]) for sc, a, b in candidates[:n_best_size] if context[a:b]]
        if not texts:
            continue  # no valid span at all: "" whatever the logits
        best_score, best_text = texts[0]
        rival = next((sc for sc, text in texts[1:] if text != best_text), None)
        close_rival = rival is not None and best_score - rival <= 4 * delta
        close_null = version_2 and abs(null_score - best_score - null_score_diff_threshold) <= 4 * delta
        if close_rival or close_null:
            fragile.append(qid)
    return fragile


def predict_qa(
    model: torch.nn.Module,
    tokenizer,
    examples,
    max_length: int = 384,
    stride: int = 128,
    batch_size: int = 32,
    precision: str = "fp32",
) -> tuple[Any, np.ndarray, np.ndarray]:
    """(windows, start_logits, end_logits) of a QA model on SQuAD rows, ready for
    `loralib.qa.postprocess_qa_predictions` (windows from `loralib.qa.prepare_eval_features`).

    Runs on the model's device; precision "bf16" / "fp16" runs under that autocast (as the Trainer's
    evaluation did for a run trained so: results.json records it), "fp32" without."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'fp16', got {precision!r}.")
    from loralib.logs import no_progress_bars

    with no_progress_bars():  # a bar for seconds of windowing is noise beside the prediction's
        feats = examples.map(
            lambda b: prepare_eval_features(b, tokenizer, max_length=max_length, stride=stride),
            batched=True,
            remove_columns=examples.column_names,
        )
    device = next(model.parameters()).device
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    starts, ends = [], []
    was_training = model.training
    model.eval()
    try:
        cast = torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()
        with torch.no_grad(), cast:
            for i in range(0, len(feats), batch_size):
                rows = feats[i : i + batch_size]
                batch = tokenizer.pad(
                    {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                    padding="max_length",
                    max_length=max_length,
                    return_tensors="pt",
                )
                out = model(**{k: v.to(device) for k, v in batch.items()})
                starts.append(out.start_logits.float().cpu().numpy())
                ends.append(out.end_logits.float().cpu().numpy())
    finally:
        model.train(was_training)
    return feats, np.concatenate(starts), np.concatenate(ends)


def no_answer_sweep(
    examples,
    features,
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    thresholds: Iterable[float],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> list[dict[str, Any]]:
    """SQuAD v2 scores as the no-answer threshold varies: one row per threshold with threshold,
    no_answer_rate (share of questions answered "") and the `squad_metrics` v2 keys.

    A question is answered "" when its null score minus its best span score exceeds the threshold:
    a low threshold abstains often (good on unanswerable questions), a high one never abstains.
    """
    from loralib.metrics import squad_metrics

    rows = []
    for t in thresholds:
        preds, diffs = postprocess_qa_predictions(
            examples,
            features,
            start_logits,
            end_logits,
            version_2=True,
            n_best_size=n_best_size,
            max_answer_length=max_answer_length,
            null_score_diff_threshold=float(t),
        )
        metrics = squad_metrics(
            preds, examples, version_2=True, no_answer_probs=diffs, no_answer_threshold=float(t)
        )
        rate = sum(p == "" for p in preds.values()) / len(preds)
        rows.append(
            {"threshold": float(t), "no_answer_rate": rate, **{k: float(v) for k, v in metrics.items()}}
        )
    return rows


def squad_null_decision(
    start_logits: torch.Tensor,
    end_logits: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, torch.Tensor]:
    """SQuAD v2 decision for one window per row: best span vs the null (<s>) span.

    start_logits, end_logits: (batch, seq). context_mask: (batch, seq) bool, True where an answer may
    lie (context tokens); None allows every position but 0. The best non-null span maximises
    start[i] + end[j] with i <= j < i + max_answer_length inside the context; the null score is
    start[0] + end[0]. Returns start, end (the span; (0, 0) where no answer is predicted), span_score,
    null_score, score_diff = null - span, and no_answer = score_diff > null_score_diff_threshold.
    """
    if start_logits.shape != end_logits.shape or start_logits.dim() != 2:
        raise ValueError(
            f"start/end logits must both be (batch, seq), got {tuple(start_logits.shape)} and "
            f"{tuple(end_logits.shape)}."
        )
    if max_answer_length < 1:
        raise ValueError(f"max_answer_length must be >= 1, got {max_answer_length}.")
    b, n = start_logits.shape
    start_logits, end_logits = start_logits.float(), end_logits.float()
    if context_mask is None:
        context_mask = torch.ones(b, n, dtype=torch.bool, device=start_logits.device)
        context_mask[:, 0] = False
    context_mask = context_mask.bool()
    i = torch.arange(n, device=start_logits.device)
    band = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_length)  # (start, end)
    allowed = band[None] & context_mask[:, :, None] & context_mask[:, None, :]
    scores = start_logits[:, :, None] + end_logits[:, None, :]
    scores = scores.masked_fill(~allowed, float("-inf"))
    span_score, flat = scores.view(b, -1).max(dim=1)
    start, end = flat // n, flat % n
    null_score = start_logits[:, 0] + end_logits[:, 0]
    score_diff = null_score - span_score  # +inf where the window has no valid span
    no_answer = score_diff > null_score_diff_threshold
    zero = torch.zeros_like(start)
    return {
        "start": torch.where(no_answer, zero, start),
        "end": torch.where(no_answer, zero, end),
        "span_score": span_score,
        "null_score": null_score,
        "score_diff": score_diff,
        "no_answer": no_answer,
    }
