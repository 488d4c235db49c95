"""How far a float32 / float16 / bfloat16 result may lie from its float64 reference, on any CPU or GPU.

A computation built from sums and products (matmuls, additions, scaling by a positive constant, a 0/1
mask: LoRA's forward and every gradient of it are such multilinear maps) that is done in floating point
differs from exact arithmetic by at most

    |computed - exact|  <=  gamma_n * (the same computation on the absolute values of its inputs)

elementwise, where gamma_n = n u / (1 - n u), u is the unit roundoff of the type and n the number of
roundings along the longest chain (a matmul of inner size k: k). The bound holds for every order of
summation, so for every kernel: AVX-512 or AVX2 or the default ATen path, oneDNN or MKL, with or
without FMA, blocked or not (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., 3.1).
A fixed atol holds only on the machine it was tuned on; this bound is derived from the dtype and the
reduction size instead, and a real bug (a wrong scaling, a missing term) is far outside it.

Half precision (fp16 / bf16) is bounded the same way with two parts: each rounding of an operand or an
intermediate to the half type (`roundings`) costs u_half, and the sums accumulate in fp32 (what every
CPU and GPU matmul kernel does for half inputs), costing gamma_n(fp32).

Covers: `unit_roundoff`, `gamma`, `error_bound`, `Reference` / `float64_reference` (a function's value
and gradients in float64 together with their magnitudes) and `assert_within_rounding`. Not here: which
computations are multilinear; that is the caller's claim (a softmax or a layer norm is not, and needs
a float64 run of both sides instead).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

HALF_TYPES = (torch.float16, torch.bfloat16)


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-(mantissa bits + 1): half the distance from 1 to the next number of `dtype`."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}.")
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of n successive roundings in `dtype`."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n (the number of roundings) must be a non-negative int, got {n!r}.")
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(
            f"n={n} roundings in {dtype} leave no bound (n u = {nu:.3g} >= 1); compare in a wider type."
        )
    return nu / (1 - nu)


def error_bound(dtype: torch.dtype, n: int, roundings: int = 4) -> float:
    """The relative bound g with |computed - exact| <= g * magnitude, for a chain of `n` accumulated terms.

    dtype: the type the computation is done in. For fp32 / fp64 the sums run in that type: gamma of
    n + roundings. For fp16 / bf16 the operands and intermediates are rounded to it `roundings` times
    and the sums accumulate in fp32: (1 + gamma_roundings(half)) (1 + gamma_n(fp32)) - 1.
    """
    if dtype in HALF_TYPES:
        a, b = gamma(roundings, dtype), gamma(n, torch.float32)
        return a + b + a * b
    return gamma(n + roundings, dtype)


@dataclass
class Reference:
    """A function's float64 value and gradients, and the same computed on absolute values (magnitudes)."""

    value: torch.Tensor
    magnitude: torch.Tensor
    grads: dict[str, torch.Tensor]
    grad_magnitudes: dict[str, torch.Tensor]


def float64_reference(
    fn: Callable[..., torch.Tensor],
    inputs: Mapping[str, torch.Tensor | None],
    grad_output: torch.Tensor | None = None,
    wrt: tuple[str, ...] = (),
) -> Reference:
    """Evaluate `fn(**inputs)` in float64 (and its gradients for `wrt` given `grad_output`), and again on
    |inputs| with |grad_output|: for a multilinear `fn` the second run bounds every term's size, which is
    what `error_bound` multiplies (see the module docstring). Inputs are copied, never modified."""

    def run(transform):
        leaves = {
            k: None if v is None else transform(v.detach().to(torch.float64)).requires_grad_(k in wrt)
            for k, v in inputs.items()
        }
        value = fn(**leaves)
        grads = {}
        if wrt:
            if grad_output is None:
                raise ValueError("grad_output is needed to compute gradients for wrt=...")
            got = torch.autograd.grad(
                value, [leaves[k] for k in wrt], transform(grad_output.detach().to(torch.float64))
            )
            grads = dict(zip(wrt, got))
        return value.detach(), grads

    value, grads = run(lambda t: t)
    magnitude, grad_magnitudes = run(torch.abs)
    return Reference(value, magnitude, grads, grad_magnitudes)


def assert_within_rounding(
    actual: torch.Tensor,
    reference: torch.Tensor,
    magnitude: torch.Tensor,
    dtype: torch.dtype,
    n: int,
    roundings: int = 4,
    name: str = "value",
) -> None:
    """Raise AssertionError unless |actual - reference| <= error_bound(dtype, n) * magnitude everywhere.

    reference, magnitude: float64 (from `float64_reference`). A tiny absolute floor (n x the smallest
    normal number of `dtype`) covers results that underflow. The message names the worst element.
    """
    if actual.shape != reference.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference {tuple(reference.shape)}")
    bound = error_bound(dtype, n, roundings)
    err = (actual.detach().to(torch.float64) - reference).abs()
    tol = bound * magnitude + n * torch.finfo(dtype).tiny
    bad = ~(err <= tol)  # NaN counts as bad
    if bad.any():
        ratio = torch.where(bad, err / tol, torch.zeros_like(err))
        worst = int(ratio.flatten().argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), err.shape))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements are outside the {dtype} rounding bound "
            f"(gamma = {bound:.3g} for n = {n}); worst at {idx}: got {actual.flatten()[worst].item():.9g}, "
            f"float64 reference {reference.flatten()[worst].item():.9g}, error {err.flatten()[worst].item():.3g} "
            f"> bound {tol.flatten()[worst].item():.3g}"
        )
