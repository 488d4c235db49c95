"""DoRA (Liu et al. 2024, "weight-decomposed low-rank adaptation"): the magnitude variant of every LoRA layer.

DoRA writes the adapted weight as a magnitude times a direction, one magnitude per output feature:

    W' = m * (W0 + s B A) / ||W0 + s B A||_row        m: `lora_magnitude_vector`, initialised to ||W0 + s B A||_row

where a "row" is one output feature (a row of an `nn.Linear` weight; a column of GPT-2's Conv1D weight and
of an embedding table; an output channel of a convolution). With g = m / ||W0 + s B A|| the layer computes

    y = g * (x W0^T + s (xd A^T) B^T) + b           (xd: x with LoRA dropout, on the low-rank path only)

The norm is treated as a constant in the backward (the paper's section 4.3, as PEFT): it carries no
gradient, so dA and dB are LoRA's with the output gradient multiplied by g, and dm = sum(dy * z) / norm.

What this file does differently from PEFT's DoRA, on purpose:
- the norm is computed without forming the (out x in) update: ||W0 + s B A||^2 per row is
  ||W0||^2 + 2 s <W0 A^T, B> + s^2 <B (A A^T), B>, with ||W0||^2 cached (W0 is frozen), so a step costs
  one (out x in x r) product and no (out x in) temporary (PEFT builds B @ A and W0 + s B A every call);
- `DoraScale` applies g in place on the layer's output and keeps that output for the backward, so the
  gradient of m needs neither a second base matmul nor a saved (n x out) copy (an in-place change of the
  output before backward raises autograd's "modified by an inplace operation"; `layer.fast_path = False`
  takes the plain formula through stock autograd instead);
- with LoRA dropout, dropout applies to the low-rank path only, as in the formula above. PEFT (and the
  paper's code) instead compute g * W0 xd + (1 - g) W0 x: one more base matmul per training step. Both
  have the same expectation over masks (E[xd] = x), and they are equal without dropout and in eval mode,
  which is what a saved adapter is used in, so adapters convert both ways with identical outputs.

Covers: the norm (`row_norm`, `w0_sq_norm`), the magnitude's init, `DoraScale`, and merging (`merge_into`,
`merge`, `unmerge`, `unmerged`). Each layer says how its weight reads as (out x in) (`LoraLayer._dora_2d`) and calls
these. Not here: the layers themselves (`loralib.layers.linear`, `.embedding`, `.conv`, `.conv1d`), the
LoRA fast path the Linear runs under g (`loralib.fast_path`).
"""

from __future__ import annotations

import torch

MAGNITUDE = "lora_magnitude_vector"  # PEFT's name, in the model and in its saved files
MERGED_NORM_KEY = "lora_merged_norm"  # state-dict entry of a merged layer: the norm unmerge divides by


def _norm_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the norm is computed in: fp32, or fp64 for fp64 adapters."""
    return torch.promote_types(dtype, torch.float32)


def w0_sq_norm(layer, w0: torch.Tensor) -> torch.Tensor:
    """||W0||^2 per row of the frozen (out x in) weight `w0`, cached on the layer until the weight changes
    (its storage, version counter, dtype or shape)."""
    dt = _norm_dtype(layer.lora_A.dtype)
    key = (w0.data_ptr(), w0._version, w0.dtype, w0.device, tuple(w0.shape), dt)
    cached = layer.__dict__.get("_dora_w0_sq")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            sq = torch.linalg.vector_norm(w0, dim=1, dtype=dt).square_()
        cached = (key, sq)
        layer.__dict__["_dora_w0_sq"] = cached
    return cached[1]


@torch.no_grad()
def row_norm(
    layer, w0: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """||W0 + s B A|| per row (out,), without forming an (out x in) matrix; no gradient (a constant).

    w0 (out x in), lora_A (r x in), lora_B (out x r), in any layouts (views of transposed weights are fine).
    """
    dt = _norm_dtype(lora_A.dtype)
    a, b = lora_A.to(dt), lora_B.to(dt)
    # W0 A^T in W0's dtype (no fp32 copy of a half-precision W0), accumulated to (out x r), then upcast.
    wa = (w0 @ lora_A.to(w0.dtype).t()).to(dt)
    cross = (wa * b).sum(1)
    ba_sq = ((b @ (a @ a.t())) * b).sum(1)
    sq = w0_sq_norm(layer, w0) + (2.0 * scaling) * cross + (scaling * scaling) * ba_sq
    return sq.clamp_min_(0).sqrt_()


def gain(magnitude: torch.Tensor, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """g = m / norm per output feature, divided in the norm's dtype, returned in `dtype`."""
    return (magnitude.to(norm.dtype) / norm).to(dtype)


def channel_view(t: torch.Tensor, ndim: int, channel_dim: int) -> torch.Tensor:
    """A (c,) vector shaped to broadcast over dimension `channel_dim` of an `ndim`-dimensional output."""
    if channel_dim in (-1, ndim - 1):
        return t
    shape = [1] * ndim
    shape[channel_dim] = -1
    return t.view(shape)


class DoraScale(torch.autograd.Function):
    """y = g * z + b with g = m / norm, computed in place on z (the layer's output before the magnitude).

    Backward: dz = g * dy, dm = sum(dy * (y - b)) / m (= sum(dy * z) / norm), db = sum(dy); `norm` is a
    constant. Only y (the output itself, no copy) and the (c,) vectors are kept.
    """

    @staticmethod
    def forward(ctx, z, magnitude, norm, bias, channel_dim):
        g = gain(magnitude, norm, z.dtype)
        z.mul_(channel_view(g, z.dim(), channel_dim))
        if bias is not None:
            z.add_(channel_view(bias.to(z.dtype), z.dim(), channel_dim))
        ctx.mark_dirty(z)
        ctx.channel_dim = channel_dim
        ctx.save_for_backward(z, magnitude, g, bias)
        return z

    @staticmethod
    def backward(ctx, dy):
        y, magnitude, g, bias = ctx.saved_tensors
        need_z, need_m, _, need_b, _ = ctx.needs_input_grad
        cd = ctx.channel_dim % dy.dim()
        dims = [d for d in range(dy.dim()) if d != cd]
        dz = dm = db = buf = None
        if need_m:
            buf = y * dy if bias is None else (y - channel_view(bias.to(y.dtype), y.dim(), cd)).mul_(dy)
            dm = buf.sum(dims, dtype=_norm_dtype(magnitude.dtype))
            dm = (dm / magnitude.to(dm.dtype)).to(magnitude.dtype)
        if need_z:  # into dm's (n x out) temporary when there is one: one allocation, not two
            gv = channel_view(g, dy.dim(), cd)
            dz = dy * gv if buf is None else torch.mul(dy, gv, out=buf)
        if need_b:
            db = dy.sum(dims).to(bias.dtype)
        return dz, dm, None, db, None


def scale(layer, z: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor, channel_dim: int = -1):
    """The layer's output from z (its output without bias and magnitude): g * z + bias. The plain formula
    through autograd under `torch.compile` or with `layer.fast_path = False`, else `DoraScale`."""
    m = layer.lora_magnitude_vector
    if torch.compiler.is_compiling() or not getattr(layer, "fast_path", True):
        out = z * channel_view(gain(m, norm, z.dtype), z.dim(), channel_dim)
        return out if bias is None else out + channel_view(bias.to(z.dtype), z.dim(), channel_dim)
    return DoraScale.apply(z, m, norm, bias, channel_dim)


def current_norm(layer) -> torch.Tensor:
    """||W0 + s B A|| per output feature of `layer` (unmerged weight), a constant."""
    a, b = layer._dora_factors()
    return row_norm(layer, layer._dora_2d(layer.weight), a, b, layer.scaling)


@torch.no_grad()
def init_magnitude(layer) -> None:
    """m = ||W0 + s B A|| (so g = 1 and the layer starts as LoRA does: as the base when B = 0)."""
    layer.lora_magnitude_vector.copy_(current_norm(layer).to(layer.lora_magnitude_vector.dtype))


def _g_rows(layer, norm: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return gain(layer.lora_magnitude_vector, norm, dtype)[:, None]


@torch.no_grad()
def merge_into(layer, weight: torch.Tensor) -> torch.Tensor:
    """weight (the layer's W0, or a copy of it) <- g * (W0 + s B A), in place; returns the norm used."""
    norm = current_norm(layer)
    w2 = layer._dora_2d(weight)
    w2.add_(layer._dora_2d(layer.delta_weight()).to(w2.dtype)).mul_(_g_rows(layer, norm, w2.dtype))
    return norm


@torch.no_grad()
def merge(layer) -> None:
    """weight <- g * (W0 + s B A), per output feature; the norm is kept for `unmerge`."""
    layer._dora_merged_norm = merge_into(layer, layer.weight)


@torch.no_grad()
def _unmerge_into(layer, weight: torch.Tensor) -> torch.Tensor:
    """weight (the merged weight, or a copy of it) <- weight / g - s B A, in place, with the norm kept at
    merge time (exact up to rounding); returns `weight`."""
    w2 = layer._dora_2d(weight)
    w2.div_(_g_rows(layer, layer._dora_merged_norm, w2.dtype)).sub_(
        layer._dora_2d(layer.delta_weight()).to(w2.dtype)
    )
    return weight


@torch.no_grad()
def unmerge(layer) -> None:
    """weight <- weight / g - s B A; the kept norm is then dropped."""
    _unmerge_into(layer, layer.weight)
    layer._dora_merged_norm = None


@torch.no_grad()
def unmerged(layer) -> torch.Tensor:
    """The frozen weight without the update, as a new tensor, from a merged layer."""
    return _unmerge_into(layer, layer.weight.clone())
