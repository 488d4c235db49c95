"""`LoraLinear`: a frozen `nn.Linear` plus a trainable low-rank update, the whole idea of LoRA.

    y = x W^T + b + dropout(x) A^T B^T * (alpha / r)

A is (r x in), B is (out x r) and starts at zero, so a fresh layer computes exactly what the
original did. The unmerged forward never builds the (out x in) matrix B @ A: it costs two thin
matmuls of O(n d r) instead of O(d^2 r) per call. A custom autograd function keeps forward +
backward close to the frozen layer's cost: no gradient for the frozen W, the low-rank terms added
in place into the big products, thin products in the layouts (and, on CPU, the oneDNN kernels)
that run them fastest, and only x, an (n x r) activation and the parameters saved for backward.
benchmarks/bench_speed.py measures it against the frozen nn.Linear, PEFT and full fine-tuning.

Covers: the layer, its initialisations, merge/unmerge. Not here: finding layers in a model and
swapping them in (`loralib.injection`), saving adapters (`loralib.adapters`).
"""

from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

INITS = ("kaiming", "gaussian", "article")


def _check_lora_args(r: int, alpha: float | None, dropout: float, init: str) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(
            f"LoRA rank r must be a positive integer, got r={r!r}; typical values are 4, 8 or 16."
        )
    if alpha is not None and (not isinstance(alpha, (int, float)) or alpha <= 0):
        raise ValueError(
            f"lora alpha must be a positive number (or None for alpha = r), got alpha={alpha!r}."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got dropout={dropout!r}.")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; choose one of {INITS}.")


# Thin products (one side of width r) on CPU: MKL, which torch.mm uses, runs these shapes at about
# a third of its big-matmul speed on the benchmark's CPU, while oneDNN's inner product, reachable as
# torch.ops.mkldnn._linear_pointwise (the op TorchInductor emits for CPU linears), is ~2x faster on
# them. It is an internal op, so it is probed once and torch.mm is used whenever it is missing,
# fails the probe, mkldnn is disabled, the tensors are not fp32 on CPU, or the product is small.
_ONEDNN_MIN_ELEMENTS = 1 << 16


@functools.cache
def _onednn_linear():
    """The oneDNN linear op if it is usable here (checked against torch.mm once), else None."""
    if os.environ.get("LORALIB_NO_ONEDNN", "") not in ("", "0"):
        return None
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        op = torch.ops.mkldnn._linear_pointwise
        g = torch.Generator().manual_seed(0)
        a, w = torch.randn(64, 48, generator=g), torch.randn(5, 96, generator=g)[:, ::2]
        with torch.no_grad():
            got = op(a, w, None, "none", [], "")
        if got.shape != (64, 5) or not torch.allclose(got, a @ w.t(), rtol=1e-4, atol=1e-4):
            return None
        return op
    except Exception:  # any failure means "not available": the torch.mm path is always correct
        return None


def _mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for a thin product, routed to oneDNN on CPU fp32 when that is available."""
    if (
        a.device.type == "cpu"
        and a.dtype == torch.float32
        and b.dtype == torch.float32
        and max(a.numel(), b.numel()) >= _ONEDNN_MIN_ELEMENTS
        and a.is_contiguous()
        and (b.is_contiguous() or b.t().is_contiguous())  # plain layouts only (no expanded grads)
        and torch.backends.mkldnn.enabled
    ):
        op = _onednn_linear()
        if op is not None:
            return op(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


class _LoraLinearFn(torch.autograd.Function):
    """y = x W^T + b + s * (xd A^T) B^T with a hand-written backward.

    `xd` is the dropped-out input, or None when dropout is off (then xd is x, no copy is made, and
    the two input gradients share one buffer). Only the gradients autograd asks for are computed,
    so a frozen W costs no (out x in) weight gradient, and only the tensors those gradients need
    are saved: the input (for dA, or dW when W trains), xa = xd A^T (kept as (r x n), for dB), B^T
    (r x out) and the parameters. Nothing of size (out x in), no second (n x in) activation.

    Layouts matter more than flops here. The six thin products add ~3% to the flops of the two big
    matmuls, but each streams an (n x d) matrix through memory, and their speed depends on the
    operands' layouts by up to 2x (measured on the benchmark's CPU, see benchmarks/):
    - B enters as B^T made contiguous once per call (r x out, tiny): `dy @ B` with B itself
      contiguous (out x r) is MKL's slowest form of that product;
    - xa and dy B are produced as (n x r) and copied (tiny) to contiguous (r x n), so that dA =
      (dy B)^T x and dB = (xa^T dy)^T are (r x n) @ (n x d) products;
    - both low-rank terms are added into the big products in place with `addmm_`, so no second
      (n x d) result is allocated;
    - the thin products of the backward run before the big dy @ W, while dy is still in cache;
    - on CPU in fp32 the thin products go to oneDNN (`_mm_t`), about 2x faster than MKL on them.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_A, lora_B, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])
        if bias is None:
            out = torch.mm(x2, weight.t())
        else:
            out = torch.addmm(bias, x2, weight.t())
        bt = lora_B.t().contiguous()  # (r, out)
        xa = _mm_t(xd2, lora_A)  # (n, r): the only extra activation LoRA keeps
        out.addmm_(xa, bt, alpha=scaling)
        need_x, need_xd, need_w, _, need_a, need_b, _ = ctx.needs_input_grad
        ctx.save_for_backward(
            x2 if need_w or (need_a and xd is None) else None,
            xd2 if need_a and xd is not None else None,
            xa.t().contiguous() if need_b else None,  # (r, n), the layout dB's product wants
            weight if need_x else None,
            lora_A if need_x or need_xd else None,
            bt if need_a or need_xd or (need_x and xd is None) else None,
        )
        ctx.scaling = scaling
        ctx.shape = shape
        ctx.has_xd = xd is not None
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2, xd2, xa_t, weight, lora_A, bt = ctx.saved_tensors
        s = ctx.scaling
        shape = ctx.shape
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_xd, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dx = dxd = dw = dbias = da = db = None
        dyb = None
        # The thin products come first, while dy (and then x) are still in cache from the step
        # that produced dy; the big dy @ W would evict them.
        if need_a or need_xd or (need_x and not ctx.has_xd):
            dyb = _mm_t(dy, bt)  # dy @ B, (n, r)
        if need_b:
            db = _mm_t(xa_t, dy.t()).mul_(s).t()  # (xa^T dy)^T, an (out x r) view
        if need_a:
            da = _mm_t(dyb.t().contiguous(), (x2 if xd2 is None else xd2).t()).mul_(s)
        if need_x:
            dx = torch.mm(dy, weight)
            if not ctx.has_xd:
                dx.addmm_(dyb, lora_A, alpha=s)
            dx = dx.view(shape)
        if need_xd and ctx.has_xd:
            dxd = torch.mm(dyb, lora_A).mul_(s).view(shape)
        if need_w:
            dw = torch.mm(dy.t(), x2)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dxd, dw, dbias, da, db, None


class LoraLinear(nn.Linear):
    """A `nn.Linear` whose frozen weight gets a trainable low-rank update B @ A scaled by alpha / r.

    It subclasses `nn.Linear`, so the original `weight`/`bias` keep their state-dict names and a
    stock checkpoint loads into it; the adapter adds `lora_A` (r x in) and `lora_B` (out x r).

    Args:
        in_features, out_features, bias: as for `nn.Linear`.
        r: rank of the update (> 0).
        alpha: scaling numerator; the update is multiplied by alpha / r. None means alpha = r
            (scaling 1), so doubling r with alpha fixed halves each direction's contribution.
        dropout: dropout on the input of the LoRA path only (0 disables it and its copy).
        init: "kaiming" (A kaiming-uniform as PEFT and microsoft/LoRA), "gaussian" (A ~ N(0, 1/r^2),
            PEFT's "gaussian"), or "article" (A ~ N(0, 1), unscaled, as in the seed article).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
        device=None,
        dtype=None,
    ) -> None:
        _check_lora_args(r, alpha, dropout, init)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.alpha = float(r if alpha is None else alpha)
        self.scaling = self.alpha / r
        self.init = init
        self.lora_dropout_p = float(dropout)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=dtype))
        self.merged = False
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        init: str = "kaiming",
    ) -> LoraLinear:
        """Wrap an existing `nn.Linear`: its weight and bias tensors are reused (not copied) and frozen."""
        if isinstance(linear, LoraLinear):
            raise TypeError(
                "this layer already has LoRA; call unload_lora()/unmerge first or adapt another layer."
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoraLinear.from_linear expects an nn.Linear, got {type(linear).__name__}.")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            r=r,
            alpha=alpha,
            dropout=dropout,
            init=init,
            device="meta",
            dtype=w.dtype,
        )
        # Build on "meta" to avoid allocating a throw-away (out x in) weight, then attach the real tensors.
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=w.dtype))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=w.dtype))
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-draw A with the chosen init and set B to zero (the layer then equals the frozen one)."""
        if self.lora_A.device.type == "meta":
            return
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:  # "article"
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (alpha / r) * B @ A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` so inference costs the same as a plain Linear. Idempotent."""
        if not self.merged:
            self.weight.add_(self.delta_weight().to(self.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (exact up to float rounding). Idempotent."""
        if self.merged:
            self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the update merged in (the adapter is not kept)."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        lin.train(self.training)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        xd = self.lora_dropout(x) if (self.lora_dropout_p > 0 and self.training) else None
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # The custom Function bypasses autocast's casting, so cast the operands as autocast would.
            dt = torch.get_autocast_dtype(device_type)
            x, weight, lora_A, lora_B = x.to(dt), weight.to(dt), lora_A.to(dt), lora_B.to(dt)
            bias = bias.to(dt) if bias is not None else None
            xd = xd.to(dt) if xd is not None else None
            with torch.autocast(device_type, enabled=False):
                return _LoraLinearFn.apply(x, xd, weight, bias, lora_A, lora_B, self.scaling)
        return _LoraLinearFn.apply(x, xd, weight, bias, lora_A, lora_B, self.scaling)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, alpha={self.alpha:g}, dropout={self.lora_dropout_p:g}, "
            f"init={self.init}, merged={self.merged}"
        )
