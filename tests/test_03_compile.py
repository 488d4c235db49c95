"""torch.compile of LoraLinear and of a model carrying it: the same outputs and gradients as eager.

Under compilation the layer steps aside from its hand-written autograd Function (whose oneDNN calls
and in-place adds TorchInductor cannot lower on every CPU) and gives the compiler the plain formula.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from loralib.injection import inject_lora, lora_layers, mark_only_lora_as_trainable
from loralib.layers import LoraLinear
from loralib.numerics import assert_within_rounding, float64_reference


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def test_the_compiled_graph_holds_plain_linears_not_the_custom_function():
    """Mechanism: what dynamo hands the compiler (recorded by a backend that just runs the graph)."""
    seen: list[str] = []

    def recording_backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    layer = LoraLinear.from_linear(nn.Linear(768, 768), r=8)
    x = torch.randn(2, 16, 768, requires_grad=True)
    torch.compile(layer, backend=recording_backend)(x).sum().backward()
    assert seen and not any("mkldnn" in t or "LoraFunction" in t or "autograd_function" in t for t in seen)
    assert sum("linear" in t for t in seen) >= 3  # the frozen product and the two thin ones


@pytest.mark.slow
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_compiled_layer_768_matches_eager(dropout):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(768, 768), r=8, lora_alpha=16, lora_dropout=dropout)
    nn.init.normal_(layer.lora_B, std=0.02)
    if dropout:
        layer.eval()  # masks differ between the two runs; eval makes both deterministic
    x = torch.randn(4, 64, 768)
    dy = torch.randn(4, 64, 768)
    xe, xc = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ye = layer(xe)
    ye.backward(dy)
    eager = _grads(layer)
    layer.zero_grad(set_to_none=True)
    yc = torch.compile(layer)(xc)
    yc.backward(dy)
    compiled = _grads(layer)
    assert compiled.keys() == eager.keys() == {"lora_A", "lora_B"}
    # Both against the formula in float64, within fp32's rounding bound (loralib.numerics): the
    # compiler fuses and reorders sums, so the two need not agree bit for bit, only with the math.
    s = layer.scaling
    ref = float64_reference(
        lambda x, W, b, A, B: x @ W.T + b + s * (x @ A.T) @ B.T,
        {"x": x, "W": layer.weight, "b": layer.bias, "A": layer.lora_A, "B": layer.lora_B},
        grad_output=dy,
        wrt=("x", "A", "B"),
    )
    n = 768 + 768 + 8 + 256 + 4
    for side, y, xg, g in (("eager", ye, xe.grad, eager), ("compiled", yc, xc.grad, compiled)):
        assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name=f"{side} y")
        assert_within_rounding(
            xg, ref.grads["x"], ref.grad_magnitudes["x"], torch.float32, n, name=f"{side} dx"
        )
        for k, r in (("lora_A", "A"), ("lora_B", "B")):
            assert_within_rounding(
                g[k], ref.grads[r], ref.grad_magnitudes[r], torch.float32, n, name=f"{side} {k}"
            )


@pytest.mark.slow
def test_compiled_small_model_matches_eager(tiny_model_dir):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    inject_lora(model, ["query", "value"], r=4)
    mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.normal_(0, 0.05)
    model.eval()  # no dropout: the two runs must see the same function
    batch = {
        "input_ids": torch.tensor([[0, 11, 25, 7, 2], [0, 40, 9, 31, 2]]),
        "labels": torch.tensor([0, 1]),
    }
    eager_out = model(**batch)
    eager_out.loss.backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    compiled_out = torch.compile(model)(**batch)
    compiled_out.loss.backward()
    torch.testing.assert_close(compiled_out.logits, eager_out.logits, atol=1e-5, rtol=1e-5)
    compiled = _grads(model)
    assert compiled.keys() == eager.keys() and any("lora_A" in k for k in eager)
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], atol=1e-4, rtol=1e-4)
