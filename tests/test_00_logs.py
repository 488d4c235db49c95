"""loralib.logs.quiet_loading: expected load reports disappear, reports that matter still print."""

from __future__ import annotations

import logging
import shutil

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

from loralib.logs import expected_report, quiet_loading
from loralib.tiny import tiny_roberta

HEADER = "\x1b[1mRobertaForSequenceClassification LOAD REPORT\x1b[0m from: x\nKey | Status | \n----+----+-\n"


@pytest.mark.parametrize(
    "rows, expected",
    [
        (["classifier.dense.weight | MISSING | ", "pooler.dense.bias | UNEXPECTED | "], True),
        (["qa_outputs.weight | MISSING | "], True),
        (["lm_head.decoder.bias | UNEXPECTED | "], True),
        (["roberta.encoder.layer.0.attention.self.query.weight | MISSING | "], False),
        (
            [
                "classifier.dense.weight | MISSING | ",
                "roberta.embeddings.word_embeddings.weight | MISSING | ",
            ],
            False,
        ),
        (["classifier.out_proj.weight | MISMATCH | "], False),
        (["pooler.dense.bias | MISSING | "], False),  # a missing pooler is not a new task head
        ([], False),
    ],
)
def test_expected_report(rows, expected):
    assert expected_report(HEADER + "\n".join(rows) + "\n\nNotes:\n- MISSING:\tnewly initialized") is expected


def test_other_messages_are_never_expected_reports():
    assert not expected_report("Some weights of the model checkpoint were not used")


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def collected():
    handler = _Collect()
    logger = logging.getLogger("transformers.modeling_utils")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


def test_quiet_loading_hides_the_expected_report_and_keeps_a_real_one(tmp_path, collected):
    quiet_loading()
    quiet_loading()  # idempotent: one filter
    assert (
        sum(
            type(f).__name__ == "_ExpectedReportFilter"
            for f in logging.getLogger("transformers.modeling_utils").filters
        )
        == 1
    )
    src = tiny_roberta()
    AutoModelForSequenceClassification.from_pretrained(src, num_labels=2)
    AutoModelForQuestionAnswering.from_pretrained(src)
    assert not [m for m in collected if "LOAD REPORT" in m]

    damaged = tmp_path / "damaged"
    shutil.copytree(src, damaged)
    weights = load_file(damaged / "model.safetensors")
    missing = next(k for k in weights if k.endswith("attention.self.query.weight"))
    del weights[missing]
    save_file(weights, damaged / "model.safetensors")
    AutoModelForSequenceClassification.from_pretrained(damaged, num_labels=2)
    reports = [m for m in collected if "LOAD REPORT" in m]
    assert len(reports) == 1 and "attention.self.query.weight" in reports[0]
