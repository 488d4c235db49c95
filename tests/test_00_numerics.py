"""`loralib.numerics`: the rounding bounds hold for fp32 / bf16 matmuls summed in any order, against an
exact float64 (or exact rational) reference, and a real error (a 1% change, the size of a wrong LoRA
term) is outside them. The bound is the worst case, n u relative to the magnitudes, so it is loose at large n.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from loralib.numerics import assert_within_rounding, error_bound, float64_reference, gamma, unit_roundoff

pytestmark = pytest.mark.numerical  # run again under other CPU kernels (scripts/test.sh)


def test_unit_roundoff_and_gamma_by_hand():
    assert unit_roundoff(torch.float32) == 2.0**-24
    assert unit_roundoff(torch.float64) == 2.0**-53
    assert unit_roundoff(torch.bfloat16) == 2.0**-8
    assert unit_roundoff(torch.float16) == 2.0**-11
    assert gamma(3, torch.float32) == pytest.approx(3 * 2.0**-24 / (1 - 3 * 2.0**-24), rel=1e-15)
    with pytest.raises(ValueError, match="no bound"):
        gamma(300, torch.bfloat16)
    with pytest.raises(ValueError, match="n"):
        gamma(-1, torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        unit_roundoff(torch.int32)


def _matmul_orders(a, b):
    """a @ b in fp32 by three summation orders: BLAS, sequential left to right, and reversed pairs."""
    yield a @ b
    seq = torch.zeros(a.shape[0], b.shape[1])
    for k in range(a.shape[1]):
        seq = seq + a[:, k : k + 1] * b[k : k + 1, :]
    yield seq
    terms = a[:, :, None] * b[None, :, :]  # (m, k, n)
    while terms.shape[1] > 1:
        if terms.shape[1] % 2:
            terms = torch.cat([terms, torch.zeros_like(terms[:, :1])], 1)
        terms = terms[:, 1::2] + terms[:, 0::2]
    yield terms[:, 0]


@pytest.mark.parametrize("k", [7, 300, 2048])
def test_the_bound_holds_for_every_summation_order_and_catches_a_real_error(k):
    g = torch.Generator().manual_seed(k)
    a = torch.randn(6, k, generator=g)
    b = torch.randn(k, 5, generator=g) + 3.0  # an offset: large terms that cancel
    ref = float64_reference(lambda a, b: a @ b, {"a": a, "b": b})
    for got in _matmul_orders(a, b):
        assert_within_rounding(got, ref.value, ref.magnitude, torch.float32, k)
    wrong = (a @ b) * (1 + 1e-2)
    with pytest.raises(AssertionError, match="outside the torch.float32 rounding bound"):
        assert_within_rounding(wrong, ref.value, ref.magnitude, torch.float32, k)


def test_the_float64_reference_is_exact_enough_to_judge_fp32():
    """float64's own error on the reference is ~2^-29 of fp32's bound: checked against exact rationals."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 40, generator=g), torch.randn(40, 2, generator=g)
    ref = float64_reference(lambda a, b: a @ b, {"a": a, "b": b})
    for i in range(3):
        for j in range(2):
            exact = sum(Fraction(float(a[i, t])) * Fraction(float(b[t, j])) for t in range(40))
            assert abs(Fraction(float(ref.value[i, j])) - exact) <= Fraction(
                gamma(40, torch.float64)
            ) * Fraction(float(ref.magnitude[i, j]))


def test_half_precision_bound_with_fp32_accumulation():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 256, generator=g), torch.randn(256, 4, generator=g)
    ref = float64_reference(lambda a, b: a @ b, {"a": a, "b": b})
    got = (a.bfloat16() @ b.bfloat16()).float()
    assert_within_rounding(got, ref.value, ref.magnitude, torch.bfloat16, 256, roundings=3)
    assert error_bound(torch.bfloat16, 256, 3) < 0.02  # not vacuous


def test_gradients_and_their_magnitudes():
    x = torch.tensor([[1.0, -2.0]])
    w = torch.tensor([[3.0, 4.0]])
    ref = float64_reference(lambda x, w: x @ w.T, {"x": x, "w": w}, torch.tensor([[2.0]]), wrt=("x", "w"))
    assert ref.value.item() == -5.0 and ref.magnitude.item() == 11.0
    assert ref.grads["w"].tolist() == [[2.0, -4.0]] and ref.grad_magnitudes["w"].tolist() == [[2.0, 4.0]]
    assert x.grad is None and not x.requires_grad  # inputs are copied


def test_nan_and_shape_mismatch_fail():
    ref = torch.ones(3, dtype=torch.float64)
    with pytest.raises(AssertionError, match="1 of 3"):
        assert_within_rounding(torch.tensor([1.0, float("nan"), 1.0]), ref, ref, torch.float32, 4)
    with pytest.raises(AssertionError, match="shape"):
        assert_within_rounding(torch.ones(2), ref, ref, torch.float32, 4)
