"""`LoraConv1D`: LoRA on GPT-2 style `transformers.pytorch_utils.Conv1D`, a Linear that stores its weight
transposed, (in x out), and computes x W + b.

    y = x W + b + dropout(x) A^T B^T * scaling        A: (r x in), B: (out x r); the update of W is (B A)^T

This is PEFT's `fan_in_fan_out=True` case: the same factors and forward as a Linear's LoRA, only the
merged update is transposed to W's layout. The forward is the plain formula through autograd (GPT-2's
layers are few and wide; the hand-written fast path is `LoraLinear`'s). Registered lazily: the class
exists once transformers is imported, which any model holding a Conv1D has done.

Covers: the layer, `from_module`, `to_base`. Not here: what every LoRA layer shares
(`loralib.layers.base`).
"""

from __future__ import annotations

from typing import Unpack

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from loralib.checks import check_bool
from loralib.layers import dora
from loralib.layers.base import LoraKwargs, LoraLayer, adapter_dtype, module_kind, register_lora_layer


@register_lora_layer
class LoraConv1D(LoraLayer, Conv1D):
    """A GPT-2 `Conv1D` (nf outputs, nx inputs) whose frozen weight gets the update (B @ A)^T * scaling.

    Keyword-only r, lora_alpha (None: = r), lora_dropout, use_rslora, init ("kaiming", "gaussian",
    "article": A's init as `LoraLinear`'s; B starts at zero), autocast_adapter_dtype, lora_bias, use_dora
    (one magnitude per output feature, i.e. per column of the (in x out) weight).
    """

    base_type = Conv1D
    linear_like = True

    def __init__(
        self, nf: int, nx: int, *, autocast_adapter_dtype: bool = True, **lora: Unpack[LoraKwargs]
    ) -> None:
        s = self._settings(lora)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        super().__init__(nf, nx)
        ad = adapter_dtype(self.weight.dtype, autocast_adapter_dtype)
        self._init_lora(s, ((s.r, nx), (nf, s.r)), self.weight.device, ad)
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    @classmethod
    def adapter_shapes(cls, module: Conv1D, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (r, module.nx), (module.nf, r)

    @classmethod
    def from_module(
        cls, module: Conv1D, *, autocast_adapter_dtype: bool = True, **lora: Unpack[LoraKwargs]
    ) -> LoraConv1D:
        """Wrap an existing Conv1D: its weight and bias tensors are reused (not copied) and frozen."""
        if isinstance(module, LoraLayer):
            raise TypeError("this layer already has LoRA; call unload_lora() first or adapt another layer.")
        if not isinstance(module, Conv1D):
            raise TypeError(
                f"LoraConv1D.from_module expects a transformers Conv1D, got {module_kind(module)}."
            )
        s = cls._settings(lora)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        # Built without Conv1D.__init__ (no throw-away weight drawn), then given the module's tensors.
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.nf, layer.nx = module.nf, module.nx
        return layer._adopt(module, s, autocast_adapter_dtype)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (B @ A)^T * scaling, shape (in, out) like Conv1D's weight."""
        return (self.lora_B @ self.lora_A).T * self.scaling

    def to_base(self) -> Conv1D:
        """A plain Conv1D with the update merged in (the adapter is not kept)."""
        self.merge()
        plain = Conv1D.__new__(Conv1D)
        nn.Module.__init__(plain)
        plain.nf, plain.nx = self.nf, self.nx
        plain.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        plain.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        plain.train(self.training)
        return plain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detour = self._detour(x)  # a mixed batch, or an adapter this layer lacks (`loralib.layers.slots`)
        if detour is not None:
            return detour
        if self.merged:
            return self._guard_merged_training(Conv1D.forward(self, x))
        xd = self.lora_dropout(x) if self.training and self.lora_dropout_p > 0 else x
        if self.use_dora:  # g * (x W + s xd A^T B^T) + b (`loralib.layers.dora`)
            out = torch.matmul(x, self.weight)
        else:
            out = Conv1D.forward(self, x)
        dt = out.dtype
        update = (xd.to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        out = out + (update * self.scaling).to(dt)
        if self.use_dora:
            return dora.scale(self, out, self.bias, self.dora_norm())
        term = self.lora_bias_term(dt)
        return out if term is None else out + term

    def _dora_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()  # Conv1D stores (in x out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}, {self._lora_repr()}"

    def __repr__(self) -> str:  # Conv1D's own __repr__ would hide the LoRA settings
        return nn.Module.__repr__(self)
