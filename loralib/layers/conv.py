"""LoRA on `nn.Conv1d`, `nn.Conv2d` and `nn.Conv3d`, in PEFT's layout.

    y = conv(x; W) + conv_1x1(conv(dropout(x); A); B) * scaling

A is a convolution with the base's kernel, stride and padding from the input channels to r channels
(no bias), B a 1x1 convolution from r channels to the output channels, grouped like the base. A starts
kaiming-uniform and B at zero, as a Linear's. Merged, the update is the composition of the two kernels,
einsum("oj,ji...->oi...", B, A) * scaling, added to W; a grouped base (groups > 1) cannot hold that
update (its weight sees only its group's input channels), so merging it is refused, as PEFT does, and
the rank must be divisible by groups.

What PEFT's layer does not carry over is refused here too, before anything changes: a base with
dilation != 1 or a padding_mode other than "zeros" (PEFT's A would compute another shape or border).

Covers: `LoraConv1d`, `LoraConv2d`, `LoraConv3d`. Not here: what every LoRA layer shares
(`loralib.layers.base`).
"""

from __future__ import annotations

from typing import Unpack

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_bool
from loralib.layers import dora
from loralib.layers.base import LoraKwargs, LoraLayer, module_kind, register_lora_layer

# The settings of a torch convolution that its forward reads: copied onto the LoRA layer and back.
_CONV_ATTRS = (
    "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode",
    "output_padding", "transposed", "_reversed_padding_repeated_twice",
)  # fmt: skip


class _LoraConvNd(LoraLayer):
    """What the three convolutions share; each subclass names its base type and F.conv function."""

    conv_fn = None

    @classmethod
    def _check_base(cls, conv: nn.Module, r: int) -> None:
        if any(d != 1 for d in conv.dilation):
            raise ValueError(
                f"LoRA on a {type(conv).__name__} with dilation={conv.dilation} is not supported."
            )
        if conv.padding_mode != "zeros":
            raise ValueError(
                f"LoRA on a {type(conv).__name__} with padding_mode={conv.padding_mode!r} is not supported "
                "(only 'zeros', as PEFT's)."
            )
        if r % conv.groups:
            raise ValueError(
                f"r={r} is not divisible by the {type(conv).__name__}'s groups={conv.groups}: B is grouped "
                "like the base, so choose r as a multiple of groups."
            )

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        ones = (1,) * len(module.kernel_size)
        return (r, module.in_channels, *module.kernel_size), (module.out_channels, r // module.groups, *ones)

    @classmethod
    def from_module(
        cls, module: nn.Module, *, autocast_adapter_dtype: bool = True, **lora: Unpack[LoraKwargs]
    ):
        """Wrap an existing convolution: its weight and bias are reused (not copied) and frozen."""
        if isinstance(module, LoraLayer):
            raise TypeError("this layer already has LoRA; call unload_lora() first or adapt another layer.")
        if type(module) is not cls.base_type:
            raise TypeError(
                f"{cls.__name__}.from_module expects an nn.{cls.base_type.__name__}, got {module_kind(module)}."
            )
        s = cls._settings(lora)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        cls._check_base(module, s.r)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        for attr in _CONV_ATTRS:
            setattr(layer, attr, getattr(module, attr))
        return layer._adopt(module, s, autocast_adapter_dtype)

    def delta_weight(self) -> torch.Tensor:
        """The merged update: B's 1x1 kernel composed with A's, times scaling; shape of `weight`."""
        if self.groups > 1:
            raise ValueError(f"cannot merge: {self._grouped_problem()}.")
        return torch.einsum("oj,ji...->oi...", self.lora_B.flatten(1), self.lora_A) * self.scaling

    def _grouped_problem(self) -> str:
        return (
            f"a {self.base_type.__name__} with groups={self.groups} cannot hold the merged update (its weight "
            "sees only its group's input channels, the update all of them); keep it unmerged"
        )

    def merge_problem(self) -> str | None:
        return super().merge_problem() or (self._grouped_problem() if self.groups > 1 else None)

    def to_base(self) -> nn.Module:
        """A plain convolution with the update merged in (the adapter is not kept)."""
        self.merge()
        plain = self.base_type.__new__(self.base_type)
        nn.Module.__init__(plain)
        for attr in _CONV_ATTRS:
            setattr(plain, attr, getattr(self, attr))
        plain.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        plain.bias = (
            None if self.bias is None else nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        )
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detour = self._detour(x)  # a mixed batch, or an adapter this layer lacks (`loralib.layers.slots`)
        if detour is not None:
            return detour
        if self.merged:
            return self._guard_merged_training(self.base_type.forward(self, x))
        if self.use_dora:  # g per output channel * (conv(x; W0) + s update) + b (`loralib.layers.dora`)
            out = type(self).conv_fn(
                x, self.weight, None, self.stride, self.padding, self.dilation, self.groups
            )
        else:
            out = self.base_type.forward(self, x)
        xd = self.lora_dropout(x) if self.training and self.lora_dropout_p > 0 else x
        a, b, bb = self.lora_A, self.lora_B, self.lora_B_bias
        if not torch.is_autocast_enabled(x.device.type) and a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
            bb = None if bb is None else bb.to(x.dtype)
        h = type(self).conv_fn(xd, a, None, self.stride, self.padding)
        out = out + type(self).conv_fn(h, b, bb, 1, 0, 1, self.groups) * self.scaling
        if self.use_dora:
            return dora.scale(self, out, self.bias, self.dora_norm(), channel_dim=1)
        return out

    def dora_problem(self) -> str | None:
        if self.groups > 1:
            return (
                f"a grouped convolution (groups={self.groups}) has no per-channel norm of the composed update"
            )
        return None

    def _dora_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(weight.shape[0], -1)  # (out x in * kernel); a view, so merging writes the weight

    def peft_magnitude(self) -> torch.Tensor:
        return self.lora_magnitude_vector.view(1, -1, *(1,) * len(self.kernel_size))

    def _dora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A.flatten(1), self.lora_B.flatten(1)

    def extra_repr(self) -> str:
        return f"{self.base_type.extra_repr(self)}, {self._lora_repr()}"


@register_lora_layer
class LoraConv1d(_LoraConvNd, nn.Conv1d):
    """LoRA on `nn.Conv1d` (build with `LoraConv1d.from_module(conv, r=...)`)."""

    base_type = nn.Conv1d
    conv_fn = staticmethod(F.conv1d)


@register_lora_layer
class LoraConv2d(_LoraConvNd, nn.Conv2d):
    """LoRA on `nn.Conv2d` (build with `LoraConv2d.from_module(conv, r=...)`)."""

    base_type = nn.Conv2d
    conv_fn = staticmethod(F.conv2d)


@register_lora_layer
class LoraConv3d(_LoraConvNd, nn.Conv3d):
    """LoRA on `nn.Conv3d` (build with `LoraConv3d.from_module(conv, r=...)`)."""

    base_type = nn.Conv3d
    conv_fn = staticmethod(F.conv3d)
