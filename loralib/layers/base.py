"""What every LoRA layer shares, and the table from a base module type to its LoRA class.

`LoraLayer` holds the adapter's state and rules, whatever module it wraps: the rank r (fixed by the
shapes of lora_A and lora_B), lora_alpha and use_rslora (the scaling), LoRA dropout's probability, the
merged state (and its entry in the state dict), merge / unmerge / reset, and how a change of the update
or its scaling re-merges. A subclass says what is type-specific: the base module (`base_type`), how to
build one from it (`from_module`) and back (`to_base`), the update as a weight-shaped tensor
(`delta_weight`), its initialisation (`_reset_lora`) and its forward.

`LORA_LAYER_TYPES` maps base module types to LoRA classes (`register_lora_layer`), and `lora_class_for`
finds the class for a module or says why there is none: injection, saving, loading, merging and the
PEFT interop go through it, never through the concrete classes.

Covers: `LoraLayer`, the registry, and the helpers every layer uses (`LoraKwargs`, `lora_scaling`,
`adapter_dtype`, `module_kind`). Not here: further named adapters in a layer (`loralib.layers.slots`, which
`LoraLayer` mixes in), the layers themselves (`loralib.layers.linear`, `.embedding`,
`.conv`, `.conv1d`, and Microsoft's API in `loralib.compat.microsoft`), the settings they are built from and
their validation (`loralib.config`), finding and swapping modules (`loralib.injection`).
"""

from __future__ import annotations

import math
import sys
from importlib import import_module
from typing import TypedDict

import torch
from torch import nn

from loralib.checks import check_alpha, check_bool, check_dropout, check_rank
from loralib.config import LoraSettings, resolve_settings
from loralib.layers import dora
from loralib.layers.slots import NamedAdapters, Routed

MERGED_KEY = "lora_merged"  # state-dict entry recording whether `weight` holds the update
# the tensors a LoRA layer adds to its base module (DoRA's magnitude: PEFT's name)
LORA_TENSORS = ("lora_A", "lora_B", "lora_B_bias", dora.MAGNITUDE)


class LoraKwargs(TypedDict, total=False):
    """The LoRA keyword arguments every layer constructor takes (`loralib.config.LoraSettings`' fields;
    their defaults are its defaults, which are PEFT's), or `settings=` one validated `LoraSettings`."""

    r: int
    lora_alpha: float | None
    lora_dropout: float
    init: str
    use_rslora: bool
    lora_bias: bool
    use_dora: bool
    settings: LoraSettings


def lora_scaling(lora_alpha: float, r: int, use_rslora: bool = False) -> float:
    """lora_alpha / r (the LoRA paper), or lora_alpha / sqrt(r) (rsLoRA)."""
    return lora_alpha / (math.sqrt(r) if use_rslora else r)


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype A and B are stored in: fp32 when the base is fp16/bf16 (as PEFT does), else the base's.

    Half-precision adapter weights fail in three ways: fp16 + AdamW overflows to inf, a GradScaler
    refuses to unscale fp16 gradients, and bf16 rounds small updates away. fp32 master copies cost
    little (A and B are small); the forward casts them to the compute dtype.
    """
    if autocast_adapter_dtype and base_dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return base_dtype


class _MergedTrainingGuard(torch.autograd.Function):
    """Identity in the forward; its backward raises: training through a merged layer is an error."""

    @staticmethod
    def forward(ctx, out, lora_A, lora_B):
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError(
            "a merged LoRA layer was trained: its forward uses the merged weight, not lora_A/lora_B, so they "
            "would get no gradient. Call loralib.unmerge_lora(model) before training (merge again for inference)."
        )


class LoraLayer(NamedAdapters):
    """The mixin every LoRA layer puts before its base module class (`class LoraX(LoraLayer, nn.X)`).

    It owns lora_A (r x fan-in) and lora_B (fan-out x r), their scaling and the merged state. Subclasses
    set `base_type` and implement `from_module`, `to_base`, `delta_weight`, `_reset_lora` and `forward`
    (whose first lines hand a call to `_detour`: a mixed batch, or an adapter this layer lacks).
    Further named adapters (`add_adapter`, `set_adapter`: `loralib.layers.slots`) route every attribute
    below to the active one.
    """

    # The active adapter's (`loralib.layers.slots`): the first adapter's are stored on the layer itself.
    lora_A = Routed()
    lora_B = Routed()
    lora_B_bias = Routed()
    lora_magnitude_vector = Routed()
    lora_dropout = Routed()
    _r = Routed()
    _lora_alpha = Routed()
    _use_rslora = Routed()
    init = Routed()
    _lora_dropout_p = Routed()
    _dora_merged_norm = Routed()

    base_type: type[nn.Module]
    # True for layers computing x W^T (or x W): what "all-linear" selects, as PEFT's does.
    linear_like: bool = False
    # How PEFT names this layer's factors in a saved adapter (after the module's name).
    peft_names: dict[str, str] = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight"}

    @classmethod
    def adapter_shapes(cls, module: nn.Module, r: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """The shapes of lora_A and lora_B of rank r on base module `module`: (r, fan-in), (fan-out, r)."""
        raise NotImplementedError

    def _init_lora(
        self,
        s: LoraSettings,
        shapes: tuple[tuple[int, ...], tuple[int, ...]],
        device,
        adapter_dtype_: torch.dtype,
        into: nn.Module | None = None,
    ) -> None:
        """Set the shared state from validated settings `s` and allocate A and B with `shapes` ((r, fan-in)
        and (fan-out, r) for a Linear; a convolution's kernels). into: a further adapter's record
        (`loralib.layers.slots.LoraAdapter`) instead of the layer's first adapter."""
        if s.use_dora:
            problem = self.dora_problem()
            if problem:
                raise ValueError(f"use_dora=True is not supported for {type(self).__name__}: {problem}.")
        t = self if into is None else into
        if into is None:
            self.merged = False
        # The settings are validated: set the state behind the checking setters directly.
        t._r, t._lora_alpha, t._use_rslora = s.r, s.lora_alpha, s.use_rslora
        t.init = s.init
        t._lora_dropout_p = s.lora_dropout
        t.lora_dropout = nn.Dropout(s.lora_dropout) if s.lora_dropout > 0 else nn.Identity()
        a_shape, b_shape = shapes
        t.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=adapter_dtype_))
        t.lora_B = nn.Parameter(torch.empty(b_shape, device=device, dtype=adapter_dtype_))
        # PEFT's lora_bias: a trainable bias on B's output (scaled with the update), zero at the start.
        bias = torch.empty(b_shape[0], device=device, dtype=adapter_dtype_) if s.lora_bias else None
        t.lora_B_bias = None if bias is None else nn.Parameter(bias)
        # DoRA: one trainable magnitude per output feature (`loralib.layers.dora`), set from the weight in reset.
        t.lora_magnitude_vector = None
        t._dora_merged_norm = None
        if s.use_dora:
            m = torch.empty(b_shape[0], device=device, dtype=adapter_dtype_)
            t.lora_magnitude_vector = nn.Parameter(m)

    @staticmethod
    def _settings(lora: LoraKwargs) -> LoraSettings:
        """The layer's validated settings from its LoRA keyword arguments (or their `settings=`)."""
        lora = dict(lora)
        return resolve_settings(lora.pop("settings", None), **lora)

    # `has_adapter` (`loralib.layers.slots`) is False where the active adapter is not this layer's, or
    # for a Microsoft layer built with r=0: `lora_layers` skips such a layer.
    # True: the state dict records a merged weight (`lora_merged`) and loading adopts it. Microsoft's
    # layers say False: there the mode (eval merged, train not) says whether the weight holds the update.
    records_merged: bool = True

    @property
    def weight_key(self) -> str:
        """The frozen weight's name inside this layer ("weight"; "conv.weight" for a wrapper)."""
        return next(n for n, p in self.named_parameters() if p is self.weight)

    def _adopt(self, module: nn.Module, s: LoraSettings, autocast_adapter_dtype: bool):
        """Take `module`'s weight (and bias) as this layer's frozen tensors (reused, not copied), allocate
        the adapter beside them and initialise it; the layer keeps the module's train/eval mode."""
        w = module.weight
        self.weight = nn.Parameter(w.data, requires_grad=False)
        if hasattr(module, "bias"):
            b = module.bias
            self.bias = None if b is None else nn.Parameter(b.data, requires_grad=False)
        self._init_lora(
            s, self.adapter_shapes(module, s.r), w.device, adapter_dtype(w.dtype, autocast_adapter_dtype)
        )
        self.reset_lora_parameters()
        self.train(module.training)
        return self

    @property
    def scaling(self) -> float:
        """What B @ A is multiplied by: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
        return lora_scaling(self.lora_alpha, self.r, self.use_rslora)

    # lora_alpha and use_rslora set the scaling of an update a merged weight already holds: changing one
    # on a merged layer takes the update out with the old scaling and puts it back with the new one.
    @property
    def lora_alpha(self) -> float:
        return self._lora_alpha

    @lora_alpha.setter
    def lora_alpha(self, value: float) -> None:
        value = check_alpha(value, "lora_alpha")
        value = float(self.r if value is None else value)  # None means lora_alpha = r, as at construction
        self._with_update_taken_out(lambda: setattr(self, "_lora_alpha", value))

    @property
    def use_rslora(self) -> bool:
        return self._use_rslora

    @use_rslora.setter
    def use_rslora(self, value: bool) -> None:
        value = check_bool(value, "use_rslora")
        self._with_update_taken_out(lambda: setattr(self, "_use_rslora", value))

    @property
    def r(self) -> int:
        return self._r

    @r.setter
    def r(self, value: int) -> None:
        if "_r" in self.__dict__:
            raise AttributeError(
                f"r is fixed by the shapes of lora_A {tuple(self.lora_A.shape)} and lora_B "
                f"{tuple(self.lora_B.shape)}; inject a new layer (unload_lora(model), then inject_lora(..., r=...))."
            )
        self._r = check_rank(value)

    @property
    def lora_dropout_p(self) -> float:
        """LoRA dropout's probability; setting it also replaces the `lora_dropout` module (CUDA and
        `torch.compile` use that module, the CPU path its own mask), so the two never disagree."""
        return self._lora_dropout_p

    @lora_dropout_p.setter
    def lora_dropout_p(self, value: float) -> None:
        value = float(check_dropout(value, "lora_dropout"))
        slot = self.__dict__.get("_lora_slot")
        t = self if slot is None else slot  # a module is registered where it is set: on the active adapter
        t._lora_dropout_p = value
        t.lora_dropout = nn.Dropout(value) if value > 0 else nn.Identity()

    def _with_update_taken_out(self, change) -> None:
        """Run `change` (of the update or its scaling) with a merged update taken out of the weight, then
        merge the new one. During __init__ `merged` is not set yet: nothing to take out."""
        merged = self.__dict__.get("merged", False)
        if merged:
            self.unmerge()
        change()
        if merged:
            self.merge()

    def reset_lora_parameters(self) -> None:
        """Re-draw the adapter with the layer's init (the update then is zero, so the layer equals the
        frozen one). On a merged layer the old update is taken out of the weight first (the layer stays
        merged, with the new, zero update)."""
        if self.lora_A.device.type == "meta":
            return
        self._with_update_taken_out(self._reset_all)

    def _reset_all(self) -> None:
        self._reset_lora()
        if self.lora_B_bias is not None:
            with torch.no_grad():
                self.lora_B_bias.zero_()
        if self.use_dora:
            dora.init_magnitude(self)

    # -- DoRA (`loralib.layers.dora`): what a layer type says about its weight -------------------------

    @property
    def use_dora(self) -> bool:
        """True when the layer is DoRA (it has a `lora_magnitude_vector`)."""
        return getattr(self, "lora_magnitude_vector", None) is not None

    def dora_problem(self) -> str | None:
        """Why this layer cannot be DoRA, or None. A type supports DoRA by defining `_dora_2d`."""
        if type(self)._dora_2d is LoraLayer._dora_2d:
            return "DoRA is implemented for Linear, Embedding, GPT-2's Conv1D and ungrouped convolutions"
        return None

    def _dora_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor as its (out x in) view: one row per output feature (DoRA's norm axis)."""
        raise NotImplementedError

    def _dora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A as (r x in) and B as (out x r), the factors of the (out x in) update (views)."""
        return self.lora_A, self.lora_B

    def peft_magnitude(self) -> torch.Tensor:
        """The magnitude in PEFT's layout: (out,) (a convolution's is (1, out, 1, ...))."""
        return self.lora_magnitude_vector

    def dora_norm(self) -> torch.Tensor:
        """||W0 + s B A|| per output feature (a constant: DoRA's backward does not differentiate it)."""
        return dora.current_norm(self)

    def lora_bias_term(self, dtype: torch.dtype) -> torch.Tensor | None:
        """What lora_bias adds to the output (lora_B_bias * scaling), or None without lora_bias."""
        if self.lora_B_bias is None:
            return None
        return (self.lora_B_bias * self.scaling).to(dtype)

    def _reset_lora(self) -> None:
        """The default init (a Linear's, PEFT's and microsoft/LoRA's): A by the layer's init, B zero, so
        the update starts at zero ("random", PEFT's init_lora_weights=False: B random too). A convolution's A is its kernel, so kaiming sees the kernel's fan-in."""
        with torch.no_grad():
            if self.init in ("kaiming", "random"):
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:  # "article"
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            if self.init == "random":  # PEFT's init_lora_weights=False: B as nn.Linear's default, not zero
                nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
            else:
                nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update, shaped like `weight`, in the adapter's dtype."""
        raise NotImplementedError

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """The weight the layer computes with, W0 + s B A (DoRA: m (W0 + s B A) / ||W0 + s B A||), shaped
        like `weight`, as a new tensor (a merged layer's is its weight)."""
        w = self.weight.detach().clone()
        if self.merged:
            return w
        if self.use_dora:
            dora.merge_into(self, w)
        else:
            w.add_(self.delta_weight().to(w.dtype))
        return w

    def unmerged_weight(self) -> torch.Tensor:
        """The frozen weight without the update, whether or not it is merged (a new tensor if merged)."""
        if not self.merged:
            return self.weight
        if self.use_dora:
            return dora.unmerged(self)
        return self.weight - self.delta_weight().to(self.weight.dtype)

    def merge_problem(self) -> str | None:
        """Why this layer cannot be merged, or None (grouped convolutions cannot, nor a lora_bias on a
        base without a bias: there is no bias to merge it into, as PEFT says)."""
        if self.lora_B_bias is not None and getattr(self, "bias", None) is None:  # an embedding has none
            return "it has lora_bias=True but its base layer has no bias to merge it into"
        return None

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` so inference costs what the base module costs. Idempotent.

        `loralib.merge_lora(model)` also refuses weights tied to another parameter (merging would change
        both); this method cannot see the rest of the model.
        """
        if not self.merged and self.has_adapter:
            problem = self.merge_problem()
            if problem:
                raise ValueError(f"cannot merge this {type(self).__name__}: {problem}.")
            if self.use_dora:
                dora.merge(self)
            else:
                self.weight.add_(self.delta_weight().to(self.weight.dtype))
            if self.lora_B_bias is not None:
                self.bias.add_(self.lora_bias_term(self.bias.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (exact up to float rounding). Idempotent."""
        if self.merged:
            if self.use_dora:
                dora.unmerge(self)
            else:
                self.weight.sub_(self.delta_weight().to(self.weight.dtype))
            if self.lora_B_bias is not None:
                self.bias.sub_(self.lora_bias_term(self.bias.dtype))
            self.merged = False

    def _guard_merged_training(self, out: torch.Tensor) -> torch.Tensor:
        """A merged forward never touches A and B, so a backward would leave them without a gradient and
        only the rest of the model would train: make that backward fail instead."""
        if (
            self.training
            and torch.is_grad_enabled()
            and (
                self.lora_A.requires_grad
                or self.lora_B.requires_grad
                or (self.use_dora and self.lora_magnitude_vector.requires_grad)
            )
        ):
            return _MergedTrainingGuard.apply(out, self.lora_A, self.lora_B)
        return out

    # The merged state travels with the weights: a merged layer's state dict holds `lora_merged`, and
    # loading one adopts it, so a merged weight is never updated a second time by an unmerged layer.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged and self.records_merged:  # an unmerged layer's: the base module's plus A and B
            destination[prefix + MERGED_KEY] = torch.tensor(True, device=self.weight.device)
            if self.use_dora:  # what unmerge divides by: not derivable from the merged weight
                destination[prefix + dora.MERGED_NORM_KEY] = self._dora_merged_norm

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + MERGED_KEY
        has_weight = prefix + self.weight_key in state_dict
        # New A/B into a merged weight that is not replaced: take the old update out, put the new one in.
        remerge = (
            self.merged
            and self.has_adapter
            and not has_weight
            and (
                any(prefix + k in state_dict for k in LORA_TENSORS)
                or any(k.startswith(prefix + "lora_adapters.") for k in state_dict)  # a further adapter's
            )
        )
        if remerge:
            self.unmerge()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if self.records_merged:
            norm_key = prefix + dora.MERGED_NORM_KEY
            for k in (key, norm_key):
                if k in unexpected_keys:
                    unexpected_keys.remove(k)
            if key in state_dict:
                self.merged = bool(state_dict[key])
                if self.merged and self.use_dora:
                    if norm_key not in state_dict:
                        error_msgs.append(
                            f"{prefix}: a merged DoRA layer's state dict needs {norm_key!r} (the norm unmerge divides by)."
                        )
                    else:
                        self._dora_merged_norm = state_dict[norm_key].detach().clone()
            elif has_weight:  # a stock checkpoint, or one saved before the flag existed: an unmerged weight
                self.merged = False
        if remerge:
            self._load_active_further_adapter(state_dict, prefix)
            self.merge()

    @torch.no_grad()
    def _load_active_further_adapter(self, state_dict, prefix: str) -> None:
        """Copy the active further adapter's tensors from `state_dict` now: its own module loads them only
        after this layer, and the re-merge needs the new values."""
        if self.active_adapter == self.adapter_name or "lora_adapters" not in self._modules:
            return
        head = f"{prefix}lora_adapters.{self.active_adapter}."
        for key, value in state_dict.items():
            if key.startswith(head):
                p = getattr(self, key[len(head) :], None)
                if isinstance(p, nn.Parameter) and p.shape == value.shape:
                    p.copy_(value)

    def _lora_repr(self) -> str:
        return (
            f"r={self.r}, lora_alpha={self.lora_alpha:g}, lora_dropout={self.lora_dropout_p:g}, "
            + ("use_rslora=True, " if self.use_rslora else "")
            + ("lora_bias=True, " if self.lora_B_bias is not None else "")
            + ("use_dora=True, " if self.use_dora else "")
            + f"init={self.init}, merged={self.merged}"
            + (
                f", adapters={self.adapter_names()}, active={self.active_adapter!r}"
                if len(self.adapter_names()) > 1
                else ""
            )
        )


# Base module type -> its LoRA class; `register_lora_layer` adds one (a new layer type is one class and
# this one line).
LORA_LAYER_TYPES: dict[type[nn.Module], type[LoraLayer]] = {}


def register_lora_layer(cls: type[LoraLayer]) -> type[LoraLayer]:
    """Class decorator: make `cls` the LoRA class of `cls.base_type`."""
    LORA_LAYER_TYPES[cls.base_type] = cls
    return cls


# Base types from optional packages, registered once their package is imported (a model that holds one
# has imported it), so loralib never imports transformers to adapt a plain torch model.
_LAZY_LAYER_MODULES = {"transformers.pytorch_utils": "loralib.layers.conv1d"}


def _register_lazy() -> None:
    for package, ours in list(_LAZY_LAYER_MODULES.items()):
        if package in sys.modules:
            import_module(ours)  # its @register_lora_layer runs
            del _LAZY_LAYER_MODULES[package]


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class that adapts `module`, or None. A subclass of a registered type qualifies only if it
    keeps the base type's forward (a subclass with its own forward, e.g. one that scales its output,
    would be bypassed by the LoRA layer's forward)."""
    _register_lazy()
    if isinstance(module, LoraLayer):
        return None
    for base, cls in LORA_LAYER_TYPES.items():
        if isinstance(module, base) and type(module).forward is base.forward:
            return cls
    return None


def supported_types() -> str:
    """The module types LoRA adapts here, for error messages."""
    _register_lazy()
    return ", ".join(
        f"nn.{t.__name__}" if t.__module__.startswith("torch.") else f"{t.__module__}.{t.__name__}"
        for t in LORA_LAYER_TYPES
    )


def module_kind(module: object) -> str:
    """The class name of `module`, for error messages."""
    return type(module).__name__
