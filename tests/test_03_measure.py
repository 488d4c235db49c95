"""loralib.measure: timing, memory accounting and the cases the speed suite compares, against
independent references (explicit allocations, hand counts, the layer itself)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from loralib.layers import LoraLinear
from loralib.measure.layer import (  # noqa: E402
    article_lora_linear,
    compare_forward_costs,
    layer_cases,
    layer_variants,
    naive_lora_forward,
    plain_lora_forward,
)
from loralib.measure.memory import peak_memory, tensor_bytes  # noqa: E402
from loralib.measure.steps import (  # noqa: E402
    measure_train_steps,
    random_batch,
    roberta_config,
    roberta_inference_builders,
    roberta_step_builders,
)
from loralib.measure.timing import ratios, time_interleaved, time_interleaved_samples  # noqa: E402
from loralib.numerics import assert_within_rounding, float64_reference  # noqa: E402

peft_lora = pytest.importorskip("peft.tuners.lora")


def test_peak_memory_counts_live_tensors_on_cpu():
    a = torch.randn(256, 256)

    def fn():
        y = a @ a  # 256 KiB
        z = y * 2  # + 256 KiB: peak 512 KiB
        del y
        w = z + 1  # y was freed, so the peak stays at 512 KiB
        return w.sum()

    peak = peak_memory(fn, "cpu")
    assert 2 * 256 * 256 * 4 <= peak < 2 * 256 * 256 * 4 + 1024
    assert peak_memory(lambda: None, "cpu") == 0


def test_time_interleaved_runs_everything_and_returns_medians():
    calls = {"a": 0, "b": 0}

    def make(name):
        def fn():
            calls[name] += 1

        return fn

    samples = time_interleaved_samples({"a": make("a"), "b": make("b")}, repeats=5, warmup=2)
    assert calls == {"a": 7, "b": 7} and all(len(v) == 5 for v in samples.values())
    # The median of what each call really spent, read from a fake clock (never the machine's: its load
    # is not this function's to judge): calls of 1, 5 and 2 ticks give a median of 2.
    import loralib.measure.timing as timing

    ticks = iter([0.0, 1.0, 1.0, 6.0, 6.0, 8.0])
    spent = SimpleNamespace(perf_counter=lambda: next(ticks))
    with pytest.MonkeyPatch.context() as m:
        m.setattr(timing, "time", spent)
        med = time_interleaved({"nap": lambda: None}, repeats=3, warmup=0)
    assert med == {"nap": 2.0}  # not wall-clock: the fake clock above
    assert ratios({"x": 2.0, "y": 3.0}, "x") == {"x": 1.0, "y": 1.5}
    with pytest.raises(ValueError, match="empty"):
        time_interleaved({})
    with pytest.raises(KeyError, match="reference"):
        ratios({"x": 1.0}, "z")


def test_tensor_bytes_counts_shared_storage_once():
    lin = nn.Linear(10, 6)
    expected = 4 * (10 * 6 + 6)
    assert tensor_bytes(lin) == expected
    assert tensor_bytes(lin, lin, {"w": lin.weight}) == expected
    lin.weight.grad = torch.zeros_like(lin.weight)
    assert tensor_bytes(lin) == expected + 4 * 60


def _formula64(layer, x):
    s = layer.scaling
    return float64_reference(
        lambda x, W, b, A, B: x @ W.T + b + s * (x @ A.T) @ B.T,
        {"x": x, "W": layer.weight, "b": layer.bias, "A": layer.lora_A, "B": layer.lora_B},
    )


def test_article_formulation_equals_the_layer():
    torch.manual_seed(0)
    layer = LoraLinear(16, 12, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    got = article_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    ref = _formula64(layer, x)
    for name, y in (("article", got), ("naive", naive_lora_forward(layer, x)), ("layer", layer(x))):
        assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, 16 + 12 + 4 + 5 + 4, name=name)
    layer.merge()
    with pytest.raises(ValueError, match="merged"):
        naive_lora_forward(layer, x)


def test_layer_variants_compute_the_same_function():
    variants = layer_variants(d=32, r=4, d_out=24)
    assert set(variants) == {"frozen", "loralib", "peft", "article", "full_ft"}
    x = torch.randn(16, 32)
    with torch.no_grad():
        y = {name: v.forward(x) for name, v in variants.items()}
    # the LoRA variants share W, b, A and B: the benchmark compares like with like (each within fp32's
    # rounding bound of the float64 formula on the loralib variant's tensors)
    ref = _formula64(variants["loralib"].forward, x)
    for name in ("loralib", "peft", "article"):
        assert_within_rounding(
            y[name], ref.value, ref.magnitude, torch.float32, 32 + 24 + 4 + 16 + 4, name=name
        )
    torch.testing.assert_close(y["frozen"], y["full_ft"])
    assert not torch.allclose(y["frozen"], y["loralib"], atol=1e-3), "B must be non-zero"
    assert [p.shape for p in variants["loralib"].params] == [(4, 32), (24, 4)]
    for fn in layer_cases(d=32, r=4, tokens=16, d_out=24, lora_dropout=0.1).values():
        fn()  # forward + backward with gradients reset afterwards
    with pytest.raises(ValueError, match="unknown layer methods"):
        layer_variants(d=8, r=2, methods=["frozen", "lora"])


def test_compare_forward_costs_small():
    costs = compare_forward_costs(d=32, r=4, tokens=64, repeats=2, warmup=0)
    assert costs["methods"] == ["frozen", "article", "plain autograd", "custom backward"]
    assert costs["forward_ratio"]["frozen"] == 1.0 and costs["train_ratio"]["frozen"] == 1.0
    assert costs["max_abs_diff"] < 1e-4
    # What autograd keeps for backward, parameters and the input excluded: the article's B @ A (d x d),
    # the thin activation x A^T (tokens x r) for plain autograd, and that plus A's cast copy for the
    # custom backward.
    assert costs["saved_bytes"]["article"] == 4 * 32 * 32
    assert costs["saved_bytes"]["plain autograd"] == 4 * 64 * 4
    assert costs["saved_bytes"]["custom backward"] == 4 * (64 * 4 + 4 * 32)
    assert costs["forward_flops"]["article"] > 2 * costs["forward_flops"]["frozen"]
    assert costs["forward_flops"]["plain autograd"] == costs["forward_flops"]["custom backward"]


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_plain_lora_forward_matches_the_layer(p):
    torch.manual_seed(0)
    layer = LoraLinear(24, 16, r=4, lora_alpha=8, lora_dropout=p)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 24)
    layer.eval()  # dropout off: both compute the same function
    torch.testing.assert_close(plain_lora_forward(layer, x), layer(x))
    torch.testing.assert_close(
        plain_lora_forward(layer, x),
        x @ layer.weight.T + layer.bias + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T,
    )


def test_compare_forward_costs_takes_a_plain_layer():
    calls = []

    def plain(layer):
        calls.append(layer)
        return lambda t: plain_lora_forward(layer, t) + 1.0  # deliberately wrong by 1

    costs = compare_forward_costs(d=16, r=2, tokens=8, repeats=1, warmup=0, plain=plain)
    assert len(calls) == 1 and isinstance(calls[0], LoraLinear)
    assert costs["max_abs_diff"] == pytest.approx(1.0, abs=1e-5)


def test_measure_train_steps_on_a_small_roberta():
    cfg = roberta_config(
        vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    batch = random_batch(cfg, batch_size=2, seq_len=8)
    builders = roberta_step_builders(cfg, r=4, lora_alpha=8)
    stats = measure_train_steps(builders, batch, repeats=1, warmup=0)
    assert set(stats) == {"full_ft", "loralib", "peft"}
    full, ours, theirs = stats["full_ft"], stats["loralib"], stats["peft"]
    assert full.trainable_params == full.total_params
    # LoRA on query/value of 2 layers: 2 layers x 2 modules x r x (in + out), plus the classifier head
    head = sum(p.numel() for p in builders["full_ft"]().classifier.parameters())
    assert ours.trainable_params == 2 * 2 * 4 * (32 + 32) + head
    assert theirs.trainable_params == ours.trainable_params
    for s in stats.values():
        assert s.peak_extra_bytes > 0 and s.peak_bytes == s.state_bytes + s.peak_extra_bytes
    # AdamW keeps two moments per trainable parameter: full fine-tuning holds ~3x the model
    assert full.state_bytes > 2.5 * ours.state_bytes
    inf = roberta_inference_builders(cfg, r=4)
    m_stock, m_merged = inf["stock"]().eval(), inf["loralib_merged"]().eval()
    with torch.no_grad():
        a = m_stock(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = m_merged(**{k: v for k, v in batch.items() if k != "labels"}).logits
    assert not torch.allclose(a, b), "the merged adapter must change the model (B is non-zero)"
    m_unmerged = inf["loralib_unmerged"]().eval()
    with torch.no_grad():
        c = m_unmerged(**{k: v for k, v in batch.items() if k != "labels"}).logits
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


def test_the_articles_forward_is_two_full_products_counted_by_torch():
    """The article's `self.query(x) + F.linear(x, B @ A)`: torch's own FLOP counter sees the frozen product,
    B @ A and a second full product, so its forward costs about twice the frozen layer's (2 + r / tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    d, r, n = 64, 4, 256
    torch.manual_seed(0)
    layer = LoraLinear(d, d, r=r)
    x = torch.randn(n, d)

    def counted(fn) -> int:
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            fn()
        return mode.get_total_flops()

    frozen = counted(lambda: torch.nn.functional.linear(x, layer.weight, layer.bias))
    article = counted(lambda: naive_lora_forward(layer, x))
    assert frozen == 2 * n * d * d
    assert article == 2 * frozen + 2 * d * r * d
    assert article / frozen == pytest.approx(2 + r / n)
    costs = compare_forward_costs(d=d, r=r, tokens=n, repeats=1, warmup=0)
    matmuls = costs["forward_flops"]["article"] - d * d - n * d  # the formula adds the scale and the sum
    assert matmuls == article


def test_forward_cost_plot_draws_the_frozen_layer_as_the_reference_not_a_bar():
    from loralib.measure.layer import plot_forward_costs

    costs = compare_forward_costs(d=16, r=2, tokens=8, repeats=1, warmup=0)
    fig = plot_forward_costs(costs)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == [
        "article",
        "plain autograd",
        "custom backward",
    ]
    assert len(fig.axes[0].patches) == 2 * 3 + 1  # two bars per method, and the noise band
