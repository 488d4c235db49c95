"""Microsoft's loralib 0.1.2 API (`microsoft/LoRA`, MIT), built on loralib's `LoraLayer`.

Code written for Microsoft's package runs unchanged with `import loralib as lora`:

    layer = lora.Linear(768, 768, r=16)                        # rank third, 0 by default; lora_alpha=1
    qkv = lora.MergedLinear(768, 3 * 768, r=8, enable_lora=[True, False, True])
    lora.mark_only_lora_as_trainable(model, bias="lora_only")
    torch.save(lora.lora_state_dict(model), "ckpt_lora.pt")   # the same keys as Microsoft's

The classes keep Microsoft's signatures, defaults, parameter names and shapes (so its released
checkpoints, e.g. the RoBERTa MNLI adapter, load unchanged), its initialisation order (the same seed
draws the same weights), its forward formulas, and its merge rule: `eval()` merges the update into the
weight and `train()` takes it out again when merge_weights=True. Their state dicts are Microsoft's: no
`lora_merged` entry (whether the weight holds the update follows the mode, as there). They are
`loralib.LoraLayer`s, so `merge_lora`, `lora_layers`, `save_lora` / `load_lora` and
`mark_only_lora_as_trainable` work on them; `to_peft` takes `Linear` and `Embedding` (the same factors
as PEFT's) and refuses `MergedLinear` and the convolutions, whose layouts PEFT has no form for.

Where Microsoft's code fails, these refuse clearly or work: r=0 builds a plain layer (no adapter, as
there); `MergedLinear` with no enabled part has no adapter (Microsoft's forward raises); `lora_ind` is a
buffer, so it follows `.to(device)`; a new lora_A/lora_B loaded into an eval-mode (merged) layer re-merges
instead of leaving the old update in the weight; `Conv1d` / `Conv3d` with kernel_size > 1, whose
factor shapes cannot form the kernel (Microsoft's forward raises a reshape error), are refused when built
(use `loralib.LoraConv1d` / `LoraConv3d`, PEFT's layout).

Covers: `LoRALayer`, `Linear`, `Embedding`, `MergedLinear`, `ConvLoRA`, `Conv1d/2d/3d`. Not here:
`mark_only_lora_as_trainable` (`loralib.injection`) and `lora_state_dict` (`loralib.adapters`), which take
Microsoft's `bias` argument with its meaning; loralib's own layers (`loralib.layers`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_bool, check_dropout, check_int, check_number
from loralib.layers.base import LoraLayer


class LoRALayer(LoraLayer):
    """Microsoft's mixin: r (0: no adapter), lora_alpha, lora_dropout, merged, merge_weights; scaling is
    lora_alpha / r. `train(mode)` merges on eval and unmerges on train when merge_weights is True."""

    # Microsoft's layers hold one adapter (their mode decides the merge); named adapters are LoraLinear's & co.
    supports_named_adapters = False

    def _ms_init(
        self,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        merge_weights: bool,
        shapes: tuple[tuple[int, ...], tuple[int, ...]] | None,
    ) -> None:
        """The shared state; zero A and B of `shapes` when r > 0 (a None `shapes`: no adapter)."""
        r = check_int(r, "r", 0, hint="r=0 builds the plain layer, as in Microsoft's loralib.")
        lora_alpha = check_number(lora_alpha, "lora_alpha", positive=True)
        lora_dropout = check_dropout(lora_dropout, "lora_dropout")
        self.merge_weights = check_bool(merge_weights, "merge_weights")
        self.merged = False
        self._r, self._lora_alpha, self._use_rslora = r, lora_alpha, False
        self.init = "kaiming"
        self._lora_dropout_p = float(lora_dropout)
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.lora_B_bias = None
        if r > 0 and shapes is not None:
            self.lora_A = nn.Parameter(self.weight.new_zeros(shapes[0]))
            self.lora_B = nn.Parameter(self.weight.new_zeros(shapes[1]))
            self.weight.requires_grad = False

    # Microsoft's scaling is an attribute; setting it sets lora_alpha (a merged layer re-merges).
    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r

    @scaling.setter
    def scaling(self, value: float) -> None:
        self.lora_alpha = check_number(value, "scaling", positive=True) * self.r

    @property
    def has_adapter(self) -> bool:
        return "lora_A" in self._parameters

    def train(self, mode: bool = True):
        nn.Module.train(self, mode)
        if self.merge_weights and self.has_adapter:
            if mode:
                self.unmerge()
            else:
                self.merge()
        elif self.merge_weights:
            self.merged = not mode  # Microsoft's flag, with nothing to fold in
        return self

    def reset_parameters(self) -> None:
        """Microsoft's order: the base module's own init, then A and B (the same seed, the same weights)."""
        self.base_type.reset_parameters(self)
        if hasattr(self, "lora_A"):
            self._reset_lora()

    def reset_lora_parameters(self) -> None:
        if self.has_adapter:
            super().reset_lora_parameters()

    # Microsoft's state dicts hold no merged flag: the mode says whether the weight holds the update.
    records_merged = False

    def _kaiming_a_zero_b(self) -> None:
        if self.has_adapter:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def _reset_lora(self) -> None:
        with torch.no_grad():
            self._kaiming_a_zero_b()


def _t(w: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    return w.transpose(0, 1) if fan_in_fan_out else w


class Linear(LoRALayer, nn.Linear):
    """Microsoft's `lora.Linear`: `nn.Linear` plus lora_A (r x in) and lora_B (out x r), scaling
    lora_alpha / r; fan_in_fan_out=True stores the weight (in x out), as GPT-2's checkpoints do."""

    base_type = nn.Linear

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        self.fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
        self._ms_init(r, lora_alpha, lora_dropout, merge_weights, ((r, in_features), (out_features, r)))
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (r, module.in_features), (module.out_features, r)

    def delta_weight(self) -> torch.Tensor:
        return _t(self.lora_B @ self.lora_A, self.fan_in_fan_out) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, _t(self.weight, self.fan_in_fan_out), bias=self.bias)
        if self.has_adapter and not self.merged:
            result += (
                self.lora_dropout(x) @ self.lora_A.transpose(0, 1) @ self.lora_B.transpose(0, 1)
            ) * self.scaling
        return result

    def to_base(self) -> nn.Linear:
        """A plain `nn.Linear` computing the same function (the update merged in)."""
        if self.has_adapter:
            self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        w = _t(self.weight.data, self.fan_in_fan_out)
        lin.weight = nn.Parameter(
            w.contiguous() if self.fan_in_fan_out else w, requires_grad=self.weight.requires_grad
        )
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        return lin.train(self.training)

    def extra_repr(self) -> str:
        return (
            f"{nn.Linear.extra_repr(self)}, r={self.r}, lora_alpha={self.lora_alpha:g}, merged={self.merged}"
        )


class Embedding(LoRALayer, nn.Embedding):
    """Microsoft's `lora.Embedding`: lora_A (r x num_embeddings) zero and lora_B (dim x r) normal at the
    start (PEFT's embedding init), no dropout."""

    base_type = nn.Embedding
    peft_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        r: int = 0,
        lora_alpha: int = 1,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, **kwargs)
        self._ms_init(r, lora_alpha, 0.0, merge_weights, ((r, num_embeddings), (embedding_dim, r)))
        self.reset_parameters()

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (r, module.num_embeddings), (module.embedding_dim, r)

    def _reset_lora(self) -> None:
        with torch.no_grad():
            nn.init.zeros_(self.lora_A)
            nn.init.normal_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).transpose(0, 1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = nn.Embedding.forward(self, x)
        if self.has_adapter and not self.merged:
            after_A = F.embedding(
                x, self.lora_A.transpose(0, 1), self.padding_idx, self.max_norm,
                self.norm_type, self.scale_grad_by_freq, self.sparse,
            )  # fmt: skip
            result += (after_A @ self.lora_B.transpose(0, 1)) * self.scaling
        return result

    def to_base(self) -> nn.Embedding:
        if self.has_adapter:
            self.merge()
        emb = nn.Embedding(
            self.num_embeddings, self.embedding_dim, self.padding_idx, max_norm=self.max_norm,
            norm_type=self.norm_type, scale_grad_by_freq=self.scale_grad_by_freq, sparse=self.sparse,
            device="meta",
        )  # fmt: skip
        emb.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        return emb.train(self.training)


class MergedLinear(LoRALayer, nn.Linear):
    """Microsoft's `lora.MergedLinear`: one fused projection (e.g. qkv) whose parts `enable_lora` (one flag
    per equal slice of out_features) get a rank-r update each; lora_A (r * parts x in), lora_B
    (out / len(enable_lora) * parts x r), combined as a grouped 1-d convolution. PEFT has no such layer."""

    base_type = nn.Linear
    peft_names = None  # no PEFT form: to_peft refuses it

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        enable_lora: list[bool] = [False],  # noqa: B006 - Microsoft's signature; never mutated
        fan_in_fan_out: bool = False,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, **kwargs)
        enable = [check_bool(e, "enable_lora entries") for e in enable_lora]
        if not enable or out_features % len(enable):
            raise ValueError(
                f"enable_lora={list(enable_lora)!r} must have a length dividing out_features={out_features} (one "
                "flag per equal slice, e.g. [True, False, True] for q, k, v)."
            )
        self.enable_lora = list(enable_lora)
        self.fan_in_fan_out = check_bool(fan_in_fan_out, "fan_in_fan_out")
        parts = sum(enable)
        shapes = ((r * parts, in_features), (out_features // len(enable) * parts, r)) if parts else None
        self._ms_init(r, lora_alpha, lora_dropout, merge_weights, shapes)
        ind = torch.zeros(
            len(enable), out_features // len(enable), dtype=torch.bool, device=self.weight.device
        )
        ind[torch.tensor(enable, device=ind.device), :] = True
        self.register_buffer("lora_ind", ind.view(-1), persistent=False)  # not in Microsoft's state dict
        self.reset_parameters()
        if fan_in_fan_out:
            self.weight.data = self.weight.data.transpose(0, 1)

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int):
        raise ValueError("MergedLinear has no PEFT form: it cannot be loaded from a PEFT adapter.")

    def zero_pad(self, x: torch.Tensor) -> torch.Tensor:
        result = x.new_zeros((len(self.lora_ind), *x.shape[1:]))
        result[self.lora_ind] = x
        return result

    def merge_AB(self) -> torch.Tensor:
        delta_w = F.conv1d(
            self.lora_A.unsqueeze(0), self.lora_B.unsqueeze(-1), groups=sum(self.enable_lora)
        ).squeeze(0)
        return _t(self.zero_pad(delta_w), self.fan_in_fan_out)

    def delta_weight(self) -> torch.Tensor:
        return self.merge_AB() * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, _t(self.weight, self.fan_in_fan_out), bias=self.bias)
        if self.has_adapter and not self.merged:
            result += self.lora_dropout(x) @ _t(self.merge_AB().T, self.fan_in_fan_out) * self.scaling
        return result

    def to_base(self) -> nn.Linear:
        return Linear.to_base(self)


class ConvLoRA(LoRALayer, nn.Module):
    """Microsoft's convolution wrapper: the convolution as `.conv` (its tensors are `conv.weight`,
    `conv.bias`), lora_A (r * k x in * k) and lora_B (out / groups * k x r * k), whose product, reshaped,
    is the kernel's update. kernel_size is an int, as there."""

    peft_names = None  # PEFT's conv layout is another factorisation: to_peft refuses it

    def __init__(
        self,
        conv_module: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        r: int = 0,
        lora_alpha: int = 1,
        lora_dropout: float = 0.0,
        merge_weights: bool = True,
        **kwargs,
    ) -> None:
        nn.Module.__init__(self)
        self.conv = conv_module(in_channels, out_channels, kernel_size, **kwargs)
        self.base_type = conv_module
        if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
            raise TypeError(f"kernel_size must be an int (Microsoft's ConvLoRA), got {kernel_size!r}.")
        k, groups = kernel_size, self.conv.groups
        shapes = ((r * k, in_channels * k), (out_channels // groups * k, r * k))
        if r > 0 and shapes[0][1] * shapes[1][0] != self.conv.weight.numel():
            raise ValueError(
                f"Microsoft's factor shapes (B @ A is {shapes[1][0]} x {shapes[0][1]}) cannot form this "
                f"{conv_module.__name__}'s kernel {tuple(self.conv.weight.shape)} for kernel_size={k} (its forward "
                f"fails there too); use loralib.Lora{conv_module.__name__}.from_module(nn.{conv_module.__name__}(...), "
                "r=...) (PEFT's conv layout), or kernel_size=1."
            )
        self._ms_init(r, lora_alpha, lora_dropout, merge_weights, shapes)
        self.reset_parameters()
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int):
        raise ValueError("Microsoft's ConvLoRA has no PEFT form: it cannot be loaded from a PEFT adapter.")

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        if hasattr(self, "lora_A"):
            self._reset_lora()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_adapter and not self.merged:
            return self.conv._conv_forward(
                x, self.conv.weight + (self.lora_B @ self.lora_A).view(self.conv.weight.shape) * self.scaling,
                self.conv.bias,
            )  # fmt: skip
        return self.conv(x)

    def to_base(self) -> nn.Module:
        if self.has_adapter:
            self.merge()
        return self.conv


class Conv1d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv1d, *args, **kwargs)


class Conv2d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv2d, *args, **kwargs)


class Conv3d(ConvLoRA):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(nn.Conv3d, *args, **kwargs)
