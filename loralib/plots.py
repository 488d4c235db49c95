"""Matplotlib figures for the teaching notebooks: low-rank spectra, parameter budgets, update sizes, losses.

Every helper draws on a new Figure (or on `ax` when given) and returns the Figure; none calls
`plt.show()`, so notebooks display it inline and save it with `fig.savefig(...)`. The helpers only
draw: the numbers come from the caller (a notebook computes them with torch and asserts them).
Not here: benchmark tables and reference-comparison plots (`loralib.benchmark.references`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _fig_ax(ax: Axes | None, figsize: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize)
    return fig, ax


def singular_values(matrix: torch.Tensor) -> np.ndarray:
    """Singular values of a 2-D tensor, largest first, as float64 NumPy (for plotting and asserting)."""
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}.")
    return torch.linalg.svdvals(matrix.detach().double().cpu()).numpy()


def plot_singular_values(
    matrices: Mapping[str, torch.Tensor | np.ndarray] | torch.Tensor,
    rank: int | None = None,
    top: int | None = None,
    ax: Axes | None = None,
    title: str = "Singular values",
) -> Figure:
    """Singular values (log scale) of one or more matrices, e.g. a LoRA update B @ A next to a dense one.

    Each value is a 2-D matrix, or a 1-D array of singular values already computed with
    `singular_values` (an SVD of a large matrix is worth doing once). rank: draws a vertical line
    after the first `rank` values (where a rank-r update's spectrum falls off a cliff). top: show
    only the largest `top` values.
    """
    if isinstance(matrices, torch.Tensor):
        matrices = {"matrix": matrices}
    if not matrices:
        raise ValueError("pass at least one matrix to plot.")
    fig, ax = _fig_ax(ax, (7, 4))
    for label, m in matrices.items():
        s = (np.asarray(m, dtype=float) if np.ndim(m) == 1 else singular_values(m))[:top]
        # Exact zeros cannot sit on a log axis; clip at a floor well below float32 round-off.
        ax.semilogy(np.arange(1, len(s) + 1), np.maximum(s, 1e-16), marker=".", label=label)
    if rank is not None:
        ax.axvline(rank + 0.5, color="gray", linestyle="--", linewidth=1)
        ax.text(rank + 0.7, 0.5, f"r = {rank}", transform=ax.get_xaxis_transform(), color="gray")
    ax.set_xlabel("index i (largest first)")
    ax.set_ylabel("singular value $\\sigma_i$ (log)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Trainable parameters of a rank-r update of a (d_out x d_in) weight: r * (d_in + d_out)."""
    return r * (d_in + d_out)


def plot_rank_vs_params(
    d_in: int,
    d_out: int | None = None,
    ranks: Sequence[int] | None = None,
    highlight: Sequence[int] = (4, 8, 16),
    ax: Axes | None = None,
) -> Figure:
    """LoRA's trainable parameters r * (d_in + d_out) against rank, beside the full matrix's d_in * d_out.

    Log-log axes; the `highlight` ranks are annotated with their share of the full matrix, and the
    break-even rank (where LoRA stops saving anything) is marked.
    """
    d_out = d_in if d_out is None else d_out
    if ranks is None:
        ranks = [2**k for k in range(int(np.log2(min(d_in, d_out))) + 1)]
    ranks = list(ranks)
    if not ranks or min(ranks) < 1:
        raise ValueError(f"ranks must be positive integers, got {ranks}.")
    full = d_in * d_out
    fig, ax = _fig_ax(ax, (7, 4))
    lora = [lora_parameter_count(d_in, d_out, r) for r in ranks]
    ax.plot(ranks, lora, marker="o", label="LoRA: r (d_in + d_out)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(full, color="C3", linestyle="--", label=f"full update: d_in d_out = {full:,}")
    breakeven = full / (d_in + d_out)
    ax.axvline(breakeven, color="gray", linestyle=":", linewidth=1)
    ax.text(
        breakeven,
        0.3,
        f"break-even r = {breakeven:g} ",
        transform=ax.get_xaxis_transform(),
        color="gray",
        rotation=90,
        ha="right",
    )
    for r in highlight:
        n = lora_parameter_count(d_in, d_out, r)
        ax.annotate(
            f"r={r}: {n:,} ({100 * n / full:.2f}%)", (r, n), textcoords="offset points", xytext=(8, -12)
        )
    ax.set_xlabel("rank r (log)")
    ax.set_ylabel("trainable parameters (log)")
    ax.set_title(f"Parameters of one {d_out} x {d_in} update")
    ax.legend(loc="upper left")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_update_size_vs_rank(
    ranks: Sequence[int],
    sizes: Mapping[str, Sequence[float]],
    reference: float | None = None,
    reference_label: str = "target",
    ax: Axes | None = None,
    ylabel: str = "$\\|\\Delta W\\|_F$ after one step",
    title: str = "How big is the update, as r grows?",
    logy: bool = False,
) -> Figure:
    """One line per labelled series of update sizes over `ranks` (log2 x axis), e.g. with and without
    alpha/r; `reference` draws a dashed horizontal line (e.g. the size of the target update)."""
    if any(len(v) != len(ranks) for v in sizes.values()):
        raise ValueError("every series in `sizes` needs one value per rank.")
    fig, ax = _fig_ax(ax, (7, 4))
    for label, values in sizes.items():
        ax.plot(ranks, values, marker="o", label=label)
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", label=reference_label)
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xticks(list(ranks), [str(r) for r in ranks])
    ax.set_xlabel("rank r (log)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    return fig


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing mean over `window` values (shorter at the start), the same length as `values`."""
    v = np.asarray(values, dtype=float)
    if window <= 1 or len(v) == 0:
        return v
    c = np.cumsum(np.insert(v, 0, 0.0))
    idx = np.arange(1, len(v) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def plot_loss_curve(
    losses: Sequence[float] | Mapping[str, Sequence[float]],
    smooth: int = 10,
    steps_per_epoch: int | None = None,
    ax: Axes | None = None,
    title: str = "Training loss",
    logy: bool = False,
) -> Figure:
    """Per-step loss (faint) with a trailing moving average of `smooth` steps; one or several runs.

    steps_per_epoch: draws a light vertical line at each epoch boundary. logy: log-scale loss axis.
    """
    runs = {"loss": losses} if not isinstance(losses, Mapping) else dict(losses)
    if not runs or any(len(v) == 0 for v in runs.values()):
        raise ValueError("there are no losses to plot; train_steps returns one per step.")
    fig, ax = _fig_ax(ax, (7, 4))
    for i, (label, values) in enumerate(runs.items()):
        x = np.arange(1, len(values) + 1)
        if smooth > 1:
            ax.plot(x, values, color=f"C{i}", alpha=0.25, linewidth=1)
            ax.plot(
                x, moving_average(values, smooth), color=f"C{i}", label=f"{label} (mean of {smooth} steps)"
            )
        else:
            ax.plot(x, values, color=f"C{i}", label=label)
    if steps_per_epoch:
        longest = max(len(v) for v in runs.values())
        for e in range(steps_per_epoch, longest, steps_per_epoch):
            ax.axvline(e + 0.5, color="gray", alpha=0.15, linewidth=1)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log)" if logy else ""))
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


def plot_parameter_budget(
    counts: Mapping[str, int], total: int, ax: Axes | None = None, logx: bool = True
) -> Figure:
    """Horizontal bars of trainable parameters per configuration, labelled with the share of `total`.

    logx (default): a log axis, so that 0.2% and 100% are both readable on one plot.
    """
    if not counts:
        raise ValueError("pass at least one configuration's trainable-parameter count.")
    fig, ax = _fig_ax(ax, (9, 0.6 * len(counts) + 1.5))
    labels = list(counts)
    values = [counts[k] for k in labels]
    ax.barh(labels, values, color="C0")
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:,} ({100 * v / total:.2f}%)", va="center")
    if logx:
        ax.set_xscale("log")
        ax.set_xlim(max(1, min(values) / 3), max(values) * 30)
    else:
        ax.set_xlim(0, max(values) * 1.45)
    ax.set_xlabel(f"trainable parameters{' (log)' if logx else ''}; model total {total:,}")
    ax.invert_yaxis()
    ax.set_title("Trainable parameters")
    fig.tight_layout()
    return fig


def draw_lora_diagram(d_in: int = 1024, d_out: int = 1024, r: int = 4) -> Figure:
    """The LoRA layer as a picture: x feeds the frozen W0 (d_out x d_in) and the trainable bypass A (r x
    d_in) then B (d_out x r), scaled by alpha / r; the two paths add up to h. Boxes are drawn to scale in
    the rank direction (A and B thin), with every shape written on them."""
    from matplotlib.patches import FancyArrowPatch, Rectangle

    fig, ax = plt.subplots(figsize=(9, 4.6))
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 6)
    ax.axis("off")

    def box(x, y, w, h, color, label, sub):
        ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", lw=1.2, alpha=0.85))
        ax.text(x + w / 2, y + h / 2 + 0.18, label, ha="center", va="center", fontsize=12, weight="bold")
        ax.text(x + w / 2, y + h / 2 - 0.25, sub, ha="center", va="center", fontsize=9)

    def arrow(a, b, text=None):
        ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=14, lw=1.3, color="black"))
        if text:
            ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.15, text, ha="center", fontsize=9)

    ax.text(0.5, 3.0, "x", ha="center", va="center", fontsize=15, weight="bold")
    ax.text(0.5, 2.5, f"({d_in})", ha="center", fontsize=9)
    box(2.2, 3.4, 3.0, 2.0, "#c9d6e8", "W0  (frozen)", f"{d_out} x {d_in}")
    box(2.2, 0.6, 1.2, 1.6, "#f6c9a8", "A", f"{r} x {d_in}\ntrainable, random")
    box(4.0, 0.6, 1.2, 1.6, "#f6c9a8", "B", f"{d_out} x {r}\ntrainable, zeros")
    ax.add_patch(plt.Circle((7.0, 3.0), 0.32, facecolor="white", edgecolor="black", lw=1.2))
    ax.text(7.0, 3.0, "+", ha="center", va="center", fontsize=16)
    arrow((0.8, 3.1), (2.2, 4.4))
    arrow((0.8, 2.9), (2.2, 1.4))
    arrow((3.4, 1.4), (4.0, 1.4), f"({r})")
    arrow((5.2, 4.4), (6.75, 3.2), "W0 x")
    arrow((5.2, 1.4), (6.75, 2.8), "α/r · B A x")
    arrow((7.32, 3.0), (8.6, 3.0))
    ax.text(9.0, 3.0, "h", ha="center", va="center", fontsize=15, weight="bold")
    ax.text(9.0, 2.5, f"({d_out})", ha="center", fontsize=9)
    lora, full = r * (d_in + d_out), d_in * d_out
    ax.set_title(
        f"h = W0 x + (α/r) B A x: the bypass trains {lora:,} parameters instead of {full:,} "
        f"({100 * lora / full:.2f}%)",
        fontsize=11,
    )
    fig.tight_layout()
    return fig
