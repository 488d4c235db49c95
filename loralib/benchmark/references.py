"""Published reference numbers for RoBERTa-base + LoRA, and the table and plots that set a run beside them.

Covers: `ARTICLE` (the seed article's own run), `LORA_PAPER` (Hu et al. 2021, Table 2), `references_for`,
`results_table` / `format_table` (a run directory -> rows -> markdown), `run_label` (what a smoke or toy run
was), and the plots of notebooks 04 and 05: `plot_vs_references`, `plot_epoch_curves`,
`plot_learning_curve`, `plot_no_answer_sweep`. Not here: training (`loralib.benchmark.run`), computing
metrics (`loralib.metrics`) or the trivial baselines (`loralib.benchmark.baselines`).

Every figure is stored on the scale `loralib.metrics` returns, under its metric key, so a run's
results.json and a reference compare directly: GLUE as fractions (0.938, not 93.8), SQuAD as percentages
(79.4), as the `evaluate` library reports them.

Sources:
- ARTICLE: "Implementing LoRA from Scratch" (Martin Dittgen, Towards Data Science), the outputs stored
  in its repository: roberta-base, rank 8 on query/value (A ~ N(0,1), unscaled), biases and layer norms
  trained, batch 16, 2 warm-up + 4 epochs, lr 4e-5; validation sets, final epoch, one run. Its SQuAD v2
  numbers come from its own no-answer classifier head, not the usual null-score rule.
- LORA_PAPER: Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021), Table 2, RoBERTa-base
  with LoRA (0.3M trainable parameters): the median of 5 seeds, rank 8 on query/value, task-specific epochs
  (25 to 80) and learning rates, max length 512. MRPC and QQP are accuracy, STS-B Pearson, CoLA MCC; the
  paper's single MNLI figure ("overall (matched and mismatched) accuracy") is listed under matched. The
  paper has no SQuAD numbers for RoBERTa.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ARTICLE_SOURCE = (
    "Dittgen, 'Implementing LoRA from Scratch', repository outputs: roberta-base, validation, final epoch"
)
LORA_PAPER_SOURCE = "Hu et al. 2021, LoRA, Table 2: RoBERTa-base + LoRA (0.3M params), median of 5 seeds"

# {task: {split: {metric: value}}}; split "validation" for every task except MNLI.
ARTICLE: dict[str, dict[str, dict[str, float]]] = {
    "cola": {"validation": {"matthews_correlation": 0.568}},
    "sst2": {"validation": {"accuracy": 0.938}},
    "mrpc": {"validation": {"accuracy": 0.885, "f1": 0.917}},
    "stsb": {"validation": {"pearson": 0.808, "spearmanr": 0.817}},
    "qqp": {"validation": {"accuracy": 0.889, "f1": 0.853}},
    "mnli": {"validation_matched": {"accuracy": 0.854}, "validation_mismatched": {"accuracy": 0.859}},
    "qnli": {"validation": {"accuracy": 0.920}},
    "rte": {"validation": {"accuracy": 0.740}},
    "wnli": {"validation": {"accuracy": 0.437}},
    "squad": {"validation": {"exact_match": 79.4, "f1": 86.9}},
    "squad_v2": {"validation": {"exact": 41.2, "f1": 45.4}},
}

LORA_PAPER: dict[str, dict[str, dict[str, float]]] = {
    "mnli": {"validation_matched": {"accuracy": 0.875}},
    "sst2": {"validation": {"accuracy": 0.951}},
    "mrpc": {"validation": {"accuracy": 0.897}},
    "cola": {"validation": {"matthews_correlation": 0.634}},
    "qnli": {"validation": {"accuracy": 0.933}},
    "qqp": {"validation": {"accuracy": 0.908}},
    "rte": {"validation": {"accuracy": 0.866}},
    "stsb": {"validation": {"pearson": 0.915}},
}

REFERENCES = {"article": ARTICLE, "lora_paper": LORA_PAPER}
SOURCES = {"article": ARTICLE_SOURCE, "lora_paper": LORA_PAPER_SOURCE}
TASK_ORDER = ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "squad", "squad_v2")
# The metrics shown per task in tables and plots (GLUE as fractions, SQuAD as percentages).
SHOWN_METRICS = {
    "cola": ("matthews_correlation",),
    "sst2": ("accuracy",),
    "mrpc": ("accuracy", "f1"),
    "stsb": ("pearson", "spearmanr"),
    "qqp": ("accuracy", "f1"),
    "mnli": ("accuracy",),
    "qnli": ("accuracy",),
    "rte": ("accuracy",),
    "wnli": ("accuracy",),
    "squad": ("exact_match", "f1"),
    "squad_v2": ("exact", "f1"),
}


def references_for(task: str, split: str, metric: str) -> dict[str, float | None]:
    """{"article": value or None, "lora_paper": value or None} for one task / split / metric."""
    return {name: table.get(task, {}).get(split, {}).get(metric) for name, table in REFERENCES.items()}


def _task_dirs(results_dir: str | os.PathLike) -> list[Path]:
    root = Path(results_dir)
    if not root.is_dir():
        raise FileNotFoundError(
            f"no results directory {root}; run `python -m loralib.benchmark --task ... --output-dir {root}`."
        )
    dirs = [p for p in root.iterdir() if (p / "results.json").exists()]
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(dirs, key=lambda p: (order.get(p.name, len(order)), p.name))


def load_all_results(results_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{task: results dict} for every OUTPUT_DIR/<task>/results.json, in GLUE-then-SQuAD order."""
    from loralib.benchmark.results import read_results

    return {p.name: read_results(p) for p in _task_dirs(results_dir)}


def results_table(results_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per task, split and shown metric: the run's final value beside both references.

    Row keys: task, split, metric, value, article, lora_paper, run_kind, pretrained, profile, model_id.
    """
    rows = []
    for task, res in load_all_results(results_dir).items():
        for split, metrics in res["metrics_by_split"].items():
            for metric in SHOWN_METRICS.get(task, (res["main_metric"],)):
                if metric not in metrics:
                    continue
                rows.append(
                    {
                        "task": task,
                        "split": split,
                        "metric": metric,
                        "value": metrics[metric],
                        **references_for(task, split, metric),
                        "run_kind": res.get("run_kind", "real"),
                        "pretrained": res.get("pretrained"),
                        "profile": res.get("profile"),
                        "model_id": res.get("model_id"),
                    }
                )
    return rows


KIND_LABELS = {
    "smoke": "SMOKE RUN (tiny random model on bundled synthetic data)",
    "toy": "TOY RUN (pretrained small model on bundled synthetic data)",
}


def run_label(records: Iterable[Mapping[str, Any]]) -> str | None:
    """What the runs among `records` (results or table rows) that are not benchmark numbers were, or None
    when every one is a real run: a smoke run trained a random model (a pipeline check), a toy run a
    pretrained one on synthetic data (it shows learning)."""
    kinds = {r.get("run_kind", "real") for r in records}
    labels = [KIND_LABELS[k] for k in ("smoke", "toy") if k in kinds]
    return " and ".join(labels) or None


def is_benchmark(records: Iterable[Mapping[str, Any]]) -> bool:
    """True when every record is a real run, so its numbers may sit beside the published ones."""
    return run_label(records) is None


def _fmt(v: float | None, metric: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if metric in ("exact_match", "exact", "f1") and abs(v) > 1.5 else f"{v:.3f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of `results_table` rows. Real runs sit beside the article's and the LoRA paper's
    numbers; smoke and toy runs get a banner and no reference columns (synthetic data is not comparable)."""
    if not rows:
        return "(no finished runs)"
    lines = []
    label = run_label(rows)
    if label:
        lines.append(
            f"**{label}**: NOT benchmark numbers, so the published ones are not shown beside them.\n"
        )
        lines.append("| task | split | metric | this run |")
        lines.append("|---|---|---|---:|")
        for r in rows:
            lines.append(f"| {r['task']} | {r['split']} | {r['metric']} | {_fmt(r['value'], r['metric'])} |")
        return "\n".join(lines)
    lines.append("| task | split | metric | this run | article | LoRA paper |")
    lines.append("|---|---|---|---:|---:|---:|")
    for r in rows:
        m = r["metric"]
        lines.append(
            f"| {r['task']} | {r['split']} | {m} | {_fmt(r['value'], m)} | "
            f"{_fmt(r['article'], m)} | {_fmt(r['lora_paper'], m)} |"
        )
    lines.append(f"\nReferences: article = {ARTICLE_SOURCE}; LoRA paper = {LORA_PAPER_SOURCE}.")
    return "\n".join(lines)


def _run_title(results: dict[str, dict[str, Any]], title: str) -> str:
    label = run_label(results.values())
    if label:
        return f"{label}: not benchmark numbers\n{title}"
    profiles = sorted({str(r.get("profile")) for r in results.values()})
    return f"{title} (profile: {', '.join(profiles)})"


def plot_vs_references(results_dir: str | os.PathLike, ax=None):
    """Grouped bars per task/metric: this run, the article, the LoRA paper. Returns the Figure.

    GLUE metrics are drawn as fractions on the left axis; SQuAD is divided by 100 onto the same scale.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    rows = results_table(results_dir)
    if not rows:
        raise ValueError(f"no finished runs in {results_dir} to plot.")
    results = load_all_results(results_dir)
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4))
    else:
        fig = ax.figure
    labels, series = [], {"this run": [], "article": [], "lora_paper": []}
    for r in rows:
        scale = 0.01 if r["metric"] in ("exact_match", "exact", "f1") and r["task"].startswith("squad") else 1
        split = {"validation": "", "validation_matched": " m", "validation_mismatched": " mm"}.get(
            r["split"], f" ({r['split']})"
        )
        labels.append(f"{r['task']}{split}\n{r['metric'].replace('matthews_correlation', 'mcc')}")
        series["this run"].append(r["value"] * scale)
        series["article"].append(np.nan if r["article"] is None else r["article"] * scale)
        series["lora_paper"].append(np.nan if r["lora_paper"] is None else r["lora_paper"] * scale)
    x = np.arange(len(rows))
    width = 0.27
    real = is_benchmark(rows)
    if not real:  # synthetic data: the published numbers on the real dev sets are not comparable
        series = {"this run": series["this run"]}
    colors = {"this run": "tab:blue" if real else "tab:red"}
    names = {
        "this run": "this run",
        "article": "article (published run)",
        "lora_paper": "LoRA paper, Table 2",
    }
    for i, (key, values) in enumerate(series.items()):
        shown = not all(np.isnan(v) for v in values)  # no legend entry for a reference with no figure here
        offset = (i - 1) * width if len(series) > 1 else 0.0
        ax.bar(x + offset, values, width, label=names[key] if shown else None, color=colors.get(key))
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("score (GLUE as fraction, SQuAD / 100)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    heading = "RoBERTa + LoRA: this run vs published references" if real else "RoBERTa + LoRA: this run"
    ax.set_title(_run_title(results, heading), fontsize=10)
    fig.tight_layout()
    return fig


def plot_epoch_curves(results_dir: str | os.PathLike):
    """Per-epoch main metric (every evaluation split) and training loss for each finished task. Returns the Figure."""
    import matplotlib.pyplot as plt

    results = load_all_results(results_dir)
    if not results:
        raise ValueError(f"no finished runs in {results_dir} to plot.")
    fig, (ax_m, ax_l) = plt.subplots(1, 2, figsize=(11, 4))
    for task, res in results.items():
        metric = res["main_metric"]
        epochs = [e["epoch"] for e in res["epochs"]]
        for split in res["metrics_by_split"]:
            values = [e["metrics"][split].get(metric) for e in res["epochs"]]
            suffix = "" if split == "validation" else f" ({split.replace('validation_', '')})"
            (line,) = ax_m.plot(epochs, values, marker="o", label=f"{task}{suffix}: {metric}")
        losses = [e["train_loss"] for e in res["epochs"]]
        ax_l.plot(epochs, losses, marker="o", label=task, color=line.get_color())
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_m, ax_l):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_m.set_xlabel("epoch")
    ax_m.set_ylabel("validation metric (GLUE fraction, SQuAD %)")
    ax_m.legend(fontsize=7)
    ax_l.set_xlabel("epoch")
    losses = [e["train_loss"] for r in results.values() for e in r["epochs"] if e["train_loss"]]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 10:  # e.g. MSE (stsb) beside cross-entropy
        ax_l.set_yscale("log")
        ax_l.set_ylabel("mean training loss (log scale)")
    else:
        ax_l.set_ylabel("mean training loss")
    ax_l.legend(fontsize=7)
    fig.suptitle(_run_title(results, "per-epoch validation metric and training loss"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_learning_curve(
    results: Mapping[str, Any],
    baseline: Mapping[str, Any] | None = None,
    split: str | None = None,
    metric: str | None = None,
    ax=None,
):
    """One run's validation metric per evaluation (every epoch end, and the points within epochs and before
    training when the run made them) beside the line it must clear and the published runs.

    results: a task's results.json (dict); baseline: `loralib.benchmark.baselines` output, drawn dashed;
    the article's and the LoRA paper's values for the same task, split and metric are drawn dotted when
    they exist and the run is not a smoke run (synthetic data is not comparable with them). split / metric default to the first evaluation split and the task's main metric.
    Returns the Figure.
    """
    import matplotlib.pyplot as plt

    split = split or next(iter(results["metrics_by_split"]))
    metric = metric or results["main_metric"]
    if ax is None:
        fig, ax = plt.subplots(figsize=(7.5, 4))
    else:
        fig = ax.figure
    # Every evaluation when the run made more than the epoch ends (evals_per_epoch, eval_on_start);
    # the epoch ends are labelled with their values.
    points = results.get("evaluations") or results["epochs"]
    xs = [e["epoch"] for e in points]
    ys = [e["metrics"][split][metric] for e in points]
    ax.plot(xs, ys, marker="o", markersize=4 if len(points) > len(results["epochs"]) else 6, color="tab:blue",
            label=f"LoRA, {results['profile']} profile")  # fmt: skip
    for x, y in zip(xs, ys):
        if x == round(x):
            ax.annotate(
                f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8
            )
    if baseline is not None:
        ax.axhline(
            baseline["metrics"][split][metric], color="gray", ls="--", label=f"baseline: {baseline['name']}"
        )
    # A smoke or toy run's data is synthetic: a published number on the real dev set is not comparable.
    refs = {} if not is_benchmark([results]) else references_for(results["task"], split, metric)
    for key, name, color in (
        ("article", "article (roberta-base)", "tab:orange"),
        ("lora_paper", "LoRA paper", "tab:green"),
    ):
        if refs.get(key) is not None:
            ax.axhline(refs[key], color=color, ls=":", label=name)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{split} {metric}")
    ax.legend(fontsize=8)
    ax.set_title(_run_title({results["task"]: results}, f"{results['task']}: learning curve"), fontsize=10)
    fig.tight_layout()
    return fig


def plot_no_answer_sweep(rows: list[dict[str, Any]], run_kind: str, default_threshold: float = 0.0):
    """SQuAD v2 exact / F1 (all, answerable, unanswerable) and the abstention rate against the no-answer
    threshold (rows from `loralib.qa.no_answer_sweep`). Returns the Figure."""
    import matplotlib.pyplot as plt

    t = [r["threshold"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("f1", "-"), ("HasAns_f1", "--"), ("NoAns_f1", ":")):
        if key in rows[0]:
            ax.plot(t, [r[key] for r in rows], style, marker=".", label=key)
    ax.plot(t, [100 * r["no_answer_rate"] for r in rows], color="gray", label='% answered "" (no answer)')
    ax.axvline(
        default_threshold, color="black", linewidth=0.8, label=f"threshold used ({default_threshold:g})"
    )
    ax.set_xlabel("null score - best span score threshold")
    ax.set_ylabel("score (%)")
    ax.legend(fontsize=8)
    title = "SQuAD v2: the no-answer decision"
    label = run_label([{"run_kind": run_kind}])
    if label:
        title = f"{label}: not benchmark numbers\n{title}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
