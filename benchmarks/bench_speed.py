"""Speed and memory suite for LoRA: one linear layer, a RoBERTa training step, and merged inference.

Run from the repository root (the Makefile's `make bench` does exactly this):

    .venv/bin/python benchmarks/bench_speed.py --output-dir outputs/benchmarks          # ~5 minutes
    .venv/bin/python benchmarks/bench_speed.py --output-dir /tmp/bench --quick          # ~1 minute

Covers: forward + backward of one linear layer (frozen nn.Linear, loralib, PEFT, the article's
formulation, full fine-tuning) at several widths and ranks, and DoRA's (loralib's against PEFT's, beside
loralib's LoRA); a training step of a randomly initialised
roberta-base-sized classifier (full fine-tuning, loralib, PEFT, both DoRAs; r = 8 on query/value, AdamW);
inference of the stock model vs the same model with a merged (and an unmerged) loralib adapter; a
mixed batch of four named adapters against each adapter's rows alone. Every
group is timed interleaved (round-robin) in one process and reported as medians and ratios, with peak
memory per case (see `loralib.memory.peak_memory` for how CPU memory is measured).

Writes <output-dir>/bench_speed.json (results, versions, machine, threads, command),
bench_speed.png (figure) and bench_speed.md (the README table). Not here: correctness (tests/), and
absolute times, which depend on the machine: only the ratios within one run are meaningful.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import torch  # noqa: E402

from loralib.files import atomic_write  # noqa: E402
from loralib.measure.layer import DORA_METHODS, LAYER_METHODS, measure_layer  # noqa: E402
from loralib.measure.mixed import measure_mixed_batch  # noqa: E402
from loralib.measure.steps import (  # noqa: E402
    measure_inference,
    measure_train_steps,
    random_batch,
    roberta_config,
    roberta_inference_builders,
    roberta_step_builders,
)
from loralib.measure.timing import ratios  # noqa: E402
from loralib.utils import versions  # noqa: E402

MIB = 2**20
# (d, r, LoRA dropout, repeats, warmup rounds); the widest layer is slow on a CPU, so it gets fewer.
FULL_LAYERS = [
    (768, 8, 0.0, 40, 2),
    (1024, 8, 0.0, 30, 2),
    (768, 64, 0.0, 20, 2),
    (4096, 8, 0.0, 5, 1),
    (768, 8, 0.1, 30, 2),
    (1024, 8, 0.1, 20, 2),
]
QUICK_LAYERS = [(768, 8, 0.0, 12, 2), (768, 8, 0.1, 12, 2), (1024, 8, 0.0, 8, 1)]
# DoRA rows (frozen, our LoRA, our DoRA, PEFT's DoRA): d = 768 and 1024, r = 8 and 64, dropout 0 and 0.1.
FULL_DORA_LAYERS = [
    (768, 8, 0.0, 30, 2),
    (1024, 8, 0.0, 20, 2),
    (768, 64, 0.0, 20, 2),
    (1024, 64, 0.0, 15, 2),
    (768, 8, 0.1, 20, 2),
    (1024, 8, 0.1, 15, 2),
]
QUICK_DORA_LAYERS = [(768, 8, 0.0, 8, 1), (1024, 8, 0.1, 6, 1)]
# DoRA targets: our DoRA layer / PEFT's DoRA, our DoRA / our LoRA (times), and the peak memory our DoRA
# adds over our LoRA at d = 1024 (MiB): no (out x in) temporary, which alone would be 4 MiB.
DORA_TARGETS = {"dora_vs_peft_dora": 0.6, "dora_vs_lora": 1.3, "dora_extra_peak_mib": 2.0}
# Named adapters: one mixed-batch forward is no slower than running each adapter's rows alone.
MIXED_TARGETS = {"mixed_vs_separate": 1.0}
# Targets (ratios within one run): layer = loralib / frozen at r = 8, d = 768 and 1024, without and
# with LoRA dropout 0.1; step = loralib / full fine-tuning; inference = merged / stock.
TARGETS = {"layer": 1.15, "layer_dropout": 1.25, "step": 0.70, "step_dropout": 0.70, "inference": 1.02}
STEP_DROPOUTS = (0.0, 0.1)


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
        f"d={row['d']}\nr={row['r']}" + (f"\np={row['lora_dropout']:g}" if row["lora_dropout"] else "")
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


def run_layers(layers, tokens: int, log, device: str = "cpu", dora: bool = False) -> list[dict]:
    rows = []
    for d, r, p, repeats, warmup in layers:
        methods = DORA_METHODS if dora else LAYER_METHODS if p == 0 else ("frozen", "loralib", "peft")
        t0 = time.perf_counter()
        res = measure_layer(
            d=d,
            r=r,
            tokens=tokens,
            lora_dropout=p,
            methods=methods,
            repeats=repeats,
            warmup=warmup,
            device=device,
        )
        row = res.to_dict()
        rows.append(row)
        shown = ", ".join(f"{m} {v:.3f}x" for m, v in row["ratio"].items())
        log(
            f"layer d={d} r={r} p={p:g}: frozen {row['median_s']['frozen'] * 1e3:.1f} ms; {shown} "
            f"({time.perf_counter() - t0:.0f} s)"
        )
    return rows


def run_model(quick: bool, log, device: str = "cpu") -> tuple[dict, dict]:
    cfg_overrides = {"num_hidden_layers": 2} if quick else {}
    cfg = roberta_config(**cfg_overrides)
    batch_size, seq_len = (8, 128) if quick else (16, 128)
    repeats = 3 if quick else 4
    batch = random_batch(cfg, batch_size=batch_size, seq_len=seq_len, device=device)
    settings = {
        "config": "RobertaConfig()" + (f" with {cfg_overrides}" if cfg_overrides else ""),
        "model": "RobertaForSequenceClassification (random weights, 2 labels)",
        "batch": [batch_size, seq_len],
        "r": 8,
        "lora_alpha": 8,
        "targets": ["query", "value"],
        "trainable_in_lora_cases": "A, B and the classification head",
        "optimizer": "AdamW(lr=1e-4, weight_decay=0.01)",
        "repeats": repeats,
        "warmup": 1,
    }
    t0 = time.perf_counter()
    # Both LoRA dropouts in one interleaved run: "loralib" / "peft" without, "loralib_dropout" /
    # "peft_dropout" with p = 0.1 (the recipe's default); full fine-tuning has no LoRA dropout.
    builders = roberta_step_builders(cfg, r=8, lora_alpha=8, device=device)
    builders.update(
        roberta_step_builders(cfg, r=8, lora_alpha=8, methods=("loralib_dora", "peft_dora"), device=device)
    )
    for name, build in roberta_step_builders(
        cfg,
        r=8,
        lora_alpha=8,
        lora_dropout=0.1,
        methods=("loralib", "peft", "loralib_dora", "peft_dora"),
        device=device,
    ).items():
        builders[f"{name}_dropout"] = build
    stats = measure_train_steps(builders, batch, repeats=repeats, warmup=1, device=device)
    med = {k: v.median_s for k, v in stats.items()}
    step = {
        **settings,
        "lora_dropout": {k: (0.1 if k.endswith("_dropout") else 0.0) for k in med},
        "cases": {k: v.to_dict() for k, v in stats.items()},
        "ratio": ratios(med, "full_ft"),
    }
    log(
        "train step: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms ({step['ratio'][k]:.3f}x)" for k, v in med.items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )
    del stats, builders
    t0 = time.perf_counter()
    # Inference uses a smaller batch so that many more interleaved repeats fit: the target (1.02x)
    # is tighter than the step's, so it needs the lower noise more than the larger batch.
    inf_batch, inf_repeats = (2, 12) if quick else (2, 20)
    inputs = {
        k: v
        for k, v in random_batch(cfg, batch_size=inf_batch, seq_len=seq_len, seed=1, device=device).items()
        if k != "labels"
    }
    inf_stats = measure_inference(
        roberta_inference_builders(cfg, r=8, lora_alpha=8, device=device),
        inputs,
        repeats=inf_repeats,
        warmup=1,
        device=device,
    )
    med = {k: v.median_s for k, v in inf_stats.items()}
    inference = {
        **{k: settings[k] for k in ("config", "model", "r", "targets")},
        "batch": [inf_batch, seq_len],
        "mode": "eval, torch.inference_mode()",
        "repeats": inf_repeats,
        "cases": {k: v.to_dict() for k, v in inf_stats.items()},
        "ratio": ratios(med, "stock"),
    }
    log(
        "inference: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms ({inference['ratio'][k]:.3f}x)" for k, v in med.items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )
    return step, inference


def check_targets(results: dict) -> dict:
    out = {}
    for row in results["layer"]:
        if row["r"] == 8 and row["d"] in (768, 1024) and row["lora_dropout"] in (0.0, 0.1):
            target = TARGETS["layer_dropout" if row["lora_dropout"] else "layer"]
            where = f"layer d={row['d']} r=8" + (
                f" dropout {row['lora_dropout']:g}" if row["lora_dropout"] else ""
            )
            out[f"{where}: loralib/frozen <= {target}"] = {
                "value": row["ratio"]["loralib"],
                "ok": row["ratio"]["loralib"] <= target,
            }
            if "peft" in row["ratio"]:
                out[f"{where}: loralib <= peft"] = {
                    "value": row["ratio"]["loralib"] / row["ratio"]["peft"],
                    "ok": row["ratio"]["loralib"] <= row["ratio"]["peft"],
                }
    step = results.get("model_step")
    if step:
        for suffix, target in (("", TARGETS["step"]), ("_dropout", TARGETS["step_dropout"])):
            if f"loralib{suffix}" not in step["ratio"]:
                continue
            v = step["ratio"][f"loralib{suffix}"]
            what = "train step" + (" dropout 0.1" if suffix else "")
            out[f"{what}: loralib/full_ft <= {target}"] = {"value": v, "ok": v <= target}
            if f"peft{suffix}" in step["ratio"]:
                out[f"{what}: loralib <= peft"] = {
                    "value": v / step["ratio"][f"peft{suffix}"],
                    "ok": v <= step["ratio"][f"peft{suffix}"],
                }
        inf = results["inference"]["ratio"]["loralib_merged"]
        out[f"inference: merged/stock <= {TARGETS['inference']}"] = {
            "value": inf,
            "ok": inf <= TARGETS["inference"],
        }
    return out


def check_dora_targets(results: dict) -> dict:
    """DoRA's targets (`DORA_TARGETS`) per row of results["dora_layer"] and for the model step."""
    out = {}
    t = DORA_TARGETS
    for row in results.get("dora_layer", []):
        rt, pk = row["ratio"], row["peak_bytes"]
        where = f"DoRA layer d={row['d']} r={row['r']}" + (
            f" dropout {row['lora_dropout']:g}" if row["lora_dropout"] else ""
        )
        if "peft_dora" in rt:
            v = rt["dora"] / rt["peft_dora"]
            out[f"{where}: dora/peft_dora <= {t['dora_vs_peft_dora']}"] = {
                "value": v,
                "ok": v <= t["dora_vs_peft_dora"],
            }
        v = rt["dora"] / rt["loralib"]
        out[f"{where}: dora/loralib <= {t['dora_vs_lora']}"] = {"value": v, "ok": v <= t["dora_vs_lora"]}
        if row["d"] == 1024 and pk:
            extra = (pk["dora"] - pk["loralib"]) / MIB
            out[f"{where}: dora peak - loralib peak <= {t['dora_extra_peak_mib']} MiB"] = {
                "value": extra,
                "ok": extra <= t["dora_extra_peak_mib"],
            }
    step = results.get("model_step")
    if step:
        for suffix in ("", "_dropout"):
            rt = step["ratio"]
            if f"loralib_dora{suffix}" in rt and f"peft_dora{suffix}" in rt:
                v = rt[f"loralib_dora{suffix}"] / rt[f"peft_dora{suffix}"]
                what = "train step" + (" dropout 0.1" if suffix else "")
                out[f"{what}: loralib_dora <= peft_dora"] = {"value": v, "ok": v <= 1.0}
    return out


def _dora_markdown(results: dict) -> list[str]:
    rows = results.get("dora_layer", [])
    if not rows:
        return []
    lines = [
        "",
        "| DoRA, forward + backward, one linear layer (time / frozen `nn.Linear`) | loralib LoRA | loralib DoRA "
        "| PEFT DoRA | DoRA / PEFT DoRA | DoRA / LoRA | peak MiB: LoRA / DoRA / PEFT DoRA |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rt, pk = row["ratio"], row["peak_bytes"]
        name = f"d = {row['d']}, r = {row['r']}" + (
            f", dropout {row['lora_dropout']:g}" if row["lora_dropout"] else ""
        )
        peft_cell = f"{rt['peft_dora']:.2f}x" if "peft_dora" in rt else "–"
        vs_peft = f"{rt['dora'] / rt['peft_dora']:.2f}" if "peft_dora" in rt else "–"
        lines.append(
            f"| {name} | {rt['loralib']:.2f}x | {rt['dora']:.2f}x | {peft_cell} | {vs_peft} | "
            f"{rt['dora'] / rt['loralib']:.2f} | "
            + " / ".join(_mib(pk.get(k)) for k in ("loralib", "dora", "peft_dora"))
            + " |"
        )
    return lines


def _mib(b) -> str:
    return "–" if b is None else f"{b / MIB:,.1f}"


def run_mixed(quick: bool, log, device: str = "cpu") -> dict:
    """A mixed batch of 4 named adapters against each adapter's rows alone (`loralib.measure.mixed`)."""
    t0 = time.perf_counter()
    overrides = {"num_hidden_layers": 2} if quick else {}
    mixed = measure_mixed_batch(
        roberta_config(**overrides),
        adapters=4,
        batch_size=16,
        seq_len=128,
        repeats=6 if quick else 10,
        device=device,
    )
    mixed["config"] = "RobertaConfig()" + (f" with {overrides}" if overrides else "")
    log(
        "mixed batch: "
        + ", ".join(f"{k} {v * 1e3:.0f} ms ({mixed['ratio'][k]:.3f}x)" for k, v in mixed["median_s"].items())
        + f" ({time.perf_counter() - t0:.0f} s)"
    )
    return mixed


def check_mixed_targets(results: dict) -> dict:
    mixed = results.get("mixed_batch")
    if not mixed:
        return {}
    v, t = mixed["ratio"]["mixed"], MIXED_TARGETS["mixed_vs_separate"]
    return {f"mixed batch of {mixed['adapters']} adapters: mixed/separate <= {t}": {"value": v, "ok": v <= t}}


def _mixed_markdown(results: dict) -> list[str]:
    mixed = results.get("mixed_batch")
    if not mixed:
        return []
    b = mixed["batch"]
    cols = ("mixed", "separate", "single")
    return [
        "",
        f"| {mixed['config']}, eval, batch {b[0]} x {b[1]}, {mixed['adapters']} named adapters (r = {mixed['r']}, "
        "query/value) | one mixed forward | each adapter's rows alone | one adapter, whole batch |",
        "|---|---|---|---|",
        "| time / separate | " + " | ".join(f"{mixed['ratio'][k]:.3f}x" for k in cols) + " |",
    ]


def markdown(results: dict) -> str:
    """The README table: ratios (medians, interleaved) and peak memory, with command and machine."""
    m = results["machine"]
    lines = [
        f"Measured with `{results['command']}` on "
        + (f"{m['cuda']} (CUDA), " if results.get("device") == "cuda" else "")
        + f"{m['cpu']} ({m['cpu_count']} cores, "
        f"torch {results['versions'].get('torch')}, {results['threads']} threads, fp32, "
        f"load average {m['loadavg']} at start){' — QUICK MODE, smoke numbers only' if results['quick'] else ''}.",
        "",
        "| Forward + backward, one linear layer (time / frozen `nn.Linear`) | loralib | PEFT | article (`query(x) + F.linear(x, B @ A)`) | full FT |",
        "|---|---|---|---|---|",
    ]
    for row in results["layer"]:
        rt = row["ratio"]
        name = f"d = {row['d']}, r = {row['r']}" + (
            f", dropout {row['lora_dropout']:g}" if row["lora_dropout"] else ""
        )
        name += f", {row['tokens']} tokens"
        cells = [f"{rt[k]:.2f}x" if k in rt else "–" for k in ("loralib", "peft", "article", "full_ft")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| Peak memory above the start, one layer (MiB) | frozen | loralib | PEFT | article | full FT |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["layer"]:
        pk = row["peak_bytes"]
        name = f"d = {row['d']}, r = {row['r']}" + (
            f", dropout {row['lora_dropout']:g}" if row["lora_dropout"] else ""
        )
        lines.append(
            f"| {name} | "
            + " | ".join(_mib(pk.get(k)) for k in ("frozen", "loralib", "peft", "article", "full_ft"))
            + " |"
        )
    step = results.get("model_step")
    if step:
        cases = step["cases"]
        b = step["batch"]
        cols = tuple(cases)

        def row(label: str, cell) -> str:
            return f"| {label} | " + " | ".join(cell(k) if k in cases else "–" for k in cols) + " |"

        lines += [
            "",
            f"| {step['config']}, batch {b[0]} x {b[1]}, LoRA r = {step['r']} on query/value, AdamW | "
            + " | ".join(cols)
            + " |",
            "|---" * (len(cols) + 1) + "|",
            row("training step, time / full FT", lambda k: f"{step['ratio'][k]:.2f}x"),
            row("training step, median seconds", lambda k: f"{cases[k]['median_s']:.2f}"),
            row("trainable parameters", lambda k: f"{cases[k]['trainable_params']:,}"),
            row("params + optimizer state (MiB)", lambda k: _mib(cases[k]["state_bytes"])),
            row("peak memory during a step (MiB)", lambda k: _mib(cases[k]["peak_bytes"])),
        ]
        inf = results["inference"]
        lines += [
            "",
            f"| Inference, batch {inf['batch'][0]} x {inf['batch'][1]} | stock | loralib merged | loralib unmerged |",
            "|---|---|---|---|",
            "| time / stock | "
            + " | ".join(f"{inf['ratio'][k]:.3f}x" for k in ("stock", "loralib_merged", "loralib_unmerged"))
            + " |",
        ]
    lines += _dora_markdown(results)
    lines += _mixed_markdown(results)
    if results.get("targets"):
        lines += ["", "| Target | measured | met |", "|---|---|---|"]
        for k, v in results["targets"].items():
            lines.append(f"| {k} | {v['value']:.3f} | {'yes' if v['ok'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default="outputs/benchmarks", help="where the JSON, PNG and MD go")
    parser.add_argument("--quick", action="store_true", help="two layer shapes and a 2-layer model (~1 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per layer call (default 2048)")
    parser.add_argument("--skip-model", action="store_true", help="layer benchmarks only")
    parser.add_argument(
        "--device", default="cpu", choices=("cpu", "cuda"), help="where to measure (default cpu)"
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(
        shlex.quote(a) for a in [".venv/bin/python", "benchmarks/bench_speed.py", *(argv or sys.argv[1:])]
    )
    started = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {msg}", flush=True)

    results: dict = {
        "command": command,
        "quick": args.quick,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "versions": versions(),
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "device": args.device,
        "dtype": "float32",
        "timing": "interleaved round-robin repetitions, medians; ratios within one run",
        "memory": "peak_memory(): CPU = torch.profiler allocator events (tensor memory only); "
        "CUDA = torch.cuda.max_memory_allocated",
    }
    log(f"machine: {results['machine']}")
    results["layer"] = run_layers(QUICK_LAYERS if args.quick else FULL_LAYERS, args.tokens, log, args.device)
    results["dora_layer"] = run_layers(
        QUICK_DORA_LAYERS if args.quick else FULL_DORA_LAYERS, args.tokens, log, args.device, dora=True
    )
    if not args.skip_model:
        results["model_step"], results["inference"] = run_model(args.quick, log, args.device)
        results["mixed_batch"] = run_mixed(args.quick, log, args.device)
    results["target_values"] = {**TARGETS, **DORA_TARGETS, **MIXED_TARGETS}
    results["targets"] = {
        **check_targets(results),
        **check_dora_targets(results),
        **check_mixed_targets(results),
    }
    results["loadavg_end"] = machine_info()["loadavg"]
    results["wall_s"] = round(time.perf_counter() - started, 1)

    json_path, png_path, md_path = (
        out_dir / "bench_speed.json",
        out_dir / "bench_speed.png",
        out_dir / "bench_speed.md",
    )

    def write_json(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)

    atomic_write(json_path, write_json)
    fig = plot_benchmark(results)
    atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    table = markdown(results)
    atomic_write(md_path, lambda tmp: Path(tmp).write_text(table))
    print()
    print(table)
    log(f"wrote {json_path}, {png_path}, {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
