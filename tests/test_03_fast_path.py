"""LoraLinear's fast path (custom autograd Function) against independent references.

References: the explicit formula y = x W^T + b + s (x A^T) B^T differentiated by stock autograd in
float64, PEFT's LoRA Linear given the same A, B, alpha and r, numerical gradients (gradcheck), and a
dropout mask redrawn from the same seed. Memory claims are checked on the tensors autograd actually
saves. No timing is asserted anywhere: timings only mean something as ratios in one benchmark run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loralib import fast_path
from loralib.fast_path import dropout_mask
from loralib.layers import LoraLinear
from loralib.measure.layer import (  # noqa: E402
    naive_lora_forward,
)
from loralib.measure.memory import saved_tensor_bytes  # noqa: E402
from loralib.numerics import assert_within_rounding

peft_lora = pytest.importorskip("peft.tuners.lora")
from peft import LoraConfig  # noqa: E402

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)


def assert_close_fp32(got, ref, name):
    """fp32 against the float64 formula, within the rounding bound of `loralib.numerics` (derived from
    fp32's unit roundoff and the layer's reduction sizes, so it holds for every kernel and CPU)."""
    want, magnitude = (ref.y, ref.y_mag) if name == "y" else (ref.leaves[name].grad, ref.mags[name].grad)
    assert_within_rounding(got, want, magnitude, torch.float32, ref.n, name=name)


def make_layer(d_in, d_out, r, bias=True, lora_alpha=None, lora_dropout=0.0, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = LoraLinear.from_linear(
        nn.Linear(d_in, d_out, bias=bias, dtype=dtype), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout
    )
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init would hide every mistake in the B @ A path
    return layer


def make_input(shape, d_in, kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "contiguous":
        x = torch.randn(*shape, d_in, generator=g)
    elif kind == "transposed":  # a non-contiguous 3-D view, as after a permute in a model
        x = torch.randn(d_in, *shape, generator=g).movedim(0, -1)
    else:  # "strided": every other feature of a wider tensor
        x = torch.randn(*shape, 2 * d_in, generator=g)[..., ::2]
    return x.detach().requires_grad_(True)


class reference:
    """The explicit formula in float64 on copies of the layer's tensors (stock autograd), and the same
    formula on their absolute values: the magnitudes a rounding bound is relative to."""

    def __init__(self, layer, x, x_lora=None):
        self.y, self.leaves = self._run(layer, x, x_lora, lambda t: t)
        self.y_mag, self.mags = self._run(layer, x, x_lora, torch.abs)
        rows = x.numel() // x.shape[-1]
        self.n = layer.in_features + layer.out_features + layer.r + rows + 4  # longer than any chain of sums

    @staticmethod
    def _run(layer, x, x_lora, f):
        def leaf(t, grad):
            return f(t.detach().double()).requires_grad_(grad)

        W = leaf(layer.weight, layer.weight.requires_grad)
        b = None if layer.bias is None else leaf(layer.bias, layer.bias.requires_grad)
        A, B, xr = leaf(layer.lora_A, True), leaf(layer.lora_B, True), leaf(x, True)
        xl = xr if x_lora is None else x_lora(xr)
        y = xr @ W.t() + (0 if b is None else b) + layer.scaling * (xl @ A.t()) @ B.t()
        return y, {"x": xr, "weight": W, "bias": b, "lora_A": A, "lora_B": B}

    def backward(self, dy):
        self.y.backward(dy.double())
        self.y_mag.backward(dy.double().abs())


def grads_of(layer, x):
    out = {"x": x.grad, "lora_A": layer.lora_A.grad, "lora_B": layer.lora_B.grad}
    out["weight"] = layer.weight.grad if layer.weight.requires_grad else None
    out["bias"] = layer.bias.grad if layer.bias is not None and layer.bias.requires_grad else None
    return out


@pytest.fixture(params=["onednn", "mm"])
def thin_backend(request, monkeypatch):
    """Run a test on both routes for the thin products: oneDNN (forced even for small shapes) and torch.mm."""
    if request.param == "onednn":
        if fast_path._onednn_linear() is None:
            pytest.skip(
                "the oneDNN route is off (LORALIB_NO_ONEDNN) or not usable in this torch build; torch.mm is used"
            )
        monkeypatch.setattr(fast_path, "_ONEDNN_MIN_ELEMENTS", 0)
    else:
        monkeypatch.setattr(fast_path, "_onednn_linear", lambda: None)
    return request.param


# (d_in, d_out, r, leading shape, input layout)
SHAPES = [
    (16, 24, 1, (10,), "contiguous"),
    (32, 32, 4, (3, 7), "contiguous"),
    (33, 17, 8, (2, 5), "transposed"),
    (24, 40, 8, (6,), "strided"),
    (64, 48, 16, (4, 9), "strided"),
]


@pytest.mark.parametrize("d_in,d_out,r,lead,kind", SHAPES)
@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("train_weight", [False, True])
def test_outputs_and_gradients_match_explicit_formula(
    d_in, d_out, r, lead, kind, bias, train_weight, thin_backend
):
    layer = make_layer(d_in, d_out, r, bias=bias != "none", lora_alpha=2 * r, lora_dropout=0.25)
    layer.eval()  # dropout in eval is the identity: the fused single-input path must be taken
    if bias == "trainable":
        layer.bias.requires_grad_(True)  # what mark_only_lora_as_trainable(bias="all") does
    layer.weight.requires_grad_(train_weight)
    x = make_input(lead, d_in, kind)
    y = layer(x)
    assert y.shape == (*lead, d_out)
    ref = reference(layer, x)
    assert_close_fp32(y, ref, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    y.backward(dy)
    ref.backward(dy)
    got = grads_of(layer, x)
    for name, t in ref.leaves.items():
        if t is None or not t.requires_grad:
            assert got.get(name) is None, f"{name} is frozen but received a gradient"
            continue
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].shape == t.shape
        assert_close_fp32(got[name], ref, name)


def test_expanded_upstream_gradient_and_input_without_grad(thin_backend):
    layer = make_layer(12, 20, 4)
    x = torch.randn(3, 5, 12)  # no grad for x: only A and B gradients are computed
    layer(x).sum().backward()  # the upstream gradient is an expanded (stride 0) tensor
    ref = reference(layer, x)
    ref.backward(torch.ones(ref.y.shape))
    assert_close_fp32(layer.lora_A.grad, ref, "lora_A")
    assert_close_fp32(layer.lora_B.grad, ref, "lora_B")


def test_onednn_route_is_taken_for_large_fp32_products(monkeypatch):
    op = fast_path._onednn_linear()
    if op is None:
        pytest.skip(
            "the oneDNN route is off (LORALIB_NO_ONEDNN) or not usable in this torch build; torch.mm is used"
        )
    calls = []

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return op(*args)

    monkeypatch.setattr(fast_path, "_onednn_linear", lambda: counting)
    layer = make_layer(256, 224, 8)
    x = torch.randn(2, 160, 256, requires_grad=True)  # 320 tokens: above the size threshold
    y = layer(x)
    dy = torch.randn(y.shape)
    y.backward(dy)
    # xa in forward; dy B, dB and dA in backward
    assert sorted(calls) == sorted([(320, 256), (320, 224), (8, 320), (8, 320)])
    ref = reference(layer, x)
    ref.backward(dy)
    assert_close_fp32(y, ref, "y")
    for name in ("x", "lora_A", "lora_B"):
        assert_close_fp32(grads_of(layer, x)[name], ref, name)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls == [], "bf16 products must stay on torch.mm"


def test_gradcheck_float64():
    layer = make_layer(7, 5, 3, dtype=torch.float64)
    layer.bias.requires_grad_(True)
    layer.weight.requires_grad_(True)
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.bias, layer.lora_A, layer.lora_B)

    def f(x, w, b, a, bb):
        with torch.nn.utils.stateless._reparametrize_module(
            layer, {"weight": w, "bias": b, "lora_A": a, "lora_B": bb}
        ):
            return layer(x)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("frozen", ["nothing", "lora_A", "lora_B", "weight_trains"])
def test_second_order_gradients_pass_gradgradcheck(p, frozen, thin_backend):
    """create_graph=True (gradient penalties, Hessian-vector products): the backward falls back to the
    plain formula, and its gradients are differentiable: checked numerically in float64."""
    layer = make_layer(7, 5, 3, lora_dropout=p, dtype=torch.float64).train()
    layer.bias.requires_grad_(True)
    layer.weight.requires_grad_(frozen == "weight_trains")
    x = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    names = [
        n for n in ("weight", "bias", "lora_A", "lora_B") if n != frozen and getattr(layer, n).requires_grad
    ]
    params = [getattr(layer, n) for n in names]

    def f(x, *ps):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        with torch.nn.utils.stateless._reparametrize_module(layer, dict(zip(names, ps))):
            return layer(x)

    assert torch.autograd.gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_a_gradient_penalty_equals_plain_autograd(p):
    layer = make_layer(10, 6, 2, lora_dropout=p).train()
    x = torch.randn(5, 10, requires_grad=True)
    torch.manual_seed(1)
    y = layer(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    torch.manual_seed(1)
    keep = dropout_mask(x.shape, p).double() / (1 - p)
    xr = x.detach().double().requires_grad_(True)
    A, B = (t.detach().double().requires_grad_(True) for t in (layer.lora_A, layer.lora_B))
    yr = xr @ layer.weight.double().T + layer.bias.double() + layer.scaling * ((xr * keep) @ A.T) @ B.T
    (gr,) = torch.autograd.grad(yr.square().sum(), xr, create_graph=True)
    gr.square().sum().backward()
    for got, want in ((layer.lora_A.grad, A.grad), (layer.lora_B.grad, B.grad), (x.grad, xr.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    assert layer.lora_A.grad.abs().sum() > 0


def peft_twin(layer: LoraLinear, lora_dropout: float = 0.0) -> nn.Module:
    base = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        base.weight.copy_(layer.weight)
        if layer.bias is not None:
            base.bias.copy_(layer.bias)
    base.requires_grad_(False)
    cfg = LoraConfig(r=layer.r, lora_alpha=layer.lora_alpha, lora_dropout=lora_dropout)
    twin = peft_lora.Linear(base, "default", config=cfg, r=layer.r, lora_alpha=layer.lora_alpha)
    with torch.no_grad():
        twin.lora_A["default"].weight.copy_(layer.lora_A)
        twin.lora_B["default"].weight.copy_(layer.lora_B)
    return twin


@pytest.mark.parametrize("d_in,d_out,r,lead,kind", SHAPES)
@pytest.mark.parametrize("bias,alpha", [(True, None), (False, 16)])
def test_matches_peft_lora_linear(d_in, d_out, r, lead, kind, bias, alpha, thin_backend):
    layer = make_layer(d_in, d_out, r, bias=bias, lora_alpha=alpha, lora_dropout=0.1).eval()
    twin = peft_twin(layer, lora_dropout=0.1).eval()
    assert twin.scaling["default"] == pytest.approx(layer.scaling)
    x1 = make_input(lead, d_in, kind)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = layer(x1), twin(x2)
    dy = torch.randn(y1.shape, generator=torch.Generator().manual_seed(3))
    y1.backward(dy)
    y2.backward(dy)
    ref = reference(layer, x1)  # both sides against the float64 formula: each within fp32's bound of it
    ref.backward(dy)
    for name, ours, theirs in (
        ("y", y1, y2),
        ("x", x1.grad, x2.grad),
        ("lora_A", layer.lora_A.grad, twin.lora_A["default"].weight.grad),
        ("lora_B", layer.lora_B.grad, twin.lora_B["default"].weight.grad),
    ):
        assert_close_fp32(ours, ref, name)
        assert_close_fp32(theirs, ref, name)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.parametrize("lead,kind", [((64,), "contiguous"), ((4, 16), "transposed")])
def test_dropout_in_training_matches_a_manual_mask(p, lead, kind, thin_backend):
    layer = make_layer(24, 20, 4, lora_dropout=p).train()
    x = make_input(lead, 24, kind)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    kept = dropout_mask(x.shape, p).to(x.dtype) / (1 - p)  # the same draw: 0 or 1 / (1 - p)
    assert 0 < (kept == 0).sum() < kept.numel(), "the mask must drop some but not all inputs"
    ref = reference(layer, x, x_lora=lambda t: t * kept.double())
    assert_close_fp32(y, ref, "y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(dy)
    ref.backward(dy)
    for name in ("x", "lora_A", "lora_B"):
        assert_close_fp32(grads_of(layer, x)[name], ref, name)
    # and it really is dropout: the same layer in eval mode gives a different output
    with torch.no_grad():
        assert not torch.allclose(layer.eval()(x), y)


def function_saved(y):
    """The tensors LoraLinear's autograd Function saved for backward (None entries dropped)."""
    node = y.grad_fn
    assert type(node).__name__.startswith("LoraFunction"), f"unexpected grad_fn {type(node).__name__}"
    return [t for t in node.saved_tensors if t is not None]


@pytest.mark.parametrize("lead,kind", [((96,), "contiguous"), ((6, 16), "contiguous"), ((6, 16), "strided")])
def test_saves_only_input_thin_activation_and_parameters(lead, kind):
    d_in, d_out, r = 40, 48, 4
    layer = make_layer(d_in, d_out, r).train()  # dropout p = 0: no copy of x may be made
    x = make_input(lead, d_in, kind)
    n = x.numel() // d_in
    saved = function_saved(layer(x))
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    shapes = sorted(tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in params)
    # the input itself (never a copy, not even of a strided view), xa (kept transposed, r x n) and B^T
    # (r x out); W, A and B are saved as the parameters themselves
    assert shapes == sorted([tuple(x.shape), (r, n), (r, d_out)])
    (x_saved,) = [t for t in saved if tuple(t.shape) == tuple(x.shape)]
    assert x_saved.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    assert (
        sum(t.numel() for t in saved if t.untyped_storage().data_ptr() in params)
        == d_in * (d_out + r) + r * d_out
    )

    # when A is frozen the input itself is no longer needed (dB uses xa, dx uses W, A and B)
    layer.lora_A.requires_grad_(False)
    shapes_b = sorted(tuple(t.shape) for t in function_saved(layer(x)))
    assert shapes_b == sorted([(d_out, d_in), (r, d_in), (d_out, r), (r, n), (r, d_out)])

    # dropout in training: x as without dropout, plus the mask's int16 random lanes; no dropped fp32 copy
    layer_do = make_layer(d_in, d_out, r, lora_dropout=0.2).train()
    saved_do = function_saved(layer_do(x))
    big = [t for t in saved_do if t.numel() == n * d_in]
    assert sorted(str(t.dtype) for t in big) == sorted([str(x.dtype), str(torch.int16)])
    (x_do,) = [t for t in big if t.dtype == x.dtype]
    assert x_do.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()


def test_second_order_through_a_frozen_a_layer_is_refused_with_the_way_out():
    layer = make_layer(8, 6, 2).train()
    layer.lora_A.requires_grad_(False)
    x = torch.randn(4, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="lora_A is frozen.*fast_path = False"):
        torch.autograd.grad(layer(x).square().sum(), layer.lora_B, create_graph=True)
    layer.fast_path = False  # the way out: plain autograd
    (gb,) = torch.autograd.grad(layer(x).square().sum(), layer.lora_B, create_graph=True)
    gb.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # without a gradient upstream of x, the kept xa is enough: exact, no refusal
    layer.fast_path = True
    x0 = x.detach()
    (gb0,) = torch.autograd.grad(layer(x0).square().sum(), layer.lora_B, create_graph=True)
    torch.testing.assert_close(gb0, gb.detach(), rtol=1e-5, atol=1e-6)
    assert gb0.requires_grad


def test_memory_helpers_see_the_difference_between_naive_and_fast():
    layer = make_layer(64, 80, 4)
    x = torch.randn(32, 64, requires_grad=True)
    exclude = [*layer.parameters(), x]
    fast = saved_tensor_bytes(lambda: layer(x), exclude=exclude)
    naive = saved_tensor_bytes(lambda: naive_lora_forward(layer, x), exclude=exclude)
    assert fast == 4 * (32 * 4 + 4 * 80)  # xa (n x r) and B^T (r x out), fp32
    assert naive == 4 * 80 * 64  # the materialised (out x in) matrix


def test_autocast_bf16_on_cpu_matches_to_bf16_tolerance():
    layer = make_layer(48, 32, 8)
    x = torch.randn(5, 7, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    ref = reference(layer, x)
    # bf16 operands (x, W, b, A, B and the (n x r) intermediate rounded once each, the output once) with
    # fp32 accumulation: the half-precision bound of loralib.numerics.
    roundings = 8
    assert_within_rounding(y, ref.y, ref.y_mag, torch.bfloat16, ref.n, roundings, name="y")
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    y.float().backward(dy)
    ref.backward(dy)
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    for name in ("x", "lora_A", "lora_B"):
        got = grads_of(layer, x)[name]
        assert_within_rounding(
            got, ref.leaves[name].grad, ref.mags[name].grad, torch.bfloat16, ref.n, roundings, name=name
        )


def test_merged_layer_is_a_plain_linear():
    layer = make_layer(20, 30, 4)
    x = torch.randn(9, 20)
    with torch.no_grad():
        y = layer(x)
        layer.merge()
        torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
