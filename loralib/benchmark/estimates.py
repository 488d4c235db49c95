"""How long and how much memory a benchmark task will take on a GPU, before you spend the hours.

Covers: the hub splits' sizes (`SPLIT_ROWS`), optimizer steps per task (`train_steps`), the FLOPs of a
training step and of an evaluation pass (`forward_flops_per_token`), peak training memory
(`training_memory`), device throughput (`Throughput`: `GPUS`, assumed, or `measure_throughput`, timed on
the device you have), `estimate_task` / `estimate_tasks` / `estimate_table`, and `plan_session` (which tasks one free
Colab session finishes, with a margin for the assumed throughput). `python -m
loralib.benchmark.estimates --task glue --device t4` prints the table. Not here: running a task
(`loralib.benchmark.run`), the speed suite (`benchmarks/bench_speed.py`).

How the numbers are derived (each step is tested in tests/test_04_estimates.py):

- Steps are exact: ceil(training rows / batch) x epochs, from the hub's split sizes and the recipe
  (`make_config`). SQuAD trains on 384-token windows: about 1.3% more windows than questions (train) and
  2.4% (dev), the Hugging Face course's counts for bert-base-cased at stride 128 (88,729 / 10,822);
  RoBERTa's tokenizer gives slightly different counts.
- Tokens per step are an upper bound: every row padded to `max_length` (128 GLUE, 384 SQuAD). GLUE batches
  are padded to their longest row, often far shorter, so GLUE times are upper bounds; pass
  `mean_padded_length` when you know it.
- FLOPs: 2 per multiply-add. A forward pass costs 2 x (linear-layer weights) + 4 x layers x length x
  hidden (attention scores and the weighted sum) per token. Training a LoRA model adds one backward pass
  through the frozen weights (input gradients only), so 2x the forward; full fine-tuning also computes
  weight gradients, 3x. Measured on this project's CPU (README, "Speed and memory"): a LoRA step costs
  0.61x a full fine-tuning step, against 2/3 here.
- Time = FLOPs / sustained throughput + a fixed cost per optimizer step. For the GPUs in `GPUS` both are
  ASSUMPTIONS (a share of the card's peak dense fp16/bf16 tensor throughput, and 15 ms per step for
  Python, kernel launches and the Trainer): no GPU was available to this project when they were written.
  `measure_throughput` times real steps of your model on your device and replaces both; notebooks 04 and
  05 do it for the device they run on.
- Memory: fp32 weights (4 bytes each; the Trainer keeps an fp32 model under autocast), 16-bit copies of
  the frozen linear weights kept for the backward (2 bytes), gradients and AdamW's two moments of the
  trained tensors (12 bytes), activations by Korthikanti et al. (2022, eq. 2: s b h (34 + 5 a s / h)
  bytes per layer for 16-bit activations; doubled for fp32), and 0.5 GiB of CUDA context. On this
  project's CPU the fp32 activation term is within 0.8-1.1x of the measured peak (the test checks it).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

# Rows of the hub's splits (train, then every evaluation split the benchmark scores).
SPLIT_ROWS: dict[str, tuple[int, tuple[int, ...]]] = {
    "cola": (8_551, (1_043,)),
    "sst2": (67_349, (872,)),
    "mrpc": (3_668, (408,)),
    "stsb": (5_749, (1_500,)),
    "qqp": (363_846, (40_430,)),
    "mnli": (392_702, (9_815, 9_832)),
    "qnli": (104_743, (5_463,)),
    "rte": (2_490, (277,)),
    "wnli": (635, (71,)),
    "squad": (87_599, (10_570,)),
    "squad_v2": (130_319, (11_873,)),
}
# Windows per question at 384 / 128 (see the module docstring).
QA_WINDOWS_PER_QUESTION = {"train": 88_729 / 87_599, "eval": 10_822 / 10_570}
CUDA_CONTEXT_BYTES = 0.5 * 2**30
STEP_OVERHEAD_S = 0.015


@dataclass(frozen=True)
class Throughput:
    """What a device sustains: FLOPs per second plus a fixed cost per optimizer step.

    measured: True when timed on the device (`measure_throughput`), False for `GPUS`' assumptions.
    """

    name: str
    flops_per_s: float
    step_overhead_s: float
    memory_gib: float | None
    precision: str
    measured: bool
    source: str


def _gpu(name: str, peak_tflops: float, share: float, memory_gib: float, precision: str) -> Throughput:
    return Throughput(
        name,
        peak_tflops * 1e12 * share,
        STEP_OVERHEAD_S,
        memory_gib,
        precision,
        measured=False,
        source=f"assumed: {share:.0%} of {peak_tflops:g} TFLOPS peak dense {precision} + {STEP_OVERHEAD_S * 1e3:g} ms/step",
    )


# Peak dense tensor-core throughput from NVIDIA's data sheets; the sustained shares are assumptions (a
# T4 is held to 70 W and clocks down under load, hence its lower share).
GPUS: dict[str, Throughput] = {
    "t4": _gpu("T4 (Colab free)", 65.0, 0.25, 15.0, "fp16"),
    "l4": _gpu("L4", 121.0, 0.30, 22.5, "bf16"),
    "a100": _gpu("A100 40GB", 312.0, 0.35, 40.0, "bf16"),
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimates need to know about a transformer encoder."""

    layers: int
    hidden: int
    heads: int
    linear_params: int  # weights of every nn.Linear in the encoder and head (the matmuls)
    total_params: int
    lora_params: int  # A and B of the adapted layers
    trained_params: int  # lora_params + biases, layer norms and the head, as the recipe trains


def model_shape(config: Any = None, cfg: Any = None, qa: bool = False) -> ModelShape:
    """The shape of `config`'s model (a transformers config; default roberta-base's) under TrainConfig
    `cfg`'s LoRA settings (default the recipe), counted on the meta device (nothing is allocated)."""
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    from loralib.benchmark.config import TrainConfig

    if config is None:
        from transformers import RobertaConfig

        config = RobertaConfig()
    cfg = cfg if cfg is not None else TrainConfig()
    auto = AutoModelForQuestionAnswering if qa else AutoModelForSequenceClassification
    with torch.device("meta"):
        model = auto.from_config(config)
    targets = set(cfg.target_modules)
    linear = lora = trained = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_head = name.startswith(("classifier", "qa_outputs"))
        if isinstance(module, nn.Linear):
            linear += module.weight.numel()
            if leaf in targets and not is_head:
                lora += cfg.r * (module.in_features + module.out_features)
        for pname, p in module.named_parameters(recurse=False):
            if is_head or (cfg.train_biases and pname == "bias" and not isinstance(module, nn.LayerNorm)):
                trained += p.numel()
            elif cfg.train_layer_norms and isinstance(module, nn.LayerNorm):
                trained += p.numel()
    total = sum(p.numel() for p in model.parameters())
    return ModelShape(
        layers=config.num_hidden_layers,
        hidden=config.hidden_size,
        heads=config.num_attention_heads,
        linear_params=linear,
        total_params=total,
        lora_params=lora,
        trained_params=lora + trained,
    )


def forward_flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """FLOPs of one token's forward pass at sequence length `seq_len` (see the module docstring)."""
    return 2.0 * shape.linear_params + 4.0 * shape.layers * seq_len * shape.hidden


def train_steps(rows: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of `epochs` passes over `rows` rows at effective batch `batch_size` (last batch kept)."""
    return math.ceil(rows / batch_size) * epochs


def mean_padded_length(lengths: Sequence[int], batch_size: int, epochs: int = 3, seed: int = 0) -> float:
    """Mean tokens per row once each shuffled batch is padded to its longest row, as
    `DataCollatorWithPadding` does (averaged over `epochs` shuffles)."""
    if not lengths:
        raise ValueError("lengths is empty: pass the token count of every training row.")
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.as_tensor(list(lengths), dtype=torch.float64)
    padded = 0.0
    for _ in range(epochs):
        order = lengths_t[torch.randperm(len(lengths_t), generator=g)]
        for batch in order.split(batch_size):
            padded += float(batch.max()) * len(batch)
    return padded / (epochs * len(lengths_t))


def activation_bytes(shape: ModelShape, batch: int, seq_len: int, bytes_per_value: int = 2) -> float:
    """Activations kept for the backward of one step: Korthikanti et al.'s s b h (34 + 5 a s / h) per
    layer for 16-bit values, scaled by bytes_per_value / 2 (4: fp32)."""
    per_layer = seq_len * batch * shape.hidden * (34 + 5 * shape.heads * seq_len / shape.hidden)
    return shape.layers * per_layer * bytes_per_value / 2


def training_memory(
    shape: ModelShape, batch: int, seq_len: int, precision: str = "bf16", cuda: bool = True
) -> dict[str, float]:
    """Peak bytes of a LoRA training step, by part (see the module docstring); "total" sums them."""
    half = precision in ("bf16", "fp16")
    parts = {
        "weights": 4.0 * shape.total_params,
        "half_copies": 2.0 * (shape.linear_params - shape.lora_params) if half else 0.0,
        "grads_and_adam": 12.0 * shape.trained_params,
        "activations": activation_bytes(shape, batch, seq_len, 2 if half else 4),
        "cuda_context": CUDA_CONTEXT_BYTES if cuda else 0.0,
    }
    parts["total"] = sum(parts.values())
    return parts


@dataclass
class Estimate:
    """One task on one device: steps, hours of training and evaluation, peak memory and whether it fits."""

    task: str
    device: str
    measured_throughput: bool
    train_steps: int
    train_hours: float
    eval_hours: float
    peak_memory_gib: float
    fits: bool | None

    @property
    def hours(self) -> float:
        return self.train_hours + self.eval_hours

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hours": self.hours}


def estimate_task(
    task: str,
    device: str | Throughput = "t4",
    profile: str = "gpu",
    config: Any = None,
    mean_padded_length: float | None = None,
    rows: tuple[int, Sequence[int]] | None = None,
    windows_per_question: tuple[float, float] | None = None,
    **overrides: Any,
) -> Estimate:
    """Estimate `task` under `profile` (plus TrainConfig `overrides`) on `device` (a `GPUS` key or a
    `Throughput`), for `config`'s model (default roberta-base's shape).

    rows: (training rows, evaluation rows per split) when the data is not the hub's (default `SPLIT_ROWS`;
    the profile's max_train_samples / max_eval_samples still apply). mean_padded_length: GLUE tokens per
    row after padding (`mean_padded_length(...)`; default the upper bound max_length).
    windows_per_question: SQuAD windows per question (train, eval) at the profile's window length and
    stride (default `QA_WINDOWS_PER_QUESTION`, measured at 384 / 128).
    """
    from loralib.benchmark.config import is_qa, make_config, task_spec

    task_spec(task)
    thr = _throughput(device)
    cfg = make_config(task, profile, **overrides)
    qa = is_qa(task)
    shape = model_shape(config, cfg, qa=qa)
    train_rows, eval_rows = rows if rows is not None else SPLIT_ROWS[task]
    if cfg.max_train_samples:
        train_rows = min(train_rows, cfg.max_train_samples)
    eval_total = sum(min(n, cfg.max_eval_samples or n) for n in eval_rows)
    seq = cfg.qa_max_length if qa else cfg.max_length
    if qa:
        per_train, per_eval = windows_per_question or (
            QA_WINDOWS_PER_QUESTION["train"],
            QA_WINDOWS_PER_QUESTION["eval"],
        )
        train_rows = math.ceil(round(train_rows * per_train, 6))
        eval_total = math.ceil(round(eval_total * per_eval, 6))
    tokens_per_row = min(seq, mean_padded_length) if mean_padded_length and not qa else seq
    steps = train_steps(train_rows, cfg.batch_size, cfg.epochs)
    per_token = forward_flops_per_token(shape, int(tokens_per_row))
    train_s = steps * (
        cfg.batch_size * tokens_per_row * 2 * per_token / thr.flops_per_s + thr.step_overhead_s
    )
    eval_batches = math.ceil(eval_total / cfg.eval_batch_size) * cfg.epochs  # scored after every epoch
    eval_s = cfg.epochs * eval_total * tokens_per_row * per_token / thr.flops_per_s
    eval_s += eval_batches * thr.step_overhead_s
    memory = training_memory(shape, cfg.batch_size, seq, thr.precision, cuda=thr.precision != "fp32")
    gib = memory["total"] / 2**30
    return Estimate(
        task=task,
        device=thr.name,
        measured_throughput=thr.measured,
        train_steps=steps,
        train_hours=train_s / 3600,
        eval_hours=eval_s / 3600,
        peak_memory_gib=gib,
        fits=None if thr.memory_gib is None else gib <= thr.memory_gib,
    )


def estimate_tasks(
    tasks: str | Iterable[str], device: str | Throughput = "t4", profile: str = "gpu", **kwargs: Any
) -> list[Estimate]:
    """`estimate_task` for every task (groups like "glue" or "colab" expanded)."""
    from loralib.benchmark.config import resolve_tasks

    return [estimate_task(t, device, profile, **kwargs) for t in resolve_tasks(tasks)]


# What a free Colab T4 session can be counted on for. Colab caps a free session at 12 hours but ends
# them earlier when it likes (idle 90 minutes, or demand); 3 hours is what one usually gets in a go.
FREE_SESSION_HOURS = 3.0
# The T4's throughput is assumed, not measured: a plan must fit even if the card sustains half of it.
SESSION_MARGIN = 2.0


@dataclass
class SessionPlan:
    """Which tasks one session trains: `chosen` fit `hours` with `margin` x their estimate; `left` do not."""

    chosen: list[Estimate]
    left: list[Estimate]
    hours: float
    margin: float

    @property
    def tasks(self) -> list[str]:
        return [e.task for e in self.chosen]

    @property
    def estimated_hours(self) -> float:
        return sum(e.hours for e in self.chosen)

    def describe(self) -> str:
        device = self.chosen[0].device if self.chosen else (self.left[0].device if self.left else "?")
        text = (
            f"{len(self.chosen)} task(s) for one {device} session: {', '.join(self.tasks) or 'none'}; "
            f"estimated {self.estimated_hours:.2f} h, {self.margin:g}x that ({self.margin * self.estimated_hours:.2f} h) "
            f"within the {self.hours:g} h a session is counted on"
        )
        if self.left:
            text += f". Left for another session: {', '.join(e.task for e in self.left)} ({sum(e.hours for e in self.left):.2f} h)"
        return text + "."


def plan_session(
    tasks: str | Iterable[str],
    device: str | Throughput = "t4",
    profile: str = "colab",
    hours: float = FREE_SESSION_HOURS,
    margin: float = SESSION_MARGIN,
    **kwargs: Any,
) -> SessionPlan:
    """The tasks, in order, that one session of `hours` finishes even if each takes `margin` x its
    estimate (a task that does not fit is left out; a later, shorter one may still be chosen)."""
    from loralib.checks import check_number

    hours = check_number(hours, "hours", positive=True)
    margin = check_number(margin, "margin", minimum=1.0, hint="(1 trusts the estimate exactly)")
    chosen, left, used = [], [], 0.0
    for est in estimate_tasks(tasks, device, profile, **kwargs):
        if est.fits is not False and used + margin * est.hours <= hours:
            chosen.append(est)
            used += margin * est.hours
        else:
            left.append(est)
    return SessionPlan(chosen, left, hours, margin)


def estimate_table(estimates: Sequence[Estimate]) -> str:
    """Markdown: one row per estimate and a total row per device."""
    lines = [
        "| task | device | steps | train (h) | eval (h) | total (h) | peak memory (GiB) | throughput |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        how = "measured" if e.measured_throughput else "assumed"
        fits = "" if e.fits is None or e.fits else " (does not fit)"
        lines.append(
            f"| {e.task} | {e.device} | {e.train_steps:,} | {e.train_hours:.2f} | {e.eval_hours:.2f} | "
            f"{e.hours:.2f} | {e.peak_memory_gib:.1f}{fits} | {how} |"
        )
    for device in dict.fromkeys(e.device for e in estimates):
        rows = [e for e in estimates if e.device == device]
        if len(rows) > 1:
            lines.append(
                f"| **all {len(rows)}** | {device} | {sum(e.train_steps for e in rows):,} | | | "
                f"**{sum(e.hours for e in rows):.1f}** | | |"
            )
    return "\n".join(lines)


def devices_table(
    tasks: str | Iterable[str],
    devices: Sequence[str | Throughput] = ("t4", "a100"),
    profile: str = "gpu",
    **kwargs: Any,
) -> str:
    """Markdown: one row per task, hours (training + evaluation after every epoch) per device, steps and
    peak memory (the first device's precision; fp16 and bf16 need the same); a total row."""
    thr = [_throughput(d) for d in devices]
    per = {t.name: estimate_tasks(tasks, t, profile, **kwargs) for t in thr}
    first = per[thr[0].name]
    head = "| task | steps | " + " | ".join(f"{t.name} (h)" for t in thr) + " | peak memory (GiB) |"
    lines = [head, "|---" * (3 + len(thr)) + "|"]
    for i, e in enumerate(first):
        hours = " | ".join(f"{per[t.name][i].hours:.2f}" for t in thr)
        lines.append(f"| {e.task} | {e.train_steps:,} | {hours} | {e.peak_memory_gib:.1f} |")
    totals = " | ".join(f"**{sum(e.hours for e in per[t.name]):.1f}**" for t in thr)
    lines.append(f"| **all** | {sum(e.train_steps for e in first):,} | {totals} | |")
    return "\n".join(lines)


def _throughput(device: str | Throughput) -> Throughput:
    if isinstance(device, Throughput):
        return device
    if device not in GPUS:
        raise ValueError(
            f"unknown device {device!r}; choose one of {', '.join(GPUS)} or pass a Throughput "
            "(loralib.benchmark.estimates.measure_throughput times your own)."
        )
    return GPUS[device]


def measure_throughput(
    model: nn.Module,
    batch_size: int = 16,
    seq_len: int = 128,
    steps: int = 3,
    precision: str | None = None,
    name: str | None = None,
) -> Throughput:
    """Time `steps` LoRA training steps of `model` (after one warm-up step) on random tokens, on the
    model's device, and return what it sustained at that shape (step overhead included in the FLOPs rate).

    The model must be a Hugging Face sequence classifier or QA model with its trained tensors marked.
    Nothing is updated (the optimizer step, a few ms for an adapter, is left out), gradients are dropped
    and the random number generators are restored, so a run that follows is unchanged.
    """
    from loralib.utils import mixed_precision

    device = next(model.parameters()).device
    precision = precision or mixed_precision(device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    from loralib.measure.steps import random_batch

    batch = random_batch(model.config, batch_size, seq_len, device=device)
    del batch["labels"]  # the loss below needs none, and QA models take other label names
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "model has no trainable parameter, so a training step has nothing to time; mark the adapter "
            "trainable first (loralib.mark_only_lora_as_trainable) or pass the model a Trainer would train."
        )
    was_training = model.training
    model.train()
    times = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i in range(steps + 1):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = model(**batch)
                logits = out.logits if hasattr(out, "logits") else out.start_logits
                loss = logits.float().square().mean()
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:
                times.append(time.perf_counter() - t0)
            for p in params:
                p.grad = None
    model.train(was_training)
    seconds = sorted(times)[len(times) // 2]
    shape = _shape_of(model)
    flops = batch_size * seq_len * 2 * forward_flops_per_token(shape, seq_len)
    label = name or (torch.cuda.get_device_name(device) if device.type == "cuda" else "this CPU")
    memory = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
    return Throughput(
        label,
        flops / seconds,
        0.0,
        memory,
        precision,
        measured=True,
        source=f"measured: {steps} steps of batch {batch_size} x {seq_len}, {seconds * 1e3:.1f} ms/step",
    )


def _shape_of(model: nn.Module) -> ModelShape:
    cfg = model.config
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelShape(
        cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, linear, total, 0, trained
    )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--task", action="append", required=True, help="task or group (glue, squad, colab, all)")
    ap.add_argument("--device", action="append", choices=list(GPUS), help="default: every GPU in the table")
    ap.add_argument("--profile", default="gpu")
    args = ap.parse_args(argv)
    rows = [e for d in args.device or list(GPUS) for e in estimate_tasks(args.task, d, args.profile)]
    print(estimate_table(rows))
    for d in args.device or list(GPUS):
        print(f"{GPUS[d].name}: {GPUS[d].source}")


if __name__ == "__main__":
    main()
