"""`LoraLinear`: a frozen `nn.Linear` plus a trainable low-rank update, the whole idea of LoRA.

    y = x W^T + b + dropout(x) A^T B^T * (lora_alpha / r)        (rsLoRA: lora_alpha / sqrt(r))

A is (r x in), B is (out x r) and starts at zero, so a fresh layer computes exactly what the
original did. The unmerged forward never builds the (out x in) matrix B @ A: it costs two thin
matmuls of O(n d r) instead of O(d^2 r) per call. A custom autograd function (`loralib.fast_path`)
keeps forward + backward close to the frozen layer's cost. benchmarks/bench_speed.py measures it
against the frozen nn.Linear, PEFT and full fine-tuning.

Covers: the layer, its arguments (one check, PEFT's names, keyword-only after the sizes), its
initialisations, the dtype of its adapter weights, merge/unmerge and the merged state in the state
dict (and what each method does on a merged layer: re-initialising or rescaling re-merges, r is
fixed), and the plain formula it hands `torch.compile` (or any caller, with `fast_path = False`). Not here: the autograd Function and LoRA
dropout's CPU mask (`loralib.fast_path`), finding layers in a model and swapping them in
(`loralib.injection`), saving adapters (`loralib.adapters`).
"""

from __future__ import annotations

from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_bool
from loralib.fast_path import LoraFunction, mask_lanes
from loralib.layers import dora
from loralib.layers.base import (
    LoraKwargs,
    LoraLayer,
    adapter_dtype,
    lora_class_for,
    module_kind,
    register_lora_layer,
)


@register_lora_layer
class LoraLinear(LoraLayer, nn.Linear):
    """A `nn.Linear` whose frozen weight gets a trainable low-rank update B @ A scaled by lora_alpha / r.

    It subclasses `nn.Linear`, so the original `weight`/`bias` keep their state-dict names and a
    stock checkpoint loads into it; the adapter adds `lora_A` (r x in) and `lora_B` (out x r).

    Args (PEFT's names; the LoRA defaults are `loralib.config.LoraSettings`', i.e. PEFT's):
        in_features, out_features, bias: as for `nn.Linear`.
        r: rank of the update (> 0; default 8).
        lora_alpha: scaling numerator; the update is multiplied by lora_alpha / r (default 8, PEFT's).
            None means lora_alpha = r (scaling 1 at any rank).
        lora_dropout: dropout on the input of the LoRA path only (0 disables it and its copy).
        use_rslora: scale by lora_alpha / sqrt(r) instead (rank-stabilised LoRA, Kalajdzievski 2023;
            PEFT's name): the update's size then no longer shrinks as r grows at a fixed learning rate.
        init: "kaiming" (A kaiming-uniform as PEFT and microsoft/LoRA), "gaussian" (A ~ N(0, 1/r^2),
            PEFT's "gaussian"), "article" (A ~ N(0, 1), unscaled, as in the seed article) or "random"
            (PEFT's init_lora_weights=False: B random too, so the layer does not start as the base).
        settings: instead of the LoRA arguments, one validated `loralib.config.LoraSettings`.
        lora_bias: a trainable bias on B's output, scaled with the update (PEFT's `lora_bias`); zero at
            the start; merged into the base bias (a base without one cannot merge).
        autocast_adapter_dtype: keep A and B in fp32 when the base is fp16/bf16 (PEFT's default and
            name); False stores them in the base dtype. The forward computes in the base's (or
            autocast's) dtype either way.

    Every argument after the two sizes is keyword-only: `LoraLinear(768, 768, 16)` is an error, not a
    layer with bias=16 and the default rank (Microsoft's loralib passes the rank third).

    State: `merge()` folds the update into `weight`. A merged layer's state dict says so (an extra
    `lora_merged` entry), and loading a state dict adopts its merged state, so a merged model's
    `state_dict()` loaded into an unmerged model is not updated twice.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        device=None,
        dtype=None,
        autocast_adapter_dtype: bool = True,
        **lora: Unpack[LoraKwargs],
    ) -> None:
        s = self._settings(lora)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        ad = adapter_dtype(self.weight.dtype, autocast_adapter_dtype)
        self._init_lora(s, self.adapter_shapes(self, s.r), device, ad)
        # False: the plain formula through stock autograd instead of `LoraFunction` (slower; for
        # experiments that need what the hand-written backward refuses).
        self.fast_path = True
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

    base_type = nn.Linear
    linear_like = True

    @classmethod
    def adapter_shapes(cls, module: nn.Linear, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (r, module.in_features), (module.out_features, r)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, *, autocast_adapter_dtype: bool = True, **lora: Unpack[LoraKwargs]
    ) -> LoraLinear:
        """Wrap an existing `nn.Linear`: its weight and bias tensors are reused (not copied) and frozen."""
        if isinstance(linear, LoraLinear):
            raise TypeError(
                "this layer already has LoRA; call unload_lora()/unmerge first or adapt another layer."
            )
        if not isinstance(linear, nn.Linear):
            other = lora_class_for(linear)
            way = f"; its LoRA class is {other.__name__} (inject_lora picks it)" if other else ""
            raise TypeError(f"LoraLinear.from_linear expects an nn.Linear, got {module_kind(linear)}{way}.")
        s = cls._settings(lora)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        w = linear.weight
        # Built on "meta" (no throw-away (out x in) weight), then given the real tensors.
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            dtype=w.dtype,
            autocast_adapter_dtype=autocast_adapter_dtype,
            settings=s,
        )
        return layer._adopt(linear, s, autocast_adapter_dtype)

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.merged = False  # a freshly drawn weight holds no update
            self.reset_lora_parameters()

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (lora_alpha / r) * B @ A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @classmethod
    def from_module(cls, module: nn.Linear, **kwargs: Any) -> LoraLinear:
        """The registry's constructor: `from_linear`."""
        return cls.from_linear(module, **kwargs)

    def to_base(self) -> nn.Linear:
        """The registry's way back: `to_linear`."""
        return self.to_linear()

    def to_linear(self) -> nn.Linear:
        """A plain `nn.Linear` with the update merged in (the adapter is not kept)."""
        self.merge()
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        lin.weight = nn.Parameter(self.weight.data, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            lin.bias = nn.Parameter(self.bias.data, requires_grad=self.bias.requires_grad)
        lin.train(self.training)
        return lin

    def _compute_operands(self, x: torch.Tensor):
        """(x, weight, bias, A, B) in the dtype the layer computes in: autocast's if it is on, else the
        weight's. fp32 adapter weights on a half-precision base are cast here (the cast is part of the
        graph, so their gradients arrive in fp32)."""
        weight, bias, lora_A, lora_B = self.weight, self.bias, self.lora_A, self.lora_B
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            dt = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dt), weight.to(dt)
            bias = bias.to(dt) if bias is not None else None
        else:
            dt = weight.dtype
        if lora_A.dtype != dt:
            lora_A, lora_B = lora_A.to(dt), lora_B.to(dt)
        return x, weight, bias, lora_A, lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        detour = self._detour(x)  # a mixed batch, or an adapter this layer lacks (`loralib.layers.slots`)
        if detour is not None:
            return detour
        if self.merged:
            return self._guard_merged_training(F.linear(x, self.weight, self.bias))
        training_dropout = self.lora_dropout_p > 0 and self.training
        x, weight, bias, lora_A, lora_B = self._compute_operands(x)
        # DoRA: the LoRA output without bias, then g = m / ||W0 + s B A|| and the bias (`loralib.layers.dora`).
        norm = self.dora_norm() if self.use_dora else None
        fn_bias = None if self.use_dora else bias  # the bias inside the LoRA product; DoRA adds it after g
        if torch.compiler.is_compiling() or not getattr(self, "fast_path", True):
            # The custom Function's oneDNN calls and in-place adds do not lower through TorchInductor; the
            # plain formula compiles to the same math and lets the compiler fuse it.
            xd = self.lora_dropout(x) if training_dropout else x
            out = F.linear(x, weight, fn_bias) + F.linear(F.linear(xd, lora_A), lora_B) * self.scaling
            return self._finish(out, bias, norm)
        xd = lanes = threshold = None
        scaling = self.scaling
        if training_dropout:
            if x.device.type == "cpu":
                lanes, threshold = mask_lanes(x.shape, self.lora_dropout_p, x.device)
                if lanes is not None:  # inverted dropout: 1 / (1 - p) scales the path, not x
                    scaling = self.scaling / (1.0 - self.lora_dropout_p)
            else:
                xd = self.lora_dropout(x)
        if torch.is_autocast_enabled(x.device.type):
            # The operands are cast already; the Function's own products must not be cast again.
            with torch.autocast(x.device.type, enabled=False):
                out = LoraFunction.apply(x, xd, lanes, threshold, weight, fn_bias, lora_A, lora_B, scaling)
                return self._finish(out, bias, norm)
        out = LoraFunction.apply(x, xd, lanes, threshold, weight, fn_bias, lora_A, lora_B, scaling)
        return self._finish(out, bias, norm)

    def _finish(
        self, out: torch.Tensor, bias: torch.Tensor | None, norm: torch.Tensor | None
    ) -> torch.Tensor:
        """DoRA's magnitude and the bias (when `norm` is given), else lora_bias's term."""
        if norm is not None:
            return dora.scale(self, out, bias, norm)
        return self._add_lora_bias(out)

    def _dora_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def _mixed_shared(self, x: torch.Tensor, rows) -> torch.Tensor | None:
        """A mixed batch (`loralib.layers.slots`): the frozen product once for every row, then each group's
        low-rank term added to its rows. None with LoRA dropout in training: each group's own forward."""
        if self.training and self.lora_dropout_p > 0:
            return None
        x, weight, bias, _, _ = self._compute_operands(x)
        out = F.linear(x, weight, bias)
        for name, index in rows:
            self._route(name)
            if not self.has_adapter:
                continue
            xs = x.index_select(0, index)
            if self.use_dora or self.lora_B_bias is not None:
                # DoRA's g scales the frozen product too, lora_bias adds a term: the layer's own forward
                out = out.index_copy(0, index, self.forward(xs))
                continue
            a, b = self.lora_A, self.lora_B
            if a.dtype != out.dtype:
                a, b = a.to(out.dtype), b.to(out.dtype)
            out = out.index_add(0, index, F.linear(F.linear(xs, a), b) * self.scaling)
        return out

    def _add_lora_bias(self, out: torch.Tensor) -> torch.Tensor:
        term = self.lora_bias_term(out.dtype)
        return out if term is None else out + term

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._lora_repr()}"
