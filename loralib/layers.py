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

import math

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_alpha, check_bool, check_dropout, check_rank
from loralib.fast_path import LoraFunction, mask_lanes

INITS = ("kaiming", "gaussian", "article")
MERGED_KEY = "lora_merged"  # state-dict entry recording whether `weight` holds the update


def check_lora_args(
    r: int, lora_alpha: float | None, lora_dropout: float, init: str
) -> tuple[int, float | None, float]:
    """Validate LoRA's hyper-parameters once, for every entry point; return them normalised."""
    r = check_rank(r)
    lora_alpha = check_alpha(lora_alpha, "lora_alpha")
    lora_dropout = check_dropout(lora_dropout, "lora_dropout")
    if not isinstance(init, str) or init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; choose one of {INITS}.")
    return r, lora_alpha, lora_dropout


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
            "a merged LoraLinear was trained: its forward uses the merged weight, not lora_A/lora_B, so they "
            "would get no gradient. Call loralib.unmerge_lora(model) before training (merge again for inference)."
        )


class LoraLinear(nn.Linear):
    """A `nn.Linear` whose frozen weight gets a trainable low-rank update B @ A scaled by lora_alpha / r.

    It subclasses `nn.Linear`, so the original `weight`/`bias` keep their state-dict names and a
    stock checkpoint loads into it; the adapter adds `lora_A` (r x in) and `lora_B` (out x r).

    Args (PEFT's names):
        in_features, out_features, bias: as for `nn.Linear`.
        r: rank of the update (> 0).
        lora_alpha: scaling numerator; the update is multiplied by lora_alpha / r. None means
            lora_alpha = r (scaling 1), so doubling r with lora_alpha fixed halves each direction's
            contribution.
        lora_dropout: dropout on the input of the LoRA path only (0 disables it and its copy).
        use_rslora: scale by lora_alpha / sqrt(r) instead (rank-stabilised LoRA, Kalajdzievski 2023;
            PEFT's name): the update's size then no longer shrinks as r grows at a fixed learning rate.
        init: "kaiming" (A kaiming-uniform as PEFT and microsoft/LoRA), "gaussian" (A ~ N(0, 1/r^2),
            PEFT's "gaussian"), or "article" (A ~ N(0, 1), unscaled, as in the seed article).
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
        r: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        init: str = "kaiming",
        device=None,
        dtype=None,
        autocast_adapter_dtype: bool = True,
        use_rslora: bool = False,
    ) -> None:
        r, lora_alpha, lora_dropout = check_lora_args(r, lora_alpha, lora_dropout, init)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        check_bool(use_rslora, "use_rslora")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.r = r
        self.lora_alpha = r if lora_alpha is None else lora_alpha
        self.use_rslora = use_rslora
        self.init = init
        self.lora_dropout_p = lora_dropout
        ad = adapter_dtype(self.weight.dtype, autocast_adapter_dtype)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=ad))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, device=device, dtype=ad))
        self.merged = False
        # False: the plain formula through stock autograd instead of `LoraFunction` (slower; for
        # experiments that need what the hand-written backward refuses).
        self.fast_path = True
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.reset_lora_parameters()

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
        self._lora_dropout_p = value
        self.lora_dropout = nn.Dropout(value) if value > 0 else nn.Identity()

    def _with_update_taken_out(self, change) -> None:
        """Run `change` (of the update or its scaling) with a merged update taken out of the weight, then
        merge the new one. During __init__ `merged` is not set yet: nothing to take out."""
        merged = self.__dict__.get("merged", False)
        if merged:
            self.unmerge()
        change()
        if merged:
            self.merge()

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        r: int = 8,
        lora_alpha: float | None = None,
        lora_dropout: float = 0.0,
        init: str = "kaiming",
        autocast_adapter_dtype: bool = True,
        use_rslora: bool = False,
    ) -> LoraLinear:
        """Wrap an existing `nn.Linear`: its weight and bias tensors are reused (not copied) and frozen."""
        if isinstance(linear, LoraLinear):
            raise TypeError(
                "this layer already has LoRA; call unload_lora()/unmerge first or adapt another layer."
            )
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"LoraLinear.from_linear expects an nn.Linear, got {module_kind(linear)}.")
        r, lora_alpha, lora_dropout = check_lora_args(r, lora_alpha, lora_dropout, init)
        check_bool(autocast_adapter_dtype, "autocast_adapter_dtype")
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init=init,
            device="meta",
            dtype=w.dtype,
            autocast_adapter_dtype=autocast_adapter_dtype,
            use_rslora=use_rslora,
        )
        # Build on "meta" to avoid allocating a throw-away (out x in) weight, then attach the real tensors.
        layer.weight = nn.Parameter(w.data, requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
        ad = adapter_dtype(w.dtype, autocast_adapter_dtype)
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, device=w.device, dtype=ad))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, device=w.device, dtype=ad))
        layer.reset_lora_parameters()
        layer.train(linear.training)
        return layer

    def reset_parameters(self) -> None:  # called by nn.Linear.__init__
        super().reset_parameters()
        if hasattr(self, "lora_A"):
            self.merged = False  # a freshly drawn weight holds no update
            self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """Re-draw A with the chosen init and set B to zero (the layer then equals the frozen one).

        On a merged layer the old update is taken out of the weight first (the layer stays merged, with
        the new, zero update)."""
        if self.lora_A.device.type == "meta":
            return
        self._with_update_taken_out(self._reset_lora)

    def _reset_lora(self) -> None:
        with torch.no_grad():
            if self.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            elif self.init == "gaussian":
                nn.init.normal_(self.lora_A, std=1.0 / self.r)
            else:  # "article"
                nn.init.normal_(self.lora_A, mean=0.0, std=1.0)
            nn.init.zeros_(self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The scaled update (lora_alpha / r) * B @ A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def unmerged_weight(self) -> torch.Tensor:
        """The frozen weight without the update, whether or not it is merged (a new tensor if merged)."""
        if not self.merged:
            return self.weight
        return self.weight - self.delta_weight().to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` so inference costs the same as a plain Linear. Idempotent.

        `loralib.merge_lora(model)` also refuses weights tied to another parameter (merging would change
        both); this method cannot see the rest of the model.
        """
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

    # The merged state travels with the weights: a merged layer's state dict holds `lora_merged`, and
    # loading one adopts it, so a merged weight is never updated a second time by an unmerged layer.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:  # only then: an unmerged layer's state dict is a plain Linear's plus A and B
            destination[prefix + MERGED_KEY] = torch.tensor(True, device=self.weight.device)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        key = prefix + MERGED_KEY
        has_weight = prefix + "weight" in state_dict
        # New A/B into a merged weight that is not replaced: take the old update out, put the new one in.
        remerge = (
            self.merged and not has_weight and any(prefix + k in state_dict for k in ("lora_A", "lora_B"))
        )
        if remerge:
            self.unmerge()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if key in unexpected_keys:
            unexpected_keys.remove(key)
        if key in state_dict:
            self.merged = bool(state_dict[key])
        elif has_weight:  # a stock checkpoint, or one saved before the flag existed: an unmerged weight
            self.merged = False
        if remerge:
            self.merge()

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
        if self.merged:
            out = F.linear(x, self.weight, self.bias)
            if (
                self.training
                and torch.is_grad_enabled()
                and (self.lora_A.requires_grad or self.lora_B.requires_grad)
            ):
                # The merged forward never touches A and B, so a backward would leave them without a
                # gradient and only the rest of the model would train: make that backward fail instead.
                out = _MergedTrainingGuard.apply(out, self.lora_A, self.lora_B)
            return out
        training_dropout = self.lora_dropout_p > 0 and self.training
        x, weight, bias, lora_A, lora_B = self._compute_operands(x)
        if torch.compiler.is_compiling() or not getattr(self, "fast_path", True):
            # The custom Function's oneDNN calls and in-place adds do not lower through TorchInductor; the
            # plain formula compiles to the same math and lets the compiler fuse it.
            xd = self.lora_dropout(x) if training_dropout else x
            return F.linear(x, weight, bias) + F.linear(F.linear(xd, lora_A), lora_B) * self.scaling
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
                return LoraFunction.apply(x, xd, lanes, threshold, weight, bias, lora_A, lora_B, scaling)
        return LoraFunction.apply(x, xd, lanes, threshold, weight, bias, lora_A, lora_B, scaling)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r={self.r}, lora_alpha={self.lora_alpha:g}, "
            f"lora_dropout={self.lora_dropout_p:g}, "
            + ("use_rslora=True, " if self.use_rslora else "")
            + f"init={self.init}, merged={self.merged}"
        )


def module_kind(module: object) -> str:
    """The class name, with the way forward for layers that look like Linear but are not."""
    name = type(module).__name__
    if name == "Conv1D":
        return (
            "Conv1D (a GPT-2 style layer from transformers that stores its weight as (in, out), PEFT's "
            "fan_in_fan_out=True case); LoraLinear adapts nn.Linear only: use PEFT's "
            "LoraConfig(fan_in_fan_out=True) for such a model, or target its nn.Linear layers"
        )
    return name
