"""Measure what LoRA costs: interleaved timings, peak memory, and the cases the speed suite compares.

Covers:
- `time_interleaved` / `time_interleaved_samples`: run several callables round-robin and take medians,
  so a noisy, shared machine slows every case alike and the *ratios* stay meaningful.
- `peak_memory`: the peak number of bytes a callable allocates above what was allocated when it
  started. CUDA reads `torch.cuda.max_memory_allocated`; CPU replays the allocation and free events
  that `torch.profiler` (profile_memory=True) records from PyTorch's CPU allocator and takes the
  running maximum. The CPU figure therefore counts tensor memory only (not MKL/oneDNN scratch buffers
  or Python objects), and frees of tensors that existed before the call are not seen, so keep the
  measured callable self-contained (it should leave the state it found, e.g. gradients set to None).
- `tensor_bytes` (unique storages of modules, optimizers, tensors) and `saved_tensor_bytes` (what
  autograd keeps for backward).
- References: `article_lora_linear` / `naive_lora_forward` (the seed article's formulation, which
  materialises W + s B @ A on every call) next to `LoraLinear`'s fused path.
- Cases: `layer_cases` (frozen linear, loralib, PEFT, article, full fine-tuning), generic training-step
  measurement (`make_train_step`, `measure_train_steps`, `measure_train_step`), RoBERTa builders
  (`roberta_step_builders`, `roberta_inference_builders`, `random_batch`) and `measure_inference`.
- `compare_forward_costs` (a few seconds; notebook 03's naive-vs-efficient teaching point) with
  `plot_forward_costs`, `plot_benchmark` for the suite's figure, and `machine_info`.

Not here: the command-line suite and its results file (benchmarks/bench_speed.py), the layer itself
(`loralib.layers`). Timings are never asserted in tests: only ratios measured in one run mean anything.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralib.layers import LoraLinear

LAYER_METHODS = ("frozen", "loralib", "peft", "article", "full_ft")
STEP_METHODS = ("full_ft", "loralib", "peft")


# --------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device | str | None) -> None:
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_interleaved_samples(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Wall-clock seconds of every call of every callable, run round-robin `repeats` times.

    Each round starts at a different case (a rotation), so no case always runs right after the same
    neighbour; `warmup` untimed rounds come first. On CUDA pass `device` so each call is synchronised.
    """
    if not fns:
        raise ValueError("time_interleaved needs at least one callable, got an empty mapping.")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}.")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            _sync(device)
            t0 = time.perf_counter()
            fns[name]()
            _sync(device)
            samples[name].append(time.perf_counter() - t0)
    return samples


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]],
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Median seconds per call of each callable, measured interleaved (see `time_interleaved_samples`)."""
    samples = time_interleaved_samples(fns, repeats=repeats, warmup=warmup, device=device)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def ratios(medians: Mapping[str, float], reference: str) -> dict[str, float]:
    """Each median divided by the reference case's median (1.0 for the reference itself)."""
    if reference not in medians:
        raise KeyError(f"reference case {reference!r} is not among the measured cases {list(medians)}.")
    ref = medians[reference]
    return {name: value / ref for name, value in medians.items()}


# --------------------------------------------------------------------------------------------- memory
def _cpu_peak_bytes(fn: Callable[[], Any]) -> int:
    try:
        from torch._C._profiler import _EventType
        from torch.profiler import ProfilerActivity, profile
    except ImportError as e:  # pragma: no cover - depends on the torch build
        raise RuntimeError(
            f"peak_memory on CPU needs torch.profiler with memory events ({e}); use a CUDA device or a "
            "newer torch."
        ) from e
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            alloc = node.typed[1]
            if alloc.device.type == "cpu":
                events.append((node.start_time_ns, alloc.alloc_size))
        stack.extend(node.children)
    events.sort()
    level = peak = 0
    for _, size in events:
        level += size
        peak = max(peak, level)
    return peak


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes `fn()` allocates above the amount allocated when it starts (device: "cpu"/"cuda").

    CUDA: `max_memory_allocated() - memory_allocated()` around the call. CPU: the running maximum
    of allocation minus free events recorded by `torch.profiler` (tensor memory from PyTorch's CPU
    allocator only; see the module docstring for what that does not count).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        start = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize(dev)
        return max(0, torch.cuda.max_memory_allocated(dev) - start)
    if dev.type != "cpu":
        raise ValueError(f"peak_memory supports 'cpu' and 'cuda' devices, got {dev}.")
    return _cpu_peak_bytes(fn)


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.grad is not None:
            yield obj.grad
    elif isinstance(obj, nn.Module):
        for p in obj.parameters():
            yield from _tensors_in(p)
        yield from obj.buffers()
    elif isinstance(obj, torch.optim.Optimizer):
        for state in obj.state.values():
            yield from _tensors_in(state)
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def tensor_bytes(*objects: Any) -> int:
    """Bytes held by the tensors in modules (parameters, their gradients, buffers), optimizers (state),
    tensors and mappings/lists of them, counting each underlying storage once."""
    seen: dict[tuple[str, int], int] = {}
    for obj in objects:
        for t in _tensors_in(obj):
            if t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def saved_tensor_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while `fn()` runs (unique storages), leaving
    out those sharing storage with `exclude` (e.g. the parameters, which exist anyway)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in excluded:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


# ----------------------------------------------------------------------------------------- references
def article_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The seed article's LoRA linear: build W + s * B @ A (out x in) on every call, then one matmul.

    Autograd through it computes the full (out x in) gradient of that matrix and only then projects
    it onto A and B, which is why it trains at about the cost of full fine-tuning.
    """
    return F.linear(x, weight + scaling * (lora_B @ lora_A), bias)


def naive_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """`article_lora_linear` applied to a `LoraLinear`'s own tensors (no dropout; for comparisons)."""
    if not isinstance(layer, LoraLinear):
        raise TypeError(f"naive_lora_forward expects a LoraLinear, got {type(layer).__name__}.")
    if layer.merged:
        raise ValueError(
            "the layer is merged: its weight already contains B @ A; call layer.unmerge() first."
        )
    return article_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)


# ---------------------------------------------------------------------------------------- layer cases
def _peft_linear(base: nn.Linear, r: int, alpha: float, dropout: float) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
    return PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=alpha)


def peft_available() -> bool:
    """Whether PEFT is importable (its cases are skipped, not failed, without it)."""
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class LayerVariant:
    """One way of computing the layer: `forward(x)` and the parameters it trains."""

    forward: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]


def layer_variants(
    d: int = 768,
    r: int = 8,
    d_out: int | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, LayerVariant]:
    """The layer (d -> d_out) in each method, all built from the same frozen W, b and the same A, B.

    Methods: "frozen" (nn.Linear with frozen weight and bias), "loralib" (`LoraLinear`), "peft"
    (peft.tuners.lora.Linear, left out when PEFT is missing), "article" (`article_lora_linear`) and
    "full_ft" (nn.Linear with everything trainable). B is non-zero, so the LoRA variants compute
    the same function as each other (and differ from "frozen"). Modules are in training mode.
    """
    d_out = d if d_out is None else d_out
    alpha = float(r if alpha is None else alpha)
    methods = list(methods)
    unknown = set(methods) - set(LAYER_METHODS)
    if unknown:
        raise ValueError(f"unknown layer methods {sorted(unknown)}; choose from {LAYER_METHODS}.")
    methods = [m for m in methods if m != "peft" or peft_available()]
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d, generator=g) / math.sqrt(d))
        base.bias.copy_(torch.randn(d_out, generator=g) * 0.01)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    A = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(device=device, dtype=dtype)
    B = (torch.randn(d_out, r, generator=g) / math.sqrt(r)).to(device=device, dtype=dtype)
    out: dict[str, LayerVariant] = {}
    for method in methods:
        if method == "frozen":
            out[method] = LayerVariant(base, [])
        elif method == "loralib":
            layer = LoraLinear.from_linear(copy.deepcopy(base), r=r, alpha=alpha, dropout=dropout).train()
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            out[method] = LayerVariant(layer, [layer.lora_A, layer.lora_B])
        elif method == "peft":
            layer = (
                _peft_linear(copy.deepcopy(base), r, alpha, dropout).to(device=device, dtype=dtype).train()
            )
            pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            with torch.no_grad():
                pa.copy_(A)
                pb.copy_(B)
            out[method] = LayerVariant(layer, [pa, pb])
        elif method == "article":
            lora_A, lora_B = nn.Parameter(A.clone()), nn.Parameter(B.clone())
            w, b, s = base.weight, base.bias, alpha / r

            def article(t, w=w, b=b, a=lora_A, bb=lora_B, s=s):
                return article_lora_linear(t, w, b, a, bb, s)

            out[method] = LayerVariant(article, [lora_A, lora_B])
        else:  # full_ft
            full = copy.deepcopy(base).requires_grad_(True)
            out[method] = LayerVariant(full, [full.weight, full.bias])
    return out


def layer_cases(
    d: int = 768,
    r: int = 8,
    tokens: int = 2048,
    d_out: int | None = None,
    alpha: float | None = None,
    dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Callable[[], None]]:
    """Forward + backward closures over `layer_variants` for a (tokens x d) input, one per method.

    The input requires grad (as inside a model), the upstream gradient is fixed, and each call sets
    the gradients back to None, as a training step would, so every call does the same work.
    """
    variants = layer_variants(d, r, d_out, alpha, dropout, methods, device, dtype, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, d, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(tokens, d if d_out is None else d_out, generator=g).to(device=device, dtype=dtype)

    def closure(v: LayerVariant) -> Callable[[], None]:
        def run() -> None:
            v.forward(x).backward(dy)
            x.grad = None
            for p in v.params:
                p.grad = None

        return run

    return {name: closure(v) for name, v in variants.items()}


@dataclass
class LayerResult:
    """One layer configuration, per method: median seconds, ratio to the frozen linear (or the first
    method), every timed sample, and the peak bytes allocated during one forward + backward."""

    d: int
    d_out: int
    r: int
    tokens: int
    dropout: float
    repeats: int
    median_s: dict[str, float]
    ratio: dict[str, float]
    peak_bytes: dict[str, int]
    samples_s: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_layer(
    d: int = 768,
    r: int = 8,
    tokens: int = 2048,
    d_out: int | None = None,
    dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory: bool = True,
) -> LayerResult:
    """Time (interleaved) and measure peak memory of every `layer_cases` method for one shape."""
    cases = layer_cases(
        d, r, tokens, d_out=d_out, dropout=dropout, methods=methods, device=device, dtype=dtype
    )
    samples = time_interleaved_samples(cases, repeats=repeats, warmup=warmup, device=device)
    med = {name: statistics.median(ts) for name, ts in samples.items()}
    ref = "frozen" if "frozen" in med else next(iter(med))
    peaks = {name: peak_memory(fn, device) for name, fn in cases.items()} if memory else {}
    return LayerResult(
        d=d,
        d_out=d if d_out is None else d_out,
        r=r,
        tokens=tokens,
        dropout=dropout,
        repeats=repeats,
        median_s=med,
        ratio=ratios(med, ref),
        peak_bytes=peaks,
        samples_s=samples,
    )


# ------------------------------------------------------------------------------------ training steps
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


def _param_counts(model: nn.Module) -> tuple[int, int]:
    ps = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in ps if p.requires_grad), sum(p.numel() for p in ps)


def _step_stats(
    model: nn.Module,
    times: list[float],
    fn: Callable[[], Any],
    state: int,
    device: torch.device | str | None,
    memory: bool,
) -> StepStats:
    """Summarise one interleaved case: timing samples, parameter counts, state and peak memory of `fn`."""
    trainable, total = _param_counts(model)
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


def measure_train_step(
    build_model: Callable[[], nn.Module],
    batch: Mapping[str, torch.Tensor],
    steps: int = 5,
    optimizer_factory: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] = default_optimizer,
    warmup: int = 1,
    loss_fn: Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor] = default_loss,
    device: torch.device | str | None = None,
    memory: bool = True,
) -> StepStats:
    """One case of `measure_train_steps`. Compare cases with `measure_train_steps` instead: separate
    runs on a shared machine are not comparable, interleaved ones are."""
    return measure_train_steps(
        {"case": build_model},
        batch,
        repeats=steps,
        warmup=warmup,
        optimizer_factory=optimizer_factory,
        loss_fn=loss_fn,
        device=device,
        memory=memory,
    )["case"]


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


# ---------------------------------------------------------------------------------- RoBERTa builders
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
    r: int = 8,
    alpha: float = 8,
    targets: tuple[str, ...] = ("query", "value"),
    dropout: float = 0.0,
    num_labels: int = 2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    methods: Iterable[str] = STEP_METHODS,
) -> dict[str, Callable[[], nn.Module]]:
    """Builders of a randomly initialised RoBERTa classifier for "full_ft", "loralib" and "peft".

    The same seed gives every case identical weights. LoRA cases adapt `targets` with rank r and
    train A, B and the classification head (PEFT: task_type SEQ_CLS, which saves the head).
    """
    from loralib.injection import inject_lora, mark_only_lora_as_trainable

    config = roberta_config() if config is None else config
    methods = [m for m in methods if m != "peft" or peft_available()]

    def full_ft() -> nn.Module:
        return _roberta_classifier(config, num_labels, seed, device)

    def loralib_case() -> nn.Module:
        model = _roberta_classifier(config, num_labels, seed, device)
        inject_lora(model, list(targets), r=r, alpha=alpha, dropout=dropout)
        mark_only_lora_as_trainable(model, modules_to_save=["classifier"])
        return model.to(device).train()

    def peft_case() -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model = _roberta_classifier(config, num_labels, seed, device)
        cfg = LoraConfig(
            r=r, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, task_type="SEQ_CLS"
        )
        return get_peft_model(model, cfg).to(device).train()

    table = {"full_ft": full_ft, "loralib": loralib_case, "peft": peft_case}
    unknown = set(methods) - set(table)
    if unknown:
        raise ValueError(f"unknown step methods {sorted(unknown)}; choose from {tuple(table)}.")
    return {m: table[m] for m in methods}


def roberta_inference_builders(
    config=None,
    r: int = 8,
    alpha: float = 8,
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
        inject_lora(model, list(targets), r=r, alpha=alpha)
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


# ------------------------------------------------------------------------------ notebook 03's example
def compare_forward_costs(
    d: int = 768, r: int = 8, tokens: int = 2048, repeats: int = 5, warmup: int = 1, seed: int = 0
) -> dict[str, Any]:
    """Naive (materialise B @ A every call) vs efficient (`LoraLinear`) LoRA against the frozen linear.

    Returns a dict with, per method ("frozen", "naive", "efficient"): `forward_s` (no-grad forward
    medians), `train_s` (forward + backward medians, input requiring grad), the ratios of both to
    "frozen", `forward_flops` (multiply-adds x 2 of the forward), `saved_bytes` (activations autograd
    keeps for backward, parameters excluded), plus `max_abs_diff` between the naive and efficient
    outputs and the settings (d, r, tokens, threads, device). CPU, fp32; a few seconds at the defaults.
    """
    torch.manual_seed(seed)
    base = nn.Linear(d, d).requires_grad_(False)
    layer = LoraLinear.from_linear(copy.deepcopy(base), r=r)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 1.0 / math.sqrt(r))
    x = torch.randn(tokens, d, requires_grad=True)
    dy = torch.randn(tokens, d)
    forwards = {"frozen": base, "naive": lambda t: naive_lora_forward(layer, t), "efficient": layer}
    params = [layer.lora_A, layer.lora_B]

    def no_grad(f):
        def run():
            with torch.no_grad():
                f(x)

        return run

    def train(f):
        def run():
            f(x).backward(dy)
            x.grad = None
            for p in params:
                p.grad = None

        return run

    fwd = time_interleaved({k: no_grad(f) for k, f in forwards.items()}, repeats=repeats, warmup=warmup)
    trn = time_interleaved({k: train(f) for k, f in forwards.items()}, repeats=repeats, warmup=warmup)
    exclude = [base.weight, base.bias, layer.weight, layer.bias, *params, x]
    saved = {k: saved_tensor_bytes(lambda f=f: f(x), exclude=exclude) for k, f in forwards.items()}
    with torch.no_grad():
        diff = (naive_lora_forward(layer, x) - layer(x)).abs().max().item()
    base_flops = 2 * tokens * d * d
    return {
        "d": d,
        "r": r,
        "tokens": tokens,
        "threads": torch.get_num_threads(),
        "device": "cpu",
        "methods": list(forwards),
        "forward_s": fwd,
        "forward_ratio": ratios(fwd, "frozen"),
        "train_s": trn,
        "train_ratio": ratios(trn, "frozen"),
        "forward_flops": {
            "frozen": base_flops,
            "naive": base_flops + 2 * d * r * d + d * d,
            "efficient": base_flops + 2 * tokens * r * (d + d) + tokens * d,
        },
        "saved_bytes": saved,
        "max_abs_diff": diff,
    }


# ---------------------------------------------------------------------------------------------- plots
def plot_forward_costs(costs: Mapping[str, Any], path: str | os.PathLike | None = None):
    """Bar charts of `compare_forward_costs`: time ratios (forward, forward + backward) and saved memory."""
    import matplotlib.pyplot as plt

    methods = costs["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    xs = range(len(methods))
    w = 0.38
    ax = axes[0]
    bars = ax.bar([i - w / 2 for i in xs], [costs["forward_ratio"][m] for m in methods], w, label="forward")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    bars = ax.bar(
        [i + w / 2 for i in xs], [costs["train_ratio"][m] for m in methods], w, label="forward + backward"
    )
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("time / frozen linear")
    ax.set_title(f"d={costs['d']}, r={costs['r']}, {costs['tokens']} tokens")
    ax.legend(fontsize=8)
    ax = axes[1]
    bars = ax.bar(list(xs), [costs["saved_bytes"][m] / 2**20 for m in methods], color="tab:green")
    ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(list(xs), methods)
    ax.set_ylabel("MiB saved for backward")
    ax.set_title("activations kept by autograd")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def plot_benchmark(results: Mapping[str, Any], path: str | os.PathLike | None = None):
    """The speed suite's figure from its results dict: layer ratios, model-step ratios, peak memory."""
    import matplotlib.pyplot as plt

    layers = results.get("layer", [])
    step = results.get("model_step", {}).get("cases", {})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    ax = axes[0]
    methods = [m for m in LAYER_METHODS if any(m in row["ratio"] for row in layers)]
    w = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        vals = [row["ratio"].get(m, float("nan")) for row in layers]
        bars = ax.bar([i + (j - (len(methods) - 1) / 2) * w for i in range(len(layers))], vals, w, label=m)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    labels = [
        f"d={row['d']}\nr={row['r']}" + (f"\np={row['dropout']:g}" if row["dropout"] else "")
        for row in layers
    ]
    ax.set_xticks(range(len(layers)), labels, fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    targets = results.get("target_values", {})
    for key, style in (("layer", ":"), ("layer_dropout", "-.")):
        if key in targets:
            what = "with dropout" if key.endswith("dropout") else "no dropout"
            ax.axhline(
                targets[key], color="tab:red", lw=0.8, ls=style, label=f"target {targets[key]:g}x ({what})"
            )
    top = max([v for row in layers for v in row["ratio"].values()] + [1.2])
    ax.set_ylim(0, top * 1.25)
    ax.set_ylabel("forward + backward time / frozen nn.Linear")
    ax.set_title(f"one linear layer, {layers[0]['tokens'] if layers else '?'} tokens")
    ax.legend(fontsize=7, ncol=3, loc="upper left")
    ax = axes[1]
    names = list(step)
    if names:
        ref = step["full_ft"]["median_s"] if "full_ft" in step else step[names[0]]["median_s"]
        bars = ax.bar(names, [step[n]["median_s"] / ref for n in names], color="tab:purple")
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
        if "step" in targets:
            ax.axhline(targets["step"], color="tab:red", lw=0.8, ls=":", label=f"target {targets['step']:g}x")
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
        ax.axhline(2 / 3, color="grey", lw=0.8, ls="--", label="floor 2/3")
        ax.set_ylim(0, 1.25)
        ax.legend(fontsize=7, loc="upper right")
    ax.set_ylabel("training step time / full fine-tuning")
    ax.set_title("RoBERTa training step")
    ax = axes[2]
    if names and step[names[0]].get("peak_bytes") is not None:
        state = [step[n]["state_bytes"] / 2**20 for n in names]
        extra = [step[n]["peak_extra_bytes"] / 2**20 for n in names]
        ax.bar(names, state, label="params + optimizer state")
        ax.bar(names, extra, bottom=state, label="peak during step")
        ax.legend(fontsize=7)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    ax.set_ylabel("MiB")
    ax.set_title("peak memory per training step")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


# -------------------------------------------------------------------------------------------- machine
def machine_info() -> dict[str, Any]:
    """Where a measurement ran: OS, CPU model, cores, torch threads, load average, memory, GPU."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["loadavg"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["loadavg"] = None
    try:
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["memory_gib"] = None
    return info
