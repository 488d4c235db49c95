"""One linear layer, computed every way the speed suite compares, and notebook 03's cost demo.

Covers: the seed article's formulation (`article_lora_linear`, `naive_lora_forward`: the frozen layer's
output plus `F.linear(x, B @ A)`, the (out x in) matrix built and multiplied on every call), `layer_variants` / `layer_cases` (frozen nn.Linear, loralib, PEFT,
article, full fine-tuning, all from the same weights), `measure_layer` (interleaved timing and peak
memory of one shape), and `plain_lora_forward`, `compare_forward_costs` / `plot_forward_costs` (notebook
03's three-way cost comparison). Not here:
whole training steps (`loralib.measure.steps`), the layer itself (`loralib.layers`).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loralib.config import LoraSettings
from loralib.layers import LoraLinear
from loralib.measure.memory import peak_memory, saved_tensor_bytes
from loralib.measure.timing import ratios, time_interleaved, time_interleaved_samples

LAYER_METHODS = ("frozen", "loralib", "peft", "article", "full_ft")
DORA_METHODS = ("frozen", "loralib", "dora", "peft_dora")  # the DoRA rows: our LoRA, our DoRA, PEFT's DoRA
ALL_METHODS = (*LAYER_METHODS, "dora", "peft_dora")


def article_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """The seed article's LoRA linear as its code has it: `self.query(x) + F.linear(x, B @ A)`.

    The frozen layer's output plus a second full-size product with the (out x in) matrix B @ A built on
    every call (its code scales by 1: `scaling` generalises it). The forward does the frozen layer's
    matmul twice over; autograd computes the full (out x in) gradient of B @ A and only then projects it
    onto A and B, so it also trains at about the cost of full fine-tuning.
    """
    return F.linear(x, weight, bias) + F.linear(x, scaling * (lora_B @ lora_A))


def naive_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """`article_lora_linear` applied to a `LoraLinear`'s own tensors (no dropout; for comparisons)."""
    if not isinstance(layer, LoraLinear):
        raise TypeError(f"naive_lora_forward expects a LoraLinear, got {type(layer).__name__}.")
    if layer.merged:
        raise ValueError(
            "the layer is merged: its weight already contains B @ A; call layer.unmerge() first."
        )
    return article_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)


def _peft_linear(
    base: nn.Linear, r: int, lora_alpha: float, lora_dropout: float, use_dora: bool = False
) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora import Linear as PeftLoraLinear

    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, use_dora=use_dora)
    return PeftLoraLinear(base, "default", config=config, r=r, lora_alpha=lora_alpha, use_dora=use_dora)


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
    r: int = LoraSettings.r,
    d_out: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, LayerVariant]:
    """The layer (d -> d_out) in each method, all built from the same frozen W, b and the same A, B.

    Methods: "frozen" (nn.Linear with frozen weight and bias), "loralib" (`LoraLinear`), "peft"
    (peft.tuners.lora.Linear, left out when PEFT is missing), "article" (`article_lora_linear`),
    "full_ft" (nn.Linear with everything trainable), and DoRA: "dora" (`LoraLinear(use_dora=True)`) and
    "peft_dora" (PEFT's, same A, B and magnitude). B is non-zero, so the LoRA variants compute the same
    function as each other (and differ from "frozen"); so do the two DoRA ones. Modules are in training mode.
    """
    d_out = d if d_out is None else d_out
    alpha = float(r if lora_alpha is None else lora_alpha)
    methods = list(methods)
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        raise ValueError(f"unknown layer methods {sorted(unknown)}; choose from {ALL_METHODS}.")
    methods = [m for m in methods if not m.startswith("peft") or peft_available()]
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(d, d_out)
    with torch.no_grad():
        base.weight.copy_(torch.randn(d_out, d, generator=g) / math.sqrt(d))
        base.bias.copy_(torch.randn(d_out, generator=g) * 0.01)
    base = base.to(device=device, dtype=dtype).requires_grad_(False)
    A = (torch.randn(r, d, generator=g) / math.sqrt(d)).to(device=device, dtype=dtype)
    B = (torch.randn(d_out, r, generator=g) / math.sqrt(r)).to(device=device, dtype=dtype)
    # DoRA's magnitude: a trained-looking one (g != 1), the same for both DoRA variants
    m_scale = (1 + 0.1 * torch.rand(d_out, generator=g)).to(device=device, dtype=dtype)
    out: dict[str, LayerVariant] = {}
    for method in methods:
        if method == "frozen":
            out[method] = LayerVariant(base, [])
        elif method == "loralib":
            layer = LoraLinear.from_linear(
                copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=lora_dropout
            ).train()
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
            out[method] = LayerVariant(layer, [layer.lora_A, layer.lora_B])
        elif method == "dora":
            layer = LoraLinear.from_linear(
                copy.deepcopy(base), r=r, lora_alpha=alpha, lora_dropout=lora_dropout, use_dora=True
            ).train()
            with torch.no_grad():
                layer.lora_A.copy_(A)
                layer.lora_B.copy_(B)
                layer.lora_magnitude_vector.mul_(m_scale)
            out[method] = LayerVariant(layer, [layer.lora_A, layer.lora_B, layer.lora_magnitude_vector])
        elif method == "peft_dora":
            layer = (
                _peft_linear(copy.deepcopy(base), r, alpha, lora_dropout, use_dora=True)
                .to(device=device, dtype=dtype)
                .train()
            )
            pa, pb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            pm = layer.lora_magnitude_vector["default"].weight
            with torch.no_grad():
                pa.copy_(A)
                pb.copy_(B)
                pm.copy_(torch.linalg.vector_norm(base.weight + (alpha / r) * (B @ A), dim=1) * m_scale)
            out[method] = LayerVariant(layer, [pa, pb, pm])
        elif method == "peft":
            layer = (
                _peft_linear(copy.deepcopy(base), r, alpha, lora_dropout)
                .to(device=device, dtype=dtype)
                .train()
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
    r: int = LoraSettings.r,
    tokens: int = 2048,
    d_out: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Callable[[], None]]:
    """Forward + backward closures over `layer_variants` for a (tokens x d) input, one per method.

    The input requires grad (as inside a model), the upstream gradient is fixed, and each call sets
    the gradients back to None, as a training step would, so every call does the same work.
    """
    variants = layer_variants(d, r, d_out, lora_alpha, lora_dropout, methods, device, dtype, seed)
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
    lora_dropout: float
    repeats: int
    median_s: dict[str, float]
    ratio: dict[str, float]
    peak_bytes: dict[str, int]
    samples_s: dict[str, list[float]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def measure_layer(
    d: int = 768,
    r: int = LoraSettings.r,
    tokens: int = 2048,
    d_out: int | None = None,
    lora_dropout: float = 0.0,
    methods: Iterable[str] = LAYER_METHODS,
    repeats: int = 20,
    warmup: int = 3,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    memory: bool = True,
) -> LayerResult:
    """Time (interleaved) and measure peak memory of every `layer_cases` method for one shape."""
    cases = layer_cases(
        d, r, tokens, d_out=d_out, lora_dropout=lora_dropout, methods=methods, device=device, dtype=dtype
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
        lora_dropout=lora_dropout,
        repeats=repeats,
        median_s=med,
        ratio=ratios(med, ref),
        peak_bytes=peaks,
        samples_s=samples,
    )


def plain_lora_forward(layer: LoraLinear, x: torch.Tensor) -> torch.Tensor:
    """LoRA written as ordinary autograd sees it: x W^T + b + s (dropout(x) A^T) B^T, two thin matmuls.

    It never builds B @ A, and the frozen W gets no gradient either (it does not require one); what it
    pays against `LoraLinear`'s hand-written backward is extra passes over (tokens x d) tensors: the
    scaling multiply, the sum of the two output paths, the sum of the two input-gradient paths, and,
    with dropout, an fp32 copy of the dropped input kept for the backward.
    """
    if not isinstance(layer, LoraLinear):
        raise TypeError(f"plain_lora_forward expects a LoraLinear, got {type(layer).__name__}.")
    dropped = layer.lora_dropout(x)  # nn.Dropout, or nn.Identity when p = 0
    return (
        F.linear(x, layer.weight, layer.bias)
        + F.linear(F.linear(dropped, layer.lora_A), layer.lora_B) * layer.scaling
    )


def compare_forward_costs(
    d: int = 768,
    r: int = LoraSettings.r,
    tokens: int = 2048,
    repeats: int = 5,
    warmup: int = 1,
    seed: int = 0,
    plain: Callable[[LoraLinear], Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Three ways to compute one LoRA layer, against the frozen linear it adapts.

    Methods: "frozen" (the plain nn.Linear), "article" (`article_lora_linear`: the frozen output plus a
    second product with B @ A built on every call, the seed article's code), "plain autograd" (two thin matmuls, ordinary autograd: `plain_lora_forward`, or
    `plain(layer)` if given, e.g. a notebook's own layer built from `layer`'s tensors) and "custom
    backward" (`LoraLinear` itself). Returns, per method: `forward_s` (no-grad forward medians),
    `train_s` (forward + backward medians, input requiring grad), the ratios of both to "frozen",
    `forward_flops` (multiply-adds x 2 of the forward), `saved_bytes` (activations autograd keeps for
    backward, parameters excluded), plus `max_abs_diff` (largest output difference of any method from
    the custom backward's) and the settings (d, r, tokens, threads, device). CPU, fp32, no dropout; a
    few seconds at the defaults.
    """
    torch.manual_seed(seed)
    base = nn.Linear(d, d).requires_grad_(False)
    layer = LoraLinear.from_linear(copy.deepcopy(base), r=r)
    with torch.no_grad():
        layer.lora_B.normal_(0.0, 1.0 / math.sqrt(r))
    x = torch.randn(tokens, d, requires_grad=True)
    dy = torch.randn(tokens, d)
    plain_fn = plain(layer) if plain is not None else (lambda t: plain_lora_forward(layer, t))
    forwards = {
        "frozen": base,
        "article": lambda t: naive_lora_forward(layer, t),
        "plain autograd": plain_fn,
        "custom backward": layer,
    }
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
        ref = layer(x)
        diff = max((forwards[k](x) - ref).abs().max().item() for k in ("article", "plain autograd"))
    base_flops = 2 * tokens * d * d
    low_rank = base_flops + 2 * tokens * r * (d + d) + tokens * d
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
            # B @ A (d x r x d), scaled, a second full product and the sum of the two outputs
            "article": 2 * base_flops + 2 * d * r * d + d * d + tokens * d,
            "plain autograd": low_rank,
            "custom backward": low_rank,
        },
        "saved_bytes": saved,
        "max_abs_diff": diff,
    }


def plot_forward_costs(costs: Mapping[str, Any], path: str | os.PathLike | None = None, noise: float = 0.05):
    """Bar charts of `compare_forward_costs`: time ratios (forward, forward + backward) and saved memory.

    The frozen layer is the reference line at 1.0, not a bar; the band of +-`noise` around it marks
    differences this kind of machine does not resolve between runs (a ratio inside it is not a result).
    """
    import matplotlib.pyplot as plt

    methods = [m for m in costs["methods"] if m != "frozen"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    xs = list(range(len(methods)))
    w = 0.38
    ax = axes[0]
    ax.axhspan(
        1 - noise, 1 + noise, color="grey", alpha=0.15, lw=0, label=f"frozen layer +-{noise:.0%} (noise)"
    )
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    for offset, key, label in (
        (-w / 2, "forward_ratio", "forward"),
        (w / 2, "train_ratio", "forward + backward"),
    ):
        bars = ax.bar([i + offset for i in xs], [costs[key][m] for m in methods], w, label=label)
        ax.bar_label(bars, fmt="%.2fx", fontsize=7, padding=2)
    ax.set_xticks(xs, methods)
    ax.set_ylabel("time / frozen linear")
    top = max(max(costs["forward_ratio"][m], costs["train_ratio"][m]) for m in methods)
    ax.set_ylim(0, top * 1.25)
    ax.set_title(f"d={costs['d']}, r={costs['r']}, {costs['tokens']} tokens")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    every = costs["methods"]
    bars = ax.bar(
        list(range(len(every))), [costs["saved_bytes"][m] / 2**20 for m in every], color="tab:green"
    )
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(list(range(len(every))), every)
    ax.set_ylabel("MiB saved for backward")
    ax.set_ylim(0, max(costs["saved_bytes"][m] for m in every) / 2**20 * 1.2 + 1e-3)
    ax.set_title("activations kept by autograd")
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig
