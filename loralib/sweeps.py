"""Many small LoRA fine-tuning runs of one classifier on one task, each cached: the runs notebook 07 compares.

`Sweep(model_id, task)` tokenises the task's data once; `sweep.run(r=..., target_modules=..., ...)` trains
a fresh copy of the pretrained model with that LoRA setup (a plain PyTorch loop: AdamW, linear decay, the
task head trained too) and returns a `RunResult` with the validation accuracy and loss, the training
losses, the parameter counts, the time it took and every layer's (W, dW, A) for `loralib.analysis` (for a
full fine-tuning run, W and dW = trained - pretrained of the layers `target_modules` names). The same setup
asked twice is trained once.

Covers: `RunSpec` (one run's settings, PEFT's names), `RunResult`, `Sweep`, `budget_rank` (the rank that
gives a set of targets a parameter budget). Not here: the benchmark's Trainer runs (`loralib.benchmark`),
the measures themselves (`loralib.analysis`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralib.checks import check_alpha, check_bool, check_int, check_names, check_number, check_rank
from loralib.config import LoraSettings


@dataclass(frozen=True)
class RunSpec:
    """One run: LoRA's settings (PEFT's names) and the optimiser's.

    lora_alpha None means lora_alpha = r (scaling 1, the recipe). loraplus_lr_ratio: B's learning rate over
    A's (LoRA+; None: one rate).
    """

    r: int = LoraSettings.r
    target_modules: tuple[str, ...] | str = ("query", "value")
    lora_alpha: float | None = None
    use_rslora: bool = False
    use_dora: bool = False
    # Full fine-tuning instead of LoRA (the LoRA fields are then unused): every weight of the model trains.
    full_finetune: bool = False
    # Record DoRA's (delta M, delta D) of the layers named here (full names) every `trace_every` steps.
    trace: tuple[str, ...] = ()
    trace_every: int = 4
    learning_rate: float = 1e-3
    loraplus_lr_ratio: float | None = None
    epochs: int = 2
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.target_modules, str):  # a str is a regex or "all-linear", as for inject_lora
            object.__setattr__(
                self, "target_modules", tuple(check_names(self.target_modules, "target_modules"))
            )
        check_rank(self.r)
        check_alpha(self.lora_alpha, "lora_alpha")
        check_bool(self.use_rslora, "use_rslora")
        check_bool(self.use_dora, "use_dora")
        check_bool(self.full_finetune, "full_finetune")
        object.__setattr__(self, "trace", tuple(check_names(self.trace, "trace")))
        check_int(self.trace_every, "trace_every", 1)
        check_number(self.learning_rate, "learning_rate", positive=True)
        if self.loraplus_lr_ratio is not None:
            check_number(self.loraplus_lr_ratio, "loraplus_lr_ratio", positive=True)
        check_int(self.epochs, "epochs", 1)
        check_int(self.batch_size, "batch_size", 1)
        check_int(self.seed, "seed", 0)


@dataclass
class RunResult:
    spec: RunSpec
    accuracy: float
    eval_loss: float
    train_losses: list[float]
    lora_parameters: int
    trained_parameters: int
    seconds: float
    updates: dict[str, dict[str, torch.Tensor]] = field(repr=False)
    # layer name -> [(step, delta M, delta D)] for the layers in spec.trace (`loralib.analysis.magnitude_direction`)
    trace: dict[str, list[tuple[int, float, float]]] = field(default_factory=dict, repr=False)

    def row(self) -> dict[str, Any]:
        """The run as a flat table row (settings, then results)."""
        spec = asdict(self.spec)
        targets = self.spec.target_modules
        spec["target_modules"] = targets if isinstance(targets, str) else "+".join(targets)
        return {
            **spec,
            "accuracy": round(self.accuracy, 4),
            "eval_loss": round(self.eval_loss, 4),
            "lora_parameters": self.lora_parameters,
            "seconds": round(self.seconds, 1),
        }


def _effective_weight(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight a Linear (or a LoRA / DoRA Linear) computes with, a float64 copy."""
    from loralib.layers import LoraLayer

    w = module.effective_weight() if isinstance(module, LoraLayer) else module.weight.detach()
    return w.to(torch.float64, copy=True)  # a copy: a fully fine-tuned weight changes in place


def budget_rank(model: nn.Module, target_modules: Sequence[str] | str, budget: int) -> tuple[int, int]:
    """(r, parameters): the rank whose LoRA on `target_modules` comes nearest to `budget` parameters (at
    least 1; a tie goes to the smaller), counted as r x (in + out) per matched Linear."""
    from loralib.injection import find_targets

    check_int(budget, "budget", 1, hint="A parameter count, e.g. 73728.")
    modules = dict(model.named_modules())
    per_rank = sum(
        modules[n].in_features + modules[n].out_features for n in find_targets(model, target_modules)
    )
    if per_rank == 0:
        raise ValueError(f"target_modules={list(target_modules)!r} matched no Linear layer.")
    low = max(1, budget // per_rank)
    r = low if abs(low * per_rank - budget) <= abs((low + 1) * per_rank - budget) else low + 1
    return r, r * per_rank


class Sweep:
    """The cached runs of one pretrained classifier on one GLUE task (default: bundled SST-2).

    model_id: hub id or directory of a pretrained encoder. data_dir: "bundled", a folder, or None (the
    hub). max_train / max_eval: rows used (evenly spread subsets). max_length: tokens per sentence.
    device: where the runs train (default CUDA when available, else CPU), in fp32.
    """

    def __init__(
        self,
        model_id: str,
        task: str = "sst2",
        data_dir: str | None = "bundled",
        max_train: int | None = None,
        max_eval: int | None = None,
        max_length: int = 64,
        device: str | torch.device | None = None,
    ) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from loralib.data import get_task, load_glue, subset_rows, tokenize_glue

        for name, value in (("max_train", max_train), ("max_eval", max_eval)):
            if value is not None:
                check_int(value, name, 1, hint="A row count, or None for every row.")
        check_int(max_length, "max_length", 2)
        spec = get_task(task)
        if spec.is_qa or spec.is_regression:
            raise ValueError(f"Sweep trains classifiers; {task!r} is not a GLUE classification task.")
        from loralib.utils import default_device

        self.model_id, self.task, self.num_labels = model_id, task, spec.num_labels
        self.device = torch.device(device) if device is not None else default_device()
        data = load_glue(task, data_dir=data_dir)
        tok = AutoTokenizer.from_pretrained(model_id)
        self.tokenizer = tok
        train = subset_rows(data[spec.train_split], max_train)
        evals = subset_rows(data[spec.eval_splits[0]], max_eval)
        self.train = tokenize_glue(train, tok, task, max_length=max_length)
        self.eval = tokenize_glue(evals, tok, task, max_length=max_length)
        self._base = AutoModelForSequenceClassification.from_pretrained(model_id, num_labels=spec.num_labels)
        self._base.requires_grad_(False)
        self._base.to(self.device)
        self.results: dict[RunSpec, RunResult] = {}

    def base_model(self) -> nn.Module:
        """A fresh copy of the pretrained model (its head random, as from_pretrained leaves it)."""
        return copy.deepcopy(self._base)

    def _batches(self, ds, batch_size: int, generator: torch.Generator | None):
        order = (
            torch.randperm(len(ds), generator=generator) if generator is not None else torch.arange(len(ds))
        )
        for start in range(0, len(ds), batch_size):
            rows = ds[order[start : start + batch_size].tolist()]
            enc = self.tokenizer.pad(
                {"input_ids": rows["input_ids"], "attention_mask": rows["attention_mask"]},
                return_tensors="pt",
            )  # to the batch's longest row, as DataCollatorWithPadding
            labels = torch.as_tensor(rows["labels"])
            yield (
                enc["input_ids"].to(self.device),
                enc["attention_mask"].to(self.device),
                labels.to(self.device),
            )

    def run(self, spec: RunSpec | None = None, **changes: Any) -> RunResult:
        """Train (or fetch from the cache) the run `spec` with `changes` applied (any RunSpec field)."""
        from loralib import optim
        from loralib.analysis import adapter_updates, magnitude_direction
        from loralib.injection import inject_lora, mark_only_lora_as_trainable
        from loralib.utils import set_seed

        spec = replace(spec or RunSpec(), **changes)
        if spec in self.results:
            return self.results[spec]
        t0 = time.perf_counter()
        set_seed(spec.seed)
        model = self.base_model()
        with torch.no_grad():  # a head of this seed's own
            head = model.classifier
            for m in head.modules():
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)
        if spec.full_finetune:
            model.requires_grad_(True)
        else:
            inject_lora(
                model, spec.target_modules, r=spec.r, lora_alpha=spec.lora_alpha, use_rslora=spec.use_rslora,
                use_dora=spec.use_dora,
            )  # fmt: skip
            mark_only_lora_as_trainable(model, bias="none", modules_to_save=["classifier"])
        opt = optim.make_optimizer(model, spec.learning_rate, spec.loraplus_lr_ratio, weight_decay=0.0)
        modules = dict(model.named_modules())
        w0 = {name: _effective_weight(modules[name]) for name in spec.trace}
        trace: dict[str, list[tuple[int, float, float]]] = {name: [] for name in spec.trace}
        steps = spec.epochs * math.ceil(len(self.train) / spec.batch_size)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / steps)
        g = torch.Generator().manual_seed(spec.seed)
        losses = []
        model.train()
        for _ in range(spec.epochs):
            for ids, mask, labels in self._batches(self.train, spec.batch_size, g):
                loss = F.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if spec.trace and len(losses) % spec.trace_every == 0:
                    for name in spec.trace:
                        dm, dd = magnitude_direction(w0[name], _effective_weight(modules[name]))
                        trace[name].append((len(losses), dm, dd))
        accuracy, eval_loss = self.evaluate(model)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        updates = self._full_updates(model, spec) if spec.full_finetune else adapter_updates(model)
        result = RunResult(
            spec, accuracy, eval_loss, losses, lora, trained, time.perf_counter() - t0, updates, trace
        )
        self.results[spec] = result
        return result

    def _full_updates(self, model: nn.Module, spec: RunSpec) -> dict[str, dict[str, torch.Tensor]]:
        """A fully fine-tuned run's {"W": the pretrained weight, "dW": trained minus pretrained} (float64, CPU)
        for the Linear layers `spec.target_modules` names: the same matrices a LoRA run of that spec adapts."""
        from loralib.injection import find_targets

        base, trained = dict(self._base.named_modules()), dict(model.named_modules())
        out = {}
        for name in find_targets(self._base, spec.target_modules):
            w0 = base[name].weight.detach().to("cpu", torch.float64)
            out[name] = {"W": w0, "dW": trained[name].weight.detach().to("cpu", torch.float64) - w0}
        return out

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> tuple[float, float]:
        """(accuracy, mean cross-entropy) on the validation rows."""
        model.eval()
        correct, loss, n = 0, 0.0, 0
        for ids, mask, labels in self._batches(self.eval, 64, None):
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            n += len(labels)
        return correct / n, loss / n
