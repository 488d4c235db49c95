"""LoraLinear against the explicit formula y = x W^T + b + dropout(x) A^T B^T (alpha / r).

Every check compares the layer (and its hand-written backward) with the formula evaluated by plain
torch ops and autograd, in float32 (tight tolerance) and float64; plus the documented
initialisations, merge/unmerge, dropout and argument errors; plus the numeric helpers of
`loralib.plots` that notebook 01 draws this math with. Not here: injection into a model
(test_03_injection.py) and saving adapters (test_03_adapters.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats
from torch import nn

from loralib.fast_path import dropout_mask
from loralib.layers import LoraLinear
from loralib.numerics import assert_within_rounding, float64_reference

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12)}


def check_formula(layer, x, y=None, grad_output=None, grads=None, mask=None):
    """`y` and `grads` ({"x"/"A"/"B"/"b": tensor}) against the formula in float64, within the rounding
    bound of the layer's dtype (`loralib.numerics`: derived from the dtype and the reduction sizes)."""
    s = layer.scaling
    inputs = {"x": x, "W": layer.weight, "b": layer.bias, "A": layer.lora_A, "B": layer.lora_B, "m": mask}
    ref = float64_reference(
        lambda x, W, b, A, B, m: explicit(x, W, b, A, B, s, m), inputs, grad_output, tuple(grads or ())
    )
    n = layer.in_features + layer.out_features + layer.r + x.numel() // x.shape[-1] + 4
    if y is not None:
        assert_within_rounding(y, ref.value, ref.magnitude, layer.weight.dtype, n, name="y")
    for k, got in (grads or {}).items():
        assert_within_rounding(got, ref.grads[k], ref.grad_magnitudes[k], layer.weight.dtype, n, name=k)


# (in, out, r, alpha, bias, batch shape)
CASES = [
    (16, 8, 1, 1.0, True, (5,)),
    (32, 48, 4, 8.0, True, (3, 7)),
    (64, 64, 8, 16.0, False, (2, 5)),
    (24, 10, 2, 0.5, False, (11,)),
    (40, 72, 16, None, True, (2, 3, 4)),
]
CASE_IDS = [f"in{c[0]}-out{c[1]}-r{c[2]}-a{c[3]}-bias{int(c[4])}-x{'x'.join(map(str, c[5]))}" for c in CASES]


def explicit(x, weight, bias, A, B, scaling, mask=None):
    """The formula, term by term; `mask` is a dropout mask already divided by (1 - p)."""
    xd = x if mask is None else x * mask
    y = x @ weight.T + (xd @ A.T @ B.T) * scaling
    return y if bias is None else y + bias


def make_layer(i, o, r, alpha, bias, dtype, seed=0, **kw):
    torch.manual_seed(seed)
    layer = LoraLinear(i, o, bias=bias, r=r, lora_alpha=alpha, dtype=dtype, **kw)
    with torch.no_grad():
        # B is zero after init; a random B makes every term of the formula matter.
        layer.lora_B.normal_(0.0, 0.5)
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("i, o, r, alpha, bias, shape", CASES, ids=CASE_IDS)
def test_forward_equals_formula(i, o, r, alpha, bias, shape, dtype):
    layer = make_layer(i, o, r, alpha, bias, dtype)
    assert layer.scaling == pytest.approx((alpha if alpha is not None else r) / r)
    x = torch.randn(*shape, i, dtype=dtype)
    y = layer(x)
    assert y.shape == (*shape, o) and y.dtype == dtype
    check_formula(layer, x, y)


# Every case with a frozen bias (or none), and the cases with a bias also with that bias trained.
GRAD_CASES = [(*c, False) for c in CASES] + [(*c, True) for c in CASES if c[4]]
GRAD_IDS = [f"{i}-bias-frozen" for i in CASE_IDS] + [
    f"{i}-bias-trained" for c, i in zip(CASES, CASE_IDS) if c[4]
]


@pytest.mark.parametrize("x_grad", [True, False], ids=["x-grad", "x-no-grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("i, o, r, alpha, bias, shape, train_bias", GRAD_CASES, ids=GRAD_IDS)
def test_backward_equals_autograd_of_formula(i, o, r, alpha, bias, shape, train_bias, dtype, x_grad):
    layer = make_layer(i, o, r, alpha, bias, dtype)
    if train_bias:
        layer.bias.requires_grad_(True)
    x = torch.randn(*shape, i, dtype=dtype, requires_grad=x_grad)
    g = torch.randn(*shape, o, dtype=dtype)  # a random upstream gradient exercises every entry
    (layer(x) * g).sum().backward()
    grads = {"A": layer.lora_A.grad, "B": layer.lora_B.grad}
    assert layer.weight.grad is None, "the frozen weight must not receive a gradient"
    if x_grad:
        grads["x"] = x.grad
    else:
        assert x.grad is None
    if train_bias:
        grads["b"] = layer.bias.grad
    elif layer.bias is not None:
        assert layer.bias.grad is None
    check_formula(layer, x, grad_output=g, grads=grads)


def test_unfrozen_weight_gets_the_formula_gradient():
    layer = make_layer(20, 12, 4, 8.0, True, torch.float64)
    layer.weight.requires_grad_(True)
    x = torch.randn(6, 20, dtype=torch.float64)
    layer(x).square().sum().backward()
    W = layer.weight.detach().clone().requires_grad_(True)
    explicit(
        x, W, layer.bias.detach(), layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling
    ).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, W.grad, rtol=1e-12, atol=1e-12)


def test_only_lora_matrices_are_trainable_by_default():
    layer = LoraLinear(8, 4, r=2)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert set(layer.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}
    assert layer.lora_A.shape == (2, 8) and layer.lora_B.shape == (4, 2)


@pytest.mark.parametrize("i, o, r", [(512, 64, 8), (256, 32, 16), (128, 16, 4)])
@pytest.mark.parametrize("init", ["kaiming", "gaussian", "article"])
def test_init_distributions(init, i, o, r):
    torch.manual_seed(1)
    layer = LoraLinear(i, o, r=r, init=init)
    a = layer.lora_A.detach().double().flatten().numpy()
    assert torch.count_nonzero(layer.lora_B) == 0, "B must start at zero"
    if init == "kaiming":
        # kaiming_uniform_(a=sqrt(5)) on an (r x in) matrix: U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear.
        bound = 1.0 / math.sqrt(i)
        assert abs(a).max() <= bound
        dist = stats.uniform(loc=-bound, scale=2 * bound)
    else:
        std = 1.0 / r if init == "gaussian" else 1.0
        dist = stats.norm(loc=0.0, scale=std)
    # Seeded, so deterministic; a wrong distribution (e.g. std 1 instead of 1/r) gives p ~ 0.
    assert stats.kstest(a, dist.cdf).pvalue > 1e-3
    assert a.std() == pytest.approx(dist.std(), rel=0.1)


@pytest.mark.parametrize("init", ["kaiming", "gaussian", "article"])
def test_from_linear_with_zero_B_is_the_original_linear_exactly(init):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    layer = LoraLinear.from_linear(lin, r=4, lora_alpha=8, init=init)
    assert layer.weight.data_ptr() == lin.weight.data_ptr(), "weights are reused, not copied"
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert torch.count_nonzero(layer.lora_A) > 0 and torch.count_nonzero(layer.lora_B) == 0
    for shape in [(5, 48), (2, 3, 48)]:
        x = torch.randn(*shape)
        assert torch.equal(layer(x), lin(x))


def test_from_linear_keeps_dtype_and_training_mode():
    lin = nn.Linear(8, 4, bias=False, dtype=torch.float64).eval()
    layer = LoraLinear.from_linear(lin, r=2)
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    assert layer.bias is None and not layer.training


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("i, o, r, alpha, bias, shape", CASES, ids=CASE_IDS)
def test_merge_unmerge(i, o, r, alpha, bias, shape, dtype):
    layer = make_layer(i, o, r, alpha, bias, dtype)
    W0 = layer.weight.detach().clone()
    delta = layer.delta_weight().detach()
    torch.testing.assert_close(
        delta, layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach(), **TOL[dtype]
    )
    x = torch.randn(*shape, i, dtype=dtype)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.weight, W0 + delta, **TOL[dtype])
    layer.merge()  # idempotent: the update is never added twice
    torch.testing.assert_close(layer.weight, W0 + delta, **TOL[dtype])
    torch.testing.assert_close(layer(x), y, **TOL[dtype])
    layer.unmerge()
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, W0, **TOL[dtype])
    torch.testing.assert_close(layer(x), y, **TOL[dtype])


def test_to_linear_is_a_plain_linear_with_the_merged_weight():
    layer = make_layer(16, 8, 4, 8.0, True, torch.float32)
    x = torch.randn(3, 16)
    y = layer(x)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), y, **TOL[torch.float32])


def test_dropout_train_is_random_and_still_trains_eval_is_deterministic():
    torch.manual_seed(0)
    p = 0.5
    layer = make_layer(32, 16, 4, 8.0, True, torch.float32, lora_dropout=p)
    x = torch.randn(10, 32)
    layer.train()
    assert not torch.equal(layer(x), layer(x)), "dropout in train mode must change the LoRA path"

    # Same seed -> same mask (the layer's CPU mask generator, `dropout_mask`), so the layer matches the
    # formula with an explicit inverted-dropout mask.
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    mask = dropout_mask(x.shape, p).float() / (1 - p)
    g = torch.randn(10, 16)
    (y * g).sum().backward()
    assert layer.lora_A.grad.abs().sum() > 0 and layer.lora_B.grad.abs().sum() > 0
    check_formula(layer, x, y, g, {"A": layer.lora_A.grad, "B": layer.lora_B.grad}, mask=mask)

    layer.eval()
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    check_formula(layer, x, y1)


def test_dropout_input_gradient_flows_through_the_mask():
    layer = make_layer(12, 6, 2, 4.0, True, torch.float64, lora_dropout=0.3).train()
    x = torch.randn(7, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    layer(x).sum().backward()
    torch.manual_seed(5)
    mask = dropout_mask((7, 12), 0.3).double() / 0.7
    x_ref = x.detach().clone().requires_grad_(True)
    explicit(
        x_ref, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, mask
    ).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)


def test_autocast_bf16_follows_the_formula():
    layer = make_layer(32, 16, 4, 8.0, True, torch.float32)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = explicit(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(y.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(r=0), "positive integer"),
        (dict(r=-1), "positive integer"),
        (dict(r=2.5), "positive integer"),
        (dict(r=True), "positive integer"),
        (dict(lora_alpha=0), "alpha must be a positive"),
        (dict(lora_alpha=-2.0), "alpha must be a positive"),
        (dict(lora_dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(lora_dropout=-0.1), r"dropout must be in \[0, 1\)"),
        (dict(init="xavier"), "unknown LoRA init 'xavier'.*kaiming"),
    ],
)
def test_bad_arguments_raise_helpful_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraLinear(8, 4, **kwargs)
    with pytest.raises(ValueError, match=match):
        LoraLinear.from_linear(nn.Linear(8, 4), **kwargs)


@pytest.mark.parametrize(
    "module, match",
    [
        (LoraLinear(8, 4, r=2), "already has LoRA"),
        (nn.Conv1d(8, 4, 1), "expects an nn.Linear, got Conv1d"),
        (nn.Embedding(8, 4), "expects an nn.Linear, got Embedding"),
    ],
)
def test_from_linear_rejects_non_linear_and_lora(module, match):
    with pytest.raises(TypeError, match=match):
        LoraLinear.from_linear(module, r=2)
