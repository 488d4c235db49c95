"""Whole training steps and inference passes of a model, and the RoBERTa cases the speed suite builds.

Covers: `make_train_step` / `measure_train_steps` (interleaved steps of several models, with their
state and peak memory as `StepStats`), `measure_inference`, and randomly initialised RoBERTa
classifiers for full fine-tuning, loralib and PEFT (`roberta_config`, `random_batch`,
`roberta_step_builders`, `roberta_inference_builders`). Not here: one layer (`loralib.measure.layer`),
the QLoRA memory comparison (`loralib.measure.qlora_memory`).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from loralib.config import LoraSettings
from loralib.measure.layer import peft_available
from loralib.measure.memory import peak_memory, tensor_bytes
from loralib.measure.timing import time_interleaved_samples
from loralib.utils import count_parameters

STEP_METHODS = ("full_ft", "loralib", "peft")


def default_optimizer(params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW(lr=1e-4, weight_decay=0.01), the benchmark's optimizer for every case."""
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def default_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """`model(**batch).loss`, the Hugging Face convention (the batch carries labels)."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError(
            "model(**batch) returned no .loss: put labels in the batch or pass loss_fn=(model, batch) -> loss."
        )
    return loss


def make_train_step(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = default_loss,
) -> Callable[[], None]:
    """A closure doing one full step: forward, backward, optimizer.step(), zero_grad(set_to_none).

    Gradients are dropped at the end, so every call starts and ends in the same state (which is
    also what `peak_memory` needs on CPU).
    """

    def step() -> None:
        loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


@dataclass
class StepStats:
    """Timing and memory of one training-step (or inference) case.

    state_bytes: parameters, buffers and optimizer state alive between steps; peak_extra_bytes: the
    most the step allocates on top (activations, gradients, optimizer temporaries); peak_bytes: their
    sum. Trainable/total parameter counts are included for the report.
    """

    median_s: float
    times_s: list[float] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    state_bytes: int = 0
    peak_extra_bytes: int | None = None
    peak_bytes: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _step_stats(
    model: nn.Module,
    times: list[float],
    fn: Callable[[], Any],
    state: int,
    device: torch.device | str | None,
    memory: bool,
) -> StepStats:
    """Summarise one interleaved case: timing samples, parameter counts, state and peak memory of `fn`."""
    counts = count_parameters(model)
    trainable, total = counts.trainable, counts.total
    extra = peak_memory(fn, device) if memory else None
    return StepStats(
        median_s=statistics.median(times),
        times_s=times,
        trainable_params=trainable,
        total_params=total,
        state_bytes=state,
        peak_extra_bytes=extra,
        peak_bytes=None if extra is None else state + extra,
    )


def measure_train_steps(
    builders: Mapping[str, Callable[[], nn.Module]],
    batch: Mapping[str, torch.Tensor],
    repeats: int = 5,
    warmup: int = 1,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = default_optimizer,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = default_loss,
    device: torch.device | str | None = None,
    memory: bool = True,
) -> dict[str, StepStats]:
    """Build every model, then time their training steps interleaved and measure each step's memory.

    builders: name -> zero-argument callable returning a model in train mode whose trainable
    parameters are exactly what should train (e.g. full FT, loralib, PEFT, QLoRA). The optimizer is
    built by `optimizer_factory` over the trainable parameters. `batch` is passed as `model(**batch)`
    unless `loss_fn` says otherwise. All models are alive at once, so they must fit together.
    """
    if not builders:
        raise ValueError("measure_train_steps needs at least one builder.")
    models, steps, opts = {}, {}, {}
    for name, build in builders.items():
        model = build()
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"case {name!r}: the model has no trainable parameters; nothing to step.")
        opts[name] = optimizer_factory(trainable)
        models[name] = model
        steps[name] = make_train_step(model, batch, opts[name], loss_fn)
    samples = time_interleaved_samples(steps, repeats=repeats, warmup=warmup, device=device)
    return {
        name: _step_stats(model, samples[name], steps[name], tensor_bytes(model, opts[name]), device, memory)
        for name, model in models.items()
    }


def measure_inference(
    builders: Mapping[str, Callable[[], nn.Module]],
    batch: Mapping[str, torch.Tensor],
    repeats: int = 5,
    warmup: int = 1,
    device: torch.device | str | None = None,
    memory: bool = True,
) -> dict[str, StepStats]:
    """Time `model(**batch)` under `torch.inference_mode()` in eval mode, interleaved, per builder."""
    models = {name: build().eval() for name, build in builders.items()}

    def forward(model: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                model(**batch)

        return run

    fns = {name: forward(m) for name, m in models.items()}
    samples = time_interleaved_samples(fns, repeats=repeats, warmup=warmup, device=device)
    return {
        name: _step_stats(model, samples[name], fns[name], tensor_bytes(model), device, memory)
        for name, model in models.items()
    }


def roberta_config(**overrides: Any):
    """`RobertaConfig()` (roberta-base sized: 12 layers, hidden 768, vocab 50265) with overrides."""
    from transformers import RobertaConfig

    return RobertaConfig(**overrides)


def random_batch(
    config, batch_size: int = 16, seq_len: int = 128, num_labels: int = 2, seed: int = 0, device="cpu"
) -> dict[str, torch.Tensor]:
    """Random token ids (avoiding special ids), a full attention mask and class labels."""
    if seq_len > config.max_position_embeddings - 2:
        raise ValueError(
            f"seq_len={seq_len} exceeds what the config's positions allow "
            f"({config.max_position_embeddings - 2}); use a shorter sequence."
        )
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, config.vocab_size, (batch_size, seq_len), generator=g)
    labels = torch.randint(0, num_labels, (batch_size,), generator=g)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def _roberta_classifier(config, num_labels: int, seed: int, device) -> nn.Module:
    from transformers import RobertaForSequenceClassification

    torch.manual_seed(seed)
    cfg = copy.deepcopy(config)
    cfg.num_labels = num_labels
    return RobertaForSequenceClassification(cfg).to(device).train()


def roberta_step_builders(
    config=None,
    r: int = LoraSettings.r,
    lora_alpha: float = 8,
    targets: tuple[str, ...] = ("query", "value"),
    lora_dropout: float = 0.0,
    num_labels: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    methods: Iterable[str] = STEP_METHODS,
) -> dict[str, Callable[[], nn.Module]]:
    """Builders of a randomly initialised RoBERTa classifier for "full_ft", "loralib" and "peft" (and, when
    asked for, DoRA: "loralib_dora", "peft_dora").

    The same seed gives every case identical weights. LoRA cases adapt `targets` with rank r and
    train A, B and the classification head (PEFT: task_type SEQ_CLS, which saves the head).
    """
    from loralib.injection import inject_lora, mark_only_lora_as_trainable

    config = roberta_config() if config is None else config
    methods = [m for m in methods if not m.startswith("peft") or peft_available()]

    def full_ft() -> nn.Module:
        return _roberta_classifier(config, num_labels, seed, device)

    def loralib_case() -> nn.Module:
        model = _roberta_classifier(config, num_labels, seed, device)
        inject_lora(model, list(targets), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
        return model.to(device).train()

    def peft_case(use_dora: bool = False) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = _roberta_classifier(config, num_labels, seed, device)
        cfg = LoraConfig(
            r=r,
            lora_alpha=lora_alpha,
            target_modules=list(targets),
            lora_dropout=lora_dropout,
            task_type="SEQ_CLS",
            use_dora=use_dora,
        )
        return get_peft_model(model, cfg).to(device).train()

    def dora_case() -> nn.Module:
        model = _roberta_classifier(config, num_labels, seed, device)
        inject_lora(
            model, list(targets), r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=True
        )
        mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
        return model.to(device).train()

    table = {
        "full_ft": full_ft,
        "loralib": loralib_case,
        "peft": peft_case,
        "loralib_dora": dora_case,
        "peft_dora": lambda: peft_case(use_dora=True),
    }
    unknown = set(methods) - set(table)
    if unknown:
        raise ValueError(f"unknown step methods {sorted(unknown)}; choose from {tuple(table)}.")
    return {m: table[m] for m in methods}


def roberta_inference_builders(
    config=None,
    r: int = LoraSettings.r,
    lora_alpha: float = 8,
    targets: tuple[str, ...] = ("query", "value"),
    num_labels: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> dict[str, Callable[[], nn.Module]]:
    """ "stock" (the plain model), "loralib_merged" (LoRA with non-zero B, then `merge_lora`) and
    "loralib_unmerged" (the same adapter left unmerged), for inference timing."""
    from loralib.injection import inject_lora, lora_layers, merge_lora

    config = roberta_config() if config is None else config

    def stock() -> nn.Module:
        return _roberta_classifier(config, num_labels, seed, device)

    def adapted(merge: bool) -> nn.Module:
        model = _roberta_classifier(config, num_labels, seed, device)
        inject_lora(model, list(targets), r=r, lora_alpha=lora_alpha)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
        return merge_lora(model) if merge else model

    return {
        "stock": stock,
        "loralib_merged": lambda: adapted(True),
        "loralib_unmerged": lambda: adapted(False),
    }
