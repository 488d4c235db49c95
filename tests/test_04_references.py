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


@pytest.mark.parametrize("kind", ["smoke", "toy"])
def test_format_table_labels_smoke_and_toy_runs_and_sets_no_reference_beside_them(kind):
    row = dict(task="rte", split="validation", metric="accuracy", value=0.5, article=0.74, lora_paper=0.866)
    synthetic = format_table([{**row, "run_kind": kind}])
    real = format_table([{**row, "run_kind": "real"}])
    assert f"{kind.upper()} RUN" in synthetic and "NOT benchmark numbers" in synthetic
    assert "0.740" not in synthetic and "0.866" not in synthetic and "LoRA paper" not in synthetic
    assert "| rte | validation | accuracy | 0.500 |" in synthetic
    assert "RUN" not in real and "| rte | validation | accuracy | 0.500 | 0.740 | 0.866 |" in real
    assert "| rte | validation | accuracy | 0.500 | 0.740 | 0.866 |" in real


@pytest.mark.parametrize("kind", ["toy", "real"])
def test_the_reference_bars_are_drawn_only_beside_a_real_run(tmp_path, kind):
    import json

    import matplotlib

    matplotlib.use("Agg")
    from loralib.benchmark.references import plot_vs_references

    (tmp_path / "rte").mkdir()
    res = {
        "task": "rte", "run_kind": kind, "profile": "x", "main_metric": "accuracy",
        "metrics_by_split": {"validation": {"accuracy": 0.5}},
    }  # fmt: skip
    (tmp_path / "rte" / "results.json").write_text(json.dumps(res))
    fig = plot_vs_references(tmp_path)
    heights = sorted(round(p.get_height(), 3) for p in fig.axes[0].patches)
    assert heights == ([0.5] if kind == "toy" else [0.5, 0.74, 0.866])
    assert fig.axes[0].get_title().startswith("TOY RUN") is (kind == "toy")


def test_learning_curve_draws_every_evaluation_and_labels_the_epoch_ends():
    import matplotlib

    matplotlib.use("Agg")
    from loralib.benchmark.references import plot_learning_curve

    def point(epoch, acc):
        return {"epoch": epoch, "step": int(epoch * 4), "metrics": {"validation": {"accuracy": acc}}}

    evals = [point(0, 0.55), point(0.5, 0.5), point(1, 0.6), point(1.5, 0.8), point(2, 0.9)]
    res = {"task": "sst2", "profile": "toy", "run_kind": "toy", "benchmark": False, "main_metric": "accuracy",
           "metrics_by_split": {"validation": {"accuracy": 0.9}}, "epochs": [evals[2], evals[4]]}  # fmt: skip
    for results, xs in (({**res, "evaluations": evals}, [0, 0.5, 1, 1.5, 2]), (res, [1, 2])):
        fig = plot_learning_curve(results)
        line = fig.axes[0].lines[0]
        assert list(line.get_xdata()) == xs
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert labels == (["0.55", "0.6", "0.9"] if len(xs) == 5 else ["0.6", "0.9"])  # whole epochs only
        matplotlib.pyplot.close(fig)
