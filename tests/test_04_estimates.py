"""loralib.benchmark.estimates: steps, parameter counts, FLOPs and memory against independent references
(hand arithmetic, a real model's parameters, torch's FLOP counter, the CPU allocator's peak)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import RobertaConfig, RobertaForSequenceClassification

import loralib
from loralib.benchmark import estimates
from loralib.benchmark.config import COLAB_TASKS, RECIPE_LORA, TrainConfig, make_config, resolve_tasks
from loralib.measure.memory import peak_memory

SMALL = dict(
    vocab_size=300,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=256,
    max_position_embeddings=160,
)


def small_lora_model(targets=("query", "value"), r=4, seed=0):
    torch.manual_seed(seed)
    cfg = RobertaConfig(**SMALL, attn_implementation="eager", num_labels=2)
    model = RobertaForSequenceClassification(cfg)
    loralib.inject_lora(model, list(targets), r=r, lora_alpha=r)
    loralib.mark_only_lora_as_trainable(
        model, bias="all", train_layer_norms=True, modules_to_save=["classifier"]
    )
    return cfg, model


@pytest.mark.parametrize(
    "task, steps",
    [
        ("sst2", math.ceil(67_349 / 16) * 6),  # 4,210 steps an epoch
        ("mnli", math.ceil(392_702 / 16) * 6),
        ("rte", math.ceil(2_490 / 16) * 6),
        ("squad", math.ceil(87_599 * 88_729 / 87_599 / 16) * 6),  # windows, not questions
    ],
)
def test_steps_follow_split_sizes_and_the_recipe(task, steps):
    assert estimates.estimate_task(task, "t4").train_steps == steps


def test_steps_follow_the_profile_subset_and_epochs():
    # cpu profile: 2,000 rows, 3 epochs; colab profile: SQuAD for 2 epochs.
    assert estimates.estimate_task("sst2", "t4", "cpu").train_steps == 125 * 3
    assert estimates.estimate_task("squad", "t4", "colab").train_steps == math.ceil(88_729 / 16) * 2


def test_model_shape_counts_what_a_real_lora_model_has():
    cfg, model = small_lora_model(r=4)
    shape = estimates.model_shape(cfg, TrainConfig(lora=dataclasses.replace(RECIPE_LORA, r=4)))
    real = loralib.count_parameters(model)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    linear_weights = (
        sum(
            p.numel()
            for n, p in model.named_parameters()
            if n.endswith(".weight") and p.ndim == 2 and "lora_" not in n
        )
        - model.roberta.embeddings.word_embeddings.weight.numel()
        - model.roberta.embeddings.position_embeddings.weight.numel()
        - model.roberta.embeddings.token_type_embeddings.weight.numel()
    )
    assert shape.lora_params == lora
    assert shape.trained_params == real.trainable
    assert shape.total_params == real.total - lora
    assert shape.linear_params == linear_weights


def test_roberta_base_counts_match_the_readme():
    shape = estimates.model_shape()
    assert shape.lora_params == 294_912  # r 8 on query and value, 12 layers
    assert shape.layers == 12 and shape.hidden == 768


@pytest.mark.parametrize("seq_len", [16, 64, 128])
def test_forward_flops_match_torch_flop_counter(seq_len):
    cfg, model = small_lora_model()
    shape = estimates.model_shape(cfg, TrainConfig(lora=dataclasses.replace(RECIPE_LORA, r=4)))
    batch = 3
    ids = torch.randint(5, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids)
    # The counter also sees LoRA's small matmuls (r x d per token) and the classifier on one token only.
    per_token = counter.get_total_flops() / (batch * seq_len)
    assert per_token == pytest.approx(estimates.forward_flops_per_token(shape, seq_len), rel=0.05)


def test_a_lora_training_step_costs_twice_the_forward():
    cfg, model = small_lora_model()
    ids = torch.randint(5, cfg.vocab_size, (4, 64))
    with FlopCounterMode(display=False) as fwd:
        model(input_ids=ids)
    with FlopCounterMode(display=False) as step:
        model(input_ids=ids).logits.sum().backward()
    assert step.get_total_flops() / fwd.get_total_flops() == pytest.approx(2.0, rel=0.1)


@pytest.mark.parametrize("batch, seq_len", [(4, 64), (8, 128)])
def test_activation_term_matches_the_measured_cpu_peak(batch, seq_len):
    cfg, model = small_lora_model()
    shape = estimates.model_shape(cfg, TrainConfig(lora=dataclasses.replace(RECIPE_LORA, r=4)))
    ids = torch.randint(5, cfg.vocab_size, (batch, seq_len))
    labels = torch.randint(0, 2, (batch,))

    def step():
        model(input_ids=ids, labels=labels).loss.backward()
        for p in model.parameters():
            p.grad = None

    step()
    measured = peak_memory(step)
    predicted = estimates.activation_bytes(shape, batch, seq_len, bytes_per_value=4)
    assert 0.7 <= measured / predicted <= 1.3


def test_memory_parts_add_up_and_half_precision_halves_activations():
    shape = estimates.model_shape()
    fp32 = estimates.training_memory(shape, 16, 128, "fp32", cuda=False)
    bf16 = estimates.training_memory(shape, 16, 128, "bf16")
    assert fp32["total"] == pytest.approx(sum(v for k, v in fp32.items() if k != "total"))
    assert bf16["activations"] == pytest.approx(fp32["activations"] / 2)
    assert fp32["weights"] == 4 * shape.total_params and fp32["cuda_context"] == 0


def test_mean_padded_length_by_hand():
    assert estimates.mean_padded_length([1, 2, 3, 4], batch_size=4) == 4.0
    assert estimates.mean_padded_length([1, 2, 3, 4], batch_size=1) == 2.5
    # Two rows per batch: always between the mean and the maximum.
    assert 2.5 < estimates.mean_padded_length([1, 2, 3, 4], batch_size=2) < 4.0
    with pytest.raises(ValueError, match="lengths"):
        estimates.mean_padded_length([], 16)


def test_shorter_padding_means_less_time_but_the_same_steps():
    full = estimates.estimate_task("sst2", "t4")
    short = estimates.estimate_task("sst2", "t4", mean_padded_length=32)
    assert short.train_steps == full.train_steps and short.train_hours < full.train_hours / 2


def test_the_colab_selection_fits_a_free_session():
    assert resolve_tasks("colab") == list(COLAB_TASKS)
    assert make_config("squad", "colab").epochs == 2 and make_config("sst2", "colab").epochs == 6
    rows = estimates.estimate_tasks("colab", "t4", "colab")
    assert all(e.fits for e in rows)
    # Under 1.5 h at the assumed throughput: under 3 h if a T4 sustains only half of it.
    assert sum(e.hours for e in rows) < 1.5
    assert sum(e.hours for e in estimates.estimate_tasks("glue", "t4")) > 3  # the full recipe does not


def test_faster_devices_take_less_time():
    t4, a100 = (estimates.estimate_task("mnli", d) for d in ("t4", "a100"))
    assert a100.train_steps == t4.train_steps and a100.hours < t4.hours


def test_unknown_device_names_the_choices():
    with pytest.raises(ValueError, match="unknown device 'h100'.*t4"):
        estimates.estimate_task("sst2", "h100")


def test_measure_throughput_changes_nothing():
    cfg, model = small_lora_model()
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    model.eval()
    rng = torch.get_rng_state()
    thr = estimates.measure_throughput(model, batch_size=2, seq_len=16, steps=2)
    assert thr.measured and thr.flops_per_s > 0 and thr.precision == "fp32"
    assert torch.equal(torch.get_rng_state(), rng) and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    est = estimates.estimate_task("sst2", thr, "smoke", config=cfg, rows=(64, [48]))
    assert est.measured_throughput and est.train_steps == 4 * 2


def test_table_and_command_line(capsys):
    rows = estimates.estimate_tasks(["rte", "mrpc"], "t4")
    table = estimates.estimate_table(rows)
    assert "| rte | T4" in table and "**all 2**" in table and "assumed" in table
    estimates.main(["--task", "rte", "--device", "a100"])
    out = capsys.readouterr().out
    assert "| rte | A100" in out and "assumed: 35% of 312 TFLOPS" in out


def test_measure_throughput_needs_something_to_train():
    _, model = small_lora_model()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        estimates.measure_throughput(model, batch_size=2, seq_len=8, steps=1)


def test_plan_session_keeps_the_tasks_that_fit_with_the_margin():
    plan = estimates.plan_session("glue", "t4", "colab")
    each = {e.task: e.hours for e in estimates.estimate_tasks("glue", "t4", "colab")}
    # The reference: a greedy pass in task order over the same estimates, by hand.
    used, chosen = 0.0, []
    for task, hours in each.items():
        if used + 2.0 * hours <= 3.0:
            chosen.append(task)
            used += 2.0 * hours
    assert plan.tasks == chosen and [e.task for e in plan.left] == [t for t in each if t not in chosen]
    assert plan.margin * plan.estimated_hours <= plan.hours == estimates.FREE_SESSION_HOURS
    assert {"qqp", "mnli"} <= {e.task for e in plan.left}  # the two big tasks never fit one free session
    assert "sst2" in plan.tasks and "left for another session: qqp" in plan.describe().lower()
    assert estimates.plan_session("colab", "t4", "colab").left == []  # --task colab fits, as documented


def test_plan_session_checks_its_budget():
    assert estimates.plan_session(["rte"], hours=1e-6).tasks == []
    with pytest.raises(ValueError, match="hours must be a positive number"):
        estimates.plan_session("glue", hours=0)
    with pytest.raises(ValueError, match="margin must be in"):
        estimates.plan_session("glue", margin=0.5)
