"""loralib.sweeps: the cached small runs of notebook 07, on the tiny offline RoBERTa."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loralib.sweeps import RunSpec, Sweep, budget_rank


@pytest.fixture(scope="module")
def sweep(tiny_model_dir):
    return Sweep(tiny_model_dir, max_train=32, max_eval=24, device="cpu")


QUICK = RunSpec(r=2, epochs=1, batch_size=8, learning_rate=1e-3)


def test_budget_rank_by_hand():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4))  # 10 parameters per rank each
    assert budget_rank(model, ["0", "2"], 45) == (2, 40)  # 40 is nearer 45 than 60
    assert budget_rank(model, ["0", "2"], 55) == (3, 60)
    assert budget_rank(model, ["0"], 3) == (1, 10)  # at least rank 1
    with pytest.raises(ValueError, match="matched no"):
        budget_rank(model, ["nothing"], 10)


def test_a_run_trains_counts_and_is_cached(sweep):
    before = {k: v.clone() for k, v in sweep.base_model().state_dict().items()}
    res = sweep.run(QUICK)
    assert sweep.run(QUICK) is res  # cached
    assert len(res.train_losses) == 4 and 0 <= res.accuracy <= 1 and res.eval_loss > 0
    cfg = sweep.base_model().config
    assert res.lora_parameters == cfg.num_hidden_layers * 2 * 2 * (2 * cfg.hidden_size)  # q and v, r 2
    after = sweep.base_model().state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the pretrained copy is untouched
    name, up = next(iter(res.updates.items()))
    assert up["dW"].shape == up["W"].shape and torch.linalg.matrix_rank(up["dW"]) <= 2
    assert "query" in name or "value" in name


def test_the_rules_agree_at_rank_one_and_seeds_differ(sweep):
    plain = sweep.run(QUICK, r=1, lora_alpha=4)
    rs = sweep.run(QUICK, r=1, lora_alpha=4, use_rslora=True)
    assert plain.train_losses == rs.train_losses and plain.eval_loss == rs.eval_loss
    other = sweep.run(QUICK, r=1, lora_alpha=4, seed=1)
    assert other.train_losses != plain.train_losses


def test_regex_and_all_linear_targets(sweep):
    res = sweep.run(QUICK, target_modules="all-linear", r=1)
    assert res.row()["target_modules"] == "all-linear"
    assert any("intermediate" in n for n in res.updates) and not any("classifier" in n for n in res.updates)


def test_bad_settings_are_named(tiny_model_dir):
    with pytest.raises(ValueError, match="r"):
        RunSpec(r=0)
    with pytest.raises(ValueError, match="learning_rate"):
        RunSpec(learning_rate=-1.0)
    with pytest.raises(ValueError, match="classification"):
        Sweep(tiny_model_dir, task="stsb")


@pytest.mark.parametrize(
    "field, value",
    [("epochs", 0), ("epochs", -1), ("epochs", 1.5), ("batch_size", 0), ("batch_size", True), ("seed", -1),
     ("lora_alpha", 0), ("lora_alpha", float("nan")), ("learning_rate", float("inf")), ("loraplus_lr_ratio", 0),
     ("use_rslora", 1), ("r", 0)],
)  # fmt: skip
def test_a_run_spec_refuses_bad_values_naming_the_field(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        RunSpec(**{field: value})


def test_sweep_and_budget_refuse_bad_sizes(tiny_model_dir):
    for kw, name in (
        ({"max_train": 0}, "max_train"),
        ({"max_eval": -3}, "max_eval"),
        ({"max_length": 0}, "max_length"),
    ):
        with pytest.raises((ValueError, TypeError), match=name):
            Sweep(tiny_model_dir, **kw)
    model = nn.Sequential(nn.Linear(4, 6))
    for budget in (0, -5, 2.5):
        with pytest.raises((ValueError, TypeError), match="budget"):
            budget_rank(model, ["0"], budget)


def test_a_full_fine_tuning_run_records_its_whole_update(sweep):
    res = sweep.run(QUICK, full_finetune=True)
    base = dict(sweep.base_model().named_modules())
    cfg = sweep.base_model().config
    assert res.lora_parameters == 0 and res.trained_parameters == sum(
        p.numel() for p in sweep.base_model().parameters()
    )
    assert len(res.updates) == 2 * cfg.num_hidden_layers and all(
        n.endswith(("query", "value")) for n in res.updates
    )
    for name, up in res.updates.items():
        assert torch.equal(up["W"], base[name].weight.double())  # the pretrained weight, untouched
        assert up["dW"].abs().max() > 0 and up["dW"].dtype == torch.float64
    # One AdamW step moves every entry: the update has full rank, unlike LoRA's.
    assert torch.linalg.matrix_rank(next(iter(res.updates.values()))["dW"]) > QUICK.r
