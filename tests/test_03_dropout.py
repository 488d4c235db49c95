"""LoRA dropout on CPU (`loralib.fast_path.dropout_mask`): the semantics of inverted dropout, checked
statistically, and the layer against the explicit formula given the same mask.

Semantics: each input element of the LoRA branch is kept with probability 1 - p (exact to 1e-4 for any
p, not rounded to a coarse grid such as 1/256), independently, scaled by 1 / (1 - p); a new mask on
every call, reproducible under `torch.manual_seed`; identity in eval mode. Only the mask's random lanes
(two bytes per element), not a dropped fp32 copy of x, are kept for the backward.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loralib.fast_path import dropout_mask
from loralib.layers import LoraLinear
from loralib.measure.memory import saved_tensor_bytes  # noqa: E402
from loralib.numerics import assert_within_rounding, float64_reference

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)

N = 1 << 25  # 33.5M draws: the keep rate's standard error is <= 8.7e-5 (p = 0.5), 5e-5 at p = 0.1


@pytest.mark.parametrize("p", [0.1, 0.37, 0.5, 0.01, 1e-3, 0.9, 0.999])
def test_keep_rate_is_one_minus_p_to_1e4(p):
    torch.manual_seed(0)
    rate = dropout_mask((N,), p).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / N)
    # 5 standard errors of sampling noise, plus the construction's own rounding (at most 2^-17):
    assert abs(rate - (1 - p)) < 5 * sigma + 2**-17 + 1e-12, (rate, 1 - p)
    assert 5 * sigma + 2**-17 < 5e-4  # the test can see errors much smaller than a 1/256 grid (3.9e-3)


def test_p_off_a_coarse_grid_is_not_rounded():
    """p = 0.1 on a 1/256 grid would keep 230/256 = 0.8984 or 231/256 = 0.9023: both are > 10 sigma off."""
    torch.manual_seed(1)
    rate = dropout_mask((N,), 0.1).double().mean().item()
    assert abs(rate - 0.9) < 3e-4
    assert min(abs(rate - 230 / 256), abs(rate - 231 / 256)) > 1e-3


def test_elements_are_independent():
    """Neighbours (same 64-bit draw, lags 1-3), the next draw (lag 4) and the next row (lag d) are
    uncorrelated: their joint keep rate is (1 - p)^2."""
    torch.manual_seed(2)
    p, d = 0.3, 768
    m = dropout_mask((N // d, d), p).flatten().double()
    q = m.mean().item()
    for lag in (1, 2, 3, 4, 5, d):
        joint = (m[:-lag] * m[lag:]).mean().item()
        assert abs(joint - q * q) < 5 * math.sqrt(q * q * (1 - q * q) / (N - lag)), lag
    # and every lane of a draw has the same rate
    lanes = m[: (N // 4) * 4].view(-1, 4).mean(0)
    assert (lanes - (1 - p)).abs().max().item() < 5 * math.sqrt(p * (1 - p) / (N // 4))


def test_new_mask_each_call_and_reproducible_under_manual_seed():
    torch.manual_seed(3)
    a, b = dropout_mask((64, 48), 0.5), dropout_mask((64, 48), 0.5)
    assert not torch.equal(a, b)
    torch.manual_seed(3)
    assert torch.equal(dropout_mask((64, 48), 0.5), a)
    assert dropout_mask((5, 7), 0.0).all() and dropout_mask((5, 7), 0.0).shape == (5, 7)


def _layer(p: float, d_in: int = 48, d_out: int = 40, r: int = 4) -> LoraLinear:
    torch.manual_seed(0)
    layer = LoraLinear(d_in, d_out, r=r, lora_alpha=8, lora_dropout=p)
    nn.init.normal_(layer.lora_B, std=0.3)
    return layer


@pytest.mark.parametrize("p", [0.1, 0.37, 0.8])
def test_layer_matches_the_formula_given_its_mask_forward_and_backward(p):
    """The backward uses the forward's mask: outputs and all gradients equal the explicit formula."""
    layer = _layer(p).train()
    x = torch.randn(3, 30, 48, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = dropout_mask(x.shape, p).to(x.dtype)
    assert 0 < keep.sum() < keep.numel()
    dy = torch.randn(y.shape)
    y.backward(dy)
    s = layer.scaling
    ref = float64_reference(
        lambda x, W, b, A, B, keep: x @ W.t() + b + s * ((x * keep / (1 - p)) @ A.t()) @ B.t(),
        {"x": x, "W": layer.weight, "b": layer.bias, "A": layer.lora_A, "B": layer.lora_B, "keep": keep},
        grad_output=dy,
        wrt=("x", "A", "B"),
    )
    n = 48 + 40 + 4 + 90 + 4  # in + out + r + rows + the mask's scalings: longer than any chain of sums
    assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name="y")
    for k, got in (("x", x.grad), ("A", layer.lora_A.grad), ("B", layer.lora_B.grad)):
        assert_within_rounding(got, ref.grads[k], ref.grad_magnitudes[k], torch.float32, n, name=f"d{k}")


def test_the_lora_branch_is_unbiased_inverted_dropout():
    """Averaged over masks the dropped branch equals the undropped one (scaling 1 / (1 - p))."""
    layer = _layer(0.4, d_in=16, d_out=8, r=2).train()
    x = torch.randn(64, 16)
    with torch.no_grad():
        frozen = nn.functional.linear(x, layer.weight, layer.bias)
        full = layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
        torch.manual_seed(4)
        mean = torch.stack([layer(x) - frozen for _ in range(4000)]).mean(0)
    assert (mean - full).abs().max().item() < 0.05 * full.abs().max().item()


def test_eval_mode_is_identity():
    layer = _layer(0.5).eval()
    x = torch.randn(10, 48)
    ref = layer.weight @ x.t()
    with torch.no_grad():
        y1, y2 = layer(x), layer(x)
        expected = ref.t() + layer.bias + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t()
    assert torch.equal(y1, y2)
    torch.testing.assert_close(y1, expected, atol=1e-5, rtol=1e-5)


def test_backward_keeps_the_masks_lanes_not_a_dropped_fp32_copy():
    n, d_in, d_out, r = 256, 96, 80, 4
    layer = _layer(0.1, d_in, d_out, r).train()
    x = torch.randn(n, d_in, requires_grad=True)
    saved = saved_tensor_bytes(lambda: layer(x), exclude=[*layer.parameters(), x])
    # int16 lanes (n x in) + xa^T (r x n) + B^T (r x out) in fp32; the no-dropout path saves the last two
    assert saved == 2 * n * d_in + 4 * (r * n + r * d_out)
    plain = _layer(0.0, d_in, d_out, r).train()
    assert saved_tensor_bytes(lambda: plain(x), exclude=[*plain.parameters(), x]) == 4 * (r * n + r * d_out)


@pytest.mark.parametrize(
    "x_grad, a_grad, b_grad, w_grad",
    [(True, True, True, False), (False, True, True, False), (True, False, True, False),
     (True, True, False, False), (False, False, True, False), (True, True, True, True)],
    ids=str,
)  # fmt: skip
def test_every_combination_of_requested_gradients_uses_the_same_mask(x_grad, a_grad, b_grad, w_grad):
    p = 0.25
    layer = _layer(p, d_in=20, d_out=12, r=3).train()
    layer.lora_A.requires_grad_(a_grad)
    layer.lora_B.requires_grad_(b_grad)
    layer.weight.requires_grad_(w_grad)
    x = torch.randn(2, 9, 20, requires_grad=x_grad)
    torch.manual_seed(11)
    y = layer(x)
    torch.manual_seed(11)
    keep = dropout_mask(x.shape, p).double() / (1 - p)
    inputs = {"x": x, "A": layer.lora_A, "B": layer.lora_B, "W": layer.weight, "b": layer.bias, "keep": keep}
    wanted = tuple(k for k, flag in (("x", x_grad), ("A", a_grad), ("B", b_grad), ("W", w_grad)) if flag)
    dy = torch.randn(y.shape)
    y.backward(dy)
    s = layer.scaling
    ref = float64_reference(
        lambda x, A, B, W, b, keep: x @ W.t() + b + s * ((x * keep) @ A.t()) @ B.t(),
        inputs,
        grad_output=dy,
        wrt=wanted,
    )
    n = 20 + 12 + 3 + 18 + 4  # in + out + r + rows + the mask's scalings
    assert_within_rounding(y, ref.value, ref.magnitude, torch.float32, n, name="y")
    got = {"x": x.grad, "A": layer.lora_A.grad, "B": layer.lora_B.grad, "W": layer.weight.grad}
    for name in ("x", "A", "B", "W"):
        if name in wanted:
            assert_within_rounding(
                got[name], ref.grads[name], ref.grad_magnitudes[name], torch.float32, n, name=name
            )
        else:
            assert got[name] is None, name


def test_dropout_under_cpu_autocast_bf16_follows_the_formula():
    p = 0.2
    layer = _layer(p, d_in=32, d_out=16, r=4).train()
    x = torch.randn(8, 32, requires_grad=True)
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.manual_seed(5)
    keep = dropout_mask(x.shape, p).float() / (1 - p)
    with torch.no_grad():
        ref = (
            x @ layer.weight.t()
            + layer.bias
            + layer.scaling * ((x * keep) @ layer.lora_A.t()) @ layer.lora_B.t()
        )
    torch.testing.assert_close(y.float(), ref, atol=5e-2, rtol=5e-2)
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()
