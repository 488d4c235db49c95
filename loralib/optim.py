"""LoRA+ (Hayou et al. 2024): a larger learning rate for B than for A, as parameter groups any optimizer takes.

In LoRA the update is B @ A with B starting at zero. LoRA+ argues that one learning rate for both is
inefficient for wide models and trains B with `loraplus_lr_ratio` times A's learning rate (the paper
suggests about 16). Here that is nothing but torch parameter groups, so it works with every torch
optimizer, with bitsandbytes' 8-bit AdamW and with the Hugging Face `Trainer` (`optimizers=(opt, None)`:
its scheduler scales every group's rate by the same factor, so the ratio holds all through training).

Covers: `param_groups` (A / B / other trained tensors, with the Trainer's no-decay rule for biases and
norms, `decay_parameter_names`) and `make_optimizer`. Works on loralib models (`...lora_A`, `...lora_B`) and PEFT ones
(`...lora_A.default.weight`). Not here: the LoRA layer (`loralib.layers`), the benchmark's use of it
(`TrainConfig.loraplus_lr_ratio`, `loralib.benchmark.trainer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from loralib.checks import check_module, check_number


def _kind(name: str) -> str:
    parts = name.split(".")
    # lora_B_bias (PEFT: lora_B.bias) is part of B's output, so it takes B's LoRA+ rate, as in PEFT's LoRA+.
    if "lora_B" in parts or "lora_embedding_B" in parts or "lora_B_bias" in parts:  # PEFT's embedding names
        return "lora_B"
    if "lora_A" in parts or "lora_embedding_A" in parts:
        return "lora_A"
    if "lora_magnitude_vector" in parts:  # DoRA's magnitude: its own group, at the base rate, no decay
        return "lora_magnitude"
    return "other"


def decay_parameter_names(model: nn.Module) -> set[str]:
    """The parameter names the Hugging Face Trainer applies weight decay to: its own rule (no decay inside
    nn.LayerNorm modules, nor for names with bias / layernorm / rmsnorm / norm), called, not copied."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))  # it reads nothing from the Trainer


def param_groups(
    model: nn.Module, lr: float, loraplus_lr_ratio: float | None = 16.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups over `model`'s trainable tensors: B at lr x loraplus_lr_ratio, everything else at lr.

    Weight decay follows the Trainer's own rule (`decay_parameter_names`: none for biases and norms, by
    module type and by name); the rest gets `weight_decay`. Every trainable tensor is in exactly one group.
    loraplus_lr_ratio=None gives plain groups (one learning rate). Every group carries a "name" ("lora_A",
    "lora_B", "lora_magnitude" (DoRA's, at lr and never decayed), "other", with "/no_decay"), which torch
    optimizers keep. Empty groups are left out.
    """
    check_module(model)
    check_number(lr, "lr", positive=True, hint="A learning rate such as 5e-4.")
    check_number(weight_decay, "weight_decay", minimum=0.0)
    if loraplus_lr_ratio is not None:
        check_number(loraplus_lr_ratio, "loraplus_lr_ratio", positive=True, hint="LoRA+ suggests about 16.")
    decay = decay_parameter_names(model)
    groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():  # a shared tensor once, under its first name
        if p.requires_grad:
            kind = _kind(name) if loraplus_lr_ratio is not None else "other"
            # decaying DoRA's magnitude would pull each output feature's norm towards zero, not the update
            no_decay = name not in decay or _kind(name) == "lora_magnitude"
            groups.setdefault((kind, no_decay), []).append(p)
    if not groups:
        raise ValueError("the model has no trainable parameters; inject LoRA and mark it trainable first.")
    if loraplus_lr_ratio is not None and not any(kind == "lora_B" for kind, _ in groups):
        raise ValueError(
            "loraplus_lr_ratio is set but the model has no trainable lora_B matrices: LoRA+ raises B's "
            "learning rate, so inject LoRA first (or pass loraplus_lr_ratio=None)."
        )
    out = []
    for (kind, no_decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr * loraplus_lr_ratio if kind == "lora_B" else lr,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "name": kind + ("/no_decay" if no_decay else ""),
            }
        )
    return out


def make_optimizer(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float | None = 16.0,
    weight_decay: float = 0.0,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.AdamW,
    **optimizer_kwargs: Any,
) -> torch.optim.Optimizer:
    """`optimizer_cls(param_groups(model, lr, loraplus_lr_ratio, weight_decay), lr=lr, **optimizer_kwargs)`."""
    return optimizer_cls(param_groups(model, lr, loraplus_lr_ratio, weight_decay), lr=lr, **optimizer_kwargs)
