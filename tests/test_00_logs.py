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


def test_the_cli_with_no_progress_prints_no_bars_no_expected_report_and_no_bnb_notice(tmp_path):
    """In a fresh process (bitsandbytes' notice comes once, at import): what a reader of the CLI sees."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "loralib.benchmark",
        "--task",
        "rte",
        "--output-dir",
        str(tmp_path),
        "--no-progress",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = out.stdout + out.stderr
    for noise in ("it/s]", "examples/s]", "LOAD REPORT", "Failed to load CPU gemm_4bit_forward"):
        assert noise not in seen, f"{noise!r} reached the reader:\n{seen[-1500:]}"
    assert "| rte | validation | accuracy |" in out.stdout  # the results still are there


def test_no_progress_bars_restores_the_bars_after_the_block():
    import datasets
    from transformers.utils import logging as hf_logging

    from loralib.logs import no_progress_bars

    datasets.enable_progress_bars()
    hf_logging.enable_progress_bar()
    with no_progress_bars():
        assert not datasets.is_progress_bar_enabled() and not hf_logging.is_progress_bar_enabled()
    assert datasets.is_progress_bar_enabled() and hf_logging.is_progress_bar_enabled()
