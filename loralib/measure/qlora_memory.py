"""Memory and trainable parameters of one training step: full FT vs LoRA (loralib, PEFT) vs QLoRA.

Covers: `compare_training_memory` (notebook 06's table, on a randomly initialised RoBERTa so it runs
offline), `qlora_step_builder`, `memory_table` and `plot_memory`. Not here: building QLoRA models
(`loralib.peft_backend`), counting quantised storage (`loralib.qlora`).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loralib.config import LoraSettings
from loralib.measure.steps import measure_train_steps, random_batch, roberta_config, roberta_step_builders
from loralib.peft_backend import ARTICLE_TARGETS, build_peft_model
from loralib.qlora import logical_parameter_count, quant_state_bytes
from loralib.utils import default_device

MEMORY_CASES: dict[str, str] = {
    "full_ft": "full fine-tuning",
    "loralib": "LoRA (loralib)",
    "peft": "LoRA (PEFT)",
    "qlora": "QLoRA (PEFT, nf4 + AdamW8bit)",
}


def qlora_step_builder(
    config,
    directory: str | os.PathLike,
    r: int = LoraSettings.r,
    lora_alpha: float = 8,
    targets: Sequence[str] = ARTICLE_TARGETS,
    num_labels: int = 2,
    seed: int = 0,
    device: str | torch.device = "cpu",
):
    """A builder for `loralib.measure_train_steps`: the QLoRA twin of `roberta_step_builders`.

    The same seed gives the same random RoBERTa as `roberta_step_builders`; it is saved to `directory`
    (from_pretrained is what quantises) and loaded in 4-bit nf4 with PEFT LoRA on `targets`, dropout 0
    and the head trained, exactly the recipe of the "peft" case; the 4-bit layers compute in fp32
    like the other cases, so the comparison is about storage, not matmul precision.
    """
    from transformers import RobertaForSequenceClassification

    directory = Path(directory)

    def build() -> nn.Module:
        if not (directory / "config.json").exists():
            torch.manual_seed(seed)
            cfg = config.__class__.from_dict(config.to_dict())
            cfg.num_labels = num_labels
            RobertaForSequenceClassification(cfg).save_pretrained(str(directory))
        model = build_peft_model(
            str(directory),
            "classification",
            num_labels,
            quantize=True,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=None,
            device=device,
            dtype=torch.float32,  # the other cases compute in fp32 too: compare storage, not precision
        )
        return model.train()

    return build


def compare_training_memory(
    config=None,
    batch_size: int = 4,
    seq_len: int = 64,
    r: int = LoraSettings.r,
    lora_alpha: float = 8,
    targets: Sequence[str] = ARTICLE_TARGETS,
    repeats: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Memory and trainable parameters of one training step: full FT, LoRA (loralib), LoRA (PEFT), QLoRA.

    Uses the project's benchmark code (`loralib.measure_train_steps`) on a randomly
    initialised RoBERTa (`config`, default roberta-base sized) so it runs offline. Every case computes in
    fp32 (QLoRA dequantises its 4-bit weights to fp32). Full FT and the
    LoRA cases use torch AdamW; QLoRA uses bitsandbytes' AdamW8bit (measured in a second call, as
    the optimizer differs). Each case's `StepStats` has state_bytes (parameters, buffers, optimizer
    state and, for QLoRA, the quantisation scales, counted exactly), peak_extra_bytes (what one step
    allocates on top, from torch's allocator: torch.profiler on CPU, max_memory_allocated on CUDA)
    and peak_bytes (their sum). Returns {"cases": {name: StepStats}, "config": {...}}.
    """
    dev = torch.device(device) if device is not None else default_device()
    config = roberta_config() if config is None else config
    batch = random_batch(config, batch_size=batch_size, seq_len=seq_len, seed=seed, device=dev)
    builders = roberta_step_builders(
        config, r=r, lora_alpha=lora_alpha, targets=tuple(targets), seed=seed, device=dev
    )
    cases = measure_train_steps(builders, batch, repeats=repeats, warmup=0, device=dev)
    with tempfile.TemporaryDirectory(prefix="loralib-qlora-") as tmp:
        build = qlora_step_builder(
            config, tmp, r=r, lora_alpha=lora_alpha, targets=targets, seed=seed, device=dev
        )
        holder: dict[str, nn.Module] = {}

        def build_and_keep() -> nn.Module:
            holder["model"] = build()
            return holder["model"]

        import bitsandbytes as bnb

        q = measure_train_steps(
            {"qlora": build_and_keep},
            batch,
            repeats=repeats,
            warmup=0,
            device=dev,
            optimizer_factory=lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-4, weight_decay=0.01),
        )["qlora"]
        extra = quant_state_bytes(holder["model"])
        q.total_params = logical_parameter_count(holder["model"])
        q.state_bytes += extra
        if q.peak_bytes is not None:
            q.peak_bytes += extra
        cases["qlora"] = q
    return {
        "cases": {k: cases[k] for k in MEMORY_CASES if k in cases},
        "config": {
            "hidden_size": config.hidden_size,
            "num_hidden_layers": config.num_hidden_layers,
            "vocab_size": config.vocab_size,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "r": r,
            "lora_alpha": lora_alpha,
            "targets": list(targets),
            "device": str(dev),
            "peak_extra_source": "cuda_max_memory_allocated"
            if dev.type == "cuda"
            else "torch_profiler_cpu_allocator",
        },
    }


def memory_table(result: dict[str, Any]) -> str:
    """`compare_training_memory`'s result as an aligned text table (MiB, trainable parameters)."""
    mib = 2**20
    rows = [f"{'case':<32} {'trainable':>12} {'total':>12} {'state MiB':>10} {'step MiB':>9} {'peak MiB':>9}"]
    for name, s in result["cases"].items():
        rows.append(
            f"{MEMORY_CASES[name]:<32} {s.trainable_params:>12,} {s.total_params:>12,} {s.state_bytes / mib:>10.1f} "
            f"{(s.peak_extra_bytes or 0) / mib:>9.1f} {(s.peak_bytes or s.state_bytes) / mib:>9.1f}"
        )
    return "\n".join(rows)


def plot_memory(result: dict[str, Any], path: str | os.PathLike | None = None):
    """Stacked bars (state vs. what a step adds) per case, trainable parameters on a log axis beside."""
    import matplotlib.pyplot as plt

    cases = result["cases"]
    labels = [MEMORY_CASES[k] for k in cases]
    state = [s.state_bytes / 2**20 for s in cases.values()]
    step = [(s.peak_extra_bytes or 0) / 2**20 for s in cases.values()]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    y = range(len(labels))
    ax.barh(y, state, color="#4c72b0", label="params + buffers + optimizer state")
    ax.barh(y, step, left=state, color="#dd8452", label="allocated during a step")
    for i, (a, b) in enumerate(zip(state, step)):
        ax.text(a + b, i, f" {a + b:,.0f}", va="center", fontsize=9)
    ax.set_yticks(list(y), labels)
    ax.invert_yaxis()
    ax.set_xlabel("MiB")
    c = result["config"]
    ax.set_title(
        f"peak memory of one training step ({c['num_hidden_layers']} layers, hidden {c['hidden_size']}, {c['device']})"
    )
    ax.legend(loc="lower right", fontsize=8)
    trainable = [s.trainable_params for s in cases.values()]
    ax2.barh(y, trainable, color="#55a868")
    ax2.set_xscale("log")
    ax2.set_xlim(1e4, max(trainable) * 30)  # log bars need a floor well below the smallest count
    for i, s in enumerate(cases.values()):
        ax2.text(
            s.trainable_params,
            i,
            f" {s.trainable_params:,} ({100 * s.trainable_params / s.total_params:.1f}%)",
            va="center",
            fontsize=9,
        )
    ax2.set_yticks(list(y), [])
    ax2.invert_yaxis()
    ax2.set_xlabel("trainable parameters (log)")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
