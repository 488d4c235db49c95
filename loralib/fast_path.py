"""LoraLinear's fast path: the hand-written autograd Function and what makes it fast.

Covers: `LoraFunction` (y = x W^T + b + s (xd A^T) B^T with a backward that computes only the
gradients autograd asks for and saves only x, an (n x r) activation and the parameters; under
create_graph=True its backward is autograd of the plain formula, so higher-order gradients work), the routing
of its thin products to oneDNN on CPU (`mm_t`), LoRA dropout's CPU mask (`mask_lanes`, `dropout_mask`: 16-bit
lanes of SFC64 words seeded from torch's generator, kept for the backward instead of a dropped fp32
copy of x) and the per-thread scratch buffer its temporaries reuse. Not here: the layer's
parameters, initialisation, merging and state (`loralib.layers`), which calls this.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import torch
import torch.nn.functional as F

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


def mm_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
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


# LoRA dropout on CPU: torch's dropout costs about as much as the frozen layer's matmul (it draws one
# 32-bit number per element from a Mersenne twister, compares floats and multiplies), and the dropped
# copy of x is kept for the backward. Here one 64-bit draw gives four independent 16-bit lanes (from
# numpy's SFC64, seeded from torch's generator so that `torch.manual_seed` reproduces every mask); a
# lane below a threshold keeps its element (keep probability 1 - p to within 2^-17). The lanes (2 bytes
# per element, half an fp32 copy of x) are what the backward keeps: one comparison written straight
# into a float buffer re-forms the mask, cheaper than storing a bool mask and converting it. 1 / (1 - p)
# goes into LoRA's scaling instead of into x. CUDA keeps torch's fused dropout, which is cheap there.
_MASK_LEVELS = 1 << 16


def mask_lanes(
    shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor | None, int]:
    """(int16 random lanes of `shape`, threshold): an element is kept where its lane < threshold.

    Lanes is None when 1 - p rounds to 1 (nothing is dropped, and nothing is drawn).
    """
    threshold = round((1.0 - p) * _MASK_LEVELS) - _MASK_LEVELS // 2  # lanes are int16 in [-2^15, 2^15)
    if threshold >= _MASK_LEVELS // 2:
        return None, threshold
    numel = math.prod(shape)
    words = (numel + 3) // 4
    if torch.device(device).type == "cpu":
        seed = int(torch.randint(0, 2**62, (1,)))  # advances torch's generator: a new mask each call
        lanes = torch.from_numpy(np.random.SFC64(seed).random_raw(words).view(np.int16))
    else:
        lanes = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None).view(torch.int16)
    return lanes[:numel].view(shape), threshold


def dropout_mask(
    shape: tuple[int, ...] | torch.Size, p: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The bool keep-mask LoraLinear's CPU dropout draws: each element True with probability 1 - p,
    independently; seeded from torch's default generator (so `torch.manual_seed` reproduces it and
    every call draws a new one). The keep probability is 1 - p rounded to a multiple of 2^-16."""
    lanes, threshold = mask_lanes(shape, p, device)
    return torch.ones(shape, dtype=torch.bool, device=device) if lanes is None else lanes < threshold


_scratch_buffers = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable (this thread's) buffer for a temporary that dies within one forward or backward.

    Reusing it spares the allocator a fresh (n x d) block per call: on CPU such blocks go back to the
    OS when freed and return as page faults, which cost as much as the elementwise work on them. It
    is as large as the largest layer input seen, and stays allocated.
    """
    numel = math.prod(shape)
    buf = getattr(_scratch_buffers, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != device:
        buf = torch.empty(numel, dtype=dtype, device=device)
        _scratch_buffers.buf = buf
    return buf[:numel].view(shape)


class LoraFunction(torch.autograd.Function):
    """y = x W^T + b + s * (xd A^T) B^T with a hand-written backward.

    Dropout comes in one of two forms: `xd`, the dropped-out input (torch's dropout, on CUDA), or
    `lanes` and `threshold`, random int16 lanes of x's shape whose keep-mask is lanes < threshold
    (CPU), in which case `scaling` already includes 1 / (1 - p) and xd = x * mask is formed for the
    forward product only and formed again in the backward: the saved state is x (the no-dropout path
    keeps it too) plus two bytes per element. With neither, xd is x: no copy, and the two input
    gradients share one buffer. Only the gradients autograd asks for are computed, so a frozen W costs
    no (out x in) weight gradient, and only the tensors those gradients need are saved: the input (for
    dA, or dW when W trains), xa = xd A^T (kept as (r x n), for dB), B^T (r x out) and the parameters.
    Nothing of size (out x in).

    Layouts matter more than flops here. The six thin products add ~3% to the flops of the two big
    matmuls, but each streams an (n x d) matrix through memory, and their speed depends on the
    operands' layouts by up to 2x (measured on the benchmark's CPU, see benchmarks/):
    - B enters as B^T made contiguous once per call (r x out, tiny): `dy @ B` with B itself
      contiguous (out x r) is MKL's slowest form of that product;
    - xa and dy B are produced as (n x r) and copied (tiny) to contiguous (r x n), so that dA =
      (dy B)^T x and dB = (xa^T dy)^T are (r x n) @ (n x d) products;
    - both low-rank terms are added into the big products in place with `addmm_`, so no second
      (n x d) result is allocated (with dropout, the masked term is formed first and the big product
      added into it);
    - the thin products of the backward run before the big dy @ W, while dy is still in cache;
    - on CPU in fp32 the thin products go to oneDNN (`mm_t`), about 2x faster than MKL on them.
    """

    @staticmethod
    def forward(ctx, x, xd, lanes, threshold, weight, bias, lora_A, lora_B, scaling):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if lanes is not None:
            lanes = lanes.reshape(x2.shape)
            keep = torch.lt(lanes, threshold, out=_scratch(x2.shape, x2.dtype, x2.device))
            xd2 = keep.mul_(x2)  # x * mask in a reused buffer: a temporary, not saved
        else:
            xd2 = x2 if xd is None else xd.reshape(-1, shape[-1])
        # Allocated in the output's shape and filled through a 2-D view, so the Function returns a tensor of
        # its own, not a view (DoRA's `DoraScale` scales it in place).
        result = torch.empty((*shape[:-1], weight.shape[0]), dtype=x2.dtype, device=x2.device)
        out = result.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(x2, weight.t(), out=out)
        else:
            torch.addmm(bias, x2, weight.t(), out=out)
        bt = lora_B.t().contiguous()  # (r, out)
        xa = mm_t(xd2, lora_A)  # (n, r): the only extra activation LoRA keeps
        del xd2
        out.addmm_(xa, bt, alpha=scaling)
        need_x, need_xd, _, _, need_w, _, need_a, need_b, _ = ctx.needs_input_grad
        ctx.save_for_backward(
            # The inputs themselves, not reshaped copies, so that a backward with create_graph=True can
            # differentiate through them (`_backward_with_graph`).
            x if need_w or (need_a and xd is None) else None,  # with a mask, dA re-forms x * mask
            xd if need_a else None,
            lanes if lanes is not None and (need_a or need_x) else None,
            xa.t().contiguous() if need_b else None,  # (r, n), the layout dB's product wants
            weight if need_x or need_w else None,
            lora_A,
            lora_B,
            bt if need_a or need_xd or (need_x and xd is None) else None,
        )
        ctx.scaling = scaling
        ctx.threshold = threshold
        ctx.shape = shape
        ctx.has_xd = xd is not None
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, xd, lanes, xa_t, weight, lora_A, lora_B, bt = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the gradients must be differentiable themselves
            return LoraFunction._backward_with_graph(
                ctx, grad_out, x, xd, lanes, xa_t, weight, lora_A, lora_B
            )
        x2 = None if x is None else x.reshape(-1, ctx.shape[-1])
        xd2 = None if xd is None else xd.reshape(-1, ctx.shape[-1])
        s = ctx.scaling
        shape = ctx.shape
        dy = grad_out.reshape(-1, grad_out.shape[-1])
        need_x, need_xd, _, _, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        dx = dxd = dw = dbias = da = db = None
        dyb = None
        # The thin products come first, while dy (and then x) are still in cache from the step
        # that produced dy; the big dy @ W would evict them.
        if need_a or need_xd or (need_x and not ctx.has_xd):
            dyb = mm_t(dy, bt)  # dy @ B, (n, r)
        if need_b:
            db = mm_t(xa_t, dy.t()).mul_(s).t()  # (xa^T dy)^T, an (out x r) view
        if lanes is None:
            if need_a:
                da = mm_t(dyb.t().contiguous(), (x2 if xd2 is None else xd2).t()).mul_(s)
            if need_x:
                dx = torch.mm(dy, weight)
                if not ctx.has_xd:
                    dx.addmm_(dyb, lora_A, alpha=s)
        else:
            # dx = dy W + s (dy B A) * mask and dA = s (dy B)^T (x * mask): the mask as a float
            # multiplier once, reused in place for x * mask after the input gradient is done with it.
            keep = torch.lt(lanes, ctx.threshold, out=_scratch(lanes.shape, dy.dtype, dy.device))
            if need_x:
                dx = torch.mm(dyb, lora_A).mul_(keep)
            if need_a:
                da = torch.mm(dyb.t(), keep.mul_(x2)).mul_(s)
            del keep
            if need_x:
                dx.addmm_(dy, weight, beta=s)
        if dx is not None:
            dx = dx.view(shape)
        if need_xd and ctx.has_xd:
            dxd = torch.mm(dyb, lora_A).mul_(s).view(shape)
        if need_w:
            dw = torch.mm(dy.t(), x2)
        if need_bias:
            dbias = dy.sum(0)
        return dx, dxd, None, None, dw, dbias, da, db, None

    @staticmethod
    def _backward_with_graph(ctx, grad_out, x, xd, lanes, xa_t, weight, lora_A, lora_B):
        """The gradients by autograd of the plain formula on the saved inputs, so that they carry a graph
        (gradient penalties, `torch.autograd.grad(..., create_graph=True)`, Hessian-vector products).

        y is linear in x (and in xd), so where x was not saved (no parameter gradient needs its value) a
        zero stands in for it: dy/dx does not depend on x. With lora_A frozen the layer keeps xa = x A^T
        instead of x; that is exact while nothing upstream of x needs a gradient, and refused otherwise.
        """
        need_x, need_xd, _, _, need_w, need_bias, need_a, need_b, _ = ctx.needs_input_grad
        shape, s = ctx.shape, ctx.scaling
        x_kept = x is not None or (ctx.has_xd and xd is not None)
        if need_b and not x_kept and (need_x or need_xd):
            raise RuntimeError(
                "a second-order gradient (create_graph=True) through a LoraLinear whose lora_A is frozen: "
                "d(dB)/dx needs the layer's input, which such a layer does not keep (that is the memory "
                "it saves). Set `layer.fast_path = False` on the LoraLinear layers of this run (plain "
                "autograd, any order), or let lora_A train."
            )
        with torch.enable_grad():
            xr = x if x is not None else grad_out.new_zeros(shape).requires_grad_(need_x)
            if ctx.has_xd:
                xl = xd if xd is not None else grad_out.new_zeros(shape).requires_grad_(need_xd)
            elif lanes is not None:
                xl = xr * torch.lt(lanes.reshape(shape), ctx.threshold).to(xr.dtype)
            else:
                xl = xr
            w = weight if weight is not None else grad_out.new_zeros(grad_out.shape[-1], shape[-1])
            if x_kept:
                xa = F.linear(xl, lora_A)
            else:  # only B trains and nothing upstream needs a gradient: xa is a constant
                xa = F.linear(xl, lora_A) + (0 if xa_t is None else xa_t.t().reshape(*shape[:-1], -1))
            y = F.linear(xr, w) + F.linear(xa, lora_B) * s
            wanted = [(i, t) for i, (flag, t) in enumerate(
                ((need_x, xr), (need_xd, xl), (need_w, w), (need_a, lora_A), (need_b, lora_B))
            ) if flag]  # fmt: skip
            got = torch.autograd.grad(
                y, [t for _, t in wanted], grad_out, create_graph=True, allow_unused=True
            )
        out = [None] * 5
        for (i, t), g in zip(wanted, got):
            out[i] = torch.zeros_like(t) if g is None else g
        dx, dxd, dw, da, db = out
        dbias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if need_bias else None
        return dx, dxd, None, None, dw, dbias, da, db, None
