"""DoRA (`loralib.layers.dora`, `use_dora=True`): the layer against the paper's formula, its hand-written
backward against autograd in float64, the norm without an (out x in) temporary, merge / unmerge, the
merged state dict, save / reload, LoRA+ groups and half-precision bases. PEFT's own DoRA rows are in
`test_06_peft_table.py` (outputs, gradients, merge, both directions).

The reference is the definition, W' = m (W0 + s B A) / ||W0 + s B A||_row with the norm detached (the
paper's section 4.3), computed with the (out x in) matrix in float64. A float64 layer must equal it to
float64 rounding. An fp32 layer is checked in two derived parts: the norm against its float64 value within
the bound of its sums (`test_norm_within_its_rounding_bound`), and the layer given its own g = m / norm
against the multilinear formula g * (x W0^T + s xd A^T B^T) + b within `loralib.numerics`' bound.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import loralib
import loralib.optim
from loralib import LoraConfig, inject_lora, load_lora, merge_lora, save_lora, unmerge_lora
from loralib.fast_path import dropout_mask
from loralib.layers import LoraConv2d, LoraEmbedding, LoraLinear
from loralib.layers.dora import row_norm
from loralib.measure.memory import peak_memory, saved_tensor_bytes
from loralib.numerics import assert_within_rounding, error_bound, float64_reference, unit_roundoff

pytestmark = pytest.mark.numerical


def _linear(d_in=24, d_out=20, r=4, dtype=torch.float64, **kw) -> LoraLinear:
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, dtype=dtype)
    layer = LoraLinear.from_linear(base, r=r, lora_alpha=8, use_dora=True, init="random", **kw)
    with torch.no_grad():  # a trained-looking magnitude: g != 1
        layer.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand(d_out, dtype=layer.lora_magnitude_vector.dtype))
    return layer


def _reference(x, W, b, A, B, m, s, keep=None, scale_keep=1.0):
    """The definition: W' = m (W0 + s B A) / ||W0 + s B A||_row (norm detached), y = x W0' ... with LoRA
    dropout on the low-rank path only (`keep` the mask)."""
    delta = s * (B @ A)
    norm = torch.linalg.vector_norm(W + delta, dim=1).detach()
    g = m / norm
    xd = x if keep is None else x * keep * scale_keep
    return g * (x @ W.t() + s * (xd @ A.t()) @ B.t()) + b


def _grads_of(layer, x, dy):
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), {
        "x": x.grad,
        "A": layer.lora_A.grad,
        "B": layer.lora_B.grad,
        "m": layer.lora_magnitude_vector.grad,
    }


@pytest.mark.parametrize(
    "p, fast_path", [(0.0, True), (0.3, True), (0.0, False)], ids=["fast", "fast-dropout", "plain"]
)
def test_float64_layer_equals_the_definition_forward_and_backward(p, fast_path):
    layer = _linear(lora_dropout=p).train()
    layer.fast_path = fast_path
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    dy = torch.randn(3, 7, 20, dtype=torch.float64)
    torch.manual_seed(5)
    y, grads = _grads_of(layer, x, dy)
    keep, scale_keep = None, 1.0
    if p > 0:  # the CPU mask the layer drew, drawn again from the same seed
        torch.manual_seed(5)
        keep, scale_keep = dropout_mask(x.shape, p).to(x.dtype), 1 / (1 - p)
    leaves = {
        k: t.detach().clone().requires_grad_(True)
        for k, t in {
            "x": x,
            "A": layer.lora_A,
            "B": layer.lora_B,
            "m": layer.lora_magnitude_vector,
        }.items()
    }
    want = _reference(
        leaves["x"],
        layer.weight,
        layer.bias,
        leaves["A"],
        leaves["B"],
        leaves["m"],
        layer.scaling,
        keep,
        scale_keep,
    )
    want_grads = dict(zip(leaves, torch.autograd.grad(want, list(leaves.values()), dy)))
    # float64 against float64: torch's float64 tolerances (derived from the dtype)
    torch.testing.assert_close(y, want.detach())
    for k in leaves:
        torch.testing.assert_close(grads[k], want_grads[k], msg=k)


def test_norm_is_a_constant_in_the_backward():
    """dA and dB are LoRA's gradients of g * z: no term through the norm (the paper's section 4.3)."""
    layer = _linear()
    x = torch.randn(5, 24, dtype=torch.float64)
    dy = torch.randn(5, 20, dtype=torch.float64)
    _, got = _grads_of(layer, x, dy)
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    W, s, m = layer.weight, layer.scaling, layer.lora_magnitude_vector.detach()
    undetached = m / torch.linalg.vector_norm(W + s * B @ A, dim=1) * (x @ W.t() + s * (x @ A.t()) @ B.t())
    dA_through_norm, _ = torch.autograd.grad(undetached, [A, B], dy)
    assert (got["A"] - dA_through_norm).abs().max() > 1e-6  # the test can tell the two apart


def _fp32_layer_and_g(p: float):
    layer = _linear(48, 40, 4, dtype=torch.float32, lora_dropout=p).train()
    with torch.no_grad():
        g = (layer.lora_magnitude_vector / layer.dora_norm()).to(torch.float32)
    return layer, g


@pytest.mark.parametrize("p", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_fp32_layer_given_its_g_within_the_rounding_bound(p):
    """y = g * (x W^T + s xd A^T B^T) + b is multilinear given g: the fp32 layer (fast path, oneDNN or
    not) against float64 within `loralib.numerics`' bound, outputs and the x, A, B gradients; dm against
    sum(dy * z) / norm with the extra rounding of recovering z from y (y - b)."""
    layer, g = _fp32_layer_and_g(p)
    x = torch.randn(3, 30, 48)
    dy = torch.randn(3, 30, 40)
    torch.manual_seed(11)
    y, got = _grads_of(layer, x, dy)
    torch.manual_seed(11)
    keep = dropout_mask(x.shape, p).to(x.dtype) if p > 0 else torch.ones_like(x)
    s = layer.scaling / (1 - p)
    ref = float64_reference(
        lambda x, W, b, A, B, g, keep: g * (x @ W.t() + s * ((x * keep) @ A.t()) @ B.t()) + b,
        {
            "x": x,
            "W": layer.weight,
            "b": layer.bias,
            "A": layer.lora_A,
            "B": layer.lora_B,
            "g": g,
            "keep": keep,
        },
        grad_output=dy,
        wrt=("x", "A", "B", "g"),
    )
    n = 48 + 40 + 4 + 90 + 6  # in + out + r + rows + the scalings and g: longer than any chain of sums
    assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name="y")
    for k in ("x", "A", "B"):
        assert_within_rounding(got[k], ref.grads[k], ref.grad_magnitudes[k], torch.float32, n, name=f"d{k}")
    # dm = dg / norm = sum(dy * (y - b)) / m: y carries its own rounding (u (|g z| + |b|) per element,
    # twice: the product and the bias), amplified by 1 / m in the sum
    norm = layer.dora_norm().double()
    m = layer.lora_magnitude_vector.detach().double()
    dm_ref = ref.grads["g"] / norm
    y_err = (
        3
        * unit_roundoff(torch.float32)
        * ((ref.magnitude - layer.bias.abs().double()) + layer.bias.abs().double())
    )
    extra = (dy.abs().double() * y_err).sum((0, 1)) / m.abs()
    tol = error_bound(torch.float32, n) * ref.grad_magnitudes["g"] / norm + extra
    assert ((got["m"].double() - dm_ref).abs() <= tol).all()


@pytest.mark.parametrize("shape", [(40, 48, 4), (64, 16, 8), (8, 300, 2)])
def test_norm_within_its_rounding_bound(shape):
    """||W0 + s B A||^2 = ||W0||^2 + 2 s <W0 A^T, B> + s^2 <B A A^T, B> in fp32 against the float64 norm of
    the explicit matrix. Each sum has at most in + 2 r terms; the same expansion on absolute values,
    || |W0| + s |B| |A| ||^2, bounds every term, so |norm^2 - exact| <= gamma * that, and the square root
    halves the relative error (plus one rounding)."""
    out, d_in, r = shape
    torch.manual_seed(1)
    layer = LoraLinear(d_in, out, r=r, lora_alpha=16, use_dora=True, init="random")
    got = layer.dora_norm()
    s = layer.scaling
    W, A, B = (t.detach().double() for t in (layer.weight, layer.lora_A, layer.lora_B))
    exact = torch.linalg.vector_norm(W + s * B @ A, dim=1)
    magnitude_sq = torch.linalg.vector_norm(W.abs() + s * B.abs() @ A.abs(), dim=1).square()
    gamma = error_bound(torch.float32, d_in + 2 * r + r * r)
    tol = 0.5 * gamma * magnitude_sq / exact + 2 * unit_roundoff(torch.float32) * exact
    assert ((got.double() - exact).abs() <= tol).all()
    # and the bound is tight enough to catch a wrong expansion (a missing factor 2 on the cross term)
    wrong = torch.sqrt(W.square().sum(1) + s * ((W @ A.t()) * B).sum(1) + s * s * ((B @ A).square().sum(1)))
    assert ((wrong - exact).abs() > tol).any()


def test_the_norm_forms_no_out_by_in_temporary():
    """The norm's peak allocation is (out x r)-sized, not (out x in): at d = 1024 an (out x in) fp32
    matrix is 4 MiB, and the whole norm stays under a tenth of that."""
    layer = LoraLinear(1024, 1024, r=8, use_dora=True, init="random")
    layer.dora_norm()  # ||W0||^2 cached
    peak = peak_memory(lambda: row_norm(layer, layer.weight, layer.lora_A, layer.lora_B, layer.scaling))
    assert peak < 1024 * 1024 * 4 / 10, peak
    explicit = peak_memory(lambda: torch.linalg.vector_norm(layer.weight + layer.delta_weight(), dim=1))
    assert explicit >= 2 * 1024 * 1024 * 4  # what PEFT's form allocates: B @ A and W0 + s B A


def test_backward_keeps_the_output_not_a_copy():
    """DoRA saves what LoRA saves plus the output itself (shared storage, not a copy) and (out,) vectors."""
    n, d_in, d_out, r = 256, 96, 80, 4
    torch.manual_seed(0)
    dora = LoraLinear(d_in, d_out, r=r, use_dora=True).train()
    lora = LoraLinear(d_in, d_out, r=r).train()
    x = torch.randn(n, d_in, requires_grad=True)
    outs = []
    saved_dora = saved_tensor_bytes(lambda: outs.append(dora(x)), exclude=[*dora.parameters(), x])
    saved_lora = saved_tensor_bytes(lambda: lora(x), exclude=[*lora.parameters(), x])
    assert saved_dora == saved_lora + 4 * n * d_out + 4 * d_out  # the output (n x out) + g (out,)
    storages = []

    def pack(t):
        storages.append(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = dora(x)
    assert y.untyped_storage().data_ptr() in storages  # the output itself is what is kept


def test_fresh_layer_computes_the_base_and_magnitude_is_the_weight_norm():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoraLinear.from_linear(base, r=4, use_dora=True)
    torch.testing.assert_close(
        layer.lora_magnitude_vector, torch.linalg.vector_norm(base.weight, dim=1), rtol=1e-6, atol=0
    )
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("kind", ["linear", "embedding", "conv1d", "conv2d"])
def test_merge_unmerge_and_merged_state_dict(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = _linear(dtype=torch.float32), torch.randn(5, 24)
    elif kind == "embedding":
        layer = LoraEmbedding.from_embedding(nn.Embedding(30, 12), r=4, use_dora=True, init="random")
        x = torch.randint(0, 30, (3, 7))
    elif kind == "conv1d":
        from transformers.pytorch_utils import Conv1D

        from loralib.layers.conv1d import LoraConv1D

        layer, x = (
            LoraConv1D.from_module(Conv1D(20, 24), r=4, use_dora=True, init="random"),
            torch.randn(5, 24),
        )
    else:
        layer = LoraConv2d.from_module(nn.Conv2d(3, 8, 3), r=4, use_dora=True, init="random")
        x = torch.randn(2, 3, 6, 6)
    layer.eval()
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.2)
        want = layer(x)
        w0 = layer.weight.clone()
        layer.merge()
        merged = layer(x)
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        unmerged_weight = layer.unmerged_weight()
        layer.unmerge()
    torch.testing.assert_close(merged, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(unmerged_weight, w0, rtol=1e-5, atol=1e-6)
    assert "lora_merged_norm" in state
    # a merged state dict loaded into the unmerged layer: adopted as merged, and unmerges back exactly
    layer.load_state_dict(state)
    assert layer.merged
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
        layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=1e-5, atol=1e-6)


def test_merged_training_raises_at_backward():
    layer = _linear(dtype=torch.float32).train()
    layer.merge()
    with pytest.raises(RuntimeError, match="merged"):
        layer(torch.randn(2, 24)).sum().backward()


def test_tiny_roberta_dora_trains_saves_reloads_and_merges(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    def fresh():
        torch.manual_seed(0)
        return AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)

    config = LoraConfig(r=4, target_modules=["query", "value"], use_dora=True, modules_to_save=["classifier"])
    model = fresh()
    inject_lora(model, config)
    loralib.mark_only_lora_as_trainable(model, config=config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("lora_magnitude_vector") for n in trainable)
    opt = loralib.optim.make_optimizer(model, lr=1e-2, loraplus_lr_ratio=4)
    assert "lora_magnitude/no_decay" in {g["name"] for g in opt.param_groups}
    ids = torch.randint(5, 100, (8, 12))
    labels = torch.randint(0, 2, (8,))
    m0 = {n: p.detach().clone() for n, p in model.named_parameters() if "magnitude" in n}
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert any(not torch.equal(p, m0[n]) for n, p in model.named_parameters() if n in m0)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
    save_lora(model, tmp_path / "a")
    again = fresh()
    cfg = load_lora(again, tmp_path / "a")
    assert all(spec.get("use_dora") for spec in cfg["per_layer"].values())
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, want)
        merge_lora(again)
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
        unmerge_lora(again)
        torch.testing.assert_close(again(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_magnitude_and_trains(dtype):
    torch.manual_seed(0)
    layer = LoraLinear.from_linear(nn.Linear(32, 16).to(dtype), r=4, use_dora=True, init="random")
    assert layer.lora_magnitude_vector.dtype == torch.float32
    x = torch.randn(6, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    y.float().sum().backward()
    assert layer.lora_magnitude_vector.grad.dtype == torch.float32
    assert torch.isfinite(layer.lora_magnitude_vector.grad).all()
    # against the fp32 layer with the same (rounded) weights: within half precision
    ref = LoraLinear.from_linear(nn.Linear(32, 16), r=4, use_dora=True)
    with torch.no_grad():
        ref.weight.copy_(layer.weight.float())
        ref.bias.copy_(layer.bias.float())
        for k in ("lora_A", "lora_B", "lora_magnitude_vector"):
            getattr(ref, k).copy_(getattr(layer, k))
        want = ref(x.float())
    bound = error_bound(dtype, 32 + 4, roundings=8)
    assert ((y.float() - want).abs() <= bound * (want.abs() + 1) * 4).all()


def test_rslora_scaling_changes_the_norm_and_merged_layers_remerge():
    layer = _linear(dtype=torch.float32).eval()
    x = torch.randn(4, 24)
    layer.merge()
    layer.use_rslora = True  # re-merged with the new scaling
    with torch.no_grad():
        merged = layer(x)
        layer.unmerge()
        assert layer.scaling == pytest.approx(8 / math.sqrt(4))
        torch.testing.assert_close(merged, layer(x), rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem():
    with pytest.raises(ValueError, match="lora_bias=True is not supported with use_dora"):
        LoraConfig(use_dora=True, lora_bias=True)
    with pytest.raises(ValueError, match="grouped convolution"):
        LoraConv2d.from_module(nn.Conv2d(4, 8, 3, groups=2), r=4, use_dora=True)
    with pytest.raises(TypeError, match="use_dora"):
        LoraConfig(use_dora="yes")
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2))
    before = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="grouped"):
        inject_lora(model, ["0"], r=4, use_dora=True)
    assert [type(m) for m in model.modules()] == before


def test_peft_reads_use_dora_from_our_config():
    peft = pytest.importorskip("peft")
    d = LoraConfig(r=4, target_modules=["query"], use_dora=True).to_dict()
    assert d["use_dora"] is True
    assert peft.LoraConfig(**{k: v for k, v in d.items() if k != "peft_type"}).use_dora
    assert LoraConfig.from_dict(d).use_dora
