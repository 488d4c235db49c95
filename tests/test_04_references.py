"""loralib.benchmark.references: the article's and the LoRA paper's numbers, looked up by task, split and
metric, on the scale the metrics use, and the tables that set a run beside them."""

from __future__ import annotations

import pytest

from loralib.benchmark.references import ARTICLE, LORA_PAPER, format_table, references_for
from loralib.data import GLUE_TASKS


@pytest.mark.parametrize(
    "task, split, metric, article, paper",
    [
        ("cola", "validation", "matthews_correlation", 0.568, 0.634),
        ("sst2", "validation", "accuracy", 0.938, 0.951),
        ("mrpc", "validation", "f1", 0.917, None),
        ("stsb", "validation", "pearson", 0.808, 0.915),
        ("mnli", "validation_mismatched", "accuracy", 0.859, None),
        ("mnli", "validation_matched", "accuracy", 0.854, 0.875),
        ("squad", "validation", "exact_match", 79.4, None),
        ("squad_v2", "validation", "f1", 45.4, None),
    ],
)
def test_reference_lookup(task, split, metric, article, paper):
    assert references_for(task, split, metric) == {"article": article, "lora_paper": paper}


def test_references_cover_every_task_on_the_metrics_scale():
    assert set(ARTICLE) == {*GLUE_TASKS, "squad", "squad_v2"}
    assert set(LORA_PAPER) == set(GLUE_TASKS) - {"wnli"}
    for table in (ARTICLE, LORA_PAPER):
        for task, splits in table.items():
            for metrics in splits.values():
                for v in metrics.values():  # GLUE as fractions, SQuAD as percentages
                    assert (0 < v <= 1) if not task.startswith("squad") else (1 < v <= 100)


def test_format_table_labels_smoke_runs():
    row = dict(task="rte", split="validation", metric="accuracy", value=0.5, article=0.74, lora_paper=0.866)
    smoke = format_table([{**row, "smoke": True}])
    real = format_table([{**row, "smoke": False}])
    assert "SMOKE" in smoke and "NOT benchmark numbers" in smoke and "SMOKE" not in real
    assert "| rte | validation | accuracy | 0.500 | 0.740 | 0.866 |" in real
